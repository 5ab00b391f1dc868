"""Ensembles of adapter sets that share one backbone in memory.

The seeds ensembled k full model copies; here every member is a set of LoRA adapters on
the same frozen backbone, so k members cost k × (a few MB of adapters) rather than k models.

Combining (per task):

* classification — ``mean``: (weighted) average of member probabilities, argmax;
  ``vote``: majority of member labels (ties go to the label with the higher mean probability);
* regression — ``mean`` (weighted) or ``median`` of member scores.

Members can run one after another (k forward passes) or, with ``batched=True``, in one
forward pass: the batch is repeated once per member and every LoRA layer applies each
member's delta to its own block of rows with two batched matmuls (``lora_runtime.stacked_lora``).

:func:`evaluate_ensemble` is what ``peft-mtl ensemble`` runs: members loaded on one host, each task
scored with the members that have it, optional weight selection with its cross-fitted score.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artifacts import folder_bytes, write_json_atomic
from ..data.loading import EncodedSplit, encode_texts, iterate_batches, pad_sequences
from ..data.metrics import METRICS, overall_score
from ..data.tasks import TaskSpec
from ..device import autocast
from ..errors import UserError
from ..model.lora_runtime import stacked_lora
from ..model.saved_sets import read_manifest
from .adapter_graph import GraphEngine
from .adapter_host import AdapterHost, format_predictions, load_base
from .evaluate import predictions_from_outputs, probabilities, score
from .output_cache import OutputCache
from .scoring import load_eval_splits

logger = logging.getLogger(__name__)

CLASSIFICATION_METHODS = ("mean", "vote")
REGRESSION_METHODS = ("mean", "median")
MAX_BATCHED_ROWS = 512  # rows per batched pass; above this, one pass per member measured faster


def combine(kind: str, member_outputs: list[np.ndarray], weights: list[float] | None = None,
            method: str = "mean") -> np.ndarray:
    """Ensemble outputs: probabilities (N, C) for classification, scores (N,) for regression."""
    k = len(member_outputs)
    w = np.asarray(weights if weights is not None else [1.0] * k, dtype=np.float64)
    if len(w) != k or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise UserError("ensemble weights must be one finite, non-negative number per member, not all zero")
    w = w / w.sum()
    if kind == "classification":
        probs = np.stack([probabilities(o) for o in member_outputs])  # (k, N, C)
        mean = np.einsum("k,knc->nc", w, probs)
        if method == "mean":
            return mean
        if method == "vote":
            votes = np.zeros_like(mean)
            labels = probs.argmax(-1)  # (k, N)
            for m in range(k):
                votes[np.arange(labels.shape[1]), labels[m]] += w[m]
            # Break ties by the mean probability, then return normalised vote shares.
            votes = votes + 1e-9 * mean
            return votes / votes.sum(-1, keepdims=True)
        raise UserError(f"classification ensembles use {CLASSIFICATION_METHODS}, not {method!r}")
    scores = np.stack([np.asarray(o, dtype=np.float64) for o in member_outputs])
    if method == "mean":
        return np.einsum("k,kn->n", w, scores)
    if method == "median":
        return np.median(scores, axis=0)
    raise UserError(f"regression ensembles use {REGRESSION_METHODS}, not {method!r}")


def ensemble_predictions(task: TaskSpec, combined: np.ndarray) -> np.ndarray:
    if task.kind == "classification":
        return combined.argmax(-1)
    return predictions_from_outputs(task, combined)


def greedy_weights(task: TaskSpec, labels: np.ndarray, outputs: list[np.ndarray], rows: np.ndarray | None = None,
                   method: str = "mean", max_rounds: int = 25, init_best: int = 0) -> list[int]:
    """Forward selection with replacement (Caruana et al., 2004) on ``task``'s primary metric.

    Starts from the empty ensemble — or, with ``init_best=N``, from the N members that score
    best alone (the paper's sorted initialisation, which makes the first picks less of a
    gamble on a small split) — and repeatedly adds the member (again, if it is already in)
    whose addition scores best on ``rows`` of the labelled split; stops when no addition
    improves the score or after ``max_rounds``. Returns how often each member was picked:
    its weight in :func:`combine` (0 = left out). Members may differ per task.
    """
    rows = np.arange(len(labels)) if rows is None else rows
    metric = METRICS[task.primary_metric].fn
    sliced = [o[rows] for o in outputs]
    target = labels[rows]
    if method == "mean":
        # Weighted means only need a running sum: one addition per trial instead of re-stacking every member.
        parts = [probabilities(o) if task.kind == "classification" else np.asarray(o, dtype=np.float64) for o in sliced]

        def value(counts: list[int]) -> float:
            total = sum(c * p for c, p in zip(counts, parts) if c)
            return metric(ensemble_predictions(task, total / sum(counts)), target)
    else:
        def value(counts: list[int]) -> float:
            return metric(ensemble_predictions(task, combine(task.kind, sliced, counts, method)), target)

    counts, best = [0] * len(outputs), -np.inf
    if init_best:
        alone = [value([int(i == m) for i in range(len(outputs))]) for m in range(len(outputs))]
        for m in sorted(range(len(outputs)), key=lambda i: (-alone[i], i))[:init_best]:
            counts[m] = 1
        best = value(counts)
    for _ in range(max_rounds):
        trials = []
        for m in range(len(outputs)):
            trial = counts.copy()
            trial[m] += 1
            trials.append((value(trial), -m, trial))  # ties: the earlier member
        score, _, trial = max(trials, key=lambda x: (x[0], x[1]))
        if score <= best + 1e-12:
            break
        counts, best = trial, score
    return counts


BAGS, BAG_FRACTION, BAG_INIT_BEST = 20, 0.5, 3  # Caruana et al. 2004's settings for bagged selection


def bagged_greedy_weights(task: TaskSpec, labels: np.ndarray, outputs: list[np.ndarray],
                          rows: np.ndarray | None = None, method: str = "mean", bags: int = BAGS,
                          fraction: float = BAG_FRACTION, init_best: int = BAG_INIT_BEST,
                          seed: int = 0) -> list[float]:
    """Bagged ensemble selection (Caruana et al., 2004, section 4.3): less prone to overfit the split.

    Each of ``bags`` rounds draws ``fraction`` of the members at random and runs
    :func:`greedy_weights` (sorted initialisation with ``init_best``) on them alone; the
    result averages the bags' ensembles, each normalised to weight 1, so no single member a
    lucky selection leaned on can dominate. Returns one non-negative weight per member.
    """
    rng = np.random.default_rng(seed)
    k = len(outputs)
    take = min(k, max(1, round(fraction * k)))
    weights = np.zeros(k)
    for _ in range(bags):
        drawn = np.sort(rng.choice(k, size=take, replace=False))
        counts = np.asarray(greedy_weights(task, labels, [outputs[i] for i in drawn], rows, method,
                                           init_best=min(init_best, take)), dtype=np.float64)
        weights[drawn] += counts / counts.sum()
    return [round(float(w / bags), 6) for w in weights]


SELECTORS = {"greedy": greedy_weights, "bagged": bagged_greedy_weights}


def cross_fitted_predictions(task: TaskSpec, labels: np.ndarray, outputs: list[np.ndarray], method: str = "mean",
                             folds: int = 2, seed: int = 0, select: str = "greedy") -> tuple[np.ndarray, list[list]]:
    """Ensemble predictions where every row's member weights were selected on the other folds.

    Selecting members on the split that is then scored overstates the ensemble; this is the
    honest estimate of what the ``select`` rule (see :data:`SELECTORS`) buys on unseen data of
    the same kind.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    parts = np.array_split(order, folds)
    predictions, chosen = None, []
    for i, held_out in enumerate(parts):
        rest = np.concatenate([q for j, q in enumerate(parts) if j != i])
        counts = SELECTORS[select](task, labels, outputs, rest, method)
        chosen.append(counts)
        fold = ensemble_predictions(task, combine(task.kind, [o[held_out] for o in outputs], counts, method))
        if predictions is None:
            predictions = np.zeros((len(labels),) + fold.shape[1:], dtype=fold.dtype)
        predictions[held_out] = fold
    return predictions, chosen


