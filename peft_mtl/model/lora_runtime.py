"""The one seam between peft_mtl and peft's LoRA layers: how they run, and every use of their internals.

peft's public API covers one active adapter at a time; multi-task training needs several
active together (shared + task), inference needs microsecond switches between many loaded
sets and per-row routing (ensembles, the server's mixed batches), and the CPU kernels read
the LoRA factors directly. Those needs touch names peft does not promise to keep: the
tuner's ``set_adapter`` taking a list and ``inference_mode``, ``BaseTunerLayer._active_adapter``,
``LoraLayer.update_layer``/``lora_variant``, the ``lora_A``/``lora_B``/``scaling`` dicts, the
``base_layer`` wrapper and the ``.lora_A.weight`` key strings of saved adapters. This module
is the only code in the package that uses them (``tests/test_seams.py`` keeps it so); it is
checked against the peft releases in :data:`PEFT_CHECKED`, and a peft outside that range
gets one warning at import, naming this file.

**How a LoRA layer runs.** :func:`install` gives each peft LoRA ``Linear`` of a model one
forward, :class:`RuntimeLoraLinear` (a subclass chosen once, as peft's own
``_register_custom_module`` would at injection; nothing is reassigned per call). That
forward dispatches on the *route* held in a :class:`contextvars.ContextVar`:

* no route (the default): on the CPU the **fused** kernels (:func:`fused_lora_forward`:
  active adapters concatenated along the rank and accumulated into the base GEMM, merged
  cached weights at inference), and peft's own forward wherever they do not apply (CUDA,
  fp16, DoRA, LoRA dropout, trainable or quantized base weights);
* :func:`stacked_lora` — k members over k equal row blocks (batched ensembles);
* :func:`grouped_lora` — contiguous row groups, each with its own adapter combination (the
  server's dynamic batches);
* :func:`plain_peft` — peft's own forward, always (reference paths, tests).

A route is set for the ``with`` block and reset on exit, per thread and per asyncio task, so
a training run, the serving thread and a distillation teacher in one process never see each
other's routes. Paired dropout replay (SMART/Bregman) is the dropout kernels' context:
:func:`peft_mtl.model.kernels.paired_dropout`.
"""

from __future__ import annotations

import contextvars
import inspect
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import peft
import torch
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer as _PeftLoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer as _PeftTunerLayer
from torch import nn

from ..errors import UserError

# Checked: the test suite passes with peft 0.18.0 (+ transformers 5.0.0, accelerate 1.10.1) and
# peft 0.21.2 (+ transformers 5.23.0); peft 0.17 does not import under transformers 5.
# pyproject.toml declares the same range.
PEFT_CHECKED = ((0, 18), (0, 22))


def _version_tuple(text: str) -> tuple[int, int]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)  # type: ignore[return-value]


def check_peft_version() -> None:

    low, high = PEFT_CHECKED
    if not low <= _version_tuple(peft.__version__) < high:
        warnings.warn(f"peft {peft.__version__} is outside the range peft_mtl was checked against "
                      f"({'.'.join(map(str, low))} to below {'.'.join(map(str, high))}); "
                      f"if adapters misbehave, see peft_mtl/model/lora_runtime.py", RuntimeWarning, stacklevel=2)


# -- finding layers and switching adapters ------------------------------------------------

def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → peft LoRA layer (any kind: Linear, quantized Linear, ...)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _PeftLoraLayer)}


def lora_linears(model: nn.Module) -> list[nn.Module]:
    """peft's plain LoRA ``Linear`` layers of ``model`` (the ones routes and fused kernels cover)."""
    return [m for m in model.modules() if isinstance(m, _PeftLoraLinear)]


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _PeftTunerLayer)]


