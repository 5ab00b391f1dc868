"""The training loop: pick the step's tasks, take a step, evaluate each epoch, keep the best, save.

:func:`train` reads top to bottom: :func:`prepare` builds the passive parts (data and batch
streams, model, optimiser, objective with its regularisers, PCGrad, checkpoint state),
the SimCSE stage runs if asked, then the loop goes over epochs and steps and the best
state is written as an adapter-set folder. Each part lives beside its concern — batch
streams in ``data``, the objective (task loss + SMART + Bregman, and their random state)
in ``regularizers``, a step (gradients, PCGrad, all-reduce, clipping) in ``optimization``,
checkpoints in ``checkpoint`` — and knows nothing of the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import zlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ..errors import UserError
from . import checkpoint as ckpt
from .keep_best import apply_task_bests, record_task_bests
from .. import device
from ..artifacts import folder_lock, recover_interrupted_save
from ..model.backbone import (backbone_identity, count_parameters, load_encoder, load_quantized_encoder, load_tokenizer,
                              resolve_backbone, set_dropout)
from .config import TRACKING_FIELDS, TrainConfig, flags_from_config
from .distill import check_output_is_not_a_member, load_teacher
from .warm_start import load_initial_weights
from ..data.loading import BatchStream, EncodedSplit, LoadedSplit, default_data_dir, encode_split, load_split, task_file
from .distributed import Dist, setup as setup_distributed
from ..inference.evaluate import evaluate_sharded
from .tracking import Hooks, TrainCallback, run_hooks
from ..data.metrics import overall_score, primary_score
from ..model.multitask import MultiTaskModel, build_model
from .optimization import NonFiniteLoss, TrainingStep, build_optimizer, build_scheduler
from .pcgrad import PCGrad
from .regularizers import Objective
from ..model.saved_sets import MANIFEST, save_run
from ..device import configure_threads, resolve_precision, seed_everything
from .sampling import task_schedule
from .simcse import run_simcse
from ..data.tasks import get_task, resolve_tasks

__all__ = ["TrainingError", "train", "prepare", "load_task_data", "check_output_folder", "build_model", "summary_line"]


class TrainingError(UserError):
    """Training cannot go on (bad output folder, non-finite loss, ...); the message says why."""


logger = logging.getLogger(__name__)
log = logger.info  # progress lines; the CLI's handler keeps rank 0's only (peft_mtl.logs)


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          callbacks: list[TrainCallback] | None = None) -> dict:
    """Train, evaluate on dev every epoch, save the best state to ``cfg.out``; return the summary.

    ``callbacks`` see every step, every epoch's dev metrics and the end (:class:`TrainCallback`);
    ``cfg.tracking`` adds accelerate's trackers (:mod:`peft_mtl.training.tracking`)."""
    cfg.validate()
    check_output_path(Path(cfg.out))
    with device.deterministic_algorithms(cfg.deterministic), output_guard(Path(cfg.out)):
        return _train(cfg, resume, progress, callbacks)


def _train(cfg: TrainConfig, resume: bool, progress: bool, callbacks: list[TrainCallback] | None = None) -> dict:
    """The loop, under the run's output lock: epochs of steps, a dev evaluation and checkpoint each epoch."""
    run = prepare(cfg, resume, progress)
    state = run.progress
    with run_hooks(cfg, run.dist.is_main, callbacks) as hooks:
        summary = _epochs(run, hooks)
        if summary is None:  # finished (not interrupted): save the set
            summary = finish(run)
            hooks.end(summary | {"step": state.global_step})
    return summary


