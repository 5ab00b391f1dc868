"""Seeds and threads for the machine we run on (precision and devices: device.py)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Precision and autocast depend on the device: they live in device.py, re-exported here.
from .device import autocast, cpu_supports_bf16, resolve_precision  # noqa: E402,F401


def configure_threads() -> int:
    """Use every core we were given (torch defaults to physical cores, which can be fewer),
    unless OMP_NUM_THREADS says otherwise (launchers set it so processes don't oversubscribe)."""
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested.isdigit() and int(requested) > 0:
        n = int(requested)
    else:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return n