def activate(peft_model: nn.Module, names: list[str], trainable: bool) -> None:
    """Make exactly ``names`` active; their LoRA deltas add up in the forward pass.

    ``PeftModel.set_adapter`` takes one name only; the tuner's ``set_adapter`` takes a
    list. Inactive adapters get ``requires_grad=False`` (and, with ``trainable=False``,
    active ones too), so they cannot move.
    """
    peft_model.base_model.set_adapter(list(names), inference_mode=not trainable)


def switch_active_fast(peft_model: nn.Module, layers: Iterable[nn.Module], names: list[str]) -> None:
    """Inference-only switch: set the active adapter list on already-walked layers.

    What ``set_adapter`` does for the forward pass, without its walk over every module and
    its requires_grad bookkeeping (milliseconds with many sets loaded; this is microseconds).
    """
    for layer in layers:
        layer._active_adapter = list(names)
    peft_model.base_model.active_adapter = list(names)


def route_rows(peft_model: nn.Module, names: list[str]) -> None:
    """Activate every adapter that per-row routing (``adapter_names=[...]``) will use."""
    peft_model.base_model.set_adapter(list(dict.fromkeys(names)), inference_mode=True)


def active_lora_adapters(layer: nn.Module) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def adapters_of(layer: nn.Module, names: Iterable[str]) -> list[str]:
    """The adapters among ``names`` that adapt this layer, in order."""
    return [n for n in names if n in layer.lora_A]


def lora_factors(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A ``(r, d_in)``, B ``(d_out, r)``, scaling) of one adapter of a LoRA layer."""
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def adapter_tensors(layer: nn.Module, name: str) -> list[torch.Tensor]:
    return [layer.lora_A[name].weight, layer.lora_B[name].weight]


def is_plain_lora(layer: nn.Module, name: str) -> bool:
    """No DoRA (or other variant) and no LoRA dropout: the adapter is exactly s·B·A·x."""
    return name not in getattr(layer, "lora_variant", {}) and isinstance(layer.lora_dropout[name], nn.Identity)


def is_variant(layer: nn.Module, name: str) -> bool:
    return name in getattr(layer, "lora_variant", {})


def uses_unmerged_adapters(layer: nn.Module) -> bool:
    return not (layer.disable_adapters or layer.merged)


# -- adding and removing adapters ---------------------------------------------------------

def add_lora_to_existing_layer(layer: nn.Module, adapter_name: str, a: torch.Tensor, b: torch.Tensor, config) -> None:
    """Add a frozen LoRA adapter with factors ``a``, ``b`` to a layer that is already a LoRA layer."""
    # Newer peft (0.21 checked) takes the LoraConfig; 0.18 took its fields one by one.
    if "config" in inspect.signature(layer.update_layer).parameters:
        layer.update_layer(adapter_name, a.shape[0], config.lora_alpha, config)
    else:
        layer.update_layer(adapter_name, a.shape[0], lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora,
                           use_dora=config.use_dora, lora_bias=config.lora_bias, inference_mode=True)
    with torch.no_grad():
        layer.lora_A[adapter_name].weight.copy_(a)
        layer.lora_B[adapter_name].weight.copy_(b)
    layer.lora_A[adapter_name].weight.requires_grad_(False)
    layer.lora_B[adapter_name].weight.requires_grad_(False)


def remove_adapter_from_layer(layer: nn.Module, adapter_name: str) -> None:
    layer.delete_adapter(adapter_name)


def add_concatenated_adapter(peft_model: nn.Module, names: list[str], new_name: str) -> None:
    """A new adapter whose delta is the sum of ``names``' deltas (ranks concatenated)."""
    peft_model.base_model.add_weighted_adapter(names, [1.0] * len(names), new_name, combination_type="cat")


# -- parameter names and saved key strings ------------------------------------------------

_FACTOR_SUFFIX = {"A": ".lora_A.weight", "B": ".lora_B.weight"}


def is_peft_sublayer(name: str) -> bool:
    """Whether a module name is one of the sub-layers peft adds when it wraps a linear layer."""
    return ".lora_" in name or name.startswith("lora_") or "base_layer" in name


