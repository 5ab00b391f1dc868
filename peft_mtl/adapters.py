"""LoRA adapters through peft: one per task, plus an optional shared one.

LoRA (Hu et al. 2021) replaces a frozen weight W by ``W + (alpha / r) * B A`` with
``A ∈ R^{r×d}``, ``B ∈ R^{k×r}``, B initialised to zero so a fresh adapter leaves the
model's output unchanged. When the shared adapter and task t's adapter are both active,
peft adds both deltas: ``W + s_shared B_s A_s + s_t B_t A_t``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from . import peft_compat
from .kernels import use_fused_lora
from .options import option

SHARED_ADAPTER = "shared"

# Regexes (peft full-matches a string target) so the pooler's `dense` is never adapted:
# heads read the pooled token vectors, not BERT's pooler.
TARGET_PRESETS: dict[str, str] = {
    "qv": r".*encoder\.layer\.\d+\.attention\.self\.(query|value)",
    "attention": r".*encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
    "all": r".*encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)",
}


@dataclass
class LoraSettings:
    """LoRA hyper-parameters for every adapter of a run.

    Defaults were picked by measurement on SST with the default backbone
    (reports/defaults.md): adapters on every linear layer of each block, rank 16, alpha 32.
    """

    rank: int = option(16, help="LoRA rank r")
    alpha: float = option(32.0, help="LoRA alpha (scaling alpha/r)")
    # 0: measured on SST, LoRA dropout 0.05 scored no better (0.491 vs 0.499) and made steps
    # 1.5x slower — peft applies it as a separate copy of every adapted layer's input.
    dropout: float = option(0.0, help="dropout on the LoRA input")
    targets: str = option("all", help="qv | attention | all (every linear layer of each block) | "
                                      "comma-separated module names")
    use_rslora: bool = option(False, flag="--rslora", help="rank-stabilised scaling alpha/sqrt(r)")
    use_dora: bool = option(False, flag="--dora", help="DoRA weight decomposition (no per-sample adapter routing)")
    layers: list[int] | None = option(None, metavar="0,1,...", help="adapt only these encoder layers (default: all)")
    extra: dict = option(factory=dict, cli=False, help="further LoraConfig arguments (config files only)")

    def target_modules(self) -> str | list[str]:
        if self.targets in TARGET_PRESETS:
            return TARGET_PRESETS[self.targets]
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def to_peft(self):
        from peft import LoraConfig

        kwargs = dict(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules(),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            bias="none",
        )
        if self.layers is not None:
            kwargs["layers_to_transform"] = list(self.layers)
            kwargs["layers_pattern"] = "layer"
        kwargs.update(self.extra)
        return LoraConfig(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


def add_adapters(encoder: nn.Module, names: list[str], settings: LoraSettings) -> nn.Module:
    """Wrap ``encoder`` in a PeftModel holding one LoRA adapter per name.

    Every adapter starts trainable; the backbone's own weights stay frozen.
    """
    from peft import get_peft_model

    if not names:
        raise ValueError("add_adapters needs at least one adapter name")
    config = settings.to_peft()
    peft_model = get_peft_model(encoder, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, settings.to_peft())
    # Make every adapter trainable once, before any optimizer is built.
    peft_model.base_model.set_adapter(list(names))
    use_fused_lora(peft_model)
    return peft_model


def activate(peft_model: nn.Module, names: list[str], trainable: bool) -> None:
    """Make exactly ``names`` active; their LoRA deltas add up (see peft_compat.activate)."""
    peft_compat.activate(peft_model, names, trainable)


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
    from pathlib import Path

    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = LoraConfig.from_pretrained(str(path))
    except Exception:
        return False
    if (config.use_dora or config.rank_pattern or config.alpha_pattern or config.modules_to_save
            or config.lora_bias or config.bias != "none"):
        return False
    weights = load_file(str(path / "adapter_model.safetensors"))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                factors.setdefault(key[: -len(suffix)], {})[part] = tensor
                break
        else:
            return False  # something other than plain LoRA factors
    if not factors or any(name not in layers or len(ab) != 2 for name, ab in factors.items()):
        return False
    config.inference_mode = True
    done = []
    try:
        for name, ab in factors.items():
            peft_compat.add_lora_to_existing_layer(layers[name], adapter_name, ab["lora_A"], ab["lora_B"], config)
            done.append(layers[name])
    except Exception:
        for layer in done:  # leave no half-loaded adapter behind
            peft_compat.remove_adapter_from_layer(layer, adapter_name)
        return False
    peft_model.peft_config[adapter_name] = config
    return True
