"""Task metrics and the overall score."""

from __future__ import annotations

from typing import Callable

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels))) if len(labels) else float("nan")


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    p, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(p) < 2 or p.std() == 0 or y.std() == 0:
        return 0.0  # undefined correlation; 0 is the honest "no linear relation" value
    return float(np.corrcoef(p, y)[0, 1])


METRICS: dict[str, MetricFn] = {"accuracy": accuracy, "pearson": pearson}


def overall_score(metrics: dict[str, dict[str, float]]) -> float | None:
    """mean(SST acc, QQP acc, (STS r + 1) / 2), or None unless all three tasks are present."""
    if not all(t in metrics for t in ("sst", "qqp", "sts")):
        return None
    return (metrics["sst"]["accuracy"] + metrics["qqp"]["accuracy"] + (metrics["sts"]["pearson"] + 1) / 2) / 3


def primary_score(task_metrics: dict[str, dict[str, float]]) -> float:
    """One number to pick the best checkpoint by: the overall score, or the mean metric."""
    overall = overall_score(task_metrics)
    if overall is not None:
        return overall
    values = []
    for m in task_metrics.values():
        values.extend(v for k, v in m.items() if k in METRICS)
    return float(np.mean(values))
