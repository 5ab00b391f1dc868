"""Deprecated module name, kept for one release: the metric registry lives in :mod:`peft_mtl.data.metrics`."""

from __future__ import annotations

import warnings

from ..data.metrics import CS224N_TASKS, METRICS, Metric, overall_score, primary_score, register_metric  # noqa: F401

warnings.warn("peft_mtl.inference.metrics is now peft_mtl.data.metrics; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)
