"""peft_mtl: parameter-efficient multi-task fine-tuning for BERT-family encoders.

The public names below are imported on first use (PEP 562), so ``import peft_mtl`` and the
``peft-mtl`` command's ``--help`` answer at once; torch, transformers and peft load when a
name that needs them is first touched.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# peft imports bitsandbytes when it is installed (the `quantize` extra); on a CPU with
# AVX512-BF16 bitsandbytes then tries to fetch an optional kernel from the Hugging Face hub
# and logs a warning when it cannot — on every run, offline. Its own fallback works (the
# --quantize runs in reports/quantization.md use it), so that one logger is quieted.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "AdapterHost": "peft_mtl.inference.adapter_host",
    "load_adapters": "peft_mtl.inference.adapter_host",
    "load_base": "peft_mtl.inference.adapter_host",
    "LoraSettings": "peft_mtl.model.lora_config",
    "SmartSettings": "peft_mtl.training.config",
    "TrainConfig": "peft_mtl.training.config",
    "TASKS": "peft_mtl.data.tasks",
    "TaskSpec": "peft_mtl.data.tasks",
    "get_task": "peft_mtl.data.tasks",
    "register_task": "peft_mtl.data.tasks",
    "UserError": "peft_mtl.errors",
}
__all__ = sorted([*_EXPORTS, "BaseModel", "train"])

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from .data.tasks import TASKS, TaskSpec, get_task, register_task  # noqa: F401
    from .errors import UserError  # noqa: F401
    from .inference.adapter_host import AdapterHost, load_adapters, load_base  # noqa: F401
    from .model.lora_config import LoraSettings  # noqa: F401
    from .training.config import SmartSettings, TrainConfig  # noqa: F401


def __getattr__(name: str) -> Any:
    if name == "BaseModel":  # deprecated alias for one release; the adapter host warns when asked
        return importlib.import_module("peft_mtl.inference.adapter_host").__getattr__(name)
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'peft_mtl' has no attribute {name!r}")


def train(config: "TrainConfig", resume: bool = False, progress: bool = True) -> dict:
    """Train as ``peft-mtl train`` does; returns the summary dict."""
    from .training.train import train as _train  # deferred: torch, transformers and peft load here

    return _train(config, resume=resume, progress=progress)