def _epochs(run: "Run", hooks: Hooks) -> dict | None:
    """Epochs of steps, a dev evaluation and checkpoint each; the summary of an interrupted run, else None."""
    cfg, state = run.cfg, run.progress
    with stop_on_signals() as stop, open_trace(cfg, run.dist) as trace:
        for epoch in range(state.epoch, cfg.epochs + 1):
            schedule = task_schedule(cfg.sampling, run.sizes, run.steps_per_epoch, epoch, cfg.epochs, cfg.seed,
                                     cfg.staggered_epochs, cfg.staggered_first)
            bar = tqdm(total=len(schedule), initial=state.step, desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
                       disable=not run.show_progress, file=sys.stderr, mininterval=2.0)
            run.model.train()
            # Ranks agree on stopping (a signal may reach them at different steps).
            while state.step < len(schedule) and not run.dist.any(stop.requested):
                batches = {t: run.streams[t].next() for t in schedule[state.step]}
                if trace is not None:
                    trace.write(json.dumps({"tasks": list(batches),
                                            "rows": {t: b.indices.tolist() for t, b in batches.items()}}) + "\n")
                started = time.perf_counter()
                try:
                    loss = run.step(batches)
                except NonFiniteLoss as err:
                    has_checkpoint = (run.out / ckpt.CHECKPOINT_DIR / "progress.json").is_file()
                    advice = ("the last good checkpoint is kept; continue from it with --resume"
                              if has_checkpoint else "no checkpoint was written yet; start again")
                    raise TrainingError(f"{err}; lower --lr, or check the data ({advice})") from None
                state.step, state.global_step = state.step + 1, state.global_step + 1
                state.loss_sum, state.loss_count = state.loss_sum + loss, state.loss_count + 1
                hooks.step(state.global_step, run.step.record, time.perf_counter() - started)
                bar.update(1)
                if state.step % 20 == 0:
                    bar.set_postfix(loss=f"{state.loss_sum / state.loss_count:.4f}")
                if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                    run.save_checkpoint()
            bar.close()
            if run.dist.any(stop.requested):
                run.save_checkpoint()
                log(f"{stop.name or 'stop'}: checkpoint saved to {run.out / ckpt.CHECKPOINT_DIR}; continue with --resume")
                hooks.interrupted = True
                return {"interrupted": True, "epoch": epoch, "step": state.step}
            metrics = evaluate_sharded(run.model, run.dev, cfg.eval_batch_size, run.precision, run.show_progress,
                                       run.pad_id, run.dist)
            record_epoch(run, epoch, metrics)
            run.save_checkpoint()  # before the hooks: a run a callback stops (a pruned trial) can resume
            hooks.epoch(epoch, state.global_step, metrics, overall_score(metrics, run.primary))
            if state.epochs_since_best >= cfg.patience and epoch < cfg.epochs:
                log(f"early stop: no dev improvement for {cfg.patience} epochs (best epoch {state.best_epoch})")
                break
    return None


def record_epoch(run: "Run", epoch: int, metrics: dict) -> None:
    """Log the epoch, append it to the history, keep the state if dev improved."""
    state = run.progress
    overall, score = overall_score(metrics, run.primary), primary_score(metrics, run.primary)
    train_loss = state.loss_sum / max(1, state.loss_count)
    improved = score > state.best_score
    elapsed = run.elapsed()
    state.history.append({"epoch": epoch, "train_loss": round(train_loss, 5), "dev": metrics, "overall": overall,
                          "seconds": round(elapsed, 1)})
    shown = " ".join(f"{t} {k} {v:.4f}" for t, m in metrics.items() for k, v in m.items())
    log(f"epoch {epoch}/{run.cfg.epochs}: train loss {train_loss:.4f} | dev {shown}"
        + (f" | overall {overall:.4f}" if overall is not None else "")
        + f" | {elapsed:.0f}s" + (" | best" if improved else ""))
    if run.cfg.keep_best == "per-task":
        record_task_bests(run.model, state, epoch, metrics, run.primary)  # before the overall best moves on
    if improved:
        state.best_score, state.best_epoch, state.best_metrics = score, epoch, metrics
        state.epochs_since_best = 0
        state.best_state = ckpt.trainable_state(run.model)
    else:
        state.epochs_since_best += 1
    state.epoch, state.step, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0


# ----------------------------------------------------------------------------- the parts


