"""The trainable-parameters-vs-score report: a Markdown table and a plot, from saved runs.

Every folder holding a ``peft_mtl.json`` manifest is a run; every ``*.ensemble.json``
record (written by ``peft-mtl ensemble --record``) is an ensemble; runs in sibling folders
``seed0``, ``seed1``, ... (what ``peft-mtl sweep`` writes) are one row, mean ± sd over the
seeds; the *combined* rows of a ``*.sweep.json`` (tasks each trained alone, scored together)
are one row each; ``hf_baseline*.json`` (written by benchmarks/hf_baseline.py) are reference rows of
the plain Hugging Face pipeline, kept out of the Pareto front. Output is a pure function of
those files: rows sorted by name, no timestamps, fixed plot metadata.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import folder_bytes, write_json_atomic
from ..data.metrics import CS224N_TASKS, METRICS, overall_score
from ..data.tasks import TASKS
from ..errors import UserError
from ..model.saved_sets import MANIFEST

DEFAULT_BATCH = 32  # the table's train steps are of this batch unless a row's details say otherwise
ZOOM_POINTS = 3.0  # the zoomed overall panel shows runs within this many points (x 0.01) of the best
BUDGET_POINTS = 4.0  # the score-vs-budget panel shows trained runs within this many points of the best


METRIC_SHORT = {"accuracy": "acc", "pearson": "r", "spearman": "ρ"}  # column headings: "SST acc", "STS r"


def primary_metrics(scores: dict[str, dict[str, float]]) -> dict[str, tuple[str, float]]:
    """Task → (its primary metric, value) in one run's scores, read from the scores themselves.

    Scores are written in the order of the task's ``metrics`` (the primary first), so the
    first key is the primary one; a task registered here (the built-in ones) names its own."""
    out = {}
    for task, values in scores.items():
        if not isinstance(values, dict) or not values:
            continue
        registered = TASKS.get(task)
        metric = registered.primary_metric if registered and registered.primary_metric in values else next(iter(values))
        out[task] = (metric, values[metric])
    return out


def task_columns(rows: list["Row"]) -> dict[str, str]:
    """Task → metric for the table's columns: every task some row scored, the benchmark's first."""
    columns: dict[str, str] = {}
    for r in rows:
        for t in r.metrics:
            columns.setdefault(t, r.metric_names.get(t, ""))
    order = list(CS224N_TASKS)
    return {t: columns[t] for t in sorted(columns, key=lambda t: (order.index(t) if t in order else len(order), t))}


def overall_group(rows: list["Row"]) -> frozenset[str]:
    """The tasks an overall score is compared over: the most common task set of multi-task rows
    (ties: the larger, then alphabetical), else every task in the report. Overall scores of
    other task sets are not comparable."""
    sets = Counter(frozenset(r.metrics) for r in rows if len(r.metrics) > 1 and not r.reference)
    if not sets:
        every = frozenset(t for r in rows for t in r.metrics)
        return every if len(every) > 1 else frozenset()
    return max(sets, key=lambda s: (sets[s], len(s), sorted(s)))


def keep_comparable_overall(rows: list["Row"]) -> list["Row"]:
    """Rows scored on other tasks than the overall group show no overall score."""
    group = overall_group(rows)
    for r in rows:
        if frozenset(r.metrics) != group:
            r.overall = None
            r.sd.pop("overall", None)
    return rows


@dataclass
class Row:
    name: str
    mode: str
    backbone: str
    trainable: int
    total: int
    bytes_on_disk: int
    metrics: dict[str, float]  # task -> its primary metric's value
    overall: float | None
    train_seconds: float | None
    detail: str
    partial_dev: bool = False  # scored on a subset of the dev split: kept out of the front and the plot
    seeds: int = 1  # > 1: metrics, overall, time and size are means over this many seeds
    sd: dict[str, float] = field(default_factory=dict)  # sample sd over seeds, by task and "overall"
    reference: bool = False  # another pipeline's result (the plain HF baseline): shown, never on the front
    identity: str | None = None  # same value = the same training run (a copy of it elsewhere)
    train_steps: int | None = None  # optimiser steps taken (all epochs run, not just the kept one): the budget
    parts: list[str] = field(default_factory=list)  # a combined row: the recipes whose runs it adds up
    grouped: bool = False  # a recipe's seed group (written by `peft-mtl sweep`), even of one seed
    metric_names: dict[str, str] = field(default_factory=dict)  # task -> the metric in ``metrics``

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def _detail(manifest: dict) -> str:
    cfg = manifest.get("config", {})
    mode = manifest.get("mode")
    source = manifest.get("compressed_from")
    if source:  # no training of its own: say what it was cut from, not how that set was trained
        ranks = source.get("ranks") or {}
        cut = "/".join(f"{a} {r}" for a, r in ranks.items()) if len(set(ranks.values())) > 1 else f"r={source.get('rank')}"
        return f"{Path(source.get('folder', '?')).name} cut to {cut} by truncated SVD (peft-mtl compress), no training"
    parts = []
    if mode == "lora":
        lora = cfg.get("lora", {})
        parts.append(f"r={lora.get('rank')} {lora.get('targets')}")
        if len(manifest.get("tasks", [])) > 1:
            parts.append("shared+task" if cfg.get("shared_adapter") is not False else "per-task")
            parts.append(cfg.get("sampling", ""))
        if lora.get("use_dora"):
            parts.append("DoRA")
        if lora.get("use_rslora"):
            parts.append("rsLoRA")
    if cfg.get("quantize"):
        parts.append(cfg["quantize"])
    smart = cfg.get("smart", {})
    if smart.get("weight") or smart.get("task_weights"):
        per_task = "".join(f" {t}={w:g}" for t, w in sorted((smart.get("task_weights") or {}).items()))
        parts.append(f"SMART λ={smart.get('weight'):g}" + (f",{per_task}" if per_task else "")
                     + (" normalized" if smart.get("projection") == "normalize" else ""))
    if smart.get("bregman_mu"):
        parts.append(f"Bregman μ={smart.get('bregman_mu')}")
    if cfg.get("lora_plus_ratio", 1.0) != 1.0:
        parts.append(f"LoRA+ ×{cfg['lora_plus_ratio']:g}")
    for task, loss in sorted((cfg.get("task_losses") or {}).items()):
        parts.append(f"{task} {loss} loss")
    if cfg.get("teacher"):
        top = f", its {cfg['teacher_members']} heaviest members per task" if cfg.get("teacher_members") else ""
        parts.append(f"distilled from {Path(cfg['teacher']).name}{top} (α {cfg.get('distill_weight'):g}, "
                     f"T {cfg.get('distill_temperature'):g})")
    if cfg.get("init_from"):
        parts.append(f"started from {Path(cfg['init_from']).name}")
    if cfg.get("lr") is not None:
        parts.append(f"lr {cfg['lr']:g}")
    steps = cfg.get("steps_per_epoch")
    parts.append(f"{cfg.get('epochs')} ep" + (f" × {steps} steps" if steps else ""))
    if cfg.get("batch_size") not in (None, DEFAULT_BATCH):
        parts.append(f"batch {cfg['batch_size']}")
    if cfg.get("keep_best") == "per-task":
        parts.append("each task from its best epoch")
    if cfg.get("max_eval_examples"):
        # Not comparable with full-dev rows: say so where the number is printed.
        parts.append(f"dev = first {cfg['max_eval_examples']} rows only")
    return ", ".join(p for p in parts if p)


def train_steps(manifest: dict) -> int | None:
    """Optimiser steps a run took: the epochs it ran (early stopping included) × its steps per epoch.

    Scores are only comparable at one budget, and "4 epochs" is 3,852 steps for a multi-task run but
    1,068 for SST alone; this is the number the table prints. None for a set that was not trained
    (cut from another by ``peft-mtl compress``) or a manifest without its config.
    """
    cfg = manifest.get("config") or {}
    if manifest.get("compressed_from") or not cfg.get("batch_size"):
        return None
    epochs_run = len(manifest.get("history") or []) or cfg.get("epochs") or 0
    per_epoch = cfg.get("steps_per_epoch") or math.ceil(sum((manifest.get("train_examples") or {}).values())
                                                         / cfg["batch_size"])
    return epochs_run * per_epoch or None


def run_row(folder: Path, root: Path) -> Row:
    manifest = json.loads((folder / MANIFEST).read_text())
    primary = primary_metrics(manifest.get("metrics", {}).get("dev", {}))
    params = manifest.get("parameters", {})
    # A run whose weights are kept out of git (a full fine-tune) ships its manifest with the size it had.
    size = int(manifest["bytes_on_disk"]) if "bytes_on_disk" in manifest else folder_bytes(folder)
    return Row(name=os.path.relpath(folder, root), mode=manifest.get("mode", "?"),
               backbone=manifest.get("backbone", {}).get("name", "?"), trainable=int(params.get("trainable", 0)),
               total=int(params.get("total", 0)), bytes_on_disk=size, metrics={t: v for t, (_, v) in primary.items()},
               metric_names={t: m for t, (m, _) in primary.items()},
               overall=manifest.get("metrics", {}).get("overall"), train_seconds=manifest.get("train_seconds"),
               detail=_detail(manifest), partial_dev=bool(manifest.get("config", {}).get("max_eval_examples")),
               identity=_run_identity(manifest), train_steps=train_steps(manifest))


def _run_identity(manifest: dict) -> str:
    """What makes two manifests one run: its config (wherever it was written), results and timings."""
    config = {k: v for k, v in manifest.get("config", {}).items() if k != "out"}
    return json.dumps([config, manifest.get("metrics"), manifest.get("train_seconds")], sort_keys=True)


def drop_copies(rows: list[Row]) -> list[Row]:
    """One row per training run: a set copied out of a sweep (e.g. to ship it as an ensemble member)
    is listed once, inside its seed group."""
    in_group = {r.identity for r in rows if re.fullmatch(r"seed\d+", os.path.basename(r.name)) and r.identity}
    seen: set[str] = set()
    kept = []
    for r in rows:
        grouped = re.fullmatch(r"seed\d+", os.path.basename(r.name)) is not None
        if r.identity and ((r.identity in in_group and not grouped) or r.identity in seen):
            continue
        if r.identity:
            seen.add(r.identity)
        kept.append(r)
    return kept


def ensemble_row(record_path: Path, root: Path) -> Row:
    rec = json.loads(record_path.read_text())
    if rec.get("split") != "dev":
        raise UserError(f"{record_path}: the report compares dev scores; this record is on {rec.get('split')!r}")
    scored, overall = rec["metrics"], rec["metrics"].get("overall")
    selection = rec.get("selection")
    if selection and selection.get("cross_fitted_overall") is not None:
        # Members chosen on dev and scored on dev overstate the ensemble: the table and the
        # front show the cross-fitted scores (chosen on one half of dev, scored on the other).
        scored = {t: v["cross_fitted"] for t, v in selection["tasks"].items()}
        overall = selection["cross_fitted_overall"]
    primary = primary_metrics({t: v for t, v in scored.items() if t not in ("overall", "selection")})
    return Row(name=os.path.relpath(record_path, root), mode="ensemble", backbone=rec.get("backbone", "?"),
               trainable=int(rec["trainable"]), total=int(rec["total"]), bytes_on_disk=int(rec["bytes_on_disk"]),
               metrics={t: v for t, (_, v) in primary.items()}, metric_names={t: m for t, (m, _) in primary.items()},
               overall=overall, train_seconds=rec.get("train_seconds"),
               detail=_ensemble_detail(rec))


def _ensemble_detail(rec: dict) -> str:
    selection = rec.get("selection")
    if not selection:
        per_task = rec.get("tasks") or {}
        if any(len(m) != len(rec["members"]) for m in per_task.values()):  # members differ per task: say how
            return (f"{len(rec['members'])} members, {rec.get('method', 'mean')}; per task: "
                    + ", ".join(f"{t} {len(m)}" for t, m in per_task.items()))
        return f"{len(rec['members'])} members, {rec.get('method', 'mean')}"
    in_sample = rec["metrics"].get("overall")
    rule = "bagged selection" if selection.get("method", "").startswith("bagged") else "greedy"
    head = f"{len(rec['members'])} members, {rule} per task"
    return (f"{head}; cross-fitted scores (selected and scored on all of dev: {in_sample:.4f})"
            if in_sample is not None else head)


def reference_row(path: Path, root: Path) -> Row:
    """The plain HF Trainer + PEFT baseline (benchmarks/hf_baseline.py), one task per file."""
    rec = json.loads(path.read_text())
    task = rec["task"]
    dev = rec.get("dev", {})
    registered = TASKS.get(task)
    metric = registered.primary_metric if registered and registered.primary_metric in dev else next(iter(dev), None)
    steps = rec.get("train_steps")
    if steps is None and rec.get("train_examples") and rec.get("epochs"):
        # Records from before the script wrote its steps: the Trainer's ceil(N / batch) per epoch, at the
        # script's batch size (32 unless the recorded command set another).
        batch = rec.get("batch_size") or (None if "--batch-size" in rec.get("command", "") else DEFAULT_BATCH)
        steps = math.ceil(math.ceil(rec["train_examples"] / batch) * rec["epochs"]) if batch else None
    value = dev.get(metric)
    return Row(name=os.path.relpath(path, root), mode=f"HF {rec.get('mode', 'lora')}", backbone=rec.get("backbone", "all-MiniLM-L6-v2"),
               trainable=int(rec.get("trainable_parameters", 0)), total=int(rec.get("total_parameters", 0)),
               bytes_on_disk=int(rec.get("bytes_on_disk", 0)), metrics={task: value} if value is not None else {},
               metric_names={task: metric} if value is not None else {},
               overall=None, train_seconds=rec.get("train_seconds"),
               detail=f"reference: {rec.get('pipeline', 'HF Trainer')}, {task}, {rec.get('epochs')} ep", reference=True,
               train_steps=steps)


def combined_reference_rows(rows: list[Row]) -> list[Row]:
    """The reference pipeline's three single-task rows of one folder, as one row with its overall score."""
    out = []
    group = overall_group(rows)
    by_key: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.reference and len(r.metrics) == 1:
            by_key.setdefault((os.path.dirname(r.name), r.mode), []).append(r)
    for (folder, mode), refs in sorted(by_key.items()):
        per_task = {next(iter(r.metrics)): r for r in refs}
        if not group or set(per_task) != group or len(refs) != len(group):
            continue
        tasks = sorted(group)
        metrics = {t: per_task[t].metrics[t] for t in tasks}
        names = {t: per_task[t].metric_names[t] for t in tasks}
        overall = overall_score({t: {names[t]: metrics[t]} for t in tasks}, names)
        times = [r.train_seconds for r in refs]
        steps = [r.train_steps for r in refs]
        out.append(Row(name=os.path.join(folder, f"hf_baseline ({' + '.join(t for t in CS224N_TASKS if t in group) or ' + '.join(tasks)})"), mode=mode,
                       backbone=refs[0].backbone, trainable=sum(r.trainable for r in refs),
                       total=sum(r.total for r in refs) if all(r.total for r in refs) else 0, bytes_on_disk=0, metrics=metrics, overall=overall,
                       train_seconds=sum(times) if None not in times else None,
                       detail=f"reference: its {len(tasks)} hf_baseline_* rows (each task alone) scored together",
                       reference=True, metric_names=names,
                       train_steps=sum(steps) if None not in steps else None))
    return out


