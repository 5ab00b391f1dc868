"""Unsupervised SimCSE (Gao et al. 2021): a contrastive warm-up of the encoder before task training.

Each sentence is encoded twice; different dropout masks make the two embeddings a positive
pair, and the other sentences of the batch are negatives::

    ℓ_i = −log  exp(sim(h_i, h_i⁺)/τ) / Σ_j exp(sim(h_i, h_j⁺)/τ)

with sim the cosine similarity and τ the temperature (0.05, as in seed 003).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simcse_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    sim = F.cosine_similarity(first.float().unsqueeze(1), second.float().unsqueeze(0), dim=-1) / temperature
    return F.cross_entropy(sim, torch.arange(len(first), device=first.device))


def simcse_step_loss(model, inputs: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Encode the batch twice in one forward pass (the rows get independent dropout masks)."""
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    pooled = model.encode(doubled)
    n = inputs["input_ids"].shape[0]
    return simcse_loss(pooled[:n], pooled[n:], temperature)
