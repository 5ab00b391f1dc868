"""Seeds, threads and numeric precision for the machine we run on."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

PRECISIONS = ("auto", "bf16", "fp32")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 pays."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


_warned: set[str] = set()


def resolve_precision(precision: str) -> str:
    """``auto`` → bf16 where the CPU has native bf16, else fp32; an explicit bf16 on a CPU
    without it is honoured with a warning (emulated bf16 GEMMs are far slower than fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "bf16" and not cpu_supports_bf16() and "bf16" not in _warned:
        _warned.add("bf16")
        print("warning: --precision bf16 on a CPU without native bf16 (no AVX512-BF16/AMX in /proc/cpuinfo): "
              "bf16 matrix products are emulated there, ~100x slower than fp32 on AVX2 CPUs; "
              "use --precision auto or fp32", file=sys.stderr)
    return precision


def autocast(precision: str):
    """bf16 autocast on the CPU; frozen fp32 weights are cast per matmul, LoRA and heads keep fp32 masters."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