def combined_rows(summary_path: Path, root: Path) -> list[Row]:
    """The ``combine:`` rows of a sweep table: each task by the run that trained it alone."""
    summary = json.loads(summary_path.read_text())
    rows = []
    for name, rec in (summary.get("combined") or {}).items():
        if not rec.get("scores"):
            continue
        scores = rec["scores"]
        by_task: dict[str, dict[str, float]] = {}
        for key, value in scores.items():
            if "/" in key:
                task, metric = key.split("/", 1)
                by_task.setdefault(task, {})[metric] = value
        primary = primary_metrics(by_task)
        metrics = {t: v["mean"] for t, (_, v) in primary.items()}
        sd = {t: v["sd"] for t, (_, v) in primary.items() if v["sd"] is not None}
        overall = scores.get("overall", {}).get("mean")
        if overall is not None and scores["overall"]["sd"] is not None:
            sd["overall"] = scores["overall"]["sd"]
        n = len(rec["seeds"])
        rows.append(Row(name=os.path.join(os.path.relpath(summary_path.parent, root), name),
                        mode="/".join(rec["modes"]), backbone=rec.get("backbone") or "?",
                        trainable=int(rec["trainable"]), total=int(rec["total"]),
                        bytes_on_disk=int(rec["bytes_on_disk"]), metrics=metrics, overall=overall,
                        metric_names={t: m for t, (m, _) in primary.items()}, train_seconds=rec["train_minutes"] * 60,
                        detail=f"each task alone: {' + '.join(rec['parts'])}, {n} seed{'s' if n > 1 else ''}",
                        seeds=n, sd=sd, parts=[os.path.join(os.path.relpath(summary_path.parent, root), p)
                                               for p in rec["parts"]]))
    return rows


