"""The training loop: pick a task, forward, task loss (+ SMART, + Bregman), step, evaluate, save.

Read top to bottom: :func:`train` sets up (data, model, optimiser), optionally runs the
SimCSE stage, then loops over epochs and steps, evaluating on dev after each epoch and
keeping the best state, and finally writes the adapter-set folder.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .adapters import SHARED_ADAPTER, add_adapters
from .backbone import (backbone_identity, count_parameters, freeze, load_encoder, load_quantized_encoder,
                       load_tokenizer, resolve_backbone, set_dropout)
from .config import TrainConfig
from .distributed import Dist, setup as setup_distributed
from .data import (DataError, EncodedSplit, LoadedSplit, default_data_dir, encode_split, length_grouped_batches,
                   collate, load_split, pad_sequences, task_file)
from .evaluate import evaluate
from .heads import make_head
from .kernels import all_dropout_pairable
from .losses import get_loss
from .metrics import overall_score, primary_score
from .model import MultiTaskModel
from .pcgrad import assign_flat_grad, flat_grad, pcgrad_combine
from .runs import save_run
from .runtime import autocast, configure_threads, resolve_precision, seed_everything
from .sampling import task_schedule
from .simcse import simcse_step_loss
from .smart import BregmanProximal, smart_random_paired, smart_regularizer
from .tasks import get_task


class TrainingError(Exception):
    """Training cannot go on (bad output folder, non-finite loss, ...); the message says why."""


_QUIET = {"on": False}  # ranks other than 0 of a distributed run stay silent


def log(message: str) -> None:
    if not _QUIET["on"]:
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- set-up


def check_output_folder(out: Path, overwrite: bool, resume: bool) -> None:
    """Fail before any work if the output cannot be written or would clobber a finished run."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{out}: exists and is not a folder; choose another --out")
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


def load_task_data(cfg: TrainConfig, tokenizer, data_dir: Path) -> tuple[dict[str, EncodedSplit], dict[str, EncodedSplit], dict[str, int]]:
    """Encoded train and dev splits per task, and N_i (real training examples) for the sampler."""
    train, dev, sizes = {}, {}, {}
    for name in cfg.tasks:
        task = get_task(name)
        real = _load_reported(task_file(data_dir, task, "train"), task, cfg.strict_data)
        real.examples = real.examples[: cfg.max_train_examples] if cfg.max_train_examples else real.examples
        sizes[name] = len(real.examples)
        if name in cfg.extra_train:
            extra = _load_reported(Path(cfg.extra_train[name]), task, cfg.strict_data)
            real.examples = real.examples + extra.examples
            log(f"{name}: +{len(extra.examples)} extra training rows from {extra.path} (sampler still uses N={sizes[name]})")
        dev_split = _load_reported(task_file(data_dir, task, "dev"), task, cfg.strict_data)
        if cfg.max_eval_examples:
            dev_split.examples = dev_split.examples[: cfg.max_eval_examples]
        train[name] = encode_split(real, tokenizer, cfg.max_length, cfg.pair_encoding)
        dev[name] = encode_split(dev_split, tokenizer, cfg.max_length, cfg.pair_encoding)
        for split_name, enc in (("train", train[name]), ("dev", dev[name])):
            if enc.truncated:
                log(f"{name} {split_name}: {enc.truncated} inputs longer than {cfg.max_length} tokens were truncated")
    return train, dev, sizes


def _load_reported(path: Path, task, strict: bool) -> LoadedSplit:
    split = load_split(path, task, strict=strict)
    report = split.skip_report()
    if report:
        log(report)
    return split


def build_model(cfg: TrainConfig, encoder, hidden_size: int) -> MultiTaskModel:
    """Frozen encoder + adapters (lora), bare frozen encoder (heads) or trainable encoder (full)."""
    heads = {t: make_head(get_task(t), hidden_size, cfg.pair_encoding, cfg.head_dropout) for t in cfg.tasks}
    if cfg.mode == "full":
        return MultiTaskModel(encoder, heads, cfg.pooling)
    freeze(encoder)
    if cfg.mode == "heads":
        return MultiTaskModel(encoder, heads, cfg.pooling)
    names = ([SHARED_ADAPTER] if cfg.uses_shared_adapter else []) + list(cfg.tasks)
    peft_model = add_adapters(encoder, names, cfg.lora)
    routing = {t: ([SHARED_ADAPTER] if cfg.uses_shared_adapter else []) + [t] for t in cfg.tasks}
    return MultiTaskModel(peft_model, heads, cfg.pooling, routing)


