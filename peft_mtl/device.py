"""Every device-dependent choice, in one place: which device, which precision, which kernels.

The device belongs to the model or the run, never to the process: every function here
takes it as an argument (a run's ``--device auto|cpu|cuda|cuda:N``, under ``accelerate
launch`` the device accelerate gives each rank; a loaded host's device), so an export, a
distillation teacher or a test in the same process cannot switch it under a CUDA model.

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
import os
import random
import warnings
from typing import Iterator

import numpy as np
import torch

from .errors import UserError
from .options import PRECISIONS



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
    """``auto`` → the accelerator accelerate would pick (CUDA if present), else the CPU.

    ``PEFT_MTL_DEVICE`` (e.g. ``cpu``) overrides what ``auto`` picks: the test suite pins the
    CPU with it, so its CPU tests stay on the CPU on a machine with a GPU."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        pinned = os.environ.get("PEFT_MTL_DEVICE", "").strip()
        if pinned and pinned != "auto":
            return resolve_device(pinned)
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: this machine has no CUDA GPU (torch {torch.__version__}, "
                            f"CUDA build: {torch.version.cuda is not None}); use --device cpu or auto")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", index)
    if device.type not in ("cpu", "meta"):  # meta: the test suite's stand-in for an accelerator
        raise UserError(f"--device {spec}: use auto, cpu, cuda or cuda:N")
    return device


def enter(device: torch.device) -> None:
    """Make ``device`` current for the calling thread's CUDA calls (``torch.cuda.set_device``).

    CUDA's current device is per thread: the main thread of a run and the server's model
    thread each call this for the device their model lives on, so ``cuda:1`` means GPU 1 in
    every thread. A no-op off CUDA."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Within the block, only deterministic kernels run (a nondeterministic op raises); all is put back after.

    ``torch.use_deterministic_algorithms``, cuDNN's deterministic mode without autotuning,
    ``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS reads it when its handle is created, so set it before
    the first CUDA matmul) and the SDPA math kernel (the flash and memory-efficient backward
    passes accumulate in a nondeterministic order)."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel  # deferred: only deterministic runs need it

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
        if previous[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 pays."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def gpu_supports_bf16(device: torch.device) -> bool:
    """Native bf16 on this GPU (compute capability 8.0+, Ampere on). ``is_bf16_supported()`` also
    counts emulated bf16 (V100, T4), where fp16 with a gradient scaler is the fast choice."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → the fastest safe autocast precision on ``device``: ``bf16``, ``fp16`` (a GPU
    without native bf16) or ``fp32``. An explicit bf16 on a CPU without native bf16 is honoured
    with a warning."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if gpu_supports_bf16(device) else "fp16"
        return precision
    if precision == "auto":
        return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is for CUDA GPUs; on a CPU use auto, bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        # warnings shows it once per process (its own registry), whoever asks how often.
        warnings.warn("--precision bf16 on a CPU without native bf16 (no AVX512-BF16/AMX in /proc/cpuinfo): "
                      "bf16 matrix products are emulated there, ~100x slower than fp32 on AVX2 CPUs; "
                      "use --precision auto or fp32", RuntimeWarning, stacklevel=2)
    return precision


def autocast(precision: str, device: torch.device):
    """Autocast on ``device``; frozen fp32 weights are cast per matmul, trainable tensors keep fp32 masters."""
    if precision == "fp32" or device.type == "meta":  # meta: shapes only, no autocast kernels
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """A gradient scaler for fp16 autocast (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def uses_cpu_kernels(device: torch.device) -> bool:
    """Whether the CPU kernels (fast dropout, registered attention, fused bf16 LoRA) run on ``device``."""
    return device.type == "cpu"


def attention_implementation(device: torch.device) -> str | None:
    """The attention an encoder on ``device`` loads with (None: the kernels' registered one)."""
    return None if uses_cpu_kernels(device) else "sdpa"


def quantized_compute_dtype(device: torch.device) -> torch.dtype:
    """nf4's compute dtype: bf16 where bf16 is fast (GPUs and CPUs with native bf16), else fp16/fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if gpu_supports_bf16(device) else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def rng_state(device: torch.device) -> torch.Tensor:
    """The generator dropout masks are drawn from on ``device``."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def generator(seed: int, device: torch.device) -> torch.Generator | None:
    """A seeded generator on ``device`` (SMART's noise). The ``meta`` stand-in has no generators:
    None there, and its draws come from the global stream."""
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


def name(device: torch.device) -> str:
    """What a benchmark records: the GPU's name, or the CPU model and whether it has native bf16."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
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