def group_seeds(rows: list[Row]) -> list[Row]:
    """Runs in sibling ``seedN`` folders of one recipe become one row: mean and sd over seeds."""
    groups: dict[str, list[Row]] = {}
    out = []
    for r in rows:
        parent, leaf = os.path.split(r.name)
        if re.fullmatch(r"seed\d+", leaf) and parent:
            groups.setdefault(parent, []).append(r)
        else:
            out.append(r)
    for parent, members in groups.items():
        # One recipe: same mode and settings. Stored sizes may still differ by seed (--keep-best
        # per-task saves a shared adapter once per epoch kept): the row shows their mean.
        if len({(m.mode, m.partial_dev, m.detail) for m in members}) > 1 or (
                "each task from its best epoch" not in members[0].detail and len({m.trainable for m in members}) > 1):
            out += members  # not one recipe after all: list them as they are
            continue
        first = members[0]
        tasks = [t for t in first.metrics if all(t in m.metrics for m in members)]
        metrics = {t: statistics.fmean(m.metrics[t] for m in members) for t in tasks}
        sd = {t: statistics.stdev(m.metrics[t] for m in members) for t in tasks} if len(members) > 1 else {}
        overall = None
        if all(m.overall is not None for m in members):
            overall = statistics.fmean(m.overall for m in members)
            if len(members) > 1:
                sd["overall"] = statistics.stdev(m.overall for m in members)
        times = [m.train_seconds for m in members if m.train_seconds is not None]
        steps = [m.train_steps for m in members if m.train_steps is not None]
        out.append(Row(name=parent, mode=first.mode, backbone=first.backbone,
                       trainable=round(statistics.fmean(m.trainable for m in members)),
                       total=round(statistics.fmean(m.total for m in members)),
                       bytes_on_disk=round(statistics.fmean(m.bytes_on_disk for m in members)), metrics=metrics,
                       overall=overall,
                       train_seconds=statistics.fmean(times) if times else None,
                       detail=f"{first.detail}, {len(members)} seed{'s' if len(members) > 1 else ''}",
                       partial_dev=first.partial_dev, seeds=len(members), sd=sd, grouped=True,
                       metric_names={t: first.metric_names.get(t, "") for t in tasks},
                       train_steps=round(statistics.fmean(steps)) if len(steps) == len(members) else None))
    return out


