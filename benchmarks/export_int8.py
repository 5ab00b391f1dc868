"""Dev metrics and speed of an exported set: PyTorch (peft_mtl) vs ONNX Runtime fp32 vs int8.

    python benchmarks/export_int8.py adapters/all [--out reports] [--batch 32]

Exports the set with ``--int8`` into a temporary folder, then evaluates every task's full dev
split three ways and times each (sentences per second over the whole split, batches of
``--batch`` inputs, length-sorted as evaluation does). Writes OUT/export_int8.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from peft_mtl.data.loading import load_split, pad_sequences, task_file
    from peft_mtl.inference.evaluate import predictions_from_outputs, score
    from peft_mtl.inference.export import export_set
    from peft_mtl.inference.adapter_host import load_base
    from peft_mtl.device import configure_threads, cpu_supports_bf16

    threads = configure_threads()
    out_dir = Path(tempfile.mkdtemp(prefix="peft_mtl_export_")) / "set"
    record = export_set(args.folder, out_dir, int8=True)
    base = load_base(record.get("backbone") if record.get("backbone") != "all-MiniLM-L6-v2" else None)
    name = base.load(args.folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rows = {}
    for task, entry in record["tasks"].items():
        spec = base.spec(task, name)
        encoded = base.encode(task, [e.texts if spec.is_pair else e.texts[0] for e in
                                     load_split(task_file(args.data_dir, spec, "dev"), spec).examples], name)
        encoded.labels = np.array([e.label for e in load_split(task_file(args.data_dir, spec, "dev"), spec).examples],
                                  dtype=np.float32)
        order = np.argsort(encoded.lengths, kind="stable")
        batches = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
        results = {}
        t0 = time.perf_counter()
        torch_out = base.outputs(task, encoded, name, batch_size=args.batch)
        results["pytorch"] = (torch_out, time.perf_counter() - t0)
        for precision in ("fp32", "int8"):
            session = ort.InferenceSession(str(out_dir / entry["files"][precision]), options,
                                           providers=["CPUExecutionProvider"])
            outputs = [None] * len(order)
            t0 = time.perf_counter()
            for idx in batches:
                batch = pad_sequences([encoded.segments[0][i] for i in idx], base.pad_id)
                got = session.run(None, {n: batch[n].numpy().astype(np.int64) for n in entry["inputs"]})[0]
                for j, i in enumerate(idx):
                    outputs[i] = got[j]
            results[precision] = (np.stack(outputs), time.perf_counter() - t0)
        rows[task] = {k: {"metrics": score(encoded, predictions_from_outputs(spec, o)),
                          "sentences_per_s": round(len(order) / s, 1)} for k, (o, s) in results.items()}
        print(task, json.dumps(rows[task]), file=sys.stderr, flush=True)

    result = {"command": "python benchmarks/export_int8.py " + " ".join(sys.argv[1:]), "cpu": cpu_model(),
              "cpu_native_bf16": cpu_supports_bf16(), "threads": threads, "cores": os.cpu_count(),
              "pytorch_precision": base.precision, "tasks": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_int8.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Exported set: PyTorch vs ONNX Runtime fp32 vs int8 (dev)", "",
             f"Command: `{result['command']}` — CPU: {result['cpu']} "
             f"({'native bf16' if result['cpu_native_bf16'] else 'no native bf16'}), {threads} threads; PyTorch "
             f"path in {base.precision}. Speed: the whole dev split in length-sorted batches of {args.batch}.", "",
             "| task | engine | primary metric | all metrics | sentences/s |", "|---|---|---:|---|---:|"]
    for task, r in rows.items():
        for engine, v in r.items():
            primary = next(iter(v["metrics"].values()))
            shown = ", ".join(f"{k} {x:.4f}" for k, x in v["metrics"].items())
            lines.append(f"| {task} | {engine} | {primary:.4f} | {shown} | {v['sentences_per_s']} |")
    (out / "export_int8.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({t: {e: v["sentences_per_s"] for e, v in r.items()} for t, r in rows.items()}))


if __name__ == "__main__":
    main()
