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
from ..options import option

SHARED_ADAPTER = "shared"

# Presets are resolved per architecture by :func:`lora_targets`: the linear layers inside the
# transformer blocks (never the pooler, embeddings or heads: heads read pooled token vectors).
TARGET_PRESETS = ("qv", "attention", "all")
# Query and value projections by their names across BERT, RoBERTa, ELECTRA (query/value),
# DistilBERT (q_lin/v_lin), DeBERTa-v2 (query_proj/value_proj) and decoder-style names.
_QUERY_VALUE = {"query", "value", "q_lin", "v_lin", "query_proj", "value_proj", "q_proj", "v_proj", "q", "v"}
_ATTENTION_WORDS = ("attention", "attn")


def transformer_blocks(encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module list) of the encoder's repeated transformer blocks, found by structure:
    the ModuleList with one entry per hidden layer."""
    config = getattr(encoder, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    candidates = [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    exact = [(n, m) for n, m in candidates if layers is not None and len(m) == layers]
    pool = exact or candidates
    if not pool:
        raise ValueError(f"{type(encoder).__name__}: no transformer blocks (nn.ModuleList) found; "
                         f"name the LoRA targets with --lora-targets module,names")
    return max(pool, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def lora_targets(encoder: nn.Module, preset: str, layers: list[int] | None = None) -> list[str]:
    """Full names of the linear layers a preset adapts, for any encoder architecture.

    ``all``: every ``nn.Linear`` inside the transformer blocks; ``attention``: those inside
    the attention sub-module; ``qv``: the query and value projections.
    """
    prefix, blocks = transformer_blocks(encoder)
    names = []
    for index, block in enumerate(blocks):
        if layers is not None and index not in layers:
            continue
        for sub, module in block.named_modules():
            if not isinstance(module, nn.Linear) or not sub or ".lora_" in sub or "base_layer" in sub:
                continue  # peft's own sub-layers, if the encoder is already wrapped
            last = sub.rsplit(".", 1)[-1]
            if preset == "qv" and last not in _QUERY_VALUE:
                continue
            if preset == "attention" and not any(w in sub.lower() for w in _ATTENTION_WORDS):
                continue
            names.append(f"{prefix}.{index}.{sub}" if prefix else f"{index}.{sub}")
    if not names:
        raise ValueError(f"--lora-targets {preset}: no matching linear layers in {type(encoder).__name__}'s blocks; "
                         f"name them instead (--lora-targets name1,name2)")
    return names


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

    def target_modules(self, encoder: nn.Module) -> list[str]:
        """The modules of ``encoder`` to adapt: a preset resolved by architecture, or the names given."""
        if self.targets in TARGET_PRESETS:
            return lora_targets(encoder, self.targets, self.layers)
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.layers is None:
            return names
        prefix, _ = transformer_blocks(encoder)
        return [n for n, _ in encoder.named_modules() if any(n.endswith("." + t) or n == t for t in names)
                and any(n.startswith(f"{prefix}.{i}.") for i in self.layers)]

    def to_peft(self, targets: list[str]):
        """peft's LoraConfig for these settings on ``targets`` (from :meth:`target_modules`)."""
        from peft import LoraConfig

        kwargs = dict(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(targets),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            bias="none",
        )
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
    targets = settings.target_modules(encoder)  # before wrapping: peft adds linear sub-layers
    peft_model = get_peft_model(encoder, settings.to_peft(targets), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, settings.to_peft(targets))
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