def add_up_parts(rows: list[Row]) -> list[Row]:
    """A combined row's train steps: the sum of its parts' (each task's run alone), when all are listed."""
    steps = {r.name: r.train_steps for r in rows}
    for r in rows:
        if r.parts and all(steps.get(p) is not None for p in r.parts):
            r.train_steps = sum(steps[p] for p in r.parts)
    return rows


def collect(roots: list[Path], base: Path) -> list[Row]:
    rows = []
    seen = set()
    for root in roots:
        if not root.exists():
            continue
        for manifest in sorted(root.rglob(MANIFEST)):
            folder = manifest.parent
            if any(part.startswith(".") for part in folder.relative_to(root).parts):
                continue  # temporary or checkpoint folders
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                rows.append(run_row(folder, base))
        for record in sorted(root.rglob("*.ensemble.json")):
            rows.append(ensemble_row(record, base))
        for record in sorted(root.rglob("hf_baseline*.json")):
            rows.append(reference_row(record, base))
        for record in sorted(root.rglob("*.sweep.json")):
            rows += combined_rows(record, base)
    rows = keep_comparable_overall(rows)
    rows += combined_reference_rows(rows)
    return sorted(add_up_parts(group_seeds(drop_copies(rows))), key=lambda r: r.name)


def pareto(points: list[tuple[int, float]]) -> set[int]:
    """Indices of points no other point beats on both fewer parameters and a higher score."""
    front = set()
    for i, (p, s) in enumerate(points):
        if not any((q <= p and t >= s) and (q < p or t > s) for j, (q, t) in enumerate(points) if j != i):
            front.add(i)
    return front


