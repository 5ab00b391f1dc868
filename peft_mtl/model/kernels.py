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

LoRA layers: :func:`use_fused_lora` routes peft's LoRA ``Linear`` layers through
:func:`fused_lora_forward` — all active adapters as one rank-concatenated product
accumulated into the base GEMM (a custom autograd function in fp32; under bf16 autocast
one input cast and a kept bf16 copy of the frozen weight), and merged cached weights at
inference — and through peft's own forward otherwise.
Measurements for each piece: reports/speed.md.
"""

from __future__ import annotations

import types
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from . import peft_compat

ATTENTION_NAME = "peft_mtl"
_INT16_SPAN = 65536


_paired = False


@contextmanager
def paired_dropout() -> Iterator[None]:
    """Inside the block, the second half of every batch reuses the first half's dropout masks.

    SMART without ascent steps runs the clean and the perturbed copy of a batch as one
    batch of 2B rows; with shared masks the two halves differ only by the perturbation.
    """
    global _paired
    previous, _paired = _paired, True
    try:
        yield
    finally:
        _paired = previous


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Boolean mask with P(True) = 1 − p (to 1/65536), from a quarter of the usual random draws."""
    if _paired:
        if shape[0] % 2:
            raise ValueError(f"paired dropout needs an even batch dimension, got shape {tuple(shape)}")
        half = keep_mask_unpaired(torch.Size([shape[0] // 2, *shape[1:]]), p)
        return torch.cat([half, half])
    return keep_mask_unpaired(shape, p)


def keep_mask_unpaired(shape: torch.Size, p: float) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)
    uniforms = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    return uniforms >= round(p * _INT16_SPAN) - _INT16_SPAN // 2


class _FastDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = keep_mask(x.shape, p)
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
    """Drop-in ``nn.Dropout`` that uses :func:`fast_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

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


# -- LoRA linear layers -------------------------------------------------------------------

def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def concat_factors(layer: nn.Module, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A = Σ_i s_i B_i A_i`` over the adapters ``names`` of a LoRA layer.

    The factors are concatenated along the rank (scaling folded into B): adapters that are
    active together (shared + task) become one low-rank product.
    """
    factors = [peft_compat.lora_factors(layer, n) for n in names]
    if len(factors) == 1:
        a, b, s = factors[0]
        return a, b * s
    a = torch.cat([a for a, _, _ in factors], dim=0)  # (r, d_in)
    b = torch.cat([b * s for _, b, s in factors], dim=1)  # (d_out, r)
    return a, b


def _frozen_bf16(layer: nn.Module, name: str) -> torch.Tensor | None:
    """A bf16 copy of the frozen base weight or bias, made once (re-made if the tensor changes)."""
    tensor = getattr(layer.base_layer, name)
    if tensor is None or tensor.dtype == torch.bfloat16:
        return tensor
    cache = layer.__dict__.setdefault("_peft_mtl_bf16", {})
    key = (tensor.data_ptr(), tensor._version)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = (key, tensor.detach().to(torch.bfloat16))
        cache[name] = hit
    return hit[1]


def _merged(layer: nn.Module, active: list[str], dtype: torch.dtype, build: bool = True) -> torch.Tensor | None:
    """``W + Σ_i s_i B_i A_i`` in ``dtype`` for the active adapters, kept until they or W change.

    Inference then costs what a merged model costs (no rank-r matmuls per layer) while the
    adapters stay separate: switching sets only changes which merge the next big pass
    makes (``build=False``: return None rather than merge). The key holds the tensors
    themselves (so their ids cannot be reused) and their version counters (bumped by
    optimiser steps and in-place copies, e.g. Bregman's parameter swap).
    """
    tensors = [layer.base_layer.weight]
    for name in active:
        tensors += peft_compat.adapter_tensors(layer, name)
    key = (dtype,) + tuple((id(t), t._version) for t in tensors) + tuple(float(layer.scaling[n]) for n in active)
    cache = layer.__dict__.setdefault("_peft_mtl_merged", {})
    if cache.get("key") != key:
        if not build:
            return None
        with torch.no_grad():
            a, b = concat_factors(layer, active)
            merged = torch.addmm(layer.base_layer.weight.float(), b.float(), a.float())
        cache.update(key=key, tensors=tensors, weight=merged.to(dtype))
    return cache["weight"]


def _compute_dtype(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.dtype | None:
    """bf16 or fp32 when :func:`fused_lora_forward` covers the call, None for peft's own path."""
    if kwargs or not peft_compat.uses_unmerged_adapters(layer):
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad:
        return None  # full fine-tuning or a quantized layer: peft's own path
    for name in peft_compat.active_lora_adapters(layer):
        if not peft_compat.is_plain_lora(layer, name):
            return None  # DoRA and LoRA dropout need peft's per-adapter path
    if _autocast_bf16() or base.weight.dtype == torch.bfloat16:
        return torch.bfloat16
    if (base.weight.dtype == torch.float32 and x.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)):
        return torch.float32
    return None  # fp16 or another autocast: peft's own path


def _worth_merging(layer: nn.Module, x: torch.Tensor) -> bool:
    """A merge costs about what the rank-r path costs on d_in·d_out / (d_in + d_out) rows."""
    rows = x.numel() // x.shape[-1]
    return rows >= layer.in_features * layer.out_features / (layer.in_features + layer.out_features)


class _LoraLinear(torch.autograd.Function):
    """``x W^T + b + (x A^T) B^T`` for a frozen ``W`` and trainable low-rank ``A``, ``B`` (fp32).

    Autograd over peft's forward scales and adds each adapter's output separately and
    adds the base and low-rank input gradients as two tensors; here the low-rank product
    is accumulated into the base GEMM's output (``addmm_``) in both directions, the frozen
    weight gets no gradient, and nothing of width d_out or d_in is materialised twice.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
        projected = rows @ a.t()  # (N, r)
        out = torch.addmm(bias, rows, weight.t()) if bias is not None else rows @ weight.t()
        out.addmm_(projected, b.t())
        ctx.save_for_backward(rows, weight, a, b, projected)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, weight, a, b, projected = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_projected = grad_out @ b  # (N, r)
        grad_rows = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_rows = grad_out @ weight
            grad_rows.addmm_(grad_projected, a)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0)
        if ctx.needs_input_grad[3]:
            grad_a = grad_projected.t() @ rows
        if ctx.needs_input_grad[4]:
            grad_b = grad_out.t() @ projected
        return grad_rows, None, grad_bias, grad_a, grad_b


def fused_lora_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A peft LoRA ``Linear`` forward with the active adapters fused into the base GEMM.

    peft computes ``base(x) + Σ_i s_i B_i A_i x`` adapter by adapter — a scaled output and
    an add of width d_out per adapter, and under autocast a cast of ``x`` per adapter and a
    re-cast of the frozen fp32 weight on every call. Here the active adapters (shared +
    task) are concatenated along the rank — ``[B_1 s_1, B_2 s_2] [A_1; A_2] = Σ_i s_i B_i
    A_i`` — and their product is accumulated into the base GEMM's output; without
    gradients (inference) the deltas are merged into a cached weight when the batch repays
    the merge. Under bf16 autocast ``x`` is cast once and the frozen weight once per run;
    in fp32 :class:`_LoraLinear` does the same fusion in the backward pass. Anything this
    does not cover (fp16, DoRA, LoRA dropout, per-sample ``adapter_names``, merged or
    trainable base weights) runs peft's own forward.
    """
    dtype = None if args else _compute_dtype(layer, x, kwargs)
    if dtype is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    if dtype == torch.float32:
        return _fused_fp32(layer, x)
    x16 = _bf16_input(x)
    active = peft_compat.active_lora_adapters(layer)
    if active and not torch.is_grad_enabled():
        # Inference: one GEMM with W + Σ s_i B_i A_i, merged once per active combination.
        merged = _merged(layer, active, torch.bfloat16, build=_worth_merging(layer, x16))
        if merged is not None:
            return torch.nn.functional.linear(x16, merged, _frozen_bf16(layer, "bias"))
    result = torch.nn.functional.linear(x16, _frozen_bf16(layer, "weight"), _frozen_bf16(layer, "bias"))
    if not active:
        return result
    a, b = concat_factors(layer, active)
    rows = x16.reshape(-1, x16.shape[-1])
    # result + (x A^T) B^T as one addmm: the delta is never materialised on its own.
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), rows @ a.to(torch.bfloat16).t(),
                        b.to(torch.bfloat16).t())
    return fused.view(result.shape)


