"""Cheaper CPU building blocks for the frozen backbone: dropout, attention, LoRA layers.

Dropout: ``torch.nn.functional.dropout`` draws one 32-bit random number per element
(``bernoulli_``), which on this CPU cost 13% of a LoRA training step (reports/speed.md).
:func:`fast_dropout` draws 64-bit words and uses each as four 16-bit uniforms, so it makes
a quarter of the random draws; the keep probability is quantised to 1/65536 (0.1 becomes
0.100006). Masks come from torch's global generator, so seeding and SMART's replay of a
step's dropout masks work as before.

Attention: :func:`attention_forward` is transformers' eager attention (matmul, softmax,
matmul — faster on CPU than SDPA at these lengths, see backbone.load_encoder) with
:func:`fast_dropout` on the attention probabilities. It is registered with transformers'
``AttentionInterface`` as ``"peft_mtl"``.

The fused LoRA layers live with every other use of peft's internals, in
:mod:`peft_mtl.model.lora_runtime`. Measurements for each piece: reports/speed.md.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

ATTENTION_NAME = "peft_mtl"
_INT16_SPAN = 65536


# Per context (thread / asyncio task): a SMART pass in one thread never pairs another's masks.
_PAIRED: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_mtl_paired_dropout", default=False)


@contextmanager
def paired_dropout() -> Iterator[None]:
    """Inside the block, the second half of every batch reuses the first half's dropout masks.

    SMART without ascent steps runs the clean and the perturbed copy of a batch as one
    batch of 2B rows; with shared masks the two halves differ only by the perturbation.
    """
    token = _PAIRED.set(True)
    try:
        yield
    finally:
        _PAIRED.reset(token)


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask with P(True) = 1 − p (to 1/65536), from a quarter of the usual random draws."""
    if _PAIRED.get():
        if shape[0] % 2:
            raise ValueError(f"paired dropout needs an even batch dimension, got shape {tuple(shape)}")
        half = keep_mask_unpaired(torch.Size([shape[0] // 2, *shape[1:]]), p, device)
        return torch.cat([half, half])
    return keep_mask_unpaired(shape, p, device)


def keep_mask_unpaired(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    uniforms = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    return uniforms >= round(p * _INT16_SPAN) - _INT16_SPAN // 2


class _FastDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(mask)  # one byte per element
        ctx.scale = 1.0 / (1.0 - p)
        return x.mul(mask).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout, like ``F.dropout``, with masks from :func:`keep_mask`."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    return _FastDropout.apply(x, p)


class FastDropout(nn.Dropout):
    """Drop-in ``nn.Dropout`` that uses :func:`fast_dropout` on the CPU and PyTorch's dropout elsewhere.

    The quarter-of-the-draws trick pays on a CPU; a GPU draws its masks on the device with
    PyTorch's own kernel (and SMART's paired pass, which needs these masks, stays CPU-only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, self.training)
        return fast_dropout(x, self.p, self.training)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention with :func:`fast_dropout` on the attention probabilities."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    weights = fast_dropout(weights, dropout, module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def register_attention() -> str:
    """Make ``attn_implementation="peft_mtl"`` available to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    # The eager additive mask is what this attention function expects.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return ATTENTION_NAME


def all_dropout_pairable(model: nn.Module) -> bool:
    """True when every dropout in ``model`` draws its masks through :func:`keep_mask`."""
    for module in model.modules():
        if isinstance(module, nn.Dropout) and not isinstance(module, FastDropout) and module.p > 0:
            return False
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", ATTENTION_NAME) != ATTENTION_NAME \
                and getattr(config, "attention_probs_dropout_prob", 0) > 0:
            return False
    return True


def use_fast_dropout(encoder: nn.Module) -> int:
    """Swap every ``nn.Dropout`` in ``encoder`` for :class:`FastDropout` (same p); returns how many."""
    swapped = 0
    for module in list(encoder.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p, child.inplace))
                swapped += 1
    return swapped
