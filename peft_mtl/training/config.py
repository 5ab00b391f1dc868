"""Typed training configuration with defaults that work, saved with every run.

Every field is declared once, with its help text, through :func:`peft_mtl.options.option`:
``peft-mtl train``'s flags are generated from these classes, and validation errors name
the flag a user typed (``--pcgrad``), not an internal field name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..data.losses import LOSSES
from ..data.tasks import TASKS, is_task_file, read_task_file, read_tasks
from ..model.lora_config import LoraSettings
from ..options import (PRECISIONS, add_config_arguments, apply_overrides, config_fields, differences, flag_for,
                       option, overrides_from_args)
from .sampling import SAMPLERS

MODES = ("lora", "heads", "full")
PAIR_ENCODINGS = ("cross", "bi")
SMART_PRECISIONS = ("fp32", "train")

# Fields that say how a run is watched or stored, not what it computes: a resumed run may
# change them (``--resume`` compares every other field with the interrupted run's).
TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")
TRACKING_FIELDS = frozenset({"tracking.report_to", "tracking.dir", "tracking.run_name", "tracking.group",
                             "tracking.mlflow_uri"})
RUN_CONTROL_FIELDS = frozenset({"out", "overwrite", "checkpoint_every", "trace_dir", "device", "keep_best",
                                "teacher_cache"}) | TRACKING_FIELDS
KEEP_BEST = ("overall", "per-task")


class ConfigError(UserError):
    """A configuration value is wrong; the message names the flag (or config field)."""


@dataclass
class SmartSettings:
    """SMART (Jiang et al. 2020) and momentum Bregman proximal point settings.

    ``weight`` is λ_s for every task unless ``task_weights`` overrides it; 0 disables
    SMART. Defaults follow seed 001 (σ = 1e-5, η = 1e-3, T = 1), with ε = 1e-5 on the
    embedding-layer output as in the SMART paper. ``bregman_mu`` > 0 turns on the
    proximal term μ·ℓ_s(f(x;θ), f(x;θ̃)) with θ̃ an EMA (momentum β) of past parameters.
    """

    weight: float = option(0.0, help="SMART lambda_s for every task (0: off)")
    task_weights: dict[str, float] = option(factory=dict, flag="--smart-task-weight", metavar="TASK=W",
                                            help="per-task lambda_s, repeatable; overrides --smart-weight for TASK")
    epsilon: float = option(1e-5, help="radius of the perturbation ball around the embedding-layer output")
    sigma: float = option(1e-5, help="std of the random start of the perturbation")
    step_size: float = option(1e-3, help="ascent step size eta")
    # 0 keeps the random N(0, σ²) perturbation without ascent (as in R3F, Aghajanyan et al.
    # 2021): one forward/backward less per step (bench: lora_smart_t0).
    steps: int = option(1, help="ascent steps T (0: random perturbation only, one pass cheaper)")
    norm: str = option("inf", choices=("inf", "l2"), help="the norm of the perturbation's ball (or normalisation)")
    # "ball" is the paper's formula; at ε = 1e-5 its divergence is ~1e-10 and the term has no
    # measurable effect (reports/multitask.md). "normalize" is what the public SMART code the
    # seeds used does: the ascent step is rescaled to unit norm, ε only guards the division.
    projection: str = option("ball", choices=("ball", "normalize"),
                             help="ball: project the perturbation onto the epsilon-ball (the paper); normalize: "
                                  "rescale each ascent step to unit norm, as the public SMART code does")
    # bf16's spacing near 1 is 2^-7 ≈ 0.008: an ε = 1e-5 perturbation vanishes when the
    # perturbed activations are cast to bf16, so by default SMART's passes run in fp32.
    precision: str = option("fp32", choices=SMART_PRECISIONS,
                            help="precision of the passes of a SMART step: fp32 (resolves the default "
                                 "epsilon), or train (the run's precision; only for epsilon >~ 1e-2 under bf16)")
    bregman_mu: float = option(0.0, flag="--bregman-mu", help="Bregman proximal weight mu (0: off)")
    bregman_beta: float = option(0.99, flag="--bregman-beta", help="momentum beta of the Bregman average")

    def weight_for(self, task: str) -> float:
        return self.task_weights.get(task, self.weight)


@dataclass
class TrackingSettings:
    """Where a run's curves go (accelerate's trackers); not part of the recipe."""

    report_to: list[str] = option(factory=list, flag="--report-to", metavar="NAME,...",
                                  help="log the run to these trackers: " + ", ".join(TRACKERS) + " (any subset; "
                                       "wandb offline with WANDB_MODE=offline)")
    dir: str | None = option(None, flag="--tracking-dir", metavar="DIR",
                             help="where trackers write (default: tracking/ beside the output folder, shared by the "
                                  "runs there); MLflow's store is sqlite:///DIR/mlflow.db unless --mlflow-uri")
    run_name: str | None = option(None, flag="--run-name", help="the run's name in the trackers (default: the output "
                                                                 "folder's name)")
    group: str | None = option(None, flag="--tracking-group", metavar="NAME",
                               help="MLflow experiment, TensorBoard sub-folder, trackio/wandb project (default: "
                                    "peft_mtl; sweep and search set it)")
    mlflow_uri: str | None = option(None, flag="--mlflow-uri", metavar="URI",
                                    help="MLflow tracking server URL or store URI (default: a SQLite database under "
                                         "--tracking-dir)")


@dataclass
class TrainConfig:
    """Everything a training run needs. Saved as JSON next to its outputs."""

    tasks: list[str] = option(factory=lambda: ["sst"], metavar="T1,T2",
                              help="comma-separated built-in tasks (sst,qqp,sts) and/or task files (tasks/intent.yaml)")
    out: str = option("adapters/run", show_default=False, help="output folder for the adapter set (required)")
    mode: str = option("lora", choices=MODES,
                       help="lora: frozen backbone + LoRA adapters; heads: frozen backbone, heads only; "
                            "full: fine-tune the whole backbone")
    backbone: str | None = option(None, help="model folder or cached hub id (default: all-MiniLM-L6-v2)")
    data_dir: str | None = option(None, help="folder with the task files (default: ../shared/data or data/)")
    epochs: int = option(4, help="training epochs (the best epoch on dev is kept)")
    batch_size: int = option(32, help="examples per step and process")
    lr: float = option(1e-3, help="peak learning rate (full mode wants ~5e-5)")
    head_lr: float | None = option(None, help="learning rate of the heads (default: --lr)")
    lora_plus_ratio: float = option(1.0, help="LoRA+: lr of the B matrices = ratio x lr (1: plain LoRA)")
    weight_decay: float = option(0.01, help="AdamW weight decay")
    warmup_ratio: float = option(0.06, help="fraction of steps of linear warm-up")
    max_grad_norm: float = option(1.0, help="gradient clipping norm")
    max_length: int = option(128, help="tokens per input; longer inputs are truncated and counted")
    pooling: str = option("mean", choices=("mean", "cls"),
                          help="mean of token vectors (measured better on the default backbone) or cls")
    head_dropout: float = option(0.1, help="dropout before each head")
    backbone_dropout: float | None = option(None, help="dropout inside the encoder (default: the checkpoint's, 0.1 for BERT)")
    pair_encoding: str = option("cross", choices=PAIR_ENCODINGS,
                                help="cross: [CLS] a [SEP] b [SEP]; bi: encode the sentences separately")
    shared_adapter: bool | None = option(None, flag="--no-shared",
                                         help="no shared adapter: independent per-task adapters (lora mode; "
                                              "by default a shared adapter is used when training several tasks)")
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    smart: SmartSettings = dataclasses.field(default_factory=SmartSettings)
    tracking: TrackingSettings = dataclasses.field(default_factory=TrackingSettings)
    # uniform beat annealed, staggered and independent adapters on this data (reports/multitask.md)
    sampling: str = option("uniform", help="which task each step trains: annealed | uniform | proportional | sqrt "
                                           "| round-robin | staggered | sum (every task every step)")
    steps_per_epoch: int | None = option(None, help="optimiser steps per epoch (default: one pass over the data)")
    staggered_epochs: int = option(1, help="staggered sampling: epochs of the first task alone before round-robin")
    staggered_first: str | None = option(None, metavar="TASK",
                                         help="staggered sampling: the task trained alone first (default: the one "
                                              "with the most training rows, QQP for the built-in three)")
    task_losses: dict[str, str] = option(factory=dict, flag="--task-loss", metavar="TASK=LOSS",
                                         help="loss for TASK instead of its task file's, repeatable: cross_entropy | "
                                              "dual | ordinal | mse (e.g. sst=ordinal)")
    ordinal_alpha: float = option(1.5, help="exponent of the ordinal loss")
    pcgrad: bool = option(False, help="PCGrad on the parameters tasks share (needs --sampling sum)")
    simcse_epochs: int = option(0, help="unsupervised SimCSE warm-up epochs of the shared adapter (0: off)")
    simcse_temperature: float = option(0.05, help="SimCSE temperature tau")
    simcse_max_sentences: int = option(20000, help="SimCSE: at most this many training sentences")
    extra_train: dict[str, str] = option(factory=dict, metavar="TASK=FILE",
                                         help="extra training rows for TASK, repeatable (not counted in the sampler's N_i)")
    init_from: str | None = option(None, metavar="SET",
                                   help="start from this saved set's adapters and heads instead of fresh ones (same "
                                        "adapters, ranks and target modules; e.g. a set cut down by `peft-mtl "
                                        "compress`)")
    teacher: str | None = option(None, metavar="RECORD",
                                 help="knowledge distillation: also learn this teacher's outputs on the training rows "
                                      "- an ensemble record (NAME.ensemble.json from `peft-mtl ensemble --record`, "
                                      "its members and per-task weights) or an adapter-set folder")
    teacher_members: int = option(0, metavar="K",
                                  help="distillation: keep only each task's K heaviest ensemble members, their weights "
                                       "renormalised (0: all members with weight); the teacher costs one forward pass "
                                       "per member and training row")
    distill_weight: float = option(0.5, help="distillation: weight alpha of the teacher term; the label loss gets 1 - alpha")
    distill_temperature: float = option(2.0, help="distillation: temperature T softening teacher and student "
                                                  "probabilities (classification tasks)")
    teacher_cache: str | None = option(None, metavar="DIR",
                                       help="distillation: where the teacher's outputs are cached (default "
                                            "~/.cache/peft_mtl/outputs, shared with `peft-mtl ensemble --cache-dir`)")
    precision: str = option("auto", choices=PRECISIONS,
                            help="auto: bf16 autocast on GPUs with bf16 (else fp16 + gradient scaling) and on CPUs "
                                 "with native bf16, else fp32")
    device: str = option("auto", metavar="DEVICE",
                         help="auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda | cuda:N; under "
                              "accelerate launch each process uses the GPU accelerate assigns")
    seed: int = option(0, help="seed of every random choice of the run")
    patience: int = option(2, help="early stopping after this many epochs without dev improvement")
    keep_best: str = option("overall", choices=KEEP_BEST,
                            help="overall: save the epoch with the best overall dev score; per-task: save each "
                                 "task's adapters and head from the epoch where that task scored best on dev (a "
                                 "shared adapter is then saved once per epoch kept; lora and heads modes)")
    max_train_examples: int | None = option(None, help="use at most N training rows per task (a seeded random "
                                                             "sample: task files are often sorted by label)")
    max_eval_examples: int | None = option(None, help="use at most N dev rows per task (a seeded random sample)")
    eval_batch_size: int = option(128, help="examples per evaluation batch")
    strict_data: bool = option(False, flag="--strict", help="malformed rows are errors instead of being skipped")
    checkpoint_every: int = option(200, help="steps between resumable checkpoints (0: only at epoch ends)")
    overwrite: bool = option(False, help="replace an existing output folder")
    quantize: str | None = option(None, choices=("int8", "nf4"),
                                  help="quantize the frozen backbone with bitsandbytes (LoRA on top)")
    trace_dir: str | None = option(None, help="write rankN.jsonl: the tasks and data rows of every step")
    # Off by default: deterministic kernels are slower on GPUs, and the CPU path is already
    # bit-identical on resume (tests/test_resume.py). On CUDA it makes "resume = the same bits" hold.
    deterministic: bool = option(False, help="deterministic algorithms only (torch.use_deterministic_algorithms, "
                                             "cuBLAS workspace, SDPA math kernel): bit-identical reruns on a GPU")

    def validate(self) -> "TrainConfig":
        """Check every field and every combination; raise ConfigError naming the flags.

        Pure: task files are read but not registered (:func:`peft_mtl.data.tasks.resolve_tasks`
        does that when a run is prepared).

        Long on purpose: a flat list of checks, one per field or combination, read top to bottom.
        """

        def flag(path: str) -> str:
            return flag_for(TrainConfig, path)

        def fail(path: str, msg: str) -> None:
            raise ConfigError(f"{flag(path)}: {msg}")

        for path, _, _ in config_fields(TrainConfig):
            value = _value_at(self, path)
            numbers = value.values() if isinstance(value, dict) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                fail(path, f"{value!r} is not a finite number")
        if not self.tasks:
            fail("tasks", "name at least one task")
        unknown = [t for t in self.tracking.report_to if t not in TRACKERS]
        if unknown:
            fail("tracking.report_to", f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")
        for t in self.tasks:
            if not is_task_file(t) and t not in TASKS:
                fail("tasks", f"unknown task {t!r}; known: {', '.join(sorted(TASKS))} (or a task file: "
                              f"path/to/task.yaml)")
        if len(set(self.tasks)) != len(self.tasks):
            fail("tasks", "a task is listed twice")
        names = [spec.name for spec in read_tasks(self.tasks, self.strict_data)]
        for path, allowed in (("mode", MODES), ("pair_encoding", PAIR_ENCODINGS), ("pooling", ("mean", "cls")),
                              ("precision", PRECISIONS), ("smart.norm", ("inf", "l2")),
                              ("smart.precision", SMART_PRECISIONS), ("smart.projection", ("ball", "normalize"))):
            value = getattr(self.smart, path.split(".")[1]) if path.startswith("smart.") else getattr(self, path)
            if value not in allowed:
                fail(path, f"must be one of {', '.join(allowed)}, got {value!r}")
        if self.sampling not in SAMPLERS:
            fail("sampling", f"unknown sampler {self.sampling!r}; known: {', '.join(sorted(SAMPLERS))}")
        for t, loss in self.task_losses.items():
            if t not in names:
                fail("task_losses", f"task {t!r} is not being trained (tasks: {', '.join(names)})")
            if loss not in LOSSES:
                fail("task_losses", f"unknown loss {loss!r}; known: {', '.join(sorted(LOSSES))}")
        if self.staggered_first is not None and self.staggered_first not in names:
            fail("staggered_first", f"task {self.staggered_first!r} is not being trained (tasks: {', '.join(names)})")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_length", "simcse_max_sentences"):
            if getattr(self, name) < 1:
                fail(name, "must be at least 1")
        for name in ("steps_per_epoch", "max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(name, "must be at least 1 (or left out)")
        for name in ("patience", "checkpoint_every", "simcse_epochs", "staggered_epochs"):
            if getattr(self, name) < 0:
                fail(name, "must be 0 or more")
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:")
                                                                and self.device[5:].isdigit()):
            fail("device", f"{self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.keep_best not in KEEP_BEST:
            fail("keep_best", f"must be one of {', '.join(KEEP_BEST)}, got {self.keep_best!r}")
        if self.keep_best == "per-task" and self.mode == "full":
            fail("keep_best", "per-task needs --mode lora or heads (a full fine-tune would save one encoder per "
                              "epoch kept)")
        if self.init_from and not os.path.isdir(self.init_from):
            fail("init_from", f"{self.init_from}: no such folder; give an adapter-set folder written by "
                              f"`peft-mtl train` or `peft-mtl compress`")
        if self.init_from and self.mode == "full":
            fail("init_from", "needs --mode lora or heads (a full fine-tune starts from its --backbone)")
        if self.teacher and not os.path.exists(self.teacher):  # "" turns a default teacher off
            fail("teacher", f"{self.teacher}: no such file or folder; give an ensemble record (NAME.ensemble.json "
                            f"from `peft-mtl ensemble --record`) or an adapter-set folder")
        if self.teacher_members < 0:
            fail("teacher_members", "must be 0 (all members) or more")
        if not 0 <= self.distill_weight <= 1:
            fail("distill_weight", "must be in [0, 1]")
        if self.distill_temperature <= 0:
            fail("distill_temperature", "must be positive")
        if self.lr <= 0:
            fail("lr", "must be positive")
        if self.head_lr is not None and self.head_lr <= 0:
            fail("head_lr", "must be positive")
        if self.max_grad_norm <= 0:
            fail("max_grad_norm", "must be positive")
        if not 0 <= self.warmup_ratio < 1:
            fail("warmup_ratio", "must be in [0, 1)")
        if self.lora.rank < 1:
            fail("lora.rank", "must be at least 1")
        if self.smart.steps < 0:
            fail("smart.steps", "must be 0 (random perturbation only) or more")
        if self.smart.weight < 0 or any(w < 0 for w in self.smart.task_weights.values()):
            fail("smart.weight", "must be 0 (off) or positive")
        if self.smart.epsilon < 0 or self.smart.sigma < 0 or self.smart.step_size < 0:
            fail("smart.epsilon", "epsilon, sigma and step size must be 0 or positive")
        if self.smart.bregman_mu < 0:
            fail("smart.bregman_mu", "must be 0 (off) or positive")
        if not 0 <= self.smart.bregman_beta < 1:
            fail("smart.bregman_beta", "must be in [0, 1)")
        for t in self.smart.task_weights:
            if t not in names:
                fail("smart.task_weights", f"task {t!r} is not being trained (tasks: {', '.join(names)})")
        for t in self.extra_train:
            if t not in names:
                fail("extra_train", f"task {t!r} is not being trained (tasks: {', '.join(names)})")
        # Combinations: each refusal names both flags and what to do instead.
        if self.shared_adapter is not None and self.mode != "lora":
            what = "trains one encoder that every task shares" if self.mode == "full" else "trains no adapters"
            raise ConfigError(f"{flag('shared_adapter')} conflicts with --mode {self.mode}: mode {self.mode} {what}; "
                              f"drop {flag('shared_adapter')} or use --mode lora")
        if self.pcgrad and self.sampling != "sum":
            raise ConfigError(f"--pcgrad conflicts with --sampling {self.sampling}: PCGrad compares the tasks' "
                              f"gradients within one step, so every step must train every task; use --sampling sum")
        if self.quantize is not None and self.mode != "lora":
            raise ConfigError(f"--quantize conflicts with --mode {self.mode}: a quantized backbone cannot be "
                              f"trained; use --mode lora")
        if self.simcse_epochs and self.mode == "heads":
            raise ConfigError("--simcse-epochs conflicts with --mode heads: SimCSE trains the encoder, which "
                              "heads-only mode freezes")
        if self.simcse_epochs and self.mode == "lora" and not self.uses_shared_adapter:
            raise ConfigError(f"--simcse-epochs needs a shared adapter to warm up: drop {flag('shared_adapter')} "
                              f"(or, with one task, keep it and train several)")
        return self

    @property
    def task_names(self) -> list[str]:
        """The tasks' names (a task file's ``name:``), in the order given; call after validate()."""
        return [t if not is_task_file(t) else get_task_file_name(t) for t in self.tasks]

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
        data = dict(data)
        if "sst_loss" in data:  # configs saved before task files: the SST loss had a field of its own
            loss = data.pop("sst_loss")
            if loss != "cross_entropy":
                data.setdefault("task_losses", {})["sst"] = loss
        return _build(cls, data, "")

    def changed_for_resume(self, saved: "TrainConfig") -> list[str]:
        """Flags whose values differ from an interrupted run's config (run-control fields aside)."""
        return [flag_for(TrainConfig, p) for p in differences(saved, self, RUN_CONTROL_FIELDS)]


