"""peft_mtl: parameter-efficient multi-task fine-tuning for BERT-family encoders."""

import logging

# peft imports bitsandbytes when it is installed (the `quantize` extra); on a CPU with
# AVX512-BF16 bitsandbytes then tries to fetch an optional kernel from the Hugging Face hub
# and logs a warning when it cannot — on every run, offline. Its own fallback works (the
# --quantize runs in reports/quantization.md use it), so that one logger is quieted.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .training.config import SmartSettings, TrainConfig  # noqa: E402
from .model.adapters import LoraSettings  # noqa: E402
from .inference.base_model import BaseModel, load_adapters, load_base  # noqa: E402
from .data.tasks import TASKS, TaskSpec, get_task, register_task  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BaseModel", "LoraSettings", "SmartSettings", "TASKS", "TaskSpec", "TrainConfig", "get_task",
           "load_adapters", "load_base", "register_task", "train"]


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train as ``peft-mtl train`` does; returns the summary dict."""
    from .training.train import train as _train

    return _train(config, resume=resume, progress=progress)