def build_optimizer(cfg: TrainConfig, model: MultiTaskModel) -> torch.optim.Optimizer:
    """AdamW over every trainable tensor; call after all adapters exist and are trainable."""
    groups: dict[str, list] = {"decay": [], "no_decay": [], "head": [], "lora_b": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("heads."):
            groups["head"].append(p)
        elif "lora_B" in name and cfg.lora_plus_ratio != 1.0:
            groups["lora_b"].append(p)
        elif p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias"):
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    head_lr = cfg.head_lr or cfg.lr
    param_groups = [
        {"params": groups["decay"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": groups["no_decay"], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": groups["head"], "lr": head_lr, "weight_decay": cfg.weight_decay},
        # LoRA+ (Hayou et al. 2024): B learns faster than A by a fixed ratio.
        {"params": groups["lora_b"], "lr": cfg.lr * cfg.lora_plus_ratio, "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak learning rate, then linear decay to 0."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- batches


class BatchStream:
    """Endless length-grouped batches of one task; pass k is shuffled by (seed, task, k).

    Its whole state is (pass, cursor), so a resumed run regenerates the same batches.
    """

    def __init__(self, split: EncodedSplit, batch_size: int, seed: int, task_index: int, pad_id: int,
                 dist: Dist | None = None):
        self.split, self.batch_size, self.seed, self.task_index, self.pad_id = split, batch_size, seed, task_index, pad_id
        # Every rank draws the same global batches of world × batch_size rows and keeps its own rows.
        self.dist = dist or Dist()
        self.passes, self.cursor = 0, 0
        self._batches = self._make(0)

    def _make(self, k: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.task_index, k, 0xBA7])
        return length_grouped_batches(self.split.lengths, self.batch_size * self.dist.world, rng)

    def next(self):
        if self.cursor >= len(self._batches):
            self.passes, self.cursor = self.passes + 1, 0
            self._batches = self._make(self.passes)
        idx = self.dist.shard(self._batches[self.cursor])
        self.cursor += 1
        return collate(self.split, idx, self.pad_id)

    def state(self) -> dict:
        return {"passes": self.passes, "cursor": self.cursor}

    def restore(self, state: dict) -> None:
        self.passes, self.cursor = state["passes"], state["cursor"]
        self._batches = self._make(self.passes)


# ----------------------------------------------------------------------------- one step


@dataclass
class StepContext:
    cfg: TrainConfig
    precision: str
    bregman: BregmanProximal | None
    dist: Dist = field(default_factory=Dist)
    trace: object | None = None  # an open file: one JSON line per step (task, rows) for debugging


def _dropout_pairable(model: MultiTaskModel) -> bool:
    if "_dropout_pairable" not in model.__dict__:  # one walk over the modules per model
        model.__dict__["_dropout_pairable"] = all_dropout_pairable(model)
    return model.__dict__["_dropout_pairable"]


def task_loss(model: MultiTaskModel, batch, ctx: StepContext) -> torch.Tensor:
    """Task loss for one batch, plus λ_s·R_s (SMART) and μ·D_Breg when enabled."""
    cfg, task = ctx.cfg, get_task(batch.task)
    loss_name = cfg.sst_loss if task.name == "sst" else task.default_loss
    loss_fn = get_loss(loss_name)
    rng_state = torch.get_rng_state()
    smart_weight = cfg.smart.weight_for(task.name)
    with autocast(ctx.precision):
        if smart_weight > 0 and cfg.smart.steps == 0 and _dropout_pairable(model):
            output, reg = smart_random_paired(model, task.name, batch.inputs, task.kind, cfg.smart)
            loss = loss_fn(output, batch.labels, alpha=cfg.ordinal_alpha) + smart_weight * reg
            smart_weight = 0.0  # done
        else:
            with model.capture_embeddings() as embeddings:
                output = model(task.name, batch.inputs)
            loss = loss_fn(output, batch.labels, alpha=cfg.ordinal_alpha)
        if smart_weight > 0:
            after_clean = torch.get_rng_state()

            def perturbed(noise):
                with model.perturbed_embeddings(noise):
                    return model(task.name, batch.inputs)

            masks = [seg["attention_mask"] for seg in batch.inputs]
            reg = smart_regularizer(perturbed, output, list(embeddings), masks, task.kind, cfg.smart, rng_state)
            torch.set_rng_state(after_clean)
            loss = loss + smart_weight * reg
        if ctx.bregman is not None:
            after_clean = torch.get_rng_state()
            torch.set_rng_state(rng_state)
            reference = ctx.bregman.reference_output(lambda: model(task.name, batch.inputs))
            torch.set_rng_state(after_clean)
            loss = loss + ctx.bregman.penalty(task.kind, output, reference)
    return loss


def optimizer_step(model: MultiTaskModel, tasks: tuple[str, ...], streams: dict[str, BatchStream],
                   optimizer, scheduler, ctx: StepContext, pcgrad_rng: np.random.Generator | None) -> float:
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    batches = {t: streams[t].next() for t in tasks}
    if ctx.trace is not None:
        ctx.trace.write(json.dumps({"tasks": list(tasks), "rows": {t: b.indices.tolist() for t, b in batches.items()}}) + "\n")
    if pcgrad_rng is not None and len(tasks) > 1:
        shared = model.shared_parameters()
        shared_ids = {id(p) for p in shared}
        per_task, other_grads = [], {}
        for t in tasks:
            loss = task_loss(model, batches[t], ctx)
            _check_finite(loss, t)
            loss.backward()
            total += loss.item()
            per_task.append(flat_grad(shared))
            for p in shared:
                p.grad = None
            for p in model.parameters():
                if p.grad is not None and id(p) not in shared_ids:
                    other_grads[id(p)] = p.grad
        assign_flat_grad(shared, pcgrad_combine(per_task, pcgrad_rng))
    else:
        for t in tasks:
            loss = task_loss(model, batches[t], ctx)
            _check_finite(loss, t)
            loss.backward()
            total += loss.item()
    ctx.dist.average_gradients([p for p in model.parameters() if p.requires_grad])
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], ctx.cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    if ctx.bregman is not None:
        ctx.bregman.update()
    return total


def _check_finite(loss: torch.Tensor, task: str) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(f"non-finite loss ({loss.item()}) on task {task!r}; lower --lr, or check the data. "
                            f"The last good checkpoint is kept; continue from it with --resume.")


# ----------------------------------------------------------------------------- SimCSE


def run_simcse(model: MultiTaskModel, cfg: TrainConfig, train: dict[str, EncodedSplit], precision: str,
               pad_id: int, progress: bool) -> list[float]:
    """Contrastive warm-up of the shared adapter (or the whole encoder in full mode) on training sentences."""
    sentences = []
    for split in train.values():
        for seg in split.segments:
            sentences.extend(seg)
    rng = np.random.default_rng([cfg.seed, 0x51C])
    if len(sentences) > cfg.simcse_max_sentences:
        sentences = [sentences[i] for i in rng.choice(len(sentences), cfg.simcse_max_sentences, replace=False)]
    if cfg.mode == "lora":
        if not cfg.uses_shared_adapter:
            raise TrainingError("SimCSE trains the shared adapter; drop --no-shared or --simcse-epochs")
        model.encoder.base_model.set_adapter([SHARED_ADAPTER])
        model.reset_routing()
    params = [p for n, p in model.encoder.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    lengths = np.array([len(s["input_ids"]) for s in sentences])
    losses = []
    model.train()
    for epoch in range(cfg.simcse_epochs):
        batches = length_grouped_batches(lengths, cfg.batch_size, np.random.default_rng([cfg.seed, 0x51C, epoch]))
        for idx in tqdm(batches, desc=f"simcse {epoch + 1}/{cfg.simcse_epochs}", disable=not progress,
                        file=sys.stderr, mininterval=2.0):
            inputs = pad_sequences([sentences[i] for i in idx], pad_id)
            optimizer.zero_grad(set_to_none=True)
            with autocast(precision):
                loss = simcse_step_loss(model, inputs, cfg.simcse_temperature)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        log(f"simcse epoch {epoch + 1}: mean loss {np.mean(losses[-len(batches):]):.4f}")
    if cfg.mode == "lora":
        # Back to "every adapter trainable" before the task optimiser is built.
        model.encoder.base_model.set_adapter(list(model.encoder.peft_config))
    return losses


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train, evaluate on dev every epoch, save the best state to ``cfg.out``; return the summary."""
    cfg.validate()
    out = Path(cfg.out)
    dist = setup_distributed()
    _QUIET["on"] = not dist.is_main
    progress = progress and dist.is_main
    if dist.is_main:
        check_output_folder(out, cfg.overwrite, resume)
    dist.barrier()
    started = time.time()
    configure_threads()
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg.precision)

    backbone_name, backbone_path = resolve_backbone(cfg.backbone)
    tokenizer = load_tokenizer(backbone_path)
    encoder = load_encoder(backbone_path)
    # The identity is the full-precision backbone's, so adapters trained on a quantized copy
    # load into the ordinary backbone at inference.
    identity = backbone_identity(backbone_name, encoder)
    if cfg.quantize:
        encoder = load_quantized_encoder(backbone_path, cfg.quantize)
        precision = "fp32"  # bitsandbytes layers pick their own compute dtype; autocast would fight them
    if cfg.backbone_dropout is not None:
        set_dropout(encoder, cfg.backbone_dropout)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    train_splits, dev_splits, sizes = load_task_data(cfg, tokenizer, data_dir)
    pad_id = tokenizer.pad_token_id or 0

    model = build_model(cfg, encoder, encoder.config.hidden_size)
    model.train()
    if dist.enabled:
        # Same initial weights everywhere (seeded above), different dropout masks per rank.
        torch.manual_seed(cfg.seed + 7919 * dist.rank)
    trainable, total = count_parameters(model)
    log(f"backbone {backbone_name} ({identity.num_layers} layers, {identity.hidden_size} wide), mode {cfg.mode}, "
        f"tasks {','.join(cfg.tasks)}, precision {precision}; trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%)")

    state = ckpt.load(out, model) if resume else None
    if state is None and cfg.simcse_epochs:
        run_simcse(model, cfg, train_splits, precision, pad_id, progress)

    optimizer = build_optimizer(cfg, model)
    steps_per_epoch = cfg.steps_per_epoch or math.ceil(sum(sizes.values()) / cfg.batch_size)
    if len(cfg.tasks) == 1 and not cfg.steps_per_epoch:
        steps_per_epoch = math.ceil(len(train_splits[cfg.tasks[0]]) / cfg.batch_size)
    scheduler = build_scheduler(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup_ratio)
    bregman = BregmanProximal(model, cfg.smart.bregman_mu, cfg.smart.bregman_beta) if cfg.smart.bregman_mu > 0 else None
    trace = None
    if cfg.trace_dir:
        Path(cfg.trace_dir).mkdir(parents=True, exist_ok=True)
        trace = open(Path(cfg.trace_dir) / f"rank{dist.rank}.jsonl", "a", encoding="utf-8")
    ctx = StepContext(cfg, precision, bregman, dist, trace)
    streams = {t: BatchStream(train_splits[t], cfg.batch_size, cfg.seed, i, pad_id, dist)
               for i, t in enumerate(cfg.tasks)}
    pcgrad_rng = np.random.default_rng([cfg.seed, 0xBC6]) if cfg.pcgrad else None

    progress_state = ckpt.Progress()
    if state is not None:
        ckpt.restore(state, model, optimizer, scheduler, streams, bregman, progress_state)
        log(f"resumed from {out / ckpt.CHECKPOINT_DIR} at epoch {progress_state.epoch}, step {progress_state.step}")

    stop_requested = {"signal": None}

    def on_signal(signum, frame):
        stop_requested["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    train_started = time.time() - progress_state.train_seconds
    try:
        for epoch in range(progress_state.epoch, cfg.epochs + 1):
            schedule = task_schedule(cfg.sampling, sizes, steps_per_epoch, epoch, cfg.epochs, cfg.seed,
                                     cfg.staggered_epochs)
            bar = tqdm(total=len(schedule), initial=progress_state.step, desc=f"epoch {epoch}/{cfg.epochs}",
                       unit="step", disable=not progress, file=sys.stderr, mininterval=2.0)
            model.train()
            while progress_state.step < len(schedule):
                loss = optimizer_step(model, schedule[progress_state.step], streams, optimizer, scheduler, ctx, pcgrad_rng)
                progress_state.step += 1
                progress_state.global_step += 1
                progress_state.loss_sum += loss
                progress_state.loss_count += 1
                bar.update(1)
                if progress_state.step % 20 == 0:
                    bar.set_postfix(loss=f"{progress_state.loss_sum / progress_state.loss_count:.4f}")
                if stop_requested["signal"] is not None:
                    break
                if cfg.checkpoint_every and progress_state.global_step % cfg.checkpoint_every == 0:
                    progress_state.train_seconds = time.time() - train_started
                    _save_checkpoint(dist, out, model, optimizer, scheduler, streams, bregman, progress_state, cfg)
            bar.close()
            if stop_requested["signal"] is not None:
                progress_state.train_seconds = time.time() - train_started
                _save_checkpoint(dist, out, model, optimizer, scheduler, streams, bregman, progress_state, cfg)
                name = signal.Signals(stop_requested["signal"]).name
                log(f"{name}: checkpoint saved to {out / ckpt.CHECKPOINT_DIR}; continue with --resume")
                return {"interrupted": True, "epoch": epoch, "step": progress_state.step}

            metrics = evaluate_sharded(model, dev_splits, cfg.eval_batch_size, precision, progress, pad_id, dist)
            overall = overall_score(metrics)
            score = primary_score(metrics)
            train_loss = progress_state.loss_sum / max(1, progress_state.loss_count)
            improved = score > progress_state.best_score
            progress_state.history.append({"epoch": epoch, "train_loss": round(train_loss, 5), "dev": metrics,
                                           "overall": overall, "seconds": round(time.time() - train_started, 1)})
            shown = " ".join(f"{t} {k} {v:.4f}" for t, m in metrics.items() for k, v in m.items())
            log(f"epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f} | dev {shown}"
                + (f" | overall {overall:.4f}" if overall is not None else "")
                + f" | {time.time() - train_started:.0f}s" + (" | best" if improved else ""))
            if improved:
                progress_state.best_score, progress_state.best_epoch = score, epoch
                progress_state.best_metrics = metrics
                progress_state.epochs_since_best = 0
                progress_state.best_state = ckpt.trainable_state(model)
            else:
                progress_state.epochs_since_best += 1
            progress_state.epoch, progress_state.step = epoch + 1, 0
            progress_state.loss_sum, progress_state.loss_count = 0.0, 0
            progress_state.train_seconds = time.time() - train_started
            _save_checkpoint(dist, out, model, optimizer, scheduler, streams, bregman, progress_state, cfg)
            if progress_state.epochs_since_best >= cfg.patience and epoch < cfg.epochs:
                log(f"early stop: no dev improvement for {cfg.patience} epochs (best epoch {progress_state.best_epoch})")
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if trace is not None:
            trace.close()

    train_seconds = time.time() - train_started
    ckpt.load_trainable_state(model, progress_state.best_state)
    manifest = {
        "mode": cfg.mode,
        "tasks": list(cfg.tasks),
        "backbone": identity.to_dict(),
        "backbone_source": cfg.backbone,
        "pair_encoding": cfg.pair_encoding,
        "max_length": cfg.max_length,
        "config": cfg.to_dict(),
        "metrics": {"dev": progress_state.best_metrics, "overall": overall_score(progress_state.best_metrics),
                    "best_epoch": progress_state.best_epoch},
        "history": progress_state.history,
        "parameters": {"trainable": trainable, "total": total},
        "train_examples": sizes,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "precision": precision,
    }
    manifest["processes"] = dist.world
    if dist.is_main:
        save_run(model, out, manifest, tokenizer=tokenizer, overwrite=True)
        ckpt.remove(out)
    dist.barrier()
    if cfg.trace_dir:
        with open(Path(cfg.trace_dir) / f"rank{dist.rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"final_trainable_sha256": _state_digest(ckpt.trainable_state(model))}) + "\n")
    summary = {"out": str(out), "tasks": cfg.tasks, "mode": cfg.mode, "best_epoch": progress_state.best_epoch,
               "dev": progress_state.best_metrics, "overall": overall_score(progress_state.best_metrics),
               "trainable_parameters": trainable, "train_seconds": round(train_seconds, 1)}
    if dist.enabled:
        summary.update(rank=dist.rank, processes=dist.world)
    log(f"done: {out} | best epoch {progress_state.best_epoch} | "
        + " ".join(f"{t} {k} {v:.4f}" for t, m in progress_state.best_metrics.items() for k, v in m.items())
        + f" | {train_seconds:.0f}s training")
    return summary


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].float().numpy().tobytes())
    return digest.hexdigest()


def _save_checkpoint(dist: Dist, *args) -> None:
    if dist.is_main:
        ckpt.save(*args)
    dist.barrier()


def evaluate_sharded(model, splits: dict[str, EncodedSplit], batch_size: int, precision: str, progress: bool,
                     pad_id: int, dist: Dist) -> dict[str, dict[str, float]]:
    """Dev metrics; with several processes each evaluates rows[rank::N] and outputs are gathered."""
    if not dist.enabled:
        return evaluate(model, splits, batch_size, precision, progress, pad_id)
    from .evaluate import predictions_from_outputs, raw_outputs, score

    results = {}
    for task, split in splits.items():
        idx = dist.shard(np.arange(len(split)))
        part = EncodedSplit(split.task, [[seg[i] for i in idx] for seg in split.segments], split.labels[idx], 0)
        outputs = raw_outputs(model, part, batch_size, precision, progress, pad_id) if len(part) else None
        gathered = dist.gather((idx, outputs))
        full = np.concatenate([o for i, o in gathered if o is not None])
        order = np.concatenate([i for i, o in gathered if o is not None])
        placed = np.empty_like(full)
        placed[order] = full
        results[task] = score(split, predictions_from_outputs(split.task.kind, placed))
    return results


def summary_line(summary: dict) -> str:
    return json.dumps(summary, sort_keys=False)
