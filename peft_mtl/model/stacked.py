"""Run k LoRA adapter combinations over k copies of a batch in one forward pass.

peft can route rows of one batch to different adapters (``adapter_names=[...]``), but it
does so by looping over the adapters inside every LoRA layer, gathering each one's rows,
running its two small matmuls and scattering the result back. On a CPU that costs more
than it saves (measured: 0.78× the speed of one pass per member).

Here each member's LoRA weights for a layer are stacked once into ``A: (k, d_in, R)`` and
``B: (k, R, d_out)`` — a member with several active adapters (shared + task) gets them
concatenated along the rank, which is exactly the sum of their deltas; the LoRA scaling is
folded into ``B``; members with a smaller rank, or without an adapter on that layer, are
zero-padded. The batch holds the k copies as k contiguous blocks, so the delta of every
member is two batched matmuls over a ``(k, rows, d_in)`` view: no gathers, no loops.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from . import peft_compat
from .kernels import concat_factors


@dataclass
class StackedLayer:
    """The stacked LoRA factors of one adapted linear layer."""

    A: torch.Tensor  # (k, d_in, R)
    B: torch.Tensor  # (k, R, d_out), LoRA scaling folded in


def _lora_linears(encoder: nn.Module) -> list[nn.Module]:
    linear = peft_compat.lora_linear_class()
    return [m for m in encoder.modules() if isinstance(m, linear)]


def stack_members(encoder: nn.Module, members: list[list[str]], dtype: torch.dtype = torch.float32,
                  ) -> dict[nn.Module, StackedLayer | None]:
    """Stack the LoRA factors of every member (a list of adapter names whose deltas add).

    Every LoRA layer of the encoder gets an entry; ``None`` where no member adapts it.
    """
    stacked: dict[nn.Module, StackedLayer | None] = {}
    for layer in _lora_linears(encoder):
        if getattr(layer, "merged", False):
            raise ValueError("stacked LoRA needs unmerged adapters")
        factors = []
        for names in members:
            present = [n for n in names if n in layer.lora_A]
            for n in present:
                if peft_compat.is_variant(layer, n):
                    raise ValueError(f"adapter {n!r} is a LoRA variant (e.g. DoRA) that cannot be stacked")
            factors.append(concat_factors(layer, present) if present else (None, None))
        if all(a is None for a, _ in factors):
            stacked[layer] = None
            continue
        rank = max(a.shape[0] for a, _ in factors if a is not None)
        d_in, d_out = layer.in_features, layer.out_features
        where = layer.base_layer.weight.device
        A = torch.zeros(len(members), d_in, rank, dtype=dtype, device=where)
        B = torch.zeros(len(members), rank, d_out, dtype=dtype, device=where)
        for m, (a, b) in enumerate(factors):
            if a is not None:
                A[m, :, :a.shape[0]] = a.detach().t()
                B[m, :a.shape[0], :] = b.detach().t()
        stacked[layer] = StackedLayer(A, B)
    return stacked


def _stacked_forward(layer: nn.Module, factors: StackedLayer | None, x: torch.Tensor, *args, **kwargs
                     ) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    if factors is None:
        return result
    k = factors.A.shape[0]
    rows = x.reshape(k, -1, x.shape[-1]).to(factors.A.dtype)
    delta = torch.bmm(torch.bmm(rows, factors.A), factors.B)
    return result + delta.reshape(*result.shape).to(result.dtype)


@contextmanager
def stacked_lora(stacked: dict[nn.Module, StackedLayer | None]) -> Iterator[None]:
    """Within the block, every LoRA layer applies member m's delta to the m-th of k equal row blocks.

    The batch dimension of every input must be k × n with member m's copy in rows
    ``m*n:(m+1)*n``. Whatever adapters peft has active are ignored inside the block.
    """
    with _forwards_replaced({layer: (lambda x, *a, _l=layer, _f=factors, **kw: _stacked_forward(_l, _f, x, *a, **kw))
                             for layer, factors in stacked.items()}):
        yield


@contextmanager
def _forwards_replaced(forwards: dict[nn.Module, object]) -> Iterator[None]:
    """Give each layer another forward for the block; put back whatever it had (kernels' own patch included)."""
    patched = []
    try:
        for layer, forward in forwards.items():
            patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = forward
        yield
    finally:
        for layer, previous in patched:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


# -- grouped rows: each contiguous row block gets its own adapter combination ------------------

@dataclass
class RowGroup:
    """Rows ``start:end`` of a batch run with the LoRA factors of one adapter combination."""

    start: int
    end: int
    factors: dict[nn.Module, tuple[torch.Tensor, torch.Tensor] | None]  # layer -> (A^T, B^T · s)


def combination_factors(encoder: nn.Module, names: list[str]) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor] | None]:
    """Per LoRA layer, ``(A^T (d_in, r), (s·B)^T (r, d_out))`` of the summed adapters ``names``
    (None where none of them adapts the layer). A DoRA adapter cannot be expressed so: error."""
    out: dict[nn.Module, tuple[torch.Tensor, torch.Tensor] | None] = {}
    for layer in _lora_linears(encoder):
        present = [n for n in names if n in layer.lora_A]
        for n in present:
            if peft_compat.is_variant(layer, n):
                raise ValueError(f"adapter {n!r} is a LoRA variant (e.g. DoRA) that cannot be grouped")
        if not present:
            out[layer] = None
            continue
        a, b = concat_factors(layer, present)
        out[layer] = (a.detach().t().contiguous(), b.detach().t().contiguous())
    return out


def _grouped_forward(layer: nn.Module, groups: list[RowGroup], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    for g in groups:
        f = g.factors.get(layer)
        if f is None or g.end <= g.start:
            continue
        a, b = f
        rows = x[g.start:g.end]
        result[g.start:g.end] += ((rows.to(a.dtype) @ a) @ b).to(result.dtype)
    return result


@contextmanager
def grouped_lora(encoder: nn.Module, groups: list[RowGroup]) -> Iterator[None]:
    """Within the block, rows ``g.start:g.end`` of every batch get group g's LoRA deltas.

    One forward pass serves requests for different adapter sets and tasks (the server's
    dynamic batches): the frozen weight runs once over all rows, each group's low-rank
    product only over its own contiguous rows — no gathers, no per-adapter masks.
    Whatever adapters peft has active are ignored inside the block.
    """
    with _forwards_replaced({layer: (lambda x, *a, _l=layer, **kw: _grouped_forward(_l, groups, x, *a, **kw))
                             for layer in _lora_linears(encoder)}):
        yield
