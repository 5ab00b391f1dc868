"""Knowledge distillation: the student also learns a teacher's outputs on its training rows.

Hinton et al. (2015): an ensemble's averaged predictions carry more than the gold labels
(how sure it is, which wrong class is nearly right), and a single model trained to match
them recovers part of the ensemble's gain at one model's inference cost. Here the teacher
is an ensemble of adapter sets — a record written by ``peft-mtl ensemble --record``, with
its members and per-task weights as selected — or one set's folder.

The teacher's outputs on every training row are computed once, before the first step, on
one backbone with the members swapped in, and combined as the ensemble combines them. They
go through the ensemble output cache (``~/.cache/peft_mtl/outputs`` by default), so a
resumed run or a second seed does not recompute them. During training a batch's rows look
their targets up by index, and the task's term becomes

    (1 - α) · task loss + α · distillation term

* classification: ``T² · KL(q_T ‖ softmax(z / T))`` with ``q_T ∝ p_teacher^(1/T)`` — the
  teacher's (mean) probabilities softened by the temperature, the T² keeping the gradient's
  scale independent of T (Hinton et al., section 2);
* regression: ``MSE(student score, teacher score)``.

Tasks the teacher does not cover train on their labels alone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.loading import LoadedSplit
from ..data.tasks import TaskSpec
from ..errors import UserError
from ..inference.adapter_host import load_base
from ..inference.ensemble import combine, member_outputs
from ..inference.output_cache import OutputCache
from ..model.saved_sets import read_manifest

__all__ = ["Teacher", "TeacherError", "teacher_members", "check_output_is_not_a_member", "load_teacher", "distillation_loss", "default_cache_dir"]


class TeacherError(UserError):
    """The teacher cannot be used as given; the message names the file and the fix."""


@dataclass
class Teacher:
    """Soft targets per task, row-aligned with the student's training split."""

    source: str
    targets: dict[str, torch.Tensor]  # (N, C) probabilities or (N,) scores
    members: dict[str, int]  # members with weight, per task (for the log)

    def batch_targets(self, task: str, indices: np.ndarray, device: torch.device) -> torch.Tensor | None:
        if task not in self.targets:
            return None
        return self.targets[task][torch.as_tensor(indices, dtype=torch.long)].to(device)


def default_cache_dir() -> Path:
    """``$PEFT_MTL_CACHE/outputs`` (default ``~/.cache/peft_mtl/outputs``), shared with ``peft-mtl ensemble``."""
    root = os.environ.get("PEFT_MTL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_mtl")
    return Path(root) / "outputs"


