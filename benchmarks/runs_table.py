"""Print a Markdown table of saved runs (dev metrics, time, and the flags that differ from the defaults).

    python benchmarks/runs_table.py adapters/all adapters/ablation/*
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from peft_mtl.training.config import TrainConfig

FLAG = {"lora.dropout": "--lora-dropout", "lora.rank": "--lora-rank", "lora.alpha": "--lora-alpha", "lora.targets": "--lora-targets",
        "smart.weight": "--smart-weight", "smart.bregman_mu": "--bregman-mu", "shared_adapter": "--no-shared"}


def flags(config: dict) -> str:
    default = TrainConfig().to_dict()
    out = []
    for key in ("tasks", "mode", "epochs", "steps_per_epoch", "sampling", "pooling", "lr", "lora.rank", "lora.alpha",
                "lora.targets", "lora.dropout", "smart.weight", "smart.steps", "smart.bregman_mu", "shared_adapter", "task_losses",
                "backbone_dropout", "quantize", "precision", "max_eval_examples", "max_train_examples", "keep_best",
                "init_from", "teacher", "teacher_members", "distill_weight", "distill_temperature", "seed"):
        parts = key.split(".")
        if parts[0] not in config:
            continue  # a run older than the setting: it ran with what is now the default
        value, base = config, default
        for p in parts:
            value, base = value.get(p), base.get(p)
        if key == "tasks":
            out.append(f"--tasks {','.join(value)}")
        elif key == "sampling" and len(config["tasks"]) == 1:
            continue  # a single task has nothing to sample between
        elif key in ("epochs",) or key == "sampling":
            out.append(f"--{key.replace('_', '-')} {value}")
        elif value != base:
            if key == "shared_adapter":
                if value is False:
                    out.append("--no-shared")
            else:
                out.append(f"{FLAG.get(key, '--' + key.replace('_', '-'))} {value}")
    return " ".join(out)


def main() -> None:
    print("| run | SST acc | QQP acc | STS r | overall | best epoch | train time | flags (`peft-mtl train --out RUN ...`) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for folder in sys.argv[1:]:
        m = json.loads((Path(folder) / "peft_mtl.json").read_text())
        dev = m["metrics"]["dev"]
        cell = lambda t, k: f"{dev[t][k]:.4f}" if t in dev else "—"  # noqa: E731
        overall = m["metrics"].get("overall")
        print(f"| `{folder}` | {cell('sst', 'accuracy')} | {cell('qqp', 'accuracy')} | {cell('sts', 'pearson')} | "
              f"{'—' if overall is None else f'{overall:.4f}'} | {m['metrics'].get('best_epoch')} | "
              f"{m['train_seconds'] / 60:.1f} min | `{flags(m['config'])}` |")


if __name__ == "__main__":
    main()