def _fmt(v: float | None, digits: int = 4, sd: float | None = None) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _heading(task: str, metric: str) -> str:
    return f"{task.upper()} {METRIC_SHORT.get(metric, metric)}".strip()


def _overall_rule(columns: dict[str, str], group: frozenset[str]) -> str:
    tasks = [t for t in columns if t in group]
    if set(tasks) == set(CS224N_TASKS):
        terms = [(f"({_heading(t, m)} + 1) / 2" if METRICS.get(m) and METRICS[m].correlation else _heading(t, m))
                 for t, m in columns.items() if t in group]
        return f"Overall = mean({', '.join(terms)}), only for runs with all {len(tasks)} tasks."
    return (f"Overall = the mean of each task's primary metric (correlations as (r + 1) / 2), only for runs "
            f"on exactly {', '.join(t.upper() for t in tasks) or 'the same tasks'}.")


def markdown(rows: list[Row], commands: str | None) -> str:
    columns, group = task_columns(rows), overall_group(rows)
    lines = ["# Trainable parameters vs score", "",
             "Generated by `peft-mtl report` from the saved runs; every number comes from a run's own manifest "
             f"(dev split, best epoch). {_overall_rule(columns, group)} ★ marks the Pareto front of trainable parameters vs overall score (or vs the task "
             "metric for single-task runs); runs scored on only part of the dev split say so and are left out "
             "of the front and the plot. A run named after a recipe with *n seeds* in its details is the mean ± "
             "sample sd over those seeds (written by `peft-mtl sweep`; time and size are means); a row whose details "
             "say *each task alone* scores every task by the run that trained it alone (parameters, size and time "
             "add up). Rows of mode "
             "*HF …* are the plain Hugging Face Trainer + PEFT pipeline on the same data, for reference. "
             f"*Train steps* is the budget: optimiser steps of {DEFAULT_BATCH} examples (another batch size is in the "
             "details) over all the epochs a run took; compare scores at equal steps.", "",
             "| run | mode | details | backbone | trainable params | % of total | on disk | "
             + "".join(f"{_heading(t, m)} | " for t, m in columns.items()) + "overall | train steps | train time |",
             "|---|---|---|---|---:|---:|---:|" + "---:|" * len(columns) + "---:|---:|---:|"]
    comparable = [r for r in rows if not r.partial_dev and not r.reference]
    overall_pts = [(r.trainable, r.overall) for r in comparable if r.overall is not None]
    overall_front = pareto(overall_pts) if overall_pts else set()
    overall_rows = [r for r in comparable if r.overall is not None]
    front_names = {overall_rows[i].name for i in overall_front}
    for task in columns:
        task_rows = [r for r in comparable if r.overall is None and task in r.metrics]
        front_names |= {task_rows[i].name for i in pareto([(r.trainable, r.metrics[task]) for r in task_rows])}
    for r in rows:
        star = " ★" if r.name in front_names else ""
        time_s = "—" if r.train_seconds is None else f"{r.train_seconds / 60:.1f} min"
        percent = f"{r.percent:.2f}%" if r.total else "—"
        size = _human_bytes(r.bytes_on_disk) if r.bytes_on_disk else "—"
        scores = " | ".join(_fmt(r.metrics.get(t), sd=r.sd.get(t)) for t in columns)
        steps = "—" if r.train_steps is None else f"{r.train_steps:,}"
        lines.append(f"| `{r.name}`{star} | {r.mode} | {r.detail} | {r.backbone} | {r.trainable:,} | {percent} | "
                     f"{size} | {scores} | {_fmt(r.overall, sd=r.sd.get('overall'))} | {steps} | {time_s} |")
    lines += ["", "![trainable parameters vs score](params_vs_score.png)", ""]
    if commands:
        lines += ["## Commands that produced these runs", "", commands.strip(), ""]
    return "\n".join(lines)


