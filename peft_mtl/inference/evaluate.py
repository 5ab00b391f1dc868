"""Running a model over encoded data: raw outputs, predictions and metrics."""

from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.loading import EncodedSplit, iterate_batches
from ..data.metrics import METRICS
from ..device import autocast
from ..data.tasks import TaskSpec


@torch.inference_mode()
def raw_outputs(model, split: EncodedSplit, batch_size: int = 128, precision: str = "fp32",
                progress: bool = True, pad_id: int = 0, head: str | None = None) -> np.ndarray:
    """Outputs of ``head`` (default: the task's name) for every example, in the split's order:
    logits (N, C) or scores (N,)."""
    was_training = model.training
    if was_training:  # train()/eval() walk every module: thousands with many adapter sets loaded
        model.eval()
    task = head or split.task.name
    model.use_task(task, trainable=False)
    chunks, order = [], []
    bar = tqdm(total=len(split), desc=f"eval {task}", unit="ex", disable=not progress, file=sys.stderr,
               leave=False, mininterval=1.0)
    try:
        with autocast(precision, model.device):
            for batch in iterate_batches(split, batch_size, None, pad_id):
                chunks.append(model(task, batch.inputs).float().cpu().numpy())
                order.append(batch.indices)
                bar.update(len(batch))
    finally:
        bar.close()
        if was_training:
            model.train()
    out = np.concatenate(chunks)
    result = np.empty_like(out)
    result[np.concatenate(order)] = out
    return result


def predictions_from_outputs(task: TaskSpec, outputs: np.ndarray) -> np.ndarray:
    """Class ids (argmax), or scores clipped to the task's ``output_range`` (clipping only helps)."""
    if task.kind == "classification":
        return outputs.argmax(-1)
    if task.output_range is not None:
        return np.clip(outputs, *task.output_range)
    return outputs


def probabilities(outputs: np.ndarray) -> np.ndarray:
    shifted = outputs - outputs.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def score(split: EncodedSplit, predictions: np.ndarray) -> dict[str, float]:
    """Every metric of the task (its primary one first)."""
    return {m: METRICS[m].fn(predictions, split.labels) for m in split.task.metrics}


def evaluate(model, splits: dict[str, EncodedSplit], batch_size: int = 128, precision: str = "fp32",
             progress: bool = True, pad_id: int = 0, prefix: str = "") -> dict[str, dict[str, float]]:
    results = {}
    for task, split in splits.items():
        outputs = raw_outputs(model, split, batch_size, precision, progress, pad_id, head=prefix + task)
        results[task] = score(split, predictions_from_outputs(split.task, outputs))
    return results


def evaluate_sharded(model, splits: dict[str, EncodedSplit], batch_size: int, precision: str, progress: bool,
                     pad_id: int, dist) -> dict[str, dict[str, float]]:
    """Dev metrics; with several processes each evaluates rows[rank::N] and outputs are gathered."""
    if not dist.enabled:
        return evaluate(model, splits, batch_size, precision, progress, pad_id)
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
        results[task] = score(split, predictions_from_outputs(split.task, placed))
    return results