def unwrapped_name(name: str) -> str:
    """A parameter name as the plain (unwrapped) backbone names it."""
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def is_adapter_weight(name: str) -> bool:
    """Whether a state-dict name belongs to a LoRA adapter rather than to the backbone."""
    return "lora_" in name


def is_lora_b(name: str) -> bool:
    """Whether a parameter is a LoRA ``B`` factor (LoRA+ gives those a larger learning rate)."""
    return ".lora_B." in name or name.startswith("lora_B.")


def adapter_of_parameter(name: str, adapters: set[str]) -> str | None:
    """The LoRA adapter a parameter belongs to (``...query.lora_A.shared.weight`` -> ``shared``)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] in adapters and parts[i - 1].startswith("lora_"):
            return parts[i]
    return None


def saved_factor(key: str) -> tuple[str, str] | None:
    """``(module, "A" | "B")`` for a key of a saved adapter's safetensors file, None otherwise."""
    for part, suffix in _FACTOR_SUFFIX.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def saved_factor_key(module: str, part: str) -> str:
    """The safetensors key of factor ``part`` ("A" or "B") of ``module`` in a saved adapter."""
    return module + _FACTOR_SUFFIX[part]


def saved_rank(key: str, tensor: torch.Tensor) -> int:
    """The rank of a saved factor: rows of A, columns of B."""
    factor = saved_factor(key)
    if factor is None and (".lora_A." in key or ".lora_B." in key):
        factor = ("", "A" if ".lora_A." in key else "B")
    if factor is None:
        raise UserError(f"{key}: not a LoRA factor")
    return tensor.shape[0] if factor[1] == "A" else tensor.shape[1]


def saved_factors(weights: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]] | None:
    """Module → ``{"A": tensor, "B": tensor}`` of a saved adapter; None when it holds anything else."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        factor = saved_factor(key)
        if factor is None:
            return None
        factors.setdefault(factor[0], {})[factor[1]] = tensor
    return factors


# -- the factors as one product -----------------------------------------------------------

def concat_factors(layer: nn.Module, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A = Σ_i s_i B_i A_i`` over the adapters ``names`` of a LoRA layer.

    The factors are concatenated along the rank (scaling folded into B): adapters that are
    active together (shared + task) become one low-rank product.
    """
    factors = [lora_factors(layer, n) for n in names]
    if len(factors) == 1:
        a, b, s = factors[0]
        return a, b * s
    a = torch.cat([a for a, _, _ in factors], dim=0)  # (r, d_in)
    b = torch.cat([b * s for _, b, s in factors], dim=1)  # (d_out, r)
    return a, b


