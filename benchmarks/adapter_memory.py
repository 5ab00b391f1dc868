"""Swap latency, adapter-folder load time and memory of k adapter sets vs k full model copies.

Each measurement runs in a fresh Python process so resident memory is not polluted by
earlier work (a long-lived process keeps freed memory and hides what loading costs).

    python benchmarks/adapter_memory.py --json reports/adapters.json adapters/all adapters/ablation/*
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROBE_SETS = r'''
import json, statistics, sys, time
from peft_mtl.experiments.bench import rss_mb
before = rss_mb()
from peft_mtl import load_base
folders = sys.argv[1:]
base = load_base()
rss = {"python_and_libraries": before, "backbone": rss_mb()}
loads = []
for i, f in enumerate(folders):
    t = time.perf_counter(); base.load(f, name=f"s{i}"); loads.append(time.perf_counter() - t)
    rss[f"sets_{i + 1}"] = rss_mb()
names = list(base.sets)
task = "sst"
base.predict(task, ["warm up"], names[0])
for n in names:
    base.activate(n, task)
swaps = []
for i in range(2000):
    t = time.perf_counter(); base.activate(names[i % len(names)], task); swaps.append(time.perf_counter() - t)
swaps.sort()
print(json.dumps({"rss_mb": rss, "load_ms": [round(x * 1e3, 1) for x in loads],
                  "swap_ms_median": statistics.median(swaps) * 1e3, "swap_ms_p99": swaps[int(0.99 * len(swaps))] * 1e3}))
'''

PROBE_COPIES = r'''
import json, sys, time
from peft_mtl.experiments.bench import rss_mb
before = rss_mb()
from peft_mtl.model.backbone import load_encoder, resolve_backbone
_, path = resolve_backbone(None)
k = int(sys.argv[1])
models, rss, loads = [], {"python_and_libraries": before}, []
for i in range(k):
    t = time.perf_counter(); m = load_encoder(path); loads.append(time.perf_counter() - t)
    # safetensors loads by mmap, so identical copies would share pages; fine-tuned models
    # have their own weights, so each copy gets private memory here.
    for prm in m.parameters():
        prm.data = prm.data.clone()
    models.append(m)
    rss[f"copies_{i + 1}"] = rss_mb()
print(json.dumps({"rss_mb": rss, "load_ms": [round(x * 1e3, 1) for x in loads]}))
'''


def probe(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folders", nargs="+")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    k = len(args.folders)
    sets = probe(PROBE_SETS, *args.folders)
    copies = probe(PROBE_COPIES, str(k))
    r = sets["rss_mb"]
    one_model = r["sets_1"]
    result = {
        "command": "python " + " ".join(sys.argv), "sets": args.folders,
        "swap_ms_median": round(sets["swap_ms_median"], 4), "swap_ms_p99": round(sets["swap_ms_p99"], 4),
        "load_set_ms": sets["load_ms"], "load_full_model_ms": copies["load_ms"],
        "rss_mb_backbone_plus_1_set": round(one_model, 1), f"rss_mb_backbone_plus_{k}_sets": round(r[f"sets_{k}"], 1),
        "extra_mb_per_set": round((r[f"sets_{k}"] - one_model) / max(1, k - 1), 2),
        f"ensemble_{k}_ram_vs_one_model": round(r[f"sets_{k}"] / one_model, 3),
        f"rss_mb_{k}_full_copies": round(copies["rss_mb"][f"copies_{k}"], 1),
        "rss_mb_1_full_copy": round(copies["rss_mb"]["copies_1"], 1),
        "raw": {"sets": sets, "copies": copies},
    }
    print(json.dumps({k2: v for k2, v in result.items() if k2 != "raw"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
