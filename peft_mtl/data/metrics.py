"""Task metrics, in a registry users can extend, and the overall score.

The registry sits beside the task specs (``data``): a task file names its metrics and is
checked against it.

``overall`` is the CS224N benchmark score — (SST acc + QQP acc + (STS r + 1) / 2) / 3 —
when the tasks are exactly the three built-in ones; for any other set of tasks it is the
mean of each task's primary metric, with correlations mapped to (r + 1) / 2 so that every
term lies in 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import UserError

# The benchmark this toolkit reports against: task -> the metric the CS224N score uses.
CS224N_TASKS = {"sst": "accuracy", "qqp": "accuracy", "sts": "pearson"}


@dataclass(frozen=True)
class Metric:
    fn: Callable[[np.ndarray, np.ndarray], float]
    kind: str  # the task kind it applies to
    correlation: bool = False  # in -1..1 (mapped to (r + 1) / 2 in the overall score)


METRICS: dict[str, Metric] = {}


def register_metric(name: str, kind: str, correlation: bool = False):
    """Add a metric ``fn(predictions, labels) -> float`` for tasks of ``kind``."""
    def wrap(fn):
        if name in METRICS:
            raise UserError(f"metric {name!r} is already registered")
        METRICS[name] = Metric(fn, kind, correlation)
        return fn
    return wrap


@register_metric("accuracy", "classification")
def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels))) if len(labels) else float("nan")


def _confusion(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    p, y = np.asarray(predictions, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    k = int(max(p.max(initial=0), y.max(initial=0))) + 1
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k).astype(np.float64)


@register_metric("macro_f1", "classification")
def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    c = _confusion(predictions, labels)
    tp = np.diag(c)
    present = (c.sum(0) + c.sum(1)) > 0
    denom = c.sum(0) + c.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean()) if present.any() else 0.0


@register_metric("mcc", "classification", correlation=True)
def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (multi-class form, Gorodkin 2004)."""
    c = _confusion(predictions, labels)
    t, p, n = c.sum(1), c.sum(0), c.sum()
    cov_yp = np.trace(c) * n - t @ p
    cov_yy, cov_pp = n * n - t @ t, n * n - p @ p
    if cov_yy == 0 or cov_pp == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_yy * cov_pp))


@register_metric("pearson", "regression", correlation=True)
def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    p, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(p) < 2 or p.std() == 0 or y.std() == 0:
        return 0.0  # undefined correlation; 0 is the honest "no linear relation" value
    from scipy.stats import (
        pearsonr,  # deferred: scipy.stats is slow to import and the command line imports this registry
    )

    return float(pearsonr(p, y).statistic)


@register_metric("spearman", "regression", correlation=True)
def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    p, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(p) < 2 or p.std() == 0 or y.std() == 0:
        return 0.0
    from scipy.stats import (
        spearmanr,  # deferred: scipy.stats is slow to import and the command line imports this registry
    )

    return float(spearmanr(p, y).statistic)


def unit_scale(name: str, value: float) -> float:
    """A metric on 0..1: correlations map to (r + 1) / 2, the rest are already there."""
    return (value + 1) / 2 if METRICS[name].correlation else value


def overall_score(metrics: dict[str, dict[str, float]], primary: dict[str, str] | None = None) -> float | None:
    """The CS224N score when the tasks are exactly sst/qqp/sts; otherwise the mean of the
    primary metrics on a 0..1 scale (``primary``: task → its primary metric). None when the
    primary metrics are unknown (no ``primary`` given for non-benchmark tasks)."""
    if set(metrics) == set(CS224N_TASKS):
        if not all(m in metrics[t] for t, m in CS224N_TASKS.items()):
            return None
        return float(np.mean([unit_scale(m, metrics[t][m]) for t, m in CS224N_TASKS.items()]))
    if not metrics or primary is None or not all(t in primary and primary[t] in metrics[t] for t in metrics):
        return None
    return float(np.mean([unit_scale(primary[t], metrics[t][primary[t]]) for t in metrics]))


def primary_score(metrics: dict[str, dict[str, float]], primary: dict[str, str]) -> float:
    """One number to pick the best checkpoint by: :func:`overall_score` (defined for any tasks)."""
    return overall_score(metrics, primary)
