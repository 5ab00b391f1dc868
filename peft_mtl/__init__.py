"""peft_mtl: parameter-efficient multi-task fine-tuning for BERT-family encoders."""

from .config import SmartSettings, TrainConfig
from .adapters import LoraSettings
from .inference import BaseModel, load_adapters, load_base
from .tasks import TASKS, TaskSpec, get_task, register_task

__version__ = "0.1.0"
__all__ = ["BaseModel", "LoraSettings", "SmartSettings", "TASKS", "TaskSpec", "TrainConfig", "get_task",
           "load_adapters", "load_base", "register_task", "train"]


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train as ``peft-mtl train`` does; returns the summary dict."""
    from .train import train as _train

    return _train(config, resume=resume, progress=progress)
