"""The multi-adapter graph's dev metrics against fp32 PyTorch, full dev sets, every task of a set.

    python benchmarks/multi_graph.py adapters/all [--out reports] [--data-dir ../shared/data]

For each task of the set, the whole dev split through: fp32 PyTorch (``load_base(precision="fp32")``),
the multi-adapter graph in fp32, and its int8 copy (``serve --engine onnx --int8``) in batches
of 8 (what the server's coalesced batches look like under moderate traffic) and of 64 — int8
activations are quantized per batch, so the batch size matters. Bounds (issue 33, as for
``--int8``): SST and QQP accuracy within 0.5 point, STS Pearson r within 0.005. Writes
OUT/multi_graph.json and OUT/multi_graph.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BOUNDS = {"sst": ("accuracy", 0.005), "qqp": ("accuracy", 0.005), "sts": ("pearson", 0.005)}


def graph_outputs(engine, name: str, task: str, enc, batch: int) -> np.ndarray:
    rows = enc.segments[0]
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
    out = None
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        (chunk,) = engine.outputs([(name, task, [rows[i] for i in idx])])
        if out is None:
            out = np.zeros((len(rows),) + chunk.shape[1:], np.float32)
        out[idx] = chunk
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    os.environ.setdefault("PEFT_MTL_CACHE", tempfile.mkdtemp(prefix="peft_mtl_multi_"))

    import torch

    from peft_mtl.data.loading import encode_split, load_split, task_file
    from peft_mtl.device import configure_threads, cpu_supports_bf16
    from peft_mtl.inference.adapter_graph import GraphEngine
    from peft_mtl.inference.adapter_host import load_adapters
    from peft_mtl.inference.evaluate import predictions_from_outputs, score
    from serve_load import _cpu_model

    threads = configure_threads()
    host = load_adapters(args.folder, precision="fp32", device="cpu")
    name = host.active
    engines = {"graph fp32": GraphEngine(host), "graph int8": GraphEngine(host, int8=True)}
    tasks = {}
    for task in host.sets[name].tasks:
        spec = host.spec(task, name)
        enc = encode_split(load_split(task_file(args.data_dir, spec, "dev"), spec), host.tokenizer,
                           host.sets[name].max_length)
        reference = host.outputs(task, enc, name, batch_size=64)
        runs = {"pytorch fp32": (reference, None)}
        runs["graph fp32 (batches of 64)"] = (graph_outputs(engines["graph fp32"], name, task, enc, 64), None)
        for batch in (8, 64):
            runs[f"graph int8 (batches of {batch})"] = (graph_outputs(engines["graph int8"], name, task, enc, batch), None)
        metric, bound = BOUNDS.get(task, (spec.primary_metric, 0.005))
        rows = {}
        for label, (out, _) in runs.items():
            metrics = score(enc, predictions_from_outputs(spec, out))
            rows[label] = {"metrics": metrics, "max_abs_diff_vs_pytorch": float(np.abs(out - reference).max()),
                           "delta": round(metrics[metric] - score(enc, predictions_from_outputs(spec, reference))[metric], 4)}
            rows[label]["within_bound"] = abs(rows[label]["delta"]) <= bound
        tasks[task] = {"metric": metric, "bound": bound, "examples": len(enc), "runs": rows}
        print(task, json.dumps({k: (v["metrics"][metric], v["delta"]) for k, v in rows.items()}), file=sys.stderr,
              flush=True)
    result = {"command": "python benchmarks/multi_graph.py " + " ".join(sys.argv[1:]), "cpu": _cpu_model(),
              "cpu_native_bf16": cpu_supports_bf16(), "threads": threads, "torch": torch.__version__, "tasks": tasks}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_graph.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "multi_graph.md").write_text(markdown(result))


def markdown(r: dict) -> str:
    lines = ["# The multi-adapter graph against fp32 PyTorch (full dev sets)", "",
             f"Command: `{r['command']}` — CPU: {r['cpu']} "
             f"({'native bf16' if r['cpu_native_bf16'] else 'no native bf16'}), {r['threads']} threads, "
             f"torch {r['torch']}. Bounds: SST and QQP accuracy ±0.5 point, STS Pearson r ±0.005.", "",
             "| task | engine | metric | Δ vs PyTorch fp32 | max abs output diff | within bound |",
             "|---|---|---:|---:|---:|:-:|"]
    for task, t in r["tasks"].items():
        for label, run in t["runs"].items():
            lines.append(f"| {task} ({t['examples']}) | {label} | {t['metric']} {run['metrics'][t['metric']]:.4f} | "
                         f"{run['delta']:+.4f} | {run['max_abs_diff_vs_pytorch']:.2e} | "
                         f"{'yes' if run['within_bound'] else '**no**'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
