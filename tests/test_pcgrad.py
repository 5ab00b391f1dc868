"""PCGrad: exactly the conflicting component is removed, everything else is left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from peft_mtl.model.backbone import load_encoder, load_tokenizer, set_dropout
from peft_mtl.training.config import TrainConfig
from peft_mtl.data.loading import BatchStream
from peft_mtl.model.multitask import build_model
from peft_mtl.training.optimization import TrainingStep, build_optimizer, build_scheduler
from peft_mtl.training.pcgrad import PCGrad, pcgrad_combine
from peft_mtl.training.regularizers import Objective
from peft_mtl.training.train import load_task_data


def test_combine_removes_conflicts_and_keeps_agreement():
    rng = np.random.default_rng(0)
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g1 loses its component along g2 and vice versa: (0.5, 0.5) + (0, 1)
    assert torch.allclose(pcgrad_combine([g1, g2], rng), torch.tensor([0.5, 1.5]))
    agree = [torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.5])]
    assert torch.equal(pcgrad_combine(agree, rng), agree[0] + agree[1])


def _setup(tiny_backbone, small_data, **overrides):
    cfg = TrainConfig(tasks=["sst", "sts"], sampling="sum", pcgrad=True, lr=1e-2, head_dropout=0.0, **overrides)
    torch.manual_seed(0)
    encoder = load_encoder(tiny_backbone)
    set_dropout(encoder, 0.0)  # deterministic passes: per-task gradients can be recomputed exactly
    model = build_model(cfg, encoder, encoder.config.hidden_size)
    with torch.no_grad():  # adapters that already matter, so shared gradients are not zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model.train()
    train, _, _ = load_task_data(cfg, load_tokenizer(tiny_backbone), Path(small_data))
    streams = {t: BatchStream(train[t], 8, 0, i, 0) for i, t in enumerate(cfg.tasks)}
    batches = {t: s.next() for t, s in streams.items()}
    return cfg, model, batches


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_step_projects_only_the_shared_gradient_and_only_its_conflicting_part(tiny_backbone, small_data, mode):
    cfg, model, batches = _setup(tiny_backbone, small_data, mode=mode)
    objective = Objective(model, cfg, "fp32")
    alone = {}
    for t, b in batches.items():  # each task's own gradient
        model.zero_grad(set_to_none=True)
        objective(model, b).backward()
        alone[t] = _grads(model)
    optimizer = build_optimizer(cfg, model)
    step = TrainingStep(model, objective, optimizer, build_scheduler(optimizer, 10, 0.0), cfg.max_grad_norm,
                        PCGrad(cfg.seed))
    shared_names = {n for n, p in model.named_parameters() if any(p is s for s in step.shared)}
    assert shared_names, "lora: the shared adapter; full: the encoder"
    step.gradients(batches)
    got = _grads(model)

    params = dict(model.named_parameters())
    flat = {t: torch.cat([alone[t].get(n, torch.zeros_like(params[n])).flatten() for n in sorted(shared_names)])
            for t in alone}
    g1, g2 = flat["sst"], flat["sts"]
    dot = torch.dot(g1, g2)
    expected = g1 + g2
    if dot < 0:  # each loses exactly its component along the other
        expected = (g1 - dot / g2.dot(g2) * g2) + (g2 - dot / g1.dot(g1) * g1)
    got_flat = torch.cat([got[n].flatten() for n in sorted(shared_names)])
    assert torch.allclose(got_flat, expected, atol=1e-6)
    for n, g in got.items():  # task-specific gradients: exactly the task's own
        if n not in shared_names:
            owner = "sst" if n in alone["sst"] else "sts"
            assert torch.allclose(g, alone[owner][n], atol=1e-7), n
    before = [p.detach().clone() for p in step.shared]
    step.update()
    assert any(not torch.equal(b, p) for b, p in zip(before, step.shared))


class _Conflicting:
    """STS's loss minus 10× SST's: its shared gradient points against SST's (a made conflict)."""

    def __init__(self, objective, sst_batch):
        self.objective, self.sst_batch = objective, sst_batch

    def __call__(self, model, batch):
        loss = self.objective(model, batch)
        return loss - 10 * self.objective(model, self.sst_batch) if batch.task == "sts" else loss

    def terms(self, model, batch):  # what a training step asks an objective for
        return {"task": self(model, batch)}

    def after_step(self) -> None:
        pass


def test_conflicting_gradients_lose_exactly_their_conflicting_component(tiny_backbone, small_data):
    cfg, model, batches = _setup(tiny_backbone, small_data)
    objective = _Conflicting(Objective(model, cfg, "fp32"), batches["sst"])
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(optimizer, 10, 0.0)
    plain = TrainingStep(model, objective, optimizer, scheduler, cfg.max_grad_norm)
    surgery = TrainingStep(model, objective, optimizer, scheduler, cfg.max_grad_norm, PCGrad(0))
    per_task = []
    for t in ("sst", "sts"):
        plain.gradients({t: batches[t]})
        per_task.append(torch.cat([p.grad.flatten() for p in surgery.shared]))
    g1, g2 = per_task
    dot = torch.dot(g1, g2)
    assert dot < 0, "the constructed tasks conflict"
    surgery.gradients(batches)
    projected = torch.cat([p.grad.flatten() for p in surgery.shared])
    expected = (g1 - dot / g2.dot(g2) * g2) + (g2 - dot / g1.dot(g1) * g1)
    assert torch.allclose(projected, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(projected, g1 + g2, rtol=1e-3)


@pytest.mark.parametrize("overrides", [{"shared_adapter": False}, {"mode": "heads"}])
def test_without_shared_parameters_pcgrad_leaves_every_gradient_as_it_is(tiny_backbone, small_data, overrides):
    cfg, model, batches = _setup(tiny_backbone, small_data, **overrides)
    objective = Objective(model, cfg, "fp32")
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(optimizer, 10, 0.0)
    TrainingStep(model, objective, optimizer, scheduler, cfg.max_grad_norm).gradients(batches)
    plain = _grads(model)
    step = TrainingStep(model, objective, optimizer, scheduler, cfg.max_grad_norm, PCGrad(0))
    assert step.shared == []
    step.gradients(batches)
    assert _grads(model).keys() == plain.keys()
    assert all(torch.equal(g, plain[n]) for n, g in _grads(model).items())
