"""The same toolkit on an NVIDIA GPU (skipped without CUDA): train, resume, save, reload, move
sets between CPU and GPU, and data-parallel training on two GPUs when there are two."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

REPO = Path(__file__).resolve().parents[1]


def config(tiny_backbone, small_data, out, **overrides):
    from peft_mtl.training.config import TrainConfig

    cfg = TrainConfig(tasks=["sst", "qqp", "sts"], out=str(out), backbone=str(tiny_backbone), data_dir=str(small_data),
                      epochs=2, steps_per_epoch=4, batch_size=4, lr=5e-3, checkpoint_every=0, sampling="sum",
                      pcgrad=True, device="cuda", **overrides)
    cfg.smart.weight, cfg.smart.epsilon, cfg.smart.sigma, cfg.smart.bregman_mu = 1.0, 1e-2, 1e-2, 0.5
    return cfg


def test_trains_resumes_and_saves_on_the_gpu(tiny_backbone, small_data, tmp_path, monkeypatch):
    from peft_mtl.training.train import train

    from .helpers import interrupt_after

    straight = train(config(tiny_backbone, small_data, tmp_path / "straight"), progress=False)
    assert straight["overall"] is not None
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        assert train(config(tiny_backbone, small_data, tmp_path / "resumed"), progress=False)["interrupted"]
    resumed = train(config(tiny_backbone, small_data, tmp_path / "resumed"), resume=True, progress=False)
    assert resumed["dev"] == straight["dev"]
    for adapter in ("shared", "sst", "qqp", "sts"):
        assert (tmp_path / "resumed" / adapter / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "straight" / adapter / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_a_set_predicts_the_same_on_cpu_and_gpu(tiny_backbone, small_data, tmp_path, precision):
    from peft_mtl import load_base
    from peft_mtl.training.train import train

    out = tmp_path / "set"
    train(config(tiny_backbone, small_data, out, precision=precision), progress=False)
    sentences, pairs = ["a fine film", "dull and long"], [("a man plays", "a man sings")]
    got = {}
    for device in ("cuda", "cpu"):
        base = load_base(str(tiny_backbone), precision="fp32", device=device)
        base.load(out)
        got[device] = (base.predict("sst", sentences), base.predict("sts", pairs))
    (gs, gp), (cs, cp) = got["cuda"], got["cpu"]
    assert [p["label"] for p in gs] == [p["label"] for p in cs]
    assert max(abs(a - b) for p, q in zip(gs, cs) for a, b in zip(p["probabilities"], q["probabilities"])) < 1e-3
    assert abs(gp[0]["score"] - cp[0]["score"]) < 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_data_parallel_run_ends_identical_on_both_ranks(tiny_backbone, small_data, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    out, trace = tmp_path / "run", tmp_path / "trace"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "peft_mtl", "train", "--tasks", "sst,qqp,sts", "--out", str(out),
           "--backbone", str(tiny_backbone), "--data-dir", str(small_data), "--epochs", "2", "--steps-per-epoch", "5",
           "--batch-size", "4", "--sampling", "sum", "--pcgrad", "--smart-weight", "1", "--no-progress",
           "--trace-dir", str(trace)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    finals = [json.loads((trace / f"rank{r}.jsonl").read_text().splitlines()[-1])["final_trainable_sha256"]
              for r in (0, 1)]
    assert finals[0] == finals[1]