def member_outputs(base: AdapterHost, task: str, encoded: EncodedSplit, members: list[str],
                   batched: bool | None = None, batch_size: int = 128, progress: bool = False,
                   cache: OutputCache | None = None) -> list[np.ndarray]:
    """Raw outputs of every member on the same encoded inputs.

    ``batched=None`` picks what measured faster on CPU (reports/bench.md): one batched pass
    when all k copies of the inputs fit in one pass (online requests, where per-pass
    overhead dominates), one pass per member for bigger jobs (compute-bound GEMMs, which
    batching does not speed up). With a ``cache``, members whose outputs on these inputs are
    stored are not run, and the others' outputs are stored.
    """
    keys = {m: cache.key(base, m, task, encoded) for m in members} if cache is not None else {}
    found = {m: cache.get(keys[m], len(encoded)) for m in members} if cache is not None else {}
    to_run = [m for m in members if found.get(m) is None]
    if batched is None:
        batched = len(encoded) * len(to_run) <= MAX_BATCHED_ROWS

    def keep(member: str, out: np.ndarray) -> None:
        found[member] = out
        if cache is not None:  # stored as each member finishes: an interrupted job keeps what it did
            cache.put(keys[member], out)

    if to_run and batched and _can_batch(base, to_run):
        for m, out in zip(to_run, _batched_outputs(base, task, encoded, to_run, batch_size, progress)):
            keep(m, out)
    else:
        for m in to_run:
            keep(m, base.outputs(task, encoded, m, batch_size, progress))
    return [found[m] for m in members]


