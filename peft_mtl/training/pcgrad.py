"""PCGrad gradient surgery (Yu et al., NeurIPS 2020) for parameters several tasks share.

For each task gradient g_i, and each other task j in random order: if g_i · g_j < 0,
remove the conflicting component, g_i ← g_i − (g_i · g_j / ‖g_j‖²) g_j. The shared
parameters then receive Σ_i g_i. Task-specific parameters keep their own gradients.

"Shared" means every trainable tensor more than one task's loss reaches: the shared
adapter in LoRA mode, the whole encoder in full fine-tuning, nothing with independent
adapters or heads only (PCGrad then leaves every gradient as it is).
"""

from __future__ import annotations

import numpy as np
import torch


def pcgrad_combine(task_grads: list[torch.Tensor], rng: np.random.Generator) -> torch.Tensor:
    """Project conflicting flat gradients and sum them."""
    projected = []
    for i, g in enumerate(task_grads):
        g = g.clone()
        others = [j for j in range(len(task_grads)) if j != i]
        rng.shuffle(others)
        for j in others:
            gj = task_grads[j]
            # Only a conflict (g · g_j < 0) is projected out; clamping instead of branching keeps
            # the decision on the device (no host sync per pair) and leaves g unchanged otherwise.
            dot = torch.dot(g, gj).clamp(max=0)
            g -= dot / gj.dot(gj).clamp_min(1e-20) * gj
        projected.append(g)
    return torch.stack(projected).sum(0)


class PCGrad:
    """Collects each task's gradient of the shared parameters during a step, then combines them.

    Usage per step: ``take(shared)`` after each task's backward (it moves the gradient
    aside), then ``apply(shared)`` once. The shuffling generator is seeded from the run's
    seed and saved in checkpoints.
    """

    def __init__(self, seed: int):
        self.rng = np.random.default_rng([seed, 0xBC6])
        self._grads: list[torch.Tensor] = []

    def take(self, shared: list[torch.nn.Parameter]) -> None:
        if shared:
            self._grads.append(flat_grad(shared))
            for p in shared:
                p.grad = None

    def apply(self, shared: list[torch.nn.Parameter]) -> None:
        grads, self._grads = self._grads, []
        if not shared or not grads:
            return
        assign_flat_grad(shared, pcgrad_combine(grads, self.rng) if len(grads) > 1 else grads[0])

    def random_state(self) -> dict:
        return self.rng.bit_generator.state

    def load_random_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def assign_flat_grad(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