# Offsets (points) tried in turn for a label, beside its marker first, then above or below it, then
# further out; (dx, dy, horizontal alignment).
_LABEL_SPOTS = [(6, 1, "left"), (-6, 1, "right"), (6, -9, "left"), (-6, -9, "right"), (0, 7, "center"),
                (0, -15, "center"), (6, 11, "left"), (-6, 11, "right"), (6, -19, "left"), (-6, -19, "right"),
                (0, 17, "center"), (0, -25, "center")]
MARKER_SIZE = 70  # scatter size (points^2) of every run's marker


def _marker_boxes(fig, ax) -> list:
    """Display-space boxes of every marker drawn in ``ax`` (labels must not cover them)."""
    from matplotlib.transforms import (
        Bbox,  # deferred: matplotlib is slow to import and only plots need it
    )

    half = (MARKER_SIZE ** 0.5) / 2 * fig.dpi / 72
    boxes = []
    for collection in ax.collections:
        offsets = collection.get_offsets()
        if len(offsets) == 0 or not hasattr(collection, "get_sizes") or not len(collection.get_sizes()):
            continue  # error bars and lines are not markers
        for x, y in ax.transData.transform(offsets):
            boxes.append(Bbox.from_extents(x - half, y - half, x + half, y + half))
    return boxes


