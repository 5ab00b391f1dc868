"""Unsupervised SimCSE (Gao et al. 2021): a contrastive warm-up of the encoder before task training.

Each sentence is encoded twice; different dropout masks make the two embeddings a positive
pair, and the other sentences of the batch are negatives::

    ℓ_i = −log  exp(sim(h_i, h_i⁺)/τ) / Σ_j exp(sim(h_i, h_j⁺)/τ)

with sim the cosine similarity and τ the temperature (0.05, as in seed 003).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.loading import length_grouped_batches, pad_sequences
from ..device import autocast, grad_scaler
from ..model.adapters import SHARED_ADAPTER, activate


def simcse_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    sim = F.cosine_similarity(first.float().unsqueeze(1), second.float().unsqueeze(0), dim=-1) / temperature
    return F.cross_entropy(sim, torch.arange(len(first), device=first.device))


def simcse_step_loss(model, inputs: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Encode the batch twice in one forward pass (the rows get independent dropout masks)."""
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    pooled = model.encode(doubled)
    n = inputs["input_ids"].shape[0]
    return simcse_loss(pooled[:n], pooled[n:], temperature)


def run_simcse(model, cfg, train: dict, precision: str, pad_id: int, progress: bool,
               log=lambda message: None) -> list[float]:
    """The SimCSE stage: contrastive warm-up of the shared adapter (or the whole encoder in
    full mode) on the training sentences of every task, before task training.

    Uses at most ``cfg.simcse_max_sentences`` sentences (a seeded sample), its own AdamW,
    and leaves every adapter trainable again for the task optimiser built after it.
    """
    sentences = [sentence for split in train.values() for seg in split.segments for sentence in seg]
    rng = np.random.default_rng([cfg.seed, 0x51C])
    if len(sentences) > cfg.simcse_max_sentences:
        sentences = [sentences[i] for i in rng.choice(len(sentences), cfg.simcse_max_sentences, replace=False)]
    if cfg.mode == "lora":
        activate(model.encoder, [SHARED_ADAPTER], trainable=True)
        model.reset_routing()
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scaler = grad_scaler(precision, model.device)  # fp16 gradients need scaling here as in task training
    lengths = np.array([len(s["input_ids"]) for s in sentences])
    losses: list[float] = []
    model.train()
    for epoch in range(cfg.simcse_epochs):
        batches = length_grouped_batches(lengths, cfg.batch_size, np.random.default_rng([cfg.seed, 0x51C, epoch]))
        for idx in tqdm(batches, desc=f"simcse {epoch + 1}/{cfg.simcse_epochs}", disable=not progress,
                        file=sys.stderr, mininterval=2.0):
            inputs = pad_sequences([sentences[i] for i in idx], pad_id)
            optimizer.zero_grad(set_to_none=True)
            with autocast(precision, model.device):
                loss = simcse_step_loss(model, inputs, cfg.simcse_temperature)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # skipped when fp16 gradients overflowed
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
        log(f"simcse epoch {epoch + 1}: mean loss {np.mean(losses[-len(batches):]):.4f}")
    if cfg.mode == "lora":
        # Back to "every adapter trainable" before the task optimiser is built.
        activate(model.encoder, list(model.encoder.peft_config), trainable=True)
        model.reset_routing()
    return losses