def _can_batch(base: AdapterHost, members: list[str]) -> bool:
    if base.int8 is not None:
        return False  # each member runs its own int8 graph
    for m in members:
        aset = base.sets[m]
        if aset.model is not None or aset.manifest["config"]["lora"].get("use_dora"):
            return False  # full models have their own encoder; DoRA has no per-sample routing in peft
        if aset.manifest["mode"] != "lora":
            return False
    return True


def routed_adapter(base: AdapterHost, member: str, task: str) -> str:
    """One peft adapter equal to the member's active combination for ``task`` (created once, on demand)."""
    return base.combined_adapter(member, task)


def _batched_outputs(base: AdapterHost, task: str, encoded: EncodedSplit, members: list[str], batch_size: int,
                     progress: bool) -> list[np.ndarray]:
    stacks = base.stacked_factors(members, task)
    k = len(members)
    per_member: list[list[np.ndarray]] = [[] for _ in members]
    order = []
    # batch_size inputs per pass, as in a sequential pass, so each pass holds k copies of
    # them (capped so that a pass never holds more than MAX_BATCHED_ROWS rows).
    member_batch = max(1, min(batch_size, MAX_BATCHED_ROWS // k))
    bar = tqdm(total=len(encoded), desc=f"ensemble {task}", disable=not progress, file=sys.stderr, leave=False)
    with torch.inference_mode(), autocast(base.precision, base.device), stacked_lora(stacks):
        for batch in iterate_batches(encoded, member_batch, None, base.pad_id):
            n = len(batch)
            segments = [base.hidden_states({key: v.repeat(k, 1) for key, v in seg.items()}) for seg in batch.inputs]
            for m, member in enumerate(members):
                rows = slice(m * n, (m + 1) * n)
                out = base.head_output(member, task, [(h[rows], mask[rows]) for h, mask in segments])
                per_member[m].append(out.cpu().numpy())
            order.append(batch.indices)
            bar.update(n)
    bar.close()
    idx = np.concatenate(order)
    results = []
    for chunks in per_member:
        out = np.concatenate(chunks)
        placed = np.empty_like(out)
        placed[idx] = out
        results.append(placed)
    return results


def predict_mixed(base: AdapterHost, requests: list[tuple[str, object]], adapters: str | None = None,
                  ) -> list[dict]:
    """Serve requests for different tasks in one forward pass per encoded segment layout.

    ``requests`` is a list of (task, input). Single-sentence and cross-encoded pair
    requests share one padded batch; each row is routed to its task's adapter.
    """
    name = adapters or base.active
    aset = base.get(name)
    if aset.model is not None or aset.pair_encoding != "cross" or not aset.adapter_names:
        # A full model or bi-encoder has no per-row routing: answer task by task.
        return [base.predict(t, [x], name)[0] for t, x in requests]
    rows, names, tasks = [], [], []
    for t, x in requests:
        enc = encode_texts(base.spec(t, name), [x], base.tokenizer, aset.max_length, aset.pair_encoding)
        rows.append(enc.segments[0][0])
        names.append(routed_adapter(base, name, t))  # outside inference mode: peft fills it in place
        tasks.append(t)
    base.route_rows(names)
    inputs = pad_sequences(rows, base.pad_id)
    results: list[dict | None] = [None] * len(requests)
    with torch.inference_mode(), autocast(base.precision, base.device):
        hidden, mask = base.hidden_states(inputs, adapter_names=names)
        for t in dict.fromkeys(tasks):
            idx = [i for i, task in enumerate(tasks) if task == t]
            out = base.head_output(name, t, [(hidden[idx], mask[idx])])
            for i, pred in zip(idx, format_predictions(base.spec(t, name), out.cpu().numpy())):
                results[i] = pred
    return results  # type: ignore[return-value]


def ensemble_predict(base: AdapterHost, task: str, inputs, members: list[str], weights: list[float] | None = None,
                     method: str = "mean", batched: bool | None = None, engine: GraphEngine | None = None) -> list[dict]:
    """Ensemble prediction for raw inputs: ``{"label", "probabilities"}`` or ``{"score"}`` per input.

    With a multi-adapter graph ``engine`` that runs every member, the members are rows of one pass."""
    spec = base.spec(task, members[0])
    encoded = base.encode(task, inputs, members[0])
    if engine is not None and all(engine.unsupported(m) is None for m in members):
        outputs = engine.outputs([(m, task, encoded.segments[0]) for m in members])
    else:
        outputs = member_outputs(base, task, encoded, members, batched)
    combined = combine(spec.kind, outputs, weights, method)
    if spec.kind == "classification":
        return [{"label": spec.label_of(int(p.argmax())), "probabilities": [round(float(x), 6) for x in p]}
                for p in combined]
    return [{"score": float(s)} for s in ensemble_predictions(spec, combined)]


# -- scoring an ensemble of saved sets (peft-mtl ensemble) ---------------------------------

SELECTION_METHODS = {
    "greedy": "greedy forward selection with replacement (Caruana et al. 2004)",
    "bagged": "bagged greedy selection (Caruana et al. 2004, section 4.3): 20 bags, each of a random half of the "
              "members, selection with replacement initialised with the bag's 3 best members; bag ensembles averaged",
}


@dataclass
class EnsembleSettings:
    """How ``peft-mtl ensemble`` combines and scores its members (flags of the same names)."""

    method: str = "mean"  # classification: mean | vote
    regression_method: str = "mean"  # mean | median
    weights: list[float] | None = None  # one per member folder, same for every task
    select: str = "all"  # all | greedy | bagged: weights chosen per task on the split itself
    batched: bool | None = None  # one stacked pass for all members (None: when it pays)
    split: str = "dev"
    data_dir: str | None = None
    strict: bool = False
    cache_dir: str | None = None  # member outputs kept on disk, keyed by set and inputs
    progress: bool = False


def evaluate_ensemble(folders: list[Path], settings: EnsembleSettings, backbone: str | None = None,
                      precision: str = "auto", device: str = "auto", int8: bool = False,
                      ) -> tuple[dict, AdapterHost, list[str]]:
    """Score an ensemble of saved sets on one backbone; returns (result, host, member names).

    Every task some member has is scored with the members that have it (single-task sets
    combine into one multi-task ensemble). The result holds each task's metrics and the
    overall score; with ``select`` it also holds the chosen weights and their cross-fitted
    score (weights chosen on one half of the split, scored on the other).

    Long on purpose: the per-task loop keeps the members, encodings and cache it shares in one place.
    """
    if len(folders) < 2:
        raise UserError("an ensemble needs at least two adapter-set folders")
    if settings.weights is not None and settings.select != "all":
        raise UserError(f"--weights conflicts with --select {settings.select}: selection sets the weights per task")
    host = load_base(backbone or read_manifest(folders[0]).get("backbone_source"), precision=precision,
                     device=device, int8=int8)
    names = [host.load(f, name=f"m{i}") for i, f in enumerate(folders)]
    if settings.weights is not None and len(settings.weights) != len(names):
        raise UserError(f"--weights: {len(settings.weights)} weights for {len(names)} members; give one per folder")
    tasks = list(dict.fromkeys(t for n in names for t in host.get(n).tasks))
    # Members tokenised differently (max length, cross vs bi encoding) each get their own encoding.
    layouts = {n: (host.get(n).max_length, host.get(n).pair_encoding) for n in names}
    encodings: dict = {}

    def split_for(task: str, member: str) -> EncodedSplit:
        key = (layouts[member], task)
        if key not in encodings:
            encodings[key] = load_eval_splits(host, member, [task], settings.data_dir, settings.split,
                                              settings.strict)[task]
        return encodings[key]

    cache = OutputCache(settings.cache_dir) if settings.cache_dir else None
    result, members_result, selection = {}, {n: {} for n in names}, {}
    for t in tasks:
        members = [n for n in names if t in host.get(n).tasks]
        enc = split_for(t, members[0])
        if len({layouts[m] for m in members}) == 1:
            outs = member_outputs(host, t, enc, members, batched=settings.batched, progress=settings.progress,
                                  cache=cache)
        else:
            outs = [member_outputs(host, t, split_for(t, m), [m], cache=cache)[0] for m in members]
        for n, o in zip(members, outs):
            members_result[n][t] = score(enc, predictions_from_outputs(enc.task, o))
        method = settings.method if enc.task.kind == "classification" else settings.regression_method
        weights = [settings.weights[names.index(m)] for m in members] if settings.weights is not None else None
        if settings.select != "all":
            weights, selection[t] = _select(enc, outs, method, settings.select, [str(folders[names.index(m)])
                                                                                  for m in members])
        result[t] = score(enc, ensemble_predictions(enc.task, combine(enc.task.kind, outs, weights, method)))
    primary = {t: host.spec(t, next(n for n in names if t in host.get(n).tasks)).primary_metric for t in tasks}
    overall = overall_score(result, primary)
    if overall is not None:
        result["overall"] = overall
    if selection:
        honest_overall = overall_score({t: v["cross_fitted"] for t, v in selection.items()}, primary)
        result["selection"] = {"method": SELECTION_METHODS[settings.select] + "; selected and scored on the same "
                                         "split; cross_fitted: weights chosen on one half, scored on the other",
                               "tasks": selection, "cross_fitted_overall": honest_overall}
    _log_members(folders, names, members_result, primary, cache)
    return result, host, names


def _select(enc: EncodedSplit, outs: list[np.ndarray], method: str, select: str, member_folders: list[str]
            ) -> tuple[list[float], dict]:
    """Weights chosen by ``select`` on the split, and the record of that choice with its cross-fitted score."""
    weights = SELECTORS[select](enc.task, enc.labels, outs, method=method)
    honest, folds = cross_fitted_predictions(enc.task, enc.labels, outs, method, select=select)
    honest_scores = score(enc, honest)
    logger.info(f"{select} {enc.task.name}: " + ", ".join(f"{f} ×{w:g}" for f, w in zip(member_folders, weights) if w)
                + f" | cross-fitted {enc.task.primary_metric} {honest_scores[enc.task.primary_metric]:.4f}")
    return weights, {"weights": dict(zip(member_folders, weights)), "cross_fitted": honest_scores,
                     "fold_weights": [dict(zip(member_folders, f)) for f in folds]}


def _log_members(folders: list[Path], names: list[str], members_result: dict, primary: dict,
                 cache: OutputCache | None) -> None:
    for n, f in zip(names, folders):
        if not members_result[n]:
            continue
        o = overall_score(members_result[n], primary)
        shown = " ".join(f"{t} {k} {v:.4f}" for t, m in members_result[n].items() for k, v in m.items())
        logger.info(f"member {f}: {shown}" + (f" overall {o:.4f}" if o is not None else ""))
    if cache is not None:
        logger.info(f"output cache {cache.root}: {cache.hits} member outputs reused, {cache.misses} computed")


def write_ensemble_record(path: Path, folders: list[Path], host: AdapterHost, names: list[str], result: dict,
                          settings: EnsembleSettings, command: str | None) -> None:
    """The ensemble as a report row: members, metrics, selection, parameters, bytes and train time."""
    result = dict(result)
    selection = result.pop("selection", None)
    if selection:  # members with weight 0 on every task cost nothing: leave them out of the record's size
        used = {f for task in selection["tasks"].values() for f, w in task["weights"].items() if w}
        keep = [i for i, f in enumerate(folders) if str(f) in used]
        folders, names = [folders[i] for i in keep], [names[i] for i in keep]
    manifests = [host.get(n).manifest for n in names]
    trainable = sum(m["parameters"]["trainable"] for m in manifests)
    backbone_only = manifests[0]["parameters"]["total"] - manifests[0]["parameters"]["trainable"]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {
        "members": [str(f) for f in folders],
        "tasks": {t: [str(f) for f, n in zip(folders, names) if t in host.get(n).tasks]
                  for t in result if t not in ("overall", "selection")},
        "method": settings.method, "regression_method": settings.regression_method,
        "weights": ",".join(f"{w:g}" for w in settings.weights) if settings.weights else None,
        "split": settings.split, "metrics": result, "selection": selection,
        "backbone": manifests[0]["backbone"]["name"], "trainable": trainable, "total": backbone_only + trainable,
        "bytes_on_disk": sum(folder_bytes(f) for f in folders),
        "train_seconds": sum(m.get("train_seconds") or 0 for m in manifests),
        "command": command})
