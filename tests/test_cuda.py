"""The same toolkit on an NVIDIA GPU (skipped without CUDA): train in fp32, bf16 and fp16 with its
gradient scaler, resume, save, reload, quantize, move sets between CPU and GPU, serve on the second
GPU and train data-parallel on two GPUs when there are two.

Which equalities are exact: with ``--deterministic`` (deterministic kernels, cuBLAS workspace,
SDPA math backend) a resumed run ends bit-identical to an uninterrupted one — the adapter files
are compared byte for byte. Without it, CUDA's attention and embedding backward may accumulate
in another order, so resumed-vs-straight is compared with ``allclose``; CPU-vs-GPU predictions
are always ``allclose`` (different kernels). These tests have not yet run on a GPU here: the
stand-in-device tests (tests/test_device_standin.py) are what has run, on a CPU."""

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

    straight = train(config(tiny_backbone, small_data, tmp_path / "straight", deterministic=True), progress=False)
    assert straight["overall"] is not None
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        assert train(config(tiny_backbone, small_data, tmp_path / "resumed", deterministic=True),
                     progress=False)["interrupted"]
    resumed = train(config(tiny_backbone, small_data, tmp_path / "resumed", deterministic=True), resume=True,
                    progress=False)
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
    env = {k: v for k, v in os.environ.items() if k != "PEFT_MTL_DEVICE"}  # the CPU suite's pin is not for this
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    finals = [json.loads((trace / f"rank{r}.jsonl").read_text().splitlines()[-1])["final_trainable_sha256"]
              for r in (0, 1)]
    assert finals[0] == finals[1]


def plain_config(tiny_backbone, small_data, out, precision: str, **overrides):
    """Training without SMART or PCGrad, so the precision's own path (autocast, scaler) is what runs."""
    from peft_mtl.training.config import TrainConfig

    return TrainConfig(tasks=["sst", "sts"], out=str(out), backbone=str(tiny_backbone), data_dir=str(small_data),
                       epochs=2, steps_per_epoch=4, batch_size=4, lr=5e-3, checkpoint_every=0, device="cuda",
                       precision=precision, **overrides)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trains_in_half_precision_and_resumes_with_the_scaler(tiny_backbone, small_data, tmp_path, monkeypatch,
                                                              precision):
    """bf16 autocast, and fp16 autocast with a gradient scaler whose state is in the checkpoint:
    a resumed run ends as the uninterrupted one (allclose: no --deterministic here)."""
    from peft_mtl.device import gpu_supports_bf16
    from peft_mtl.training.train import train

    from .helpers import interrupt_after

    if precision == "bf16" and not gpu_supports_bf16(torch.device("cuda", 0)):
        pytest.skip("this GPU has no native bf16")
    straight = train(plain_config(tiny_backbone, small_data, tmp_path / "straight", precision), progress=False)
    assert 0 <= straight["dev"]["sst"]["accuracy"] <= 1
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        assert train(plain_config(tiny_backbone, small_data, tmp_path / "resumed", precision),
                     progress=False)["interrupted"]
    if precision == "fp16":
        saved = torch.load(tmp_path / "resumed" / ".checkpoint" / "optimizer.pt", weights_only=True)
        assert saved["scaler"] is not None and saved["scaler"]["scale"] > 0
    resumed = train(plain_config(tiny_backbone, small_data, tmp_path / "resumed", precision), resume=True,
                    progress=False)
    for task, metrics in straight["dev"].items():
        for name, value in metrics.items():
            assert resumed["dev"][task][name] == pytest.approx(value, abs=1e-3)


def test_trains_on_an_nf4_quantized_backbone(tiny_backbone, small_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft_mtl.training.train import train

    summary = train(plain_config(tiny_backbone, small_data, tmp_path / "nf4", "auto", quantize="nf4"), progress=False)
    assert summary["overall"] is not None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_the_server_answers_from_the_second_gpu(tiny_backbone, small_data, tmp_path):
    """--device cuda:1 puts the model, and the model thread's CUDA calls, on GPU 1."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from peft_mtl import load_base
    from peft_mtl.serving import ServeConfig, create_app
    from peft_mtl.training.train import train

    train(plain_config(tiny_backbone, small_data, tmp_path / "set", "fp32"), progress=False)
    base = load_base(str(tiny_backbone), precision="fp32", device="cuda:1")
    base.load(tmp_path / "set", name="s")
    assert base.device == torch.device("cuda", 1)
    with TestClient(create_app(base, ServeConfig())) as client:
        response = client.post("/v1/predict", json={"set": "s", "task": "sst", "inputs": ["a fine film"]})
    assert response.status_code == 200, response.text
    cpu = load_base(str(tiny_backbone), precision="fp32", device="cpu")
    cpu.load(tmp_path / "set", name="s")
    expected = cpu.predict("sst", ["a fine film"], "s")[0]["probabilities"]
    assert response.json()["predictions"][0]["probabilities"] == pytest.approx(expected, abs=1e-3)