def merged_deltas(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Unwrapped module name → ``Σ_i s_i B_i A_i`` (fp32) of the adapters ``names`` on each layer they adapt.

    What merging those adapters into a plain copy of the backbone adds to each weight. A DoRA
    adapter is no such sum: ValueError."""
    deltas = {}
    with torch.no_grad():
        for name, parts in adapter_factors(model, names).items():
            a = torch.cat([a for a, _, _ in parts], dim=0)  # as concat_factors: one low-rank product
            b = torch.cat([b * s for _, b, s in parts], dim=1)
            deltas[name] = b.float() @ a.float()
    return deltas


def adapter_factors(model: nn.Module, names: list[str]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """Unwrapped module name → ``[(A (r, d_in), B (d_out, r), scaling)]`` of the adapters ``names`` on each
    layer they adapt: the live weights, detached, not copied (a multi-adapter graph feeds them as inputs).

    A DoRA adapter is no low-rank sum: UserError."""
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for name, layer in lora_layers(model).items():
        present = adapters_of(layer, names)
        if not present:
            continue
        if any(is_variant(layer, n) for n in present):
            raise UserError("DoRA adapters are not a low-rank sum")
        out[name.replace("base_model.model.", "", 1)] = [
            (a.detach(), b.detach(), float(s)) for a, b, s in (lora_factors(layer, n) for n in present)]
    return out


# -- routes: how LoRA layers run inside a `with` block -------------------------------------

class _Route:
    """A way of running LoRA layers for the duration of a ``with`` block."""

    layers: frozenset[int] | None = None  # ids of the layers it covers (None: every layer)

    def covers(self, layer: nn.Module) -> bool:
        return self.layers is None or id(layer) in self.layers

    def forward(self, layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError


_ROUTE: contextvars.ContextVar[_Route | None] = contextvars.ContextVar("peft_mtl_lora_route", default=None)


@contextmanager
def _routed(route: _Route) -> Iterator[None]:
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)


def _installed(layers: Iterable[nn.Module]) -> frozenset[int]:
    """Ids of ``layers``, each checked to run routes (a layer peft made after :func:`install` would not)."""
    ids = []
    for layer in layers:
        if not isinstance(layer, RuntimeLoraLinear):
            raise RuntimeError(f"{type(layer).__name__} does not run routes: call lora_runtime.install(model) "
                               f"after peft adds LoRA layers")
        ids.append(id(layer))
    return frozenset(ids)


class _PeftRoute(_Route):
    def forward(self, layer, x, *args, **kwargs):
        return peft_forward(layer, x, *args, **kwargs)


@contextmanager
def plain_peft() -> Iterator[None]:
    """Within the block, every LoRA layer runs peft's own forward (no fused kernels, no routing)."""
    with _routed(_PeftRoute()):
        yield


def peft_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's own forward of a LoRA ``Linear`` (the reference every other path is tested against)."""
    return _PeftLoraLinear.forward(layer, x, *args, **kwargs)


class RuntimeLoraLinear(_PeftLoraLinear):
    """peft's LoRA ``Linear`` with one forward that runs the route of the current context.

    Only :func:`install` makes these (by class, once per layer); state, saving and loading are
    peft's. See the module docstring for the routes."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        route = _ROUTE.get()
        if route is not None and route.covers(self):
            return route.forward(self, x, *args, **kwargs)
        return fused_lora_forward(self, x, *args, **kwargs)


def install(model: nn.Module) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the routed forward; returns how many layers changed.

    Idempotent: run it again after peft wraps more layers (a new adapter on new targets)."""
    count = 0
    for module in model.modules():
        if type(module) is _PeftLoraLinear:
            # Choosing the layer's class once (what peft's _register_custom_module does at
            # injection) instead of assigning `forward`: deep copies, pickling and peft's
            # isinstance checks keep working, and per-call behaviour comes from the route.
            module.__class__ = RuntimeLoraLinear
            count += 1
    if not getattr(model, "_peft_mtl_cast_hook", False):
        model.register_forward_pre_hook(_forget_cast)
        model._peft_mtl_cast_hook = True
    return count


# -- fused: the CPU kernels ---------------------------------------------------------------

def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


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
        tensors += adapter_tensors(layer, name)
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
    if kwargs or x.device.type != "cpu" or not uses_unmerged_adapters(layer):
        return None  # per-row adapter_names, a GPU, or merged adapters: peft's own path
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad:
        return None  # full fine-tuning or a quantized layer: peft's own path
    for name in active_lora_adapters(layer):
        if not is_plain_lora(layer, name):
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
    does not cover (a GPU, fp16, DoRA, LoRA dropout, per-sample ``adapter_names``, merged or
    trainable base weights) runs peft's own forward.
    """
    dtype = None if args else _compute_dtype(layer, x, kwargs)
    if dtype is None:
        return peft_forward(layer, x, *args, **kwargs)
    if dtype == torch.float32:
        return _fused_fp32(layer, x)
    x16 = _bf16_input(x)
    active = active_lora_adapters(layer)
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
    active = active_lora_adapters(layer)
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


# The last bf16 cast of a layer input, per context (thread / asyncio task): one tuple
# (weakref to the input, key, cast), replaced on each miss and forgotten before each pass.
_LAST_CAST: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("peft_mtl_last_cast", default=None)


def _forget_cast(module: nn.Module, args) -> None:
    _LAST_CAST.set(None)


def _bf16_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in bf16, reusing the previous cast when the same tensor feeds several layers.

    BERT's query, key and value projections read the same fp32 LayerNorm output; casting
    it once instead of three times (and keeping one cast node in the autograd graph)
    removes a third of the casts of a step.
    """
    if x.dtype == torch.bfloat16:
        return x
    # Inference tensors have no version counter; the entry is also forgotten before every
    # pass of an installed model (install's pre-hook), so a hit is always within one pass.
    version = None if x.is_inference() else x._version
    key = (version, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    entry = _LAST_CAST.get()
    if entry is not None and entry[0]() is x and entry[1] == key:
        return entry[2]
    cast = x.to(torch.bfloat16)
    _LAST_CAST.set((weakref.ref(x), key, cast))
    return cast


# -- stacked: k members over k copies of a batch ------------------------------------------

@dataclass
class StackedLayer:
    """The stacked LoRA factors of one adapted linear layer."""

    A: torch.Tensor  # (k, d_in, R)
    B: torch.Tensor  # (k, R, d_out), LoRA scaling folded in


def stack_members(encoder: nn.Module, members: list[list[str]], dtype: torch.dtype = torch.float32,
                  ) -> dict[nn.Module, StackedLayer | None]:
    """Stack the LoRA factors of every member (a list of adapter names whose deltas add).

    peft can route rows of one batch to different adapters (``adapter_names=[...]``), but it
    loops over the adapters inside every LoRA layer, gathering each one's rows; on a CPU
    that costs more than it saves (measured: 0.78× the speed of one pass per member). Here
    each member's factors for a layer are stacked once into ``A: (k, d_in, R)`` and
    ``B: (k, R, d_out)`` — a member with several active adapters gets them concatenated
    along the rank, the scaling folded into ``B``, smaller ranks or missing adapters
    zero-padded — so every member's delta is two batched matmuls over a ``(k, rows, d_in)``
    view. Every LoRA layer of the encoder gets an entry; ``None`` where no member adapts it.
    """
    stacked: dict[nn.Module, StackedLayer | None] = {}
    for layer in lora_linears(encoder):
        if getattr(layer, "merged", False):
            raise ValueError("stacked LoRA needs unmerged adapters")
        factors = []
        for names in members:
            present = adapters_of(layer, names)
            for n in present:
                if is_variant(layer, n):
                    raise UserError(f"adapter {n!r} is a LoRA variant (e.g. DoRA) that cannot be stacked")
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


class _StackedRoute(_Route):
    def __init__(self, stacked: dict[nn.Module, StackedLayer | None]):
        self.stacked = stacked
        self.layers = _installed(stacked)

    def forward(self, layer, x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        factors = self.stacked[layer]
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
    with _routed(_StackedRoute(stacked)):
        yield


# -- grouped rows: each contiguous row block gets its own adapter combination --------------

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
    for layer in lora_linears(encoder):
        present = adapters_of(layer, names)
        for n in present:
            if is_variant(layer, n):
                raise UserError(f"adapter {n!r} is a LoRA variant (e.g. DoRA) that cannot be grouped")
        if not present:
            out[layer] = None
            continue
        a, b = concat_factors(layer, present)
        out[layer] = (a.detach().t().contiguous(), b.detach().t().contiguous())
    return out


class _GroupedRoute(_Route):
    def __init__(self, encoder: nn.Module, groups: list[RowGroup]):
        self.groups = groups
        self.layers = _installed(lora_linears(encoder))

    def forward(self, layer, x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        for g in self.groups:
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
    with _routed(_GroupedRoute(encoder, groups)):
        yield


check_peft_version()
