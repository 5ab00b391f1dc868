"""Pooling and the small task heads that sit on the encoder.

Cross-encoded and single-sentence inputs give one pooled vector; bi-encoded pairs give two
(u, v), compared as in Sentence-BERT (Reimers & Gurevych 2019): cosine similarity scaled
to 0..5 for regression, a classifier on ``[u, v, |u - v|]`` for classification.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .kernels import FastDropout
from ..data.tasks import TaskSpec

POOLINGS = ("mean", "cls")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[CLS]`` vector, or the mean of the non-padding token vectors, in fp32.

    The encoder may run in bf16 (about 3 significant digits); pooling and the heads do
    not, so STS scores and class probabilities are not rounded to bf16's grid.
    """
    if pooling == "cls":
        return hidden[:, 0].float()
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    raise UserError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")


def apply_head(head: nn.Module, segments: list[tuple[torch.Tensor, torch.Tensor]], pooling: str, kind: str
               ) -> torch.Tensor:
    """The head step every path shares: pool each ``(hidden, mask)`` segment, apply ``head``,
    drop the last axis for regression; fp32 logits ``(B, C)`` or scores ``(B,)``."""
    out = head([pool(hidden, mask, pooling) for hidden, mask in segments])
    if kind == "regression":
        out = out.squeeze(-1)
    return out.float()


class TaskHead(nn.Module):
    """Dropout + linear layer on one pooled vector (or on ``[u, v, |u-v|]`` for bi-encoded pairs)."""

    def __init__(self, hidden_size: int, outputs: int, pair_encoding: str = "cross", dropout: float = 0.1,
                 cosine: bool = False, cosine_scale: float = 5.0):
        super().__init__()
        self.pair_encoding = pair_encoding
        self.cosine = cosine
        self.cosine_scale = cosine_scale  # cosine 1 maps to the top of the task's output range
        self.dropout = FastDropout(dropout)
        in_features = hidden_size * 3 if pair_encoding == "bi" and not cosine else hidden_size
        # A cosine head has no weights of its own: the encoder learns the geometry.
        self.linear = None if cosine else nn.Linear(in_features, outputs)

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        # Pooling and heads stay fp32 under any autocast (fp16 logits could overflow), on any device.
        kind = pooled[0].device.type
        with torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else contextlib.nullcontext():
            return self._forward([p.float() for p in pooled])

    def _forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        if self.pair_encoding == "bi":
            u, v = pooled
            if self.cosine:
                return self.cosine_scale * F.cosine_similarity(u.float(), v.float(), dim=-1).unsqueeze(-1)
            features = torch.cat([u, v, (u - v).abs()], dim=-1)
        else:
            (features,) = pooled
        return self.linear(self.dropout(features))


def make_head(task: TaskSpec, hidden_size: int, pair_encoding: str = "cross", dropout: float = 0.1) -> TaskHead:
    bi = task.is_pair and pair_encoding == "bi"
    scale = task.output_range[1] if task.output_range else 1.0
    return TaskHead(hidden_size, task.head_outputs, pair_encoding="bi" if bi else "cross", dropout=dropout,
                    cosine=bi and task.kind == "regression", cosine_scale=scale)
