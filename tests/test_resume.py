"""--resume: refuses other settings, and continues every random stream exactly."""

from __future__ import annotations

import json

import pytest

from peft_mtl.training.checkpoint import CHECKPOINT_DIR, CheckpointMismatch
from peft_mtl.training.config import TrainConfig
from peft_mtl.model.saved_sets import MANIFEST
from peft_mtl.training.train import train
from .helpers import interrupt_after


def config(tiny_backbone, small_data, out, **overrides) -> TrainConfig:
    """Three tasks summed every step, SMART (T=1) with a visible ε, Bregman, PCGrad, live dropout."""
    cfg = TrainConfig(tasks=["sst", "qqp", "sts"], out=str(out), backbone=str(tiny_backbone), data_dir=str(small_data),
                      epochs=2, steps_per_epoch=4, batch_size=4, lr=5e-3, precision="fp32", checkpoint_every=0,
                      sampling="sum", pcgrad=True)
    cfg.smart.weight, cfg.smart.epsilon, cfg.smart.sigma, cfg.smart.step_size = 1.0, 1e-2, 1e-2, 1e-2
    cfg.smart.bregman_mu = 0.5
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("stop_at", [3, 6])  # mid-epoch 1, and mid-epoch 2 (after a dev evaluation)
def test_interrupted_run_with_smart_pcgrad_bregman_ends_exactly_like_an_uninterrupted_one(
        tiny_backbone, small_data, tmp_path, monkeypatch, stop_at):
    straight = train(config(tiny_backbone, small_data, tmp_path / "straight"), progress=False)

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_after(patch, stop_at)
        first = train(config(tiny_backbone, small_data, out), progress=False)
    assert first["interrupted"] and (out / CHECKPOINT_DIR / "progress.json").is_file()
    saved = json.loads((out / CHECKPOINT_DIR / "progress.json").read_text())
    assert saved["global_step"] == stop_at and "pcgrad" in saved["random"][0]

    resumed = train(config(tiny_backbone, small_data, out), resume=True, progress=False)
    assert resumed["dev"] == straight["dev"]
    for adapter in ("shared", "sst", "qqp", "sts"):
        assert (out / adapter / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "straight" / adapter / "adapter_model.safetensors").read_bytes(), adapter


def test_resume_refuses_changed_settings_and_names_them(tiny_backbone, small_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        train(config(tiny_backbone, small_data, out), progress=False)
    changed = config(tiny_backbone, small_data, out, tasks=["sst", "sts"], lr=1e-3)
    changed.smart.bregman_mu = 0.0
    with pytest.raises(CheckpointMismatch, match=r"changed: --tasks, --lr, --bregman-mu\. Resume with the original"):
        train(changed, resume=True, progress=False)
    # Run-control settings may change; the run then finishes.
    same = config(tiny_backbone, small_data, out, checkpoint_every=1)
    assert train(same, resume=True, progress=False)["best_epoch"] in (1, 2)
    assert (out / MANIFEST).is_file()


def test_resume_refusal_is_one_cli_error_line(tiny_backbone, small_data, tmp_path, monkeypatch):
    from peft_mtl.cli import main

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        train(config(tiny_backbone, small_data, out, tasks=["sst"], sampling="uniform", pcgrad=False), progress=False)
    code = main(["train", "--tasks", "sst", "--out", str(out), "--backbone", str(tiny_backbone), "--data-dir",
                 str(small_data), "--resume", "--no-progress", "--precision", "fp32"])
    assert code == 2
