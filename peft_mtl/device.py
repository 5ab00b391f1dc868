"""Every device-dependent choice, in one place: which device, which precision, which kernels.

A process runs on one device (``--device auto|cpu|cuda|cuda:N``; under ``accelerate launch``
each rank gets the device accelerate assigns). Everything else asks this module:

* **precision** — CUDA: bf16 autocast where the GPU supports it, else fp16 autocast with a
  gradient scaler; CPU: bf16 only where the CPU has native bf16 (AVX512-BF16/AMX), because
  elsewhere bf16 GEMMs are emulated, ~100× slower than fp32.
* **kernels** — the CPU kernels (fast dropout from 64-bit words, the registered eager
  attention, fused/merged bf16 LoRA layers) only on the CPU; on CUDA, PyTorch's SDPA
  attention and dropout, and peft's own LoRA forward.
* **random state** — dropout masks come from the device's generator, so the "replay the
  clean pass's masks" of SMART and Bregman saves and restores that generator.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import warnings

import numpy as np
import torch

from .errors import UserError
from .options import PRECISIONS

# The device of the work running in this context (thread / asyncio task); threads that work
# for a model (the server's model thread) start in a copy of their creator's context.
_DEVICE: contextvars.ContextVar[torch.device] = contextvars.ContextVar("peft_mtl_device", default=torch.device("cpu"))


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def resolve_device(spec: str | None = "auto") -> torch.device:
    """``auto`` → the accelerator accelerate would pick (CUDA if present), else the CPU."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: this machine has no CUDA GPU (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda is not None}); use --device cpu or auto")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UserError(f"--device {spec}: use auto, cpu, cuda or cuda:N")
    return device


def use_device(device: torch.device) -> torch.device:
    """Make ``device`` the device of the current context (autocast, generators and kernels follow it)."""
    _DEVICE.set(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def current() -> torch.device:
    return _DEVICE.get()


def on_cuda() -> bool:
    return current().type == "cuda"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 pays."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def resolve_precision(precision: str) -> str:
    """``auto`` → the fastest safe autocast precision of the current device: ``bf16``, ``fp16``
    (CUDA without bf16) or ``fp32``. An explicit bf16 on a CPU without native bf16 is honoured
    with a warning."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be {', '.join(PRECISIONS)}, got {precision!r}")
    if on_cuda():
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if precision == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16":
        raise UserError("--precision fp16 is for CUDA GPUs; on a CPU use auto, bf16 or fp32")
    if precision == "bf16" and not cpu_supports_bf16():
        # warnings shows it once per process (its own registry), whoever asks how often.
        warnings.warn("--precision bf16 on a CPU without native bf16 (no AVX512-BF16/AMX in /proc/cpuinfo): "
                      "bf16 matrix products are emulated there, ~100x slower than fp32 on AVX2 CPUs; "
                      "use --precision auto or fp32", RuntimeWarning, stacklevel=2)
    return precision


def autocast(precision: str):
    """Autocast on the current device; frozen fp32 weights are cast per matmul, trainable tensors keep fp32 masters."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(current().type, dtype=dtype)


def grad_scaler(precision: str):
    """A gradient scaler for fp16 autocast (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(current().type) if precision == "fp16" else None


def cpu_kernels() -> bool:
    """Whether the CPU kernels (fast dropout, registered attention, fused bf16 LoRA) are used."""
    return not on_cuda()


def attention_implementation() -> str | None:
    """The attention the encoder loads with on this device (None: the kernels' registered one)."""
    return "sdpa" if on_cuda() else None


def quantized_compute_dtype() -> torch.dtype:
    """nf4's compute dtype: bf16 where bf16 is fast (CUDA with bf16, CPUs with native bf16), else fp16/fp32."""
    if on_cuda():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def rng_state() -> torch.Tensor:
    """The generator dropout masks are drawn from on the current device."""
    return torch.cuda.get_rng_state(current()) if on_cuda() else torch.get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    if on_cuda():
        torch.cuda.set_rng_state(state, current())
    else:
        torch.set_rng_state(state)


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the current device (SMART's noise)."""
    return torch.Generator(device=current()).manual_seed(seed)


def name() -> str:
    """What a benchmark records: the GPU's name, or the CPU model and whether it has native bf16."""
    if on_cuda():
        return torch.cuda.get_device_name(current())
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({'native bf16' if cpu_supports_bf16() else 'no native bf16'})"
