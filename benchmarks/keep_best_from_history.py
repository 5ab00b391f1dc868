"""What keeping the best epoch per task (``--keep-best per-task``) gives, read from runs' histories.

Every run records each epoch's dev scores (``history`` in peft_mtl.json). The set saved with
``--keep-best overall`` scores the best epoch's overall; with ``per-task`` each task scores its
own best epoch — exactly the recorded number, since evaluation is deterministic and the saved
weights are that epoch's. So both can be read off any run, whichever way it was saved; this
script does so and writes a JSON record (mean ± sample sd over the runs given).

    python benchmarks/keep_best_from_history.py RUN [RUN ...] --json reports/keep_best.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peft_mtl.artifacts import write_json_atomic  # noqa: E402
from peft_mtl.data.tasks import get_task  # noqa: E402
from peft_mtl.data.metrics import overall_score  # noqa: E402
from peft_mtl.model.saved_sets import read_manifest  # noqa: E402


def kept_scores(history: list[dict], tasks: list[str]) -> dict:
    """Overall of the best-overall epoch, and of every task at its own best epoch."""
    primary = {t: get_task(t).primary_metric for t in tasks}
    best_overall = max(history, key=lambda e: e["overall"])
    per_task = {t: max(history, key=lambda e: e["dev"][t][primary[t]]) for t in tasks}
    dev = {t: e["dev"][t] for t, e in per_task.items()}
    return {"overall_kept": {"overall": best_overall["overall"], "epoch": best_overall["epoch"],
                             "dev": best_overall["dev"]},
            "per_task_kept": {"overall": overall_score(dev, primary), "epochs": {t: e["epoch"] for t, e in per_task.items()},
                              "dev": dev}}


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (peft_mtl.json with a history)")
    parser.add_argument("--json", default=None, help="write the record here")
    args = parser.parse_args(argv)
    runs = {}
    for folder in args.runs:
        manifest = read_manifest(Path(folder))
        scores = kept_scores(manifest["history"], manifest["tasks"])
        scores.update(seed=manifest["config"]["seed"], device=manifest.get("device"),
                      precision=manifest.get("precision"), saved_with=manifest["config"].get("keep_best", "overall"),
                      saved_overall=manifest["metrics"]["overall"])
        runs[folder] = scores
        print(f"{folder}: keep overall best {scores['overall_kept']['overall']:.4f} (epoch "
              f"{scores['overall_kept']['epoch']}) | keep per-task best {scores['per_task_kept']['overall']:.4f} "
              f"(epochs {scores['per_task_kept']['epochs']})")
    record = {"command": "python benchmarks/keep_best_from_history.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "runs": runs,
              "overall_kept": summarise([r["overall_kept"]["overall"] for r in runs.values()]),
              "per_task_kept": summarise([r["per_task_kept"]["overall"] for r in runs.values()]),
              "gain": summarise([r["per_task_kept"]["overall"] - r["overall_kept"]["overall"] for r in runs.values()])}
    print(json.dumps({k: record[k] for k in ("overall_kept", "per_task_kept", "gain")}))
    if args.json:
        write_json_atomic(Path(args.json), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
