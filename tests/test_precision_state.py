"""What fp16 training and reproducibility need beyond the forward pass, checked on a CPU: the gradient
scaler's state survives a checkpoint, a step the scaler skips moves nothing, and --deterministic runs
the same and leaves torch's settings as it found them."""

from __future__ import annotations

import os

import pytest
import torch

from peft_mtl.training import checkpoint as ckpt
from peft_mtl.training.train import prepare, train

from .helpers import tiny_config


def _scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)


def test_the_gradient_scalers_state_is_saved_and_restored_with_the_checkpoint(tiny_backbone, small_data, tmp_path):
    cfg = tiny_config(tiny_backbone, small_data, tmp_path / "run")
    cfg.validate()
    run = prepare(cfg, resume=False, progress=False)
    run.step.scaler = scaler = _scaler()
    batch = {"sst": run.streams["sst"].next()}
    for _ in range(3):  # two good steps grow the scale (growth_interval 2); the tracker moves
        run.step(batch)
    assert scaler.get_scale() == 2.0 ** 11
    run.save_checkpoint()
    fresh = _scaler()
    saved = ckpt.load(run.out)
    ckpt.restore(saved, model=run.model, optimizer=run.step.optimizer, scheduler=run.step.scheduler,
                 streams=run.streams, objective=run.step.objective, surgery=run.step.surgery,
                 progress=ckpt.Progress(), rank=0, scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict()


def test_a_step_the_scaler_skips_moves_no_weight_schedule_or_bregman_average(tiny_backbone, small_data, tmp_path):
    cfg = tiny_config(tiny_backbone, small_data, tmp_path / "run")
    cfg.smart.bregman_mu = 0.5
    cfg.validate()
    run = prepare(cfg, resume=False, progress=False)
    step = run.step
    step.scaler = _scaler()
    batch = {"sst": run.streams["sst"].next()}
    trained = [p for p in step.params]
    before = [p.detach().clone() for p in trained]
    ema_before = {k: v.clone() for k, v in step.objective.tensors().items()}
    schedule_before = step.scheduler.last_epoch
    step.gradients(batch)
    trained[0].grad.fill_(float("inf"))  # an fp16 overflow
    step.update()
    assert step.scaler.get_scale() == 2.0 ** 9, "the scaler backed off"
    assert all(torch.equal(a, p) for a, p in zip(before, trained)), "no weight moved"
    assert step.scheduler.last_epoch == schedule_before, "the schedule waits for a real step"
    assert all(torch.equal(v, step.objective.tensors()[k]) for k, v in ema_before.items()), "Bregman's θ̃ waits too"
    step(batch)  # a good step after it moves all three
    assert step.scheduler.last_epoch == schedule_before + 1
    assert not all(torch.equal(a, p) for a, p in zip(before, trained))


def test_deterministic_runs_match_and_leave_torch_as_they_found_it(tiny_backbone, small_data, tmp_path):
    plain = train(tiny_config(tiny_backbone, small_data, tmp_path / "plain", epochs=1), progress=False)
    assert not torch.are_deterministic_algorithms_enabled()
    checked = train(tiny_config(tiny_backbone, small_data, tmp_path / "checked", epochs=1, deterministic=True),
                    progress=False)
    assert checked["dev"] == plain["dev"]  # the CPU path is deterministic already: nothing changes, nothing raises
    assert (tmp_path / "checked" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "plain" / "adapter_model.safetensors").read_bytes()
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_mode_refuses_a_nondeterministic_kernel():
    """The switch is real: inside it, an op without a deterministic implementation raises."""
    from peft_mtl.device import deterministic_algorithms

    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        if torch.cuda.is_available():
            with pytest.raises(RuntimeError):
                torch.zeros(4, device="cuda").index_add_(0, torch.tensor([0, 0], device="cuda"),
                                                         torch.ones(2, device="cuda"))
    assert not torch.are_deterministic_algorithms_enabled()
