"""LoRA adapters through peft: one per task, plus an optional shared one.

LoRA (Hu et al. 2021) replaces a frozen weight W by ``W + (alpha / r) * B A`` with
``A ∈ R^{r×d}``, ``B ∈ R^{k×r}``, B initialised to zero so a fresh adapter leaves the
model's output unchanged. When the shared adapter and task t's adapter are both active,
peft adds both deltas: ``W + s_shared B_s A_s + s_t B_t A_t``.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from . import lora_runtime
from .lora_config import TARGET_PRESETS, LoraSettings, lora_targets, transformer_blocks  # noqa: F401 (re-exported)

SHARED_ADAPTER = "shared"


def add_adapters(encoder: nn.Module, names: list[str], settings: LoraSettings) -> nn.Module:
    """Wrap ``encoder`` in a PeftModel holding one LoRA adapter per name.

    Every adapter starts trainable; the backbone's own weights stay frozen.
    """
    if not names:
        raise UserError("add_adapters needs at least one adapter name")
    targets = settings.target_modules(encoder)  # before wrapping: peft adds linear sub-layers
    peft_model = get_peft_model(encoder, settings.to_peft(targets), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, settings.to_peft(targets))
    # Make every adapter trainable once, before any optimizer is built.
    peft_model.base_model.set_adapter(list(names))
    lora_runtime.install(peft_model)
    return peft_model


def activate(peft_model: nn.Module, names: list[str], trainable: bool) -> None:
    """Make exactly ``names`` active; their LoRA deltas add up (see lora_runtime.activate)."""
    lora_runtime.activate(peft_model, names, trainable)


def load_adapter_into_existing_layers(peft_model: nn.Module, path, adapter_name: str,
                                      layers: dict[str, nn.Module]) -> bool:
    """Load a saved LoRA adapter into LoRA layers the model already has; False if it cannot.

    ``peft_model.load_adapter`` re-injects: it walks every module of the model (more with
    every adapter already loaded), re-matches target names and re-marks trainable
    parameters — ~70 ms per adapter with a few sets loaded. When every module the saved
    weights name is already a LoRA layer (the usual case: adapter sets of one recipe), the
    same result comes from peft's own ``update_layer`` on just those layers plus a copy of
    the weights. ``layers`` maps module names to the model's LoRA layers. Anything unusual
    (another peft type, DoRA, rank/alpha patterns, new target modules, a peft version with
    another ``update_layer``) returns False so the caller uses ``load_adapter``.
    """
    path = Path(path)
    try:
        config = LoraConfig.from_pretrained(str(path))
    except Exception:
        return False
    if (config.use_dora or config.rank_pattern or config.alpha_pattern or config.modules_to_save
            or config.lora_bias or config.bias != "none"):
        return False
    weights = load_file(str(path / "adapter_model.safetensors"))
    factors = lora_runtime.saved_factors(weights)
    if factors is None:
        return False  # something other than plain LoRA factors
    if not factors or any(name not in layers or len(ab) != 2 for name, ab in factors.items()):
        return False
    config.inference_mode = True
    done = []
    try:
        for name, ab in factors.items():
            lora_runtime.add_lora_to_existing_layer(layers[name], adapter_name, ab["A"], ab["B"], config)
            done.append(layers[name])
    except Exception:
        for layer in done:  # leave no half-loaded adapter behind
            lora_runtime.remove_adapter_from_layer(layer, adapter_name)
        return False
    peft_model.peft_config[adapter_name] = config
    return True
