"""Chaos test of training: SIGKILL at random moments, then --resume, until the run finishes.

    python benchmarks/chaos_train.py --kills 200 --backbone PATH --data-dir DIR [--json reports/chaos.json]

A run (two tasks summed, PCGrad off, SMART on, a checkpoint every 2 steps, 3 epochs) is trained once
without interruption, then again while being killed ``--kills`` times at random moments — during
start-up, steps, checkpoint writes and the final save. After each kill the next command is the
same one (with ``--resume`` when a checkpoint exists); a kill after the set was saved starts a fresh
run. The end must equal the uninterrupted run byte for byte, and no temporary folder may be left.
The test suite runs it with 20 kills (tests/test_reliability.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "peft_mtl.json"


def argv(out: Path, backbone: str, data_dir: str) -> list[str]:
    return [sys.executable, "-m", "peft_mtl", "train", "--tasks", "sst,sts", "--out", str(out), "--backbone", backbone,
            "--data-dir", data_dir, "--epochs", "3", "--batch-size", "8", "--precision", "fp32", "--no-progress",
            "--sampling", "sum", "--smart-weight", "1", "--checkpoint-every", "2", "--steps-per-epoch", "6"]


def chaos(work: Path, backbone: str, data_dir: str, kills: int, seed: int = 0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    straight = work / "straight"
    started = time.perf_counter()
    subprocess.run(argv(straight, backbone, data_dir), check=True, cwd=REPO, env=env, capture_output=True,
                   timeout=600)
    straight_seconds = time.perf_counter() - started
    out, rng, done, outcomes, failures = work / "chaos", random.Random(seed), 0, Counter(), []
    for _ in range(kills * 4):
        finished = (out / MANIFEST).is_file() and not (out / ".checkpoint").exists()
        if finished:
            if done >= kills:
                break
            outcomes["finished before the kill: trained again"] += 1
            shutil.rmtree(out)
        cmd = argv(out, backbone, data_dir) + (["--resume"] if (out / ".checkpoint").is_dir() else [])
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if done < kills:
            time.sleep(rng.uniform(1.0, max(2.0, straight_seconds)))  # start-up, steps, checkpoints, the save
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                done += 1
        _, err = proc.communicate(timeout=600)
        if proc.returncode not in (0, -signal.SIGKILL):
            failures.append(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
            outcomes["a command failed after a kill"] += 1
            break
        outcomes["resumed" if "--resume" in cmd else "started"] += 1
    identical = all((out / name / "adapter_model.safetensors").is_file() and
                    (out / name / "adapter_model.safetensors").read_bytes() ==
                    (straight / name / "adapter_model.safetensors").read_bytes() for name in ("shared", "sst", "sts"))
    leftovers = [p.name for p in [*out.parent.iterdir(), *(out.iterdir() if out.is_dir() else [])]
                 if p.name.endswith(".partial") or ".old-" in p.name or p.name.startswith(".write-test")]
    return {"kills": done, "commands": dict(outcomes), "failures": failures, "identical_to_uninterrupted": identical,
            "leftover_temporary_folders": leftovers, "seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--backbone", required=True, help="a (small) backbone folder")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="peft_mtl_chaos_") as tmp:
        result = chaos(Path(tmp), args.backbone, args.data_dir, args.kills, args.seed)
    result["command"] = "python benchmarks/chaos_train.py " + " ".join(sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result))
    ok = result["kills"] == args.kills and result["identical_to_uninterrupted"] and not result["failures"]
    return 0 if ok and not result["leftover_temporary_folders"] else 1


if __name__ == "__main__":
    sys.exit(main())
