"""SMART regularisation and momentum Bregman proximal point (Jiang et al., ACL 2020).

Smoothness-inducing adversarial regulariser::

    R_s(θ) = 1/n Σ_i max_{‖x̃_i − x_i‖_p ≤ ε} ℓ_s(f(x̃_i; θ), f(x_i; θ))

with x_i the *embedding-layer output* (token + position + segment embeddings after
LayerNorm), ℓ_s the symmetric KL divergence for classification and the squared error
for regression. The inner max is approximated by T steps of normalised gradient ascent
from x_i + N(0, σ²), each step projected back into the ε-ball (ℓ∞ or ℓ2).

Two details public implementations get wrong are handled here: the perturbation is added
to the embedding-layer output by a forward hook, so embeddings and LayerNorm run once (not
twice, as when the perturbed output is fed back as ``inputs_embeds``); and the step is a
projection onto the ball, not a renormalisation onto its surface. Every forward pass of one
step replays the clean pass's dropout masks, so R_s measures the effect of the
perturbation alone and is exactly 0 when ε = 0.

Bregman proximal point with momentum adds μ·ℓ_s(f(x; θ), f(x; θ̃_t)) to the loss, where
θ̃_t = (1 − β) θ_t + β θ̃_{t−1} is an exponential average of past parameters; it keeps each
update close, in output space, to where the model has recently been. f(x; θ̃) is computed
with ``torch.func.functional_call``: the live parameters are never overwritten, so autograd
(which saved them for the backward pass) and autocast's cast cache both stay valid.

These are the formulas; :class:`peft_mtl.training.regularizers.Objective` decides when they run and
owns their random state.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import device
from ..model.kernels import paired_dropout
from .config import SmartSettings


def symmetric_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) + KL(Q‖P) = Σ (p − q)(log p − log q), averaged over the batch.

    The second form has no cancellation between two large sums: every term is ≥ 0, so
    divergences of 1e-10 (an ε = 1e-5 perturbation) come out positive rather than as noise.
    """
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()