@dataclass
class Run:
    """The passive parts of one training run, built by :func:`prepare`."""

    cfg: TrainConfig
    out: Path
    dist: Dist
    precision: str
    tokenizer: object
    identity: object
    model: MultiTaskModel
    dev: dict[str, EncodedSplit]
    sizes: dict[str, int]
    streams: dict[str, BatchStream]
    steps_per_epoch: int
    step: TrainingStep
    progress: ckpt.Progress
    pad_id: int
    trainable: int
    total: int
    started: float
    show_progress: bool
    _clock_start: float = 0.0

    @property
    def primary(self) -> dict[str, str]:
        """task → its primary metric (what the best epoch and ``overall`` are judged by)."""
        return {t: get_task(t).primary_metric for t in self.cfg.task_names}

    def elapsed(self) -> float:
        return time.time() - self._clock_start

    def save_checkpoint(self) -> None:
        """Every rank contributes its random streams; rank 0 writes."""
        self.progress.train_seconds = self.elapsed()
        states = self.dist.gather(ckpt.random_state(self.step.objective, self.step.surgery))
        if self.dist.is_main:
            with saving(self.out, "checkpoint", "the previous checkpoint, if there was one"):
                ckpt.save(self.out, model=self.model, optimizer=self.step.optimizer, scheduler=self.step.scheduler,
                          streams=self.streams, objective=self.step.objective, progress=self.progress, cfg=self.cfg,
                          random_states=states, world=self.dist.world, scaler=self.step.scaler)
        self.dist.barrier()


def prepare(cfg: TrainConfig, resume: bool, progress: bool) -> Run:
    """Backbone, data, model, optimiser, objective, streams — and the checkpoint if resuming.

    Long on purpose: the setup of a run read top to bottom (data, model, optimiser, objective,
    checkpoint), each part one call.
    """
    out = Path(cfg.out)
    resolve_tasks(cfg.tasks, cfg.strict_data)  # file tasks become known by name (get_task)
    dist = setup_distributed()
    if dist.is_main:
        check_output_folder(out, cfg.overwrite, resume)
        if cfg.teacher:
            check_output_is_not_a_member(cfg.teacher, out, cfg.teacher_members)
    dist.barrier()
    started = time.time()
    configure_threads()
    seed_everything(cfg.seed)
    where = dist.device if dist.enabled else device.resolve_device(cfg.device)
    device.enter(where)
    precision = resolve_precision(cfg.precision, where)
    saved = ckpt.load(out) if resume else None
    if saved is not None:
        ckpt.check_compatible(saved, cfg, dist.world, out)

    backbone_name, backbone_path = resolve_backbone(cfg.backbone)
    tokenizer = load_tokenizer(backbone_path)
    encoder = load_encoder(backbone_path, device=where)
    # The identity is the full-precision backbone's, so adapters trained on a quantized copy
    # load into the ordinary backbone at inference.
    identity = backbone_identity(backbone_name, encoder)
    if cfg.quantize:
        encoder = load_quantized_encoder(backbone_path, cfg.quantize, device=where)
        precision = "fp32"  # bitsandbytes layers pick their own compute dtype; autocast would fight them
    if cfg.backbone_dropout is not None:
        set_dropout(encoder, cfg.backbone_dropout)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    raw_train: dict[str, LoadedSplit] = {}
    train_splits, dev_splits, sizes = load_task_data(cfg, tokenizer, data_dir, raw_train)
    pad_id = tokenizer.pad_token_id or 0

    model = build_model(cfg, encoder, encoder.config.hidden_size)
    if cfg.init_from and saved is None:
        load_initial_weights(model, cfg.init_from, list(cfg.task_names), cfg.mode, identity)
        log(f"init: adapters and heads from {cfg.init_from}")
    # bitsandbytes placed a quantized encoder itself; everything else goes to the device here.
    (model.heads if cfg.quantize else model).to(where)
    model.train()
    if dist.enabled:
        # Same initial weights everywhere (seeded above), different dropout masks per rank.
        torch.manual_seed(cfg.seed + 7919 * dist.rank)
    trainable, total = count_parameters(model)
    log(f"backbone {backbone_name} ({identity.num_layers} layers, {identity.hidden_size} wide), mode {cfg.mode}, "
        f"tasks {','.join(cfg.task_names)}, {device.name(where)}, precision {precision}; "
        f"trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%)")
    if saved is None and cfg.simcse_epochs:
        run_simcse(model, cfg, train_splits, precision, pad_id, progress and dist.is_main, log)

    optimizer = build_optimizer(cfg, model)
    steps_per_epoch = cfg.steps_per_epoch or math.ceil(sum(sizes.values()) / cfg.batch_size)
    if len(cfg.task_names) == 1 and not cfg.steps_per_epoch:  # one task: a pass over its rows, extra rows included
        steps_per_epoch = math.ceil(len(train_splits[cfg.task_names[0]]) / cfg.batch_size)
    scheduler = build_scheduler(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup_ratio)
    teacher = None
    if cfg.teacher:
        teacher = load_teacher(cfg.teacher, raw_train, {t: get_task(t) for t in cfg.task_names},
                               precision=cfg.precision, device=str(where), cache_dir=cfg.teacher_cache,
                               top_members=cfg.teacher_members, progress=progress and dist.is_main, log=log)
    objective = Objective(model, cfg, precision, dist.rank, teacher)
    surgery = PCGrad(cfg.seed) if cfg.pcgrad else None
    step = TrainingStep(model, objective, optimizer, scheduler, cfg.max_grad_norm, surgery, dist,
                        device.grad_scaler(precision, where))
    if surgery is not None and not step.shared:
        log("pcgrad: the tasks share no trainable parameters here (independent adapters or heads only); "
            "their gradients are used as they are")
    streams = {t: BatchStream(train_splits[t], cfg.batch_size, cfg.seed, i, pad_id, dist.world, dist.shard)
               for i, t in enumerate(cfg.task_names)}
    state = ckpt.Progress()
    if saved is not None:
        ckpt.restore(saved, model=model, optimizer=optimizer, scheduler=scheduler, streams=streams,
                     objective=objective, surgery=surgery, progress=state, rank=dist.rank, scaler=step.scaler)
        log(f"resumed from {out / ckpt.CHECKPOINT_DIR} at epoch {state.epoch}, step {state.step}")
    run = Run(cfg, out, dist, precision, tokenizer, identity, model, dev_splits, sizes, streams, steps_per_epoch,
              step, state, pad_id, trainable, total, started, progress and dist.is_main)
    run._clock_start = time.time() - state.train_seconds
    return run