def _label_without_overlaps(fig, ax, points: list, x=lambda r: max(r.trainable, 1)) -> None:
    """Name the given points (in order of importance), each at the first of a few spots around its
    marker where it overlaps no earlier label, marker or legend and stays inside the axes (a label that
    fits nowhere is left out: the table names every run). ``x`` is the row's x coordinate."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    obstacles = _marker_boxes(fig, ax)
    if ax.get_legend() is not None:
        obstacles.append(ax.get_legend().get_window_extent(renderer))
    for r, v in points:
        name = Path(r.name).name.replace(".ensemble.json", "")
        for dx, dy, align in _LABEL_SPOTS:
            text = ax.annotate(name, (x(r), v), fontsize=7, xytext=(dx, dy), textcoords="offset points",
                               ha=align)
            box = text.get_window_extent(renderer)
            inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1)
            if inside and not any(box.overlaps(other) for other in obstacles):
                obstacles.append(box)
                break
            text.remove()


def plot(rows: list[Row], path: Path) -> None:
    """Write the trainable-parameters-vs-score figure to ``path`` (PNG, atomically)."""
    import matplotlib.pyplot as plt  # deferred: matplotlib is slow to import and only plots need it

    fig = figure(rows)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def figure(rows: list[Row]):
    """Six panels: overall (full range and zoomed on the best runs) and each task's metric against
    trainable parameters, and overall against the training budget.

    Long on purpose: one matplotlib figure, panel by panel, with the shared marker and colour choices in view.
    """
    import matplotlib  # deferred: matplotlib is slow to import and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is slow to import and only plots need it

    overall = lambda r: r.overall  # noqa: E731
    # (score key, title, value of a row, zoomed): the zoomed overall panel spreads out the crowd of
    # good runs that the full-range panel (heads-only and diverged runs included) squeezes together.
    panels = [("overall", "overall score", overall, False),
              ("overall", f"overall score, zoomed: within {ZOOM_POINTS} points of the best", overall, True)] + [
        (t, f"{t.upper()} {m}", (lambda t: lambda r: r.metrics.get(t))(t), False) for t, m in task_columns(rows).items()]
    n_rows = math.ceil((len(panels) + 1) / 3)  # + the budget panel
    fig, axes = plt.subplots(n_rows, 3, figsize=(18, 5 * n_rows), squeeze=False)
    labelled = []
    markers = {"lora": "o", "heads": "s", "full": "D", "ensemble": "*"}
    # One colour per mode in every panel (the default colour cycle shifts when a panel lacks a mode).
    colors = {"lora": "tab:blue", "heads": "tab:orange", "full": "tab:green", "ensemble": "tab:red"}
    for ax, (key, label, get, zoomed) in zip(axes.flat, panels):
        pts = [(r, get(r)) for r in rows if get(r) is not None and not r.partial_dev and not r.reference]
        for mode, marker in markers.items():
            sel = [(r, v) for r, v in pts if r.mode == mode]
            if sel:
                ax.scatter([max(r.trainable, 1) for r, _ in sel], [v for _, v in sel], marker=marker, s=MARKER_SIZE,
                           label=mode, alpha=0.85, color=colors[mode])
                spread = [(r, v) for r, v in sel if r.sd.get(key) is not None]
                if spread:  # seed groups: ± 1 sd
                    ax.errorbar([max(r.trainable, 1) for r, _ in spread], [v for _, v in spread],
                                yerr=[r.sd[key] for r, _ in spread], fmt="none", ecolor=colors[mode], capsize=3,
                                alpha=0.85)
        if pts:
            front = sorted((pts[i] for i in pareto([(r.trainable, v) for r, v in pts])), key=lambda x: x[0].trainable)
            ax.step([max(r.trainable, 1) for r, _ in front], [v for _, v in front], where="post", color="black",
                    linewidth=1, linestyle="--", label="Pareto front")
            names = front
            if zoomed:
                best = max(v for _, v in pts)
                low = best - ZOOM_POINTS / 100
                ax.set_ylim(low, best + 0.25 * ZOOM_POINTS / 100)
                inside = [max(r.trainable, 1) for r, v in pts if v >= low]
                ax.set_xlim(min(inside) / 2, max(inside) * 2)
                # Here there is room to name the main rows too: seed groups and ensembles.
                main = [(r, v) for r, v in pts if (r.seeds > 1 or r.mode == "ensemble") and (r, v) not in front]
                names = [(r, v) for r, v in front + main if v >= low]
            labelled.append((ax, names))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        if pts:
            ax.legend(fontsize=8, loc="upper left" if zoomed else "lower right")
    for spare in list(axes.flat)[len(panels):-1]:  # a task count that leaves cells of the grid empty
        spare.axis("off")
    budget_names = _budget_panel(axes.flat[-1], rows, markers, colors)
    fig.suptitle("peft_mtl: trainable parameters vs dev score (labels: the Pareto front, and in the zoomed and budget "
                 "panels the seed groups and ensembles too; every run is in report.md's table)", fontsize=10)
    fig.tight_layout()
    # Labels go on after the layout: tight_layout moves the axes, and labels placed before it
    # could end up overlapping.
    for ax, names in labelled:
        _label_without_overlaps(fig, ax, names)
    _label_without_overlaps(fig, axes.flat[-1], budget_names, x=lambda r: r.train_steps)
    return fig


def _budget_ticks(steps: list[int]) -> list[int]:
    """One tick per cluster of budgets (values less than 1.3x apart), at the cluster's most common
    value: the budget the runs there were planned with, not a run that stopped early just below it."""
    clusters: list[list[int]] = []
    for value in sorted(steps):
        if clusters and value < 1.3 * clusters[-1][0]:
            clusters[-1].append(value)
        else:
            clusters.append([value])
    return [max(set(c), key=lambda v: (c.count(v), v)) for c in clusters]


def _budget_panel(ax, rows: list[Row], markers: dict, colors: dict) -> list:
    """Overall score against optimiser steps for the trained runs near the best: recipes compare
    fairly only at one budget, and this shows which rows share one (ensembles have no budget of
    their own and are left out). Returns the points to name: the seed groups and combined rows."""
    pts = [(r, r.overall) for r in rows if r.overall is not None and r.train_steps and not r.partial_dev
           and not r.reference and r.mode != "ensemble"]
    title = f"overall vs training budget (trained runs within {BUDGET_POINTS:g} points of the best)"
    ax.set_title(title)
    if not pts:
        ax.axis("off")
        return []
    low = max(v for _, v in pts) - BUDGET_POINTS / 100
    pts = [(r, v) for r, v in pts if v >= low]
    for mode, marker in markers.items():
        sel = [(r, v) for r, v in pts if r.mode == mode]
        if sel:
            ax.scatter([r.train_steps for r, _ in sel], [v for _, v in sel], marker=marker, s=MARKER_SIZE,
                       label=mode, alpha=0.85, color=colors[mode])
            spread = [(r, v) for r, v in sel if r.sd.get("overall") is not None]
            if spread:
                ax.errorbar([r.train_steps for r, _ in spread], [v for _, v in spread],
                            yerr=[r.sd["overall"] for r, _ in spread], fmt="none", ecolor=colors[mode], capsize=3,
                            alpha=0.85)
    steps = [r.train_steps for r, _ in pts]
    ax.set_xscale("log")
    ax.set_xlim(min(steps) / 1.6, max(steps) * 1.6)
    ticks = _budget_ticks(steps)
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_ylim(low, max(v for _, v in pts) + 0.25 * BUDGET_POINTS / 100)
    ax.set_xlabel("optimiser steps of the run (log scale)")
    ax.set_ylabel("overall score")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return sorted(((r, v) for r, v in pts if r.grouped or r.parts), key=lambda p: -p[1])


def write_report(roots: list[Path], out: Path, base: Path | None = None) -> list[Row]:
    """Write ``out/report.md``, ``out/params_vs_score.png`` and ``out/report.json``."""
    base = base or Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(roots, base)
    commands_file = out / "commands.md"
    commands = commands_file.read_text() if commands_file.is_file() else None
    text = markdown(rows, commands)
    tmp = out / ".report.md.tmp"
    tmp.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
    os.replace(tmp, out / "report.md")
    write_json_atomic(out / "report.json", [r.__dict__ for r in rows])
    plot(rows, out / "params_vs_score.png")
    return rows
