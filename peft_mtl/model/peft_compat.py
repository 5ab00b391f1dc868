"""Every use of peft's internals, in one place.

peft's public API covers one active adapter at a time; multi-task training needs several
active together (shared + task), inference needs microsecond switches between many loaded
sets, and the CPU kernels read the LoRA factors directly. Those needs touch names peft
does not promise to keep: the tuner's ``set_adapter`` taking a list and ``inference_mode``,
``BaseTunerLayer._active_adapter``, ``LoraLayer.update_layer``/``lora_variant``, the
``lora_A``/``lora_B``/``scaling`` dicts. They are used only through the functions below,
checked against the peft releases in :data:`PEFT_CHECKED` (the tests exercise each one);
a peft outside that range gets one warning at import, naming this file.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Iterable

import torch
from torch import nn

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
    import peft

    low, high = PEFT_CHECKED
    if not low <= _version_tuple(peft.__version__) < high:
        warnings.warn(f"peft {peft.__version__} is outside the range peft_mtl was checked against "
                      f"({'.'.join(map(str, low))} to below {'.'.join(map(str, high))}); "
                      f"if adapters misbehave, see peft_mtl/model/peft_compat.py", RuntimeWarning, stacklevel=2)


def lora_linear_class() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → peft LoRA layer (any kind: Linear, quantized Linear, ...)."""
    from peft.tuners.lora.layer import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


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


def active_lora_adapters(layer: nn.Module) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


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


def route_rows(peft_model: nn.Module, names: list[str]) -> None:
    """Activate every adapter that per-row routing (``adapter_names=[...]``) will use."""
    peft_model.base_model.set_adapter(list(dict.fromkeys(names)), inference_mode=True)


check_peft_version()
