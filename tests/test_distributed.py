"""Two CPU processes under `accelerate launch`: same task sequence, disjoint shards, one equal adapter set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peft_mtl import load_base
from peft_mtl.model.saved_sets import MANIFEST

REPO = Path(__file__).resolve().parents[1]


# Each case trains on 2 CPU processes and must end with bit-identical parameters on both ranks.
# The summed / PCGrad cases guard the all-reduce of adapters whose requires_grad peft had
# switched off by the end of the step (they used to be left out, and the ranks drifted).
CASES = {
    "uniform": [],
    "sum-pcgrad-smart-bregman": ["--sampling", "sum", "--pcgrad", "--smart-weight", "1", "--smart-epsilon", "1e-2",
                                 "--smart-sigma", "1e-2", "--bregman-mu", "0.5"],
    "full-sum-pcgrad-smartT0": ["--mode", "full", "--lr", "1e-3", "--sampling", "sum", "--pcgrad", "--smart-weight",
                                "1", "--smart-steps", "0", "--smart-epsilon", "1e-2", "--smart-sigma", "1e-2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_process_multitask_training(tiny_backbone, small_data, tmp_path, case):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    out, trace = tmp_path / "run", tmp_path / "trace"
    # --multi_gpu selects accelerate's torchrun launcher; without CUDA the ranks use gloo on the CPU.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29517 + list(CASES).index(case)),
           "-m", "peft_mtl", "train", *CASES[case], "--tasks", "sst,qqp,sts", "--out", str(out), "--backbone", str(tiny_backbone),
           "--data-dir", str(small_data), "--epochs", "2", "--steps-per-epoch", "5", "--batch-size", "4",
           "--precision", "fp32", "--no-progress", "--trace-dir", str(trace)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    # One result line (rank 0), both ranks ran.
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 1
    ranks = [[json.loads(line) for line in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    steps = [[s for s in rank if "tasks" in s] for rank in ranks]
    assert len(steps[0]) == len(steps[1]) == 10
    assert [s["tasks"] for s in steps[0]] == [s["tasks"] for s in steps[1]], "ranks must follow one task sequence"
    for a, b in zip(*steps):
        for task in a["rows"]:
            assert set(a["rows"][task]).isdisjoint(b["rows"][task]), "ranks must see disjoint data"
            assert len(a["rows"][task]) == len(b["rows"][task]) == 4
    finals = [rank[-1]["final_trainable_sha256"] for rank in ranks]
    assert finals[0] == finals[1], "both ranks must end with identical adapters"
    # Exactly one set, written once, loadable.
    if "full" not in case:
        assert sorted(p.name for p in out.iterdir()) == ["README.md", MANIFEST, "qqp", "shared", "sst", "sts"]
    assert json.loads((out / MANIFEST).read_text())["processes"] == 2
    base = load_base(str(tiny_backbone))
    base.load(out)
    assert len(base.predict("sts", [("a", "b")])) == 1
