"""SMART regulariser, projection, Bregman proximal point, PCGrad and SimCSE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_mtl.config import SmartSettings, TrainConfig
from peft_mtl.pcgrad import pcgrad_combine
from peft_mtl.simcse import simcse_loss
from peft_mtl.smart import BregmanProximal, project, smart_regularizer, symmetric_kl
from peft_mtl.train import StepContext, task_loss

from .test_adapters import batch


def regularizer(model, b, settings, kind="classification"):
    model.train()
    rng = torch.get_rng_state()
    with model.capture_embeddings() as embs:
        out = model(b.task, b.inputs)

    def perturbed(noise):
        with model.perturbed_embeddings(noise):
            return model(b.task, b.inputs)

    masks = [s["attention_mask"] for s in b.inputs]
    return smart_regularizer(perturbed, out, list(embs), masks, kind, settings, rng)


def noisy_model(factory, tasks=("sst",)):
    model = factory(TrainConfig(tasks=list(tasks)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


def test_regularizer_is_non_negative_and_zero_without_perturbation(tiny_model_factory, tiny_backbone):
    model = noisy_model(tiny_model_factory)
    b = batch(tiny_backbone)
    r = regularizer(model, b, SmartSettings(weight=1, epsilon=1e-2, sigma=1e-2, step_size=1e-2))
    assert r.item() > 0
    zero = regularizer(model, b, SmartSettings(weight=1, epsilon=0.0, sigma=1e-2, step_size=1e-2))
    assert zero.item() == pytest.approx(0.0, abs=1e-7)


def test_ascent_step_finds_a_larger_divergence_than_the_random_start(tiny_model_factory, tiny_backbone):
    model = noisy_model(tiny_model_factory)
    b = batch(tiny_backbone)
    settings = dict(weight=1, epsilon=5e-2, sigma=1e-2, step_size=5e-2)
    torch.manual_seed(0)
    random_only = regularizer(model, b, SmartSettings(steps=0, **settings))
    torch.manual_seed(0)  # the same random start
    ascended = regularizer(model, b, SmartSettings(steps=1, **settings))
    assert 0 < random_only.item() < ascended.item()


def test_regularizer_grows_with_epsilon_for_regression(tiny_model_factory, tiny_backbone):
    model = noisy_model(tiny_model_factory, ("sts",))
    b = batch(tiny_backbone, "sts")
    small = regularizer(model, b, SmartSettings(epsilon=1e-3, sigma=1e-3, step_size=1e-3), "regression")
    large = regularizer(model, b, SmartSettings(epsilon=1e-1, sigma=1e-1, step_size=1e-1), "regression")
    assert 0 <= small.item() < large.item()


def test_smart_gradients_reach_only_trainable_parameters(tiny_model_factory, tiny_backbone):
    model = noisy_model(tiny_model_factory, ("sst", "qqp"))
    b = batch(tiny_backbone)
    cfg = TrainConfig(tasks=["sst", "qqp"])
    cfg.smart = SmartSettings(weight=1.0, epsilon=1e-2, sigma=1e-2)
    model.train()
    task_loss(model, b, StepContext(cfg, "fp32", None)).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert ("lora_" in n and (".sst." in n or ".shared." in n)) or n.startswith("heads.sst"), n
    assert all(p.grad is None for n, p in model.encoder.named_parameters() if "lora_" not in n)


def test_smart_changes_the_loss_versus_plain(tiny_model_factory, tiny_backbone):
    model = noisy_model(tiny_model_factory)
    b = batch(tiny_backbone)
    cfg = TrainConfig(tasks=["sst"])
    torch.manual_seed(0)
    plain = task_loss(model, b, StepContext(cfg, "fp32", None)).item()
    cfg.smart = SmartSettings(weight=10.0, epsilon=5e-2, sigma=5e-2, step_size=5e-2)
    torch.manual_seed(0)
    with_smart = task_loss(model, b, StepContext(cfg, "fp32", None)).item()
    assert with_smart > plain


def test_projection_lands_inside_the_ball():
    d = torch.randn(3, 5, 4)
    assert project(d, 0.1, "inf").abs().max() <= 0.1
    l2 = project(d, 0.1, "l2")
    assert torch.all(l2.flatten(1).norm(dim=1) <= 0.1 + 1e-6)
    small = d * 1e-4
    assert torch.equal(project(small, 0.1, "l2"), small), "points inside the ball must not move"


def test_symmetric_kl_properties():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert symmetric_kl(a, a).item() == pytest.approx(0, abs=1e-6)
    assert symmetric_kl(a, b).item() == pytest.approx(symmetric_kl(b, a).item(), rel=1e-5) and symmetric_kl(a, b) > 0


def test_bregman_average_and_penalty(tiny_model_factory, tiny_backbone):
    model = noisy_model(tiny_model_factory)
    breg = BregmanProximal(model, mu=1.0, beta=0.5)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    before = breg.average[name].clone()
    with torch.no_grad():
        param.add_(1.0)
    breg.update()
    assert torch.allclose(breg.average[name], 0.5 * before + 0.5 * param.detach())
    b = batch(tiny_backbone)
    model.eval()
    out = model("sst", b.inputs)
    ref = breg.reference_output(lambda: model("sst", b.inputs))
    assert torch.allclose(model("sst", b.inputs), out), "reference pass must restore the parameters"
    assert breg.penalty("classification", out, ref).item() > 0


def test_pcgrad_removes_conflicts_and_keeps_agreement():
    rng = np.random.default_rng(0)
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    combined = pcgrad_combine([g1, g2], rng)
    # g1 loses its component along g2 and vice versa: (0.5, 0.5) + (0, 1)
    assert torch.allclose(combined, torch.tensor([0.5, 1.5]))
    agree = [torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.5])]
    assert torch.allclose(pcgrad_combine(agree, rng), agree[0] + agree[1])


def test_simcse_loss_prefers_matching_pairs():
    z = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert simcse_loss(z, z, 0.05) < simcse_loss(z, z.roll(1, 0), 0.05)


def test_bregman_penalty_is_live_under_bf16_autocast(tiny_model_factory, tiny_backbone):
    """Autocast caches casts of trainable weights; the reference pass must not reuse θ's casts."""
    model = noisy_model(tiny_model_factory)
    cfg = TrainConfig(tasks=["sst"])
    cfg.smart = SmartSettings(bregman_mu=1.0, bregman_beta=0.5)
    breg = BregmanProximal(model, mu=1.0, beta=0.5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                breg.average[n].add_(0.5)  # θ̃ now differs from θ
    model.train()  # trainable adapters are the tensors autocast caches
    b = batch(tiny_backbone)
    torch.manual_seed(0)
    plain = task_loss(model, b, StepContext(TrainConfig(tasks=["sst"]), "bf16", None)).item()
    torch.manual_seed(0)
    with_penalty = task_loss(model, b, StepContext(cfg, "bf16", breg)).item()
    assert with_penalty > plain + 1e-4


def test_smart_without_ascent_runs_clean_and_perturbed_copies_in_one_pass(tiny_model_factory, tiny_backbone):
    from peft_mtl.kernels import all_dropout_pairable
    from peft_mtl.smart import smart_random_paired

    model = noisy_model(tiny_model_factory)
    model.train()  # dropout live: the two halves must still share masks
    assert all_dropout_pairable(model)
    b = batch(tiny_backbone)
    torch.manual_seed(0)
    clean, zero = smart_random_paired(model, b.task, b.inputs, "classification", SmartSettings(epsilon=0.0, sigma=1e-2))
    assert zero.item() == pytest.approx(0.0, abs=1e-7)
    assert clean.shape[0] == b.inputs[0]["input_ids"].shape[0]
    clean, reg = smart_random_paired(model, b.task, b.inputs, "classification", SmartSettings(epsilon=5e-2, sigma=5e-2))
    assert reg.item() > 0
    reg.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_training_with_smart_steps_zero_uses_the_paired_pass(tiny_model_factory, tiny_backbone, monkeypatch):
    import peft_mtl.train as train_module

    calls = []
    real = train_module.smart_random_paired
    monkeypatch.setattr(train_module, "smart_random_paired", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = TrainConfig(tasks=["sst"])
    cfg.smart.weight, cfg.smart.steps = 1.0, 0
    model = noisy_model(tiny_model_factory)
    model.train()
    loss = task_loss(model, batch(tiny_backbone), StepContext(cfg, "fp32", None))
    assert calls and torch.isfinite(loss)
