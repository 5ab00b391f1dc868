"""LoRA settings of a run, and which layers of an encoder they adapt.

Plain data and name matching: importing this module needs neither torch nor peft (the
``peft-mtl`` command builds its flags from these fields), so the functions that look at a
model import torch when they run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import UserError
from ..options import option

if TYPE_CHECKING:
    from torch import nn

# Presets are resolved per architecture by :func:`lora_targets`: the linear layers inside the
# transformer blocks (never the pooler, embeddings or heads: heads read pooled token vectors).
TARGET_PRESETS = ("qv", "attention", "all")
# Query and value projections by their names across BERT, RoBERTa, ELECTRA (query/value),
# DistilBERT (q_lin/v_lin), DeBERTa-v2 (query_proj/value_proj) and decoder-style names.
_QUERY_VALUE = {"query", "value", "q_lin", "v_lin", "query_proj", "value_proj", "q_proj", "v_proj", "q", "v"}
_ATTENTION_WORDS = ("attention", "attn")


def transformer_blocks(encoder: "nn.Module") -> tuple[str, "nn.ModuleList"]:
    """(name, module list) of the encoder's repeated transformer blocks, found by structure:
    the ModuleList with one entry per hidden layer."""
    from torch import nn  # deferred: configs import without torch (a fast CLI)

    config = getattr(encoder, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    candidates = [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    exact = [(n, m) for n, m in candidates if layers is not None and len(m) == layers]
    pool = exact or candidates
    if not pool:
        raise UserError(f"{type(encoder).__name__}: no transformer blocks (nn.ModuleList) found; "
                         f"name the LoRA targets with --lora-targets module,names")
    return max(pool, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def lora_targets(encoder: "nn.Module", preset: str, layers: list[int] | None = None) -> list[str]:
    """Full names of the linear layers a preset adapts, for any encoder architecture.

    ``all``: every ``nn.Linear`` inside the transformer blocks; ``attention``: those inside
    the attention sub-module; ``qv``: the query and value projections.
    """
    from torch import nn  # deferred: configs import without torch (a fast CLI)

    from .lora_runtime import (
        is_peft_sublayer,  # deferred: peft is heavy; configs import without it
    )

    prefix, blocks = transformer_blocks(encoder)
    names = []
    for index, block in enumerate(blocks):
        if layers is not None and index not in layers:
            continue
        for sub, module in block.named_modules():
            if not isinstance(module, nn.Linear) or not sub or is_peft_sublayer(sub):
                continue  # peft's own sub-layers, if the encoder is already wrapped
            last = sub.rsplit(".", 1)[-1]
            if preset == "qv" and last not in _QUERY_VALUE:
                continue
            if preset == "attention" and not any(w in sub.lower() for w in _ATTENTION_WORDS):
                continue
            names.append(f"{prefix}.{index}.{sub}" if prefix else f"{index}.{sub}")
    if not names:
        raise UserError(f"--lora-targets {preset}: no matching linear layers in {type(encoder).__name__}'s blocks; "
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

    def target_modules(self, encoder: "nn.Module") -> list[str]:
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
        from peft import (
            LoraConfig,  # deferred: peft is heavy; configs import without it (a fast command line)
        )

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