def finish(run: Run) -> dict:
    """Load the best state, write the adapter-set folder (rank 0), return the summary."""
    cfg, state, dist = run.cfg, run.progress, run.dist
    train_seconds = run.elapsed()
    ckpt.load_trainable_state(run.model, state.best_state)
    kept, trainable = state.best_metrics, run.trainable
    if cfg.keep_best == "per-task" and state.task_best:
        trainable += apply_task_bests(run.model, state)
        kept = {t: state.task_best[t]["metrics"] for t in state.best_metrics}
    manifest = {
        "mode": cfg.mode,
        "tasks": list(cfg.task_names),
        "backbone": run.identity.to_dict(),
        "backbone_source": cfg.backbone,
        "pair_encoding": cfg.pair_encoding,
        "max_length": cfg.max_length,
        "config": cfg.to_dict(),
        "command": "peft-mtl train " + shlex.join(flags_from_config(cfg, TRACKING_FIELDS)),
        "task_specs": {t: get_task(t).to_dict() for t in cfg.task_names},
        "metrics": {"dev": kept, "overall": overall_score(kept, run.primary), "best_epoch": state.best_epoch,
                    **({"task_best_epochs": {t: state.task_best[t]["epoch"] for t in kept}}
                       if cfg.keep_best == "per-task" and state.task_best else {})},
        "history": state.history,
        "parameters": {"trainable": trainable, "total": run.total - run.trainable + trainable},
        "train_examples": run.sizes,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - run.started, 1),
        "precision": run.precision,
        "processes": dist.world,
        # Train times only compare on the same hardware: say which, and how many threads.
        "device": device.name(run.model.device),
        "threads": torch.get_num_threads(),
    }
    if dist.is_main:
        with saving(run.out, "adapter set", "the last checkpoint (epoch end) and whatever was in the folder before"):
            save_run(run.model, run.out, manifest, tokenizer=run.tokenizer, overwrite=True)
        ckpt.remove(run.out)
    dist.barrier()
    if cfg.trace_dir:
        with open(Path(cfg.trace_dir) / f"rank{dist.rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"final_trainable_sha256": state_digest(ckpt.trainable_state(run.model))}) + "\n")
    summary = {"out": str(run.out), "tasks": cfg.task_names, "mode": cfg.mode, "best_epoch": state.best_epoch,
               "dev": kept, "overall": overall_score(kept, run.primary),
               "trainable_parameters": trainable, "train_seconds": round(train_seconds, 1)}
    if dist.enabled:
        summary.update(rank=dist.rank, processes=dist.world)
    epochs = manifest["metrics"].get("task_best_epochs")
    log(f"done: {run.out} | best epoch "
        + (", ".join(f"{t} {e}" for t, e in epochs.items()) if epochs else str(state.best_epoch)) + " | "
        + " ".join(f"{t} {k} {v:.4f}" for t, m in kept.items() for k, v in m.items())
        + f" | {train_seconds:.0f}s training")
    return summary


# ----------------------------------------------------------------------------- set-up helpers


def is_replaceable(folder: Path) -> bool:
    """What --overwrite may replace: an empty folder, or one a peft_mtl run wrote (a set's
    manifest, or an interrupted run's checkpoint). Never a user's own folder."""
    return (not any(folder.iterdir()) or (folder / MANIFEST).is_file()
            or (folder / ckpt.CHECKPOINT_DIR / "progress.json").is_file())


@contextmanager
def output_guard(out: Path) -> Iterator[None]:
    """One writer per output folder (rank 0 of a run holds its lock), and a dead writer's
    interrupted save put right first."""
    if os.environ.get("RANK", "0") != "0":  # other ranks of a distributed run never write the folder
        yield
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(folder_lock(out))
        except FileExistsError:  # another run holds it: its own one-line message
            raise
        except OSError as err:  # not even a lock file can be written beside it
            raise TrainingError(f"{out}: not writable ({err.strerror}); choose an --out you can write to") from None
        for folder in (out, out / ckpt.CHECKPOINT_DIR):  # the set's save, and the checkpoint's inside it
            restored = recover_interrupted_save(folder)
            if restored:
                log(restored)
        for probe in out.glob(".write-test-*") if out.is_dir() else []:  # a dead run's write probe
            probe.unlink(missing_ok=True)
        yield


@contextmanager
def saving(out: Path, what: str, kept: str) -> Iterator[None]:
    """A full disk or an I/O error while writing ``what``: one line saying what is kept (the
    writes are atomic, so nothing half-written takes its place)."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise TrainingError(f"{out}: could not write the {what} ({reason}); kept: {kept}. Free space or fix the "
                            f"disk, then run the same command with --resume") from None


def check_output_path(out: Path) -> None:
    """The shape of ``--out``, checked before anything is written (even a lock): a folder a save can
    replace, not the current folder, a file, or a path under a file."""
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise TrainingError(f"--out {out}: is the current folder or one above it, which a run's save replaces; "
                            f"choose a new folder, e.g. --out runs/NAME")
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{out}: exists and is not a folder; choose another --out")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrainingError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
            break


def check_output_folder(out: Path, overwrite: bool, resume: bool) -> None:
    """Fail before any work if the output cannot be written or would clobber a finished run
    or anything that is not a peft_mtl run."""
    check_output_path(out)
    if overwrite and out.is_dir() and not is_replaceable(out):
        raise TrainingError(f"{out}: --overwrite replaces only an earlier run's folder (or an empty one), and this "
                            f"one holds other files; choose another --out")
    if out.is_dir() and any(p for p in out.iterdir() if p.name != ckpt.CHECKPOINT_DIR) and not (overwrite or resume):
        raise TrainingError(f"{out}: exists and is not empty; pass --overwrite to replace it, "
                            f"--resume to continue an interrupted run, or choose another --out")
    if out.is_dir() and (out / ckpt.CHECKPOINT_DIR).is_dir() and not (overwrite or resume):
        raise TrainingError(f"{out}: holds an interrupted run; pass --resume to continue it or --overwrite to start over")
    try:  # a real write is the only reliable test (root, read-only mounts, /proc, quotas)
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"{out}: not writable ({err.strerror}); choose an --out you can write to") from None


def load_task_data(cfg: TrainConfig, tokenizer, data_dir: Path, raw_train: dict[str, LoadedSplit] | None = None,
                   ) -> tuple[dict[str, EncodedSplit], dict[str, EncodedSplit], dict[str, int]]:
    """Encoded train and dev splits per task, and N_i (real training examples) for the sampler.

    ``raw_train``, if given, receives the training rows as read (in the encoded splits' order),
    for whatever needs the texts again (a distillation teacher encodes them its own way)."""
    train, dev, sizes = {}, {}, {}
    for name in cfg.task_names:
        task = get_task(name)
        real = _load_reported(task_file(data_dir, task, "train"), task, cfg.strict_data)
        real.examples = sample_rows(real.examples, cfg.max_train_examples, cfg.seed, name, "train")
        sizes[name] = len(real.examples)
        if name in cfg.extra_train:
            extra = _load_reported(Path(cfg.extra_train[name]), task, cfg.strict_data)
            real.examples = real.examples + extra.examples
            log(f"{name}: +{len(extra.examples)} extra training rows from {extra.path} (sampler still uses N={sizes[name]})")
        dev_split = _load_reported(task_file(data_dir, task, "dev"), task, cfg.strict_data)
        dev_split.examples = sample_rows(dev_split.examples, cfg.max_eval_examples, cfg.seed, name, "dev")
        train[name] = encode_split(real, tokenizer, cfg.max_length, cfg.pair_encoding)
        if raw_train is not None:
            raw_train[name] = real
        dev[name] = encode_split(dev_split, tokenizer, cfg.max_length, cfg.pair_encoding)
        for split_name, enc in (("train", train[name]), ("dev", dev[name])):
            if enc.truncated:
                log(f"{name} {split_name}: {enc.truncated} inputs longer than {cfg.max_length} tokens were truncated")
    return train, dev, sizes


def sample_rows(examples: list, limit: int | None, seed: int, task: str, split: str) -> list:
    """At most ``limit`` rows: a seeded random sample, kept in file order.

    Not the first ``limit`` rows: task files are often ordered (the SST files are sorted by
    label — their first 1,000 training rows are 80% positive), and a prefix would train and
    evaluate on a skewed slice.
    """
    if not limit or len(examples) <= limit:
        return examples
    rng = np.random.default_rng([seed, zlib.crc32(f"{task}/{split}".encode())])
    keep = np.sort(rng.choice(len(examples), size=limit, replace=False))
    return [examples[i] for i in keep]


def _load_reported(path: Path, task, strict: bool) -> LoadedSplit:
    split = load_split(path, task, strict=strict)
    report = split.skip_report()
    if report:
        log(report)
    return split


class _Stop:
    requested = False
    name = ""


@contextmanager
def stop_on_signals() -> Iterator[_Stop]:
    """SIGINT/SIGTERM ask the loop to stop after the current step (it then checkpoints)."""
    stop = _Stop()

    def on_signal(signum, frame):
        stop.requested, stop.name = True, signal.Signals(signum).name

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def open_trace(cfg: TrainConfig, dist: Dist):
    """``--trace-dir``: one JSON line per step and rank (tasks, rows), for debugging and tests."""
    if not cfg.trace_dir:
        yield None
        return
    Path(cfg.trace_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.trace_dir) / f"rank{dist.rank}.jsonl", "a", encoding="utf-8") as trace:
        yield trace


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def summary_line(summary: dict) -> str:
    return json.dumps(summary, sort_keys=False)
