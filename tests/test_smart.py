"""SMART and Bregman proximal point: each term's defining property, with real optimiser steps."""

from __future__ import annotations

import copy

import pytest
import torch

from peft_mtl.training.config import SmartSettings, TrainConfig
from peft_mtl.training.optimization import TrainingStep, build_optimizer, build_scheduler
from peft_mtl.training.regularizers import Objective
from peft_mtl.training.simcse import simcse_loss
from peft_mtl.training.smart import output_divergence, project, smart_regularizer, symmetric_kl

from .helpers import batch


def noisy_model(factory, tasks=("sst",)):
    """A model whose adapters already change the output (fresh LoRA B matrices are zero)."""
    model = factory(TrainConfig(tasks=list(tasks)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model.train()  # dropout live: every term must replay the clean pass's masks
    return model


def smart_config(tasks=("sst",), **smart) -> TrainConfig:
    cfg = TrainConfig(tasks=list(tasks))
    cfg.smart = SmartSettings(weight=1.0, **smart)
    return cfg


def smart_term(model, b, precision="fp32", seed=0, **smart) -> float:
    torch.manual_seed(seed)
    return Objective(model, smart_config(**smart), precision).terms(model, b)["smart"].item()


def regularizer(model, b, settings, kind="classification", generator=None):
    rng = torch.get_rng_state()
    with model.capture_embeddings() as embs:
        out = model(b.task, b.inputs)

    def perturbed(noise):
        with model.perturbed_embeddings(noise):
            return model(b.task, b.inputs)

    masks = [s["attention_mask"] for s in b.inputs]
    return smart_regularizer(perturbed, out, list(embs), masks, kind, settings, rng, generator)


# ----------------------------------------------------------------------------- SMART


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("steps", [0, 1])
def test_smart_term_is_zero_at_epsilon_zero_and_grows_with_epsilon(tiny_model_factory, tiny_backbone, precision, steps):
    """R_s measures only the perturbation (dropout masks replayed) — also under bf16, where an
    ε of 1e-5 is below bf16's resolution: SMART's passes run in fp32 by default."""
    model = noisy_model(tiny_model_factory)
    b = batch(tiny_backbone)
    values = [smart_term(model, b, precision, epsilon=eps, sigma=eps, step_size=eps, steps=steps)
              for eps in (0.0, 1e-5, 1e-3, 1e-1)]
    assert values[0] == pytest.approx(0.0, abs=1e-9)
    assert 0 < values[1] < values[2] < values[3], values


def test_ascent_step_finds_a_larger_divergence_than_the_random_start(tiny_model_factory, tiny_backbone):
    model = noisy_model(tiny_model_factory)
    b = batch(tiny_backbone)
    settings = dict(weight=1, epsilon=5e-2, sigma=1e-2, step_size=5e-2)
    random_only = regularizer(model, b, SmartSettings(steps=0, **settings), generator=torch.Generator().manual_seed(0))
    ascended = regularizer(model, b, SmartSettings(steps=1, **settings), generator=torch.Generator().manual_seed(0))
    assert 0 < random_only.item() < ascended.item()


def test_regularizer_grows_with_epsilon_for_regression(tiny_model_factory, tiny_backbone):
    model = noisy_model(tiny_model_factory, ("sts",))
    b = batch(tiny_backbone, "sts")
    small = regularizer(model, b, SmartSettings(epsilon=1e-3, sigma=1e-3, step_size=1e-3), "regression")
    large = regularizer(model, b, SmartSettings(epsilon=1e-1, sigma=1e-1, step_size=1e-1), "regression")
    assert 0 <= small.item() < large.item()


def test_smart_gradients_reach_only_the_active_tasks_parameters(tiny_model_factory, tiny_backbone):
    model = noisy_model(tiny_model_factory, ("sst", "qqp"))
    cfg = smart_config(("sst", "qqp"), epsilon=1e-2, sigma=1e-2)
    Objective(model, cfg, "fp32")(model, batch(tiny_backbone)).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert ("lora_" in n and (".sst." in n or ".shared." in n)) or n.startswith("heads.sst"), n
    assert all(p.grad is None for n, p in model.encoder.named_parameters() if "lora_" not in n)


def _train_steps(model, cfg, b, steps: int) -> None:
    optimizer = build_optimizer(cfg, model)
    step = TrainingStep(model, Objective(model, cfg, "fp32"), optimizer, build_scheduler(optimizer, steps, 0.0),
                        cfg.max_grad_norm)
    for i in range(steps):
        torch.manual_seed(i)
        step({b.task: b})


def test_training_with_smart_makes_the_model_smoother(tiny_model_factory, tiny_backbone):
    """SMART's defining effect: after the same optimiser steps, outputs move less under a
    perturbation of the embeddings than without the regulariser."""
    b = batch(tiny_backbone)
    b.labels[:] = torch.tensor([0, 1, 3, 4])  # mixed labels: the outputs must not saturate
    probe = SmartSettings(epsilon=5e-2, sigma=5e-2, step_size=5e-2, steps=1)
    smoothness = {}
    for weight in (0.0, 30.0):
        model = noisy_model(tiny_model_factory)
        cfg = TrainConfig(tasks=["sst"], lr=1e-2)
        cfg.smart = SmartSettings(weight=weight, epsilon=5e-2, sigma=5e-2, step_size=5e-2)
        _train_steps(model, cfg, b, 8)
        model.eval()
        with torch.enable_grad():
            smoothness[weight] = regularizer(model, b, probe, generator=torch.Generator().manual_seed(1)).item()
    assert smoothness[30.0] < 0.7 * smoothness[0.0], smoothness


def test_projection_lands_inside_the_ball():
    d = torch.randn(3, 5, 4)
    assert project(d, 0.1, "inf").abs().max() <= 0.1
    l2 = project(d, 0.1, "l2")
    assert torch.all(l2.flatten(1).norm(dim=1) <= 0.1 + 1e-6)
    small = d * 1e-4
    assert torch.equal(project(small, 0.1, "l2"), small), "points inside the ball must not move"


def test_symmetric_kl_properties():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert symmetric_kl(a, a).item() == 0.0
    assert symmetric_kl(a, b).item() == pytest.approx(symmetric_kl(b, a).item(), rel=1e-5) and symmetric_kl(a, b) > 0
    tiny = a + 1e-5 * torch.randn(4, 5)
    assert symmetric_kl(a, tiny).item() > 0, "divergences of ~1e-10 must not vanish in cancellation"


def test_smart_steps_zero_runs_clean_and_perturbed_copies_in_one_pass(tiny_model_factory, tiny_backbone, monkeypatch):
    import peft_mtl.training.regularizers as regularizers

    calls = []
    real = regularizers.smart_random_paired
    monkeypatch.setattr(regularizers, "smart_random_paired", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = noisy_model(tiny_model_factory)
    torch.manual_seed(0)
    terms = Objective(model, smart_config(steps=0, epsilon=5e-2, sigma=5e-2), "fp32").terms(model, batch(tiny_backbone))
    assert calls and terms["smart"].item() > 0
    terms["smart"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------- Bregman


@pytest.mark.parametrize("smart_steps", [None, 0, 1])
def test_bregman_penalty_is_zero_while_the_average_equals_the_parameters(tiny_model_factory, tiny_backbone, smart_steps):
    """θ̃ starts as θ; with the clean pass's dropout masks replayed the penalty is exactly 0,
    also when SMART's paired T=0 pass produced the clean outputs."""
    model = noisy_model(tiny_model_factory)
    cfg = TrainConfig(tasks=["sst"])
    cfg.smart.bregman_mu = 1.0
    if smart_steps is not None:
        cfg.smart.weight, cfg.smart.steps, cfg.smart.epsilon, cfg.smart.sigma = 1.0, smart_steps, 1e-2, 1e-2
    torch.manual_seed(0)
    terms = Objective(model, cfg, "fp32").terms(model, batch(tiny_backbone))
    assert terms["bregman"].item() == pytest.approx(0.0, abs=1e-9)


def test_bregman_penalty_is_live_under_bf16_autocast(tiny_model_factory, tiny_backbone):
    """Autocast caches casts of trainable weights; the reference pass must see θ̃, not θ's casts."""
    model = noisy_model(tiny_model_factory)
    cfg = TrainConfig(tasks=["sst"])
    cfg.smart.bregman_mu = 1.0
    objective = Objective(model, cfg, "bf16")
    b = batch(tiny_backbone)
    torch.manual_seed(0)
    assert objective.terms(model, b)["bregman"].item() < 1e-4  # θ̃ = θ: only bf16 rounding
    with torch.no_grad():
        for n, t in objective.bregman.average.items():
            if "lora_B" in n:
                t.add_(0.5)
    torch.manual_seed(0)
    assert objective.terms(model, b)["bregman"].item() > 1e-3


def test_bregman_pulls_the_update_toward_the_average(tiny_model_factory, tiny_backbone):
    """Real optimiser steps (the old in-place swap crashed the backward here): with μ > 0 the
    trained model ends closer, in output space, to θ̃ than the same steps without the term,
    and the reference pass leaves the live parameters untouched."""
    b = batch(tiny_backbone)
    distance = {}
    for mu in (0.0, 5.0):
        model = noisy_model(tiny_model_factory)
        cfg = TrainConfig(tasks=["sst"], lr=1e-2)
        cfg.smart.bregman_mu, cfg.smart.bregman_beta = mu, 0.999999  # θ̃ stays (almost) where it starts
        anchor = copy.deepcopy(model).eval()
        optimizer = build_optimizer(cfg, model)
        objective = Objective(model, cfg, "fp32")
        step = TrainingStep(model, objective, optimizer, build_scheduler(optimizer, 10, 0.0), cfg.max_grad_norm)
        for i in range(10):
            torch.manual_seed(i)
            step({"sst": b})
        model.eval()
        with torch.no_grad():
            distance[mu] = output_divergence("classification", model("sst", b.inputs), anchor("sst", b.inputs)).item()
            if objective.bregman is not None:
                before = {n: p.clone() for n, p in model.named_parameters()}
                objective.bregman.reference_output(model, "sst", b.inputs)
                assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert distance[5.0] < 0.5 * distance[0.0], distance


def test_bregman_average_follows_the_momentum_formula(tiny_model_factory):
    from peft_mtl.training.smart import BregmanProximal

    model = noisy_model(tiny_model_factory)
    breg = BregmanProximal(model, mu=1.0, beta=0.5)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    before = breg.average[name].clone()
    with torch.no_grad():
        param.add_(1.0)
    breg.update()
    assert torch.allclose(breg.average[name], 0.5 * before + 0.5 * param.detach())


def test_simcse_loss_prefers_matching_pairs():
    z = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert simcse_loss(z, z, 0.05) < simcse_loss(z, z.roll(1, 0), 0.05)


def test_normalize_projection_rescales_ascent_steps_to_unit_norm_and_is_zero_without_noise(tiny_model_factory,
                                                                                          tiny_backbone):
    """The public-code variant: the perturbation after an ascent step has unit ℓ∞ norm per
    example (ε only guards the division), so R_s is far larger than inside a 1e-5 ball."""
    from peft_mtl.training.smart import constrain

    d = torch.randn(3, 5, 4)
    normalized = constrain(d, SmartSettings(projection="normalize", epsilon=1e-6))
    assert torch.allclose(normalized.abs().flatten(1).amax(1), torch.ones(3), atol=1e-5)
    start = constrain(d, SmartSettings(projection="normalize"), start=True)
    assert torch.equal(start, d), "the random start stays N(0, sigma^2)"
    model = noisy_model(tiny_model_factory)
    b = batch(tiny_backbone)
    ball = smart_term(model, b, epsilon=1e-5, sigma=1e-5, step_size=1e-3)
    unit = smart_term(model, b, epsilon=1e-5, sigma=1e-5, step_size=1e-3, projection="normalize")
    assert unit > 1e3 * ball > 0
    assert smart_term(model, b, epsilon=1e-5, sigma=0.0, step_size=0.0, steps=0, projection="normalize") == 0.0