def _fused_fp32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    active = peft_compat.active_lora_adapters(layer)
    if active and not torch.is_grad_enabled():
        merged = _merged(layer, active, torch.float32, build=_worth_merging(layer, x))
        if merged is not None:
            return torch.nn.functional.linear(x, merged, base.bias)
    if not active:
        return torch.nn.functional.linear(x, base.weight, base.bias)
    a, b = concat_factors(layer, active)
    rows = x.reshape(-1, x.shape[-1])
    out = _LoraLinear.apply(rows, base.weight, base.bias, a, b)
    return out.view(*x.shape[:-1], out.shape[-1])


_last_cast: dict = {}


def _bf16_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in bf16, reusing the previous cast when the same tensor feeds several layers.

    BERT's query, key and value projections read the same fp32 LayerNorm output; casting
    it once instead of three times (and keeping one cast node in the autograd graph)
    removes a third of the casts of a step.
    """
    if x.dtype == torch.bfloat16:
        return x
    # Inference tensors have no version counter; the cache is also emptied before every
    # encoder forward (use_fused_lora), so a hit is always within one pass.
    version = None if x.is_inference() else x._version
    key = (version, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    entry = _last_cast.get("entry")  # one tuple, read once: threads may replace it meanwhile
    if entry is not None and entry[0]() is x and entry[1] == key:
        return entry[2]
    cast = x.to(torch.bfloat16)
    _last_cast["entry"] = (weakref.ref(x), key, cast)
    return cast


def use_fused_lora(encoder: nn.Module) -> int:
    """Route every peft LoRA ``Linear`` in ``encoder`` through :func:`fused_lora_forward`; returns how many."""
    LoraLinear = peft_compat.lora_linear_class()

    if not getattr(encoder, "_peft_mtl_cast_hook", False):
        encoder.register_forward_pre_hook(lambda module, args: _last_cast.clear())
        encoder._peft_mtl_cast_hook = True
    count = 0
    for module in encoder.modules():
        if type(module) is LoraLinear and "forward" not in module.__dict__:
            # A bound method (not a closure) so that deep copies call their own layer.
            module.forward = types.MethodType(fused_lora_forward, module)
            count += 1
    return count