def output_divergence(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if kind == "classification":
        return symmetric_kl(a, b)
    return F.mse_loss(a.float(), b.float())


@contextmanager
def replay_rng(state: torch.Tensor, where: torch.device):
    """Run a block with ``where``'s dropout generator set to ``state`` (same masks), then restore it."""

    saved = device.rng_state(where)
    device.set_rng_state(state, where)
    try:
        yield
    finally:
        device.set_rng_state(saved, where)


def _per_example_max(t: torch.Tensor) -> torch.Tensor:
    return t.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _per_example_l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Euclidean projection onto the ε-ball: clamp for ℓ∞, shrink only if outside for ℓ2."""
    if norm == "inf":
        return delta.clamp(-epsilon, epsilon)
    scale = (epsilon / _per_example_l2(delta)).clamp(max=1.0)
    return delta * scale


def constrain(delta: torch.Tensor, settings: SmartSettings, start: bool = False) -> torch.Tensor:
    """Keep a perturbation in bounds, the way ``settings.projection`` says.

    ``ball`` (the paper's formula): project onto the ε-ball. ``normalize`` (what the public
    SMART code the seed reports used does — mt-dnn, smart-pytorch): the random start is left
    as N(0, σ²) and each ascent step is rescaled to unit norm per example, ``δ / (‖δ‖ + ε)``;
    there ε only guards the division, so the perturbation has norm ~1, not ε.
    """
    if settings.projection == "ball":
        return project(delta, settings.epsilon, settings.norm)
    if start:
        return delta
    size = _per_example_max(delta) if settings.norm == "inf" else _per_example_l2(delta)
    return delta / (size + settings.epsilon)


def smart_regularizer(forward: Callable[[list[torch.Tensor]], torch.Tensor], clean_output: torch.Tensor,
                      embeddings: list[torch.Tensor], masks: list[torch.Tensor], kind: str,
                      settings: SmartSettings, rng_state: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """R_s for one batch.

    Args:
        forward: runs the model with the given embedding perturbations added; returns outputs.
        clean_output: the unperturbed outputs (gradients flow through them too).
        embeddings: the clean embedding-layer outputs, one per encoded segment (for shapes).
        masks: attention masks per segment; padding positions are never perturbed.
        rng_state: the RNG state the clean forward started from (dropout replay).
        generator: where the random start N(0, σ²) is drawn from (not the global RNG,
            whose state belongs to the dropout masks).
    """
    masks = [mask.to(emb.device) for mask, emb in zip(masks, embeddings)]  # batches are built on the CPU
    noise = []
    for emb, mask in zip(embeddings, masks):
        m = mask.unsqueeze(-1).to(torch.float32)
        noise.append(constrain(torch.randn(emb.shape, dtype=torch.float32, generator=generator, device=emb.device)
                               * settings.sigma * m, settings, start=True))
    target = clean_output.detach()
    for _ in range(settings.steps):
        for d in noise:
            d.requires_grad_(True)
        with replay_rng(rng_state, clean_output.device):
            adv = forward(noise)
        gap = output_divergence(kind, adv, target)
        # Only the perturbation's gradient is needed: no parameter gradients are built here.
        grads = torch.autograd.grad(gap, noise, allow_unused=True)
        stepped = []
        for d, g, mask in zip(noise, grads, masks):
            m = mask.unsqueeze(-1).to(torch.float32)
            if g is None:
                g = torch.zeros_like(d)
            scale = _per_example_max(g) if settings.norm == "inf" else _per_example_l2(g)
            stepped.append(constrain((d + settings.step_size * g / scale) * m, settings).detach())
        noise = stepped
    with replay_rng(rng_state, clean_output.device):
        adv = forward(noise)
    return output_divergence(kind, adv, clean_output)


def smart_random_paired(model: nn.Module, key: str, inputs: list[dict[str, torch.Tensor]], kind: str,
                        settings: SmartSettings, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """SMART with T = 0 in one forward pass: (clean outputs, R_s).

    Without ascent steps the perturbed pass does not depend on the clean one, so the batch
    runs once as 2B rows — B clean, B with x + δ, δ = Π_ε(N(0, σ²)) on real tokens — with
    the dropout masks of the first half reused for the second (kernels.paired_dropout),
    which keeps R_s = 0 when ε = 0. One bigger pass instead of two; same regulariser.
    """
    rows = inputs[0]["input_ids"].shape[0]
    hidden = model.embeddings.word_embeddings.embedding_dim
    noise = []
    for seg in inputs:
        m = seg["attention_mask"].unsqueeze(-1).to(torch.float32)
        where = model.embeddings.word_embeddings.weight.device
        delta = constrain(torch.randn(*seg["input_ids"].shape, hidden, generator=generator, device=where)
                          * settings.sigma * m.to(where), settings, start=True)
        noise.append(torch.cat([torch.zeros_like(delta), delta]))
    doubled = [{k: torch.cat([v, v]) for k, v in seg.items()} for seg in inputs]
    with model.perturbed_embeddings(noise), paired_dropout():
        out = model(key, doubled)
    clean, perturbed = out[:rows], out[rows:]
    return clean, output_divergence(kind, perturbed, clean)


class BregmanProximal:
    """θ̃ (an EMA of the trainable parameters) and the penalty μ·ℓ_s(f(x;θ), f(x;θ̃)).

    Names are those of ``model.named_parameters()``; θ̃ starts equal to θ, so the penalty of
    the first step is exactly 0 (with the same dropout masks).
    """
    def __init__(self, model: nn.Module, mu: float, beta: float):
        self.mu, self.beta = mu, beta
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.average = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def reference_output(self, model: nn.Module, *args) -> torch.Tensor:
        """``model(*args)`` with θ̃ in place of θ, leaving θ (and its autograd history) untouched."""
        # θ̃ tensors do not require grad, so autocast never caches their casts: no stale
        # low-precision copies of θ can leak into this pass (the bug an in-place swap had).
        return torch.func.functional_call(model, self.average, args, strict=False, tie_weights=False)

    def penalty(self, kind: str, output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return self.mu * output_divergence(kind, output, reference)

    @torch.no_grad()
    def update(self) -> None:
        """θ̃_t = (1 − β) θ_t + β θ̃_{t−1}."""
        for n, p in self.params.items():
            self.average[n].mul_(self.beta).add_(p.detach(), alpha=1 - self.beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"bregman.{n}": t for n, t in self.average.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.average if f"bregman.{n}" not in state]
        if missing:
            raise KeyError(f"the checkpoint has no Bregman average for {missing[0]} (and {len(missing) - 1} more)")
        for n in self.average:
            self.average[n].copy_(state[f"bregman.{n}"])