def teacher_members(source: str | Path, top: int = 0) -> tuple[dict[str, list[tuple[Path, float]]] | None, dict]:
    """``task → [(folder, weight)]`` of an ensemble record, and how it combines members.

    ``top > 0`` keeps each task's ``top`` heaviest members (ties: the record's order); the
    combination renormalises their weights. A large selected ensemble spreads little weight
    over many members, and the teacher costs one forward pass per member and training row.

    A set folder (one teacher for all its tasks) returns ``(None, {})``; the caller then
    asks the folder which tasks it has.
    """
    path = Path(source)
    if path.is_dir():
        if not (path / "peft_mtl.json").is_file():
            raise TeacherError(f"{path}: not an adapter-set folder (no peft_mtl.json); give --teacher a folder "
                               f"written by `peft-mtl train` or a NAME.ensemble.json from `peft-mtl ensemble --record`")
        return None, {}
    if not path.is_file():
        raise TeacherError(f"{path}: no such file or folder; give --teacher an ensemble record "
                           f"(NAME.ensemble.json, from `peft-mtl ensemble --record`) or an adapter-set folder")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        tasks: dict[str, list[str]] = record["tasks"]
        members: list[str] = record["members"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise TeacherError(f"{path}: not an ensemble record ({err.__class__.__name__}: {err}); write one with "
                           f"`peft-mtl ensemble SET1 SET2 ... --record {path}`") from None
    selection = (record.get("selection") or {}).get("tasks") or {}
    listed = [float(w) for w in str(record["weights"]).split(",")] if record.get("weights") else None
    out: dict[str, list[tuple[Path, float]]] = {}
    for task, folders in tasks.items():
        chosen = selection.get(task, {}).get("weights")
        weighted = []
        for folder in folders:
            if chosen is not None:
                w = float(chosen.get(folder, 0.0))
            elif listed is not None:
                w = listed[members.index(folder)]
            else:
                w = 1.0
            if w > 0:
                weighted.append((_resolve_member(folder, path), w))
        if top > 0:
            weighted = sorted(weighted, key=lambda fw: -fw[1])[:top]  # stable: ties keep the record's order
        if weighted:
            out[task] = weighted
    how = {"method": record.get("method", "mean"), "regression_method": record.get("regression_method", "mean")}
    return out, how


def _resolve_member(folder: str, record: Path) -> Path:
    """A member folder as written in the record: relative to the working directory (where
    ``peft-mtl ensemble`` ran) or, failing that, to the record's folder or its parent."""
    for candidate in (Path(folder), record.parent / folder, record.parent.parent / folder):
        if (candidate / "peft_mtl.json").is_file():
            return candidate
    raise TeacherError(f"{record}: member {folder} not found (looked in the working directory and beside the "
                       f"record); run from the folder the record was written in, or rebuild the record")


def check_output_is_not_a_member(source: str | Path, out: str | Path, top: int = 0) -> None:
    """Refuse an ``--out`` that is one of the teacher's sets: the run would replace a member
    the ensemble record was selected and scored with (and a retrained default set would then
    teach its successor something the record never measured)."""
    weighted, _ = teacher_members(source, top)
    folders = [Path(source)] if weighted is None else [f for members in weighted.values() for f, _ in members]
    target = Path(out).resolve()
    for folder in folders:
        if folder.resolve() == target:
            raise TeacherError(f"{source}: its member {folder} is this run's --out; training would replace a "
                               f"teacher's set. Write the student elsewhere (another --out), or move that member "
                               f"and rebuild the record")


def load_teacher(source: str | Path, raw_splits: dict[str, LoadedSplit], student_specs: dict[str, TaskSpec],
                 backbone: str | None = None, precision: str = "auto", device: str = "auto",
                 cache_dir: str | Path | None = None, top_members: int = 0, progress: bool = False,
                 log: Callable[[str], None] = logging.getLogger(__name__).info) -> Teacher:
    """The teacher's combined outputs on every row of ``raw_splits`` (the student's training rows, in order)."""
    weighted, how = teacher_members(source, top_members)
    if weighted is None:
        tasks = read_manifest(source).get("tasks") or []
        weighted = {t: [(Path(source), 1.0)] for t in tasks}
    weighted = {t: m for t, m in weighted.items() if t in raw_splits}
    if not weighted:
        raise TeacherError(f"{source}: covers none of the tasks being trained ({', '.join(raw_splits)}); "
                           f"pick a teacher trained on them")
    folders = list(dict.fromkeys(f for members in weighted.values() for f, _ in members))
    base = load_base(backbone or read_manifest(folders[0]).get("backbone_source"), precision=precision, device=device)
    names = {f: base.load(f, name=f"teacher{i}") for i, f in enumerate(folders)}
    cache = OutputCache(cache_dir or default_cache_dir())
    targets, counts = {}, {}
    for task, members in weighted.items():
        spec, mine = base.spec(task, names[members[0][0]]), student_specs[task]
        if spec.kind != mine.kind or _labels(spec) != _labels(mine):
            raise TeacherError(f"{source}: its {task!r} is a {spec.kind} task with {spec.num_labels} output(s) "
                               f"(labels {spec.labels}), the student's is a {mine.kind} task with "
                               f"{mine.num_labels} (labels {mine.labels}); use a teacher trained on the same task")
        inputs = [ex.texts[0] if len(ex.texts) == 1 else ex.texts for ex in raw_splits[task].examples]
        outs = []
        for folder, _ in members:
            encoded = base.encode(task, inputs, names[folder])  # each member's own max length and pair encoding
            outs.extend(member_outputs(base, task, encoded, [names[folder]], batched=False, progress=progress,
                                       cache=cache))
        method = how.get("method", "mean") if spec.kind == "classification" else how.get("regression_method", "mean")
        combined = combine(spec.kind, outs, [w for _, w in members], method)
        targets[task] = torch.as_tensor(np.asarray(combined, dtype=np.float32))
        counts[task] = len(members)
    log(f"teacher {source}: " + ", ".join(f"{t} {k} member(s)" for t, k in counts.items())
        + f" on {sum(len(v) for v in targets.values()):,} training rows "
        + f"({cache.hits} member outputs from the cache {cache.root}, {cache.misses} computed)")
    return Teacher(str(source), targets, counts)


def _labels(spec: TaskSpec) -> list[str]:
    return [str(x) for x in spec.labels] if spec.kind == "classification" and spec.labels else []


def distillation_loss(kind: str, outputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The student's distance to the teacher: ``T²·KL(q_T ‖ p_T)`` for probabilities, MSE for scores."""
    if kind == "classification":
        t = float(temperature)
        soft = torch.log(targets.float().clamp_min(1e-8)) / t
        log_q = torch.log_softmax(soft, dim=-1)
        log_p = torch.log_softmax(outputs.float() / t, dim=-1)
        return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t
    return F.mse_loss(outputs.float(), targets.float())
