"""PCGrad gradient surgery (Yu et al., NeurIPS 2020) for parameters several tasks share.

For each task gradient g_i, and each other task j in random order: if g_i · g_j < 0,
remove the conflicting component, g_i ← g_i − (g_i · g_j / ‖g_j‖²) g_j. The shared
parameters then receive Σ_i g_i. Task-specific parameters keep their own gradients.
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
            dot = torch.dot(g, gj)
            if dot < 0:
                g -= dot / gj.dot(gj).clamp_min(1e-20) * gj
        projected.append(g)
    return torch.stack(projected).sum(0)


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def assign_flat_grad(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