def _value_at(config, path: str):
    """The value of a dotted field path (``smart.weight``) of a config."""
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def get_task_file_name(path: str) -> str:
    return str(read_task_file(path).get("name"))


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


# -- the command line's view of a config ----------------------------------------------------

# Which argparse group each config field's flag is shown in (by dotted-path prefix).
TRAIN_GROUPS = {"lora.": "LoRA", "smart.": "regularisation (SMART, Bregman)", "tracking.": "experiment tracking"}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag (generated: see peft_mtl.options), plus run control."""
    add_config_arguments(parser, TrainConfig, TRAIN_GROUPS)
    parser.add_argument("--config", default=None, help="JSON file with TrainConfig fields; flags given override it")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same flags)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from ``--config`` (or the defaults), overridden by the flags given."""
    if args.config:
        try:
            cfg = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{args.config}: cannot read the config ({err})") from None
    else:
        cfg = TrainConfig()
    overrides = overrides_from_args(args, TrainConfig)
    if "out" not in overrides and not args.config:
        raise ConfigError("--out: say where the adapter set goes (e.g. --out runs/sst)")
    apply_overrides(cfg, overrides)
    return cfg.validate()


def flags_from_config(cfg: TrainConfig, ignore: frozenset[str] = frozenset()) -> list[str]:
    """The `peft-mtl train` flags that give ``cfg`` (the fields that differ from the defaults)."""
    defaults = TrainConfig()
    fields = {path: f for path, f, _ in config_fields(TrainConfig)}
    flags: list[str] = []
    for path in differences(defaults, cfg, ignore):
        f, value = fields[path], _value_at(cfg, path)
        if not f.metadata.get("cli", True):
            continue
        flag = flag_for(TrainConfig, path)
        if isinstance(value, bool) or (value is None and flag.startswith("--no-")):
            if flag.startswith("--no-"):
                if value is False:  # a True has no flag of its own: the default does it
                    flags.append(flag)
            else:
                flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, ",".join(map(str, value))]
        elif isinstance(value, dict):
            for k, v in value.items():
                flags += [flag, f"{k}={v}"]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def config_from_flags(flags: list[str]) -> TrainConfig:
    """The TrainConfig that ``peft-mtl train FLAGS`` would run (a sweep's recipes are flag lists)."""
    parser = argparse.ArgumentParser(prog="peft-mtl train", add_help=False)
    add_train_arguments(parser)
    try:
        args, extras = parser.parse_known_args(flags)
    except SystemExit:
        raise ConfigError(f"`peft-mtl train` rejects these flags: {shlex.join(flags)}") from None
    if extras:
        raise ConfigError(f"unknown train flags {extras}")
    return config_from_args(args)
