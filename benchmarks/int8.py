"""`--int8` against the fp32 PyTorch path: dev metrics and speed per task, and the engine choice.

    python benchmarks/int8.py adapters/all [--out reports] [--batch 128]

For every task of the set: the dev split through ``load_base(precision="fp32")`` and through
``load_base(int8=True)`` (ONNX Runtime int8 graph with the set's adapters merged; the graph
is built before timing). For the first task it also times the other int8 engines on the
package index on the same merged model: OpenVINO running the same int8 graph, and PyTorch's
dynamic quantization (``torch.ao.quantization.quantize_dynamic``, per-channel). Writes
OUT/int8.json and OUT/int8.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    os.environ.setdefault("PEFT_MTL_CACHE", tempfile.mkdtemp(prefix="peft_mtl_int8_"))

    import torch

    from export_int8 import cpu_model
    from peft_mtl.data.loading import encode_split, load_split, task_file
    from peft_mtl.inference.evaluate import predictions_from_outputs, score
    from peft_mtl.inference.adapter_host import load_adapters
    from peft_mtl.device import configure_threads, cpu_supports_bf16

    threads = configure_threads()
    fp32 = load_adapters(args.folder, precision="fp32", device="cpu")
    int8 = load_adapters(args.folder, int8=True)
    name = fp32.active
    rows, engines = {}, {}
    for i, task in enumerate(fp32.sets[name].tasks):
        spec = fp32.spec(task, name)
        enc = encode_split(load_split(task_file(args.data_dir, spec, "dev"), spec), fp32.tokenizer)
        results = {}
        for label, base in (("pytorch_fp32", fp32), ("int8", int8)):
            base.outputs(task, enc, name, batch_size=args.batch)  # warm-up pass (builds the int8 graph)
            t = time.perf_counter()
            out = base.outputs(task, enc, name, batch_size=args.batch)
            results[label] = (out, time.perf_counter() - t)
        if i == 0:
            engines = _other_engines(fp32, int8, name, task, enc, args.batch, results)
        rows[task] = {k: {"metrics": score(enc, predictions_from_outputs(spec, o)), "sentences_per_s": round(len(enc) / s, 1)}
                      for k, (o, s) in results.items()}
        print(task, json.dumps(rows[task]), file=sys.stderr, flush=True)

    result = {"command": "python benchmarks/int8.py " + " ".join(sys.argv[1:]), "cpu": cpu_model(),
              "cpu_native_bf16": cpu_supports_bf16(), "threads": threads, "batch": args.batch,
              "torch": torch.__version__, "tasks": rows, "engines_on_first_task": engines}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "int8.md").write_text(markdown(result))
    print(json.dumps({t: {e: v["sentences_per_s"] for e, v in r.items()} for t, r in rows.items()}))


def _other_engines(fp32, int8, name, task, enc, batch, results) -> dict:
    """The same merged model on the other int8 engines; metrics and speed on the same dev split."""
    import torch

    from peft_mtl.data.loading import iterate_batches
    from peft_mtl.inference.evaluate import predictions_from_outputs, score
    from peft_mtl.inference.export import TaskGraph, merged_encoder

    spec = fp32.spec(task, name)
    engines = {}

    def run(fn):
        chunks, order = [], []
        for b in iterate_batches(enc, batch, None, fp32.pad_id):
            chunks.append(np.asarray(fn(b.inputs[0]), dtype=np.float32))
            order.append(b.indices)
        out = np.concatenate(chunks)
        res = np.empty_like(out)
        res[np.concatenate(order)] = out
        return res

    def timed(label, fn):
        run(fn)
        t = time.perf_counter()
        out = run(fn)
        engines[label] = {"metrics": score(enc, predictions_from_outputs(spec, out)),
                          "sentences_per_s": round(len(enc) / (time.perf_counter() - t), 1)}
        print(label, engines[label], file=sys.stderr, flush=True)

    for label in ("pytorch_fp32", "int8"):
        out, seconds = results[label]
        engines["onnxruntime_int8" if label == "int8" else label] = {
            "metrics": score(enc, predictions_from_outputs(spec, out)), "sentences_per_s": round(len(enc) / seconds, 1)}
    try:
        import openvino as ov

        _, names = int8.int8._session(int8, name, task)
        path, _ = int8.int8._graph(int8, name, task)
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                          "INFERENCE_PRECISION_HINT": "f32"})
        timed("openvino_same_int8_graph", lambda x: compiled({n: x[n].numpy().astype(np.int64) for n in names})[0])
    except ImportError:
        pass
    key = f"{name}__{task}"
    graph = TaskGraph(merged_encoder(fp32, name, task), fp32.model.heads[key], fp32.model.head_pooling[key],
                      spec.kind, fp32.model.uses_token_types).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantized = quantize_dynamic(copy.deepcopy(graph), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                     dtype=torch.qint8)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if graph.token_types else [])
    with torch.inference_mode():
        timed("pytorch_dynamic_int8", lambda x: quantized(*(x[n] for n in names)))
    return engines


def markdown(r: dict) -> str:
    lines = ["# `--int8` vs the fp32 PyTorch path (dev)", "",
             f"Command: `{r['command']}` — CPU: {r['cpu']} "
             f"({'native bf16' if r['cpu_native_bf16'] else 'no native bf16: AVX2 fp32 path'}), {r['threads']} threads, "
             f"torch {r['torch']}, batches of {r['batch']} length-sorted inputs, one timed pass after a warm-up pass.", "",
             "| task | engine | primary metric | Δ vs fp32 | all metrics | sentences/s | speed vs fp32 |",
             "|---|---|---:|---:|---|---:|---:|"]
    for task, row in r["tasks"].items():
        base = row["pytorch_fp32"]
        p0 = next(iter(base["metrics"].values()))
        for engine, v in row.items():
            p = next(iter(v["metrics"].values()))
            shown = ", ".join(f"{k} {x:.4f}" for k, x in v["metrics"].items())
            lines.append(f"| {task} | {engine} | {p:.4f} | {p - p0:+.4f} | {shown} | {v['sentences_per_s']} | "
                         f"{v['sentences_per_s'] / base['sentences_per_s']:.2f}× |")
    if r["engines_on_first_task"]:
        first = next(iter(r["tasks"]))
        lines += ["", f"## Engine choice ({first}, the same merged model)", "",
                  "| engine | primary metric | sentences/s |", "|---|---:|---:|"]
        for engine, v in r["engines_on_first_task"].items():
            lines.append(f"| {engine} | {next(iter(v['metrics'].values())):.4f} | {v['sentences_per_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
