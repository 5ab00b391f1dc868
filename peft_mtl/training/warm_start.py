"""Start a run from a saved set's adapters and heads (``--init-from``) instead of fresh ones.

The use it exists for: fine-tuning a set that ``peft-mtl compress`` cut to a lower rank, so the
low-rank set recovers what the truncation lost from a good starting point rather than from
zero. Any saved set of the same shape works (continuing a finished run with another schedule,
a teacher, more data). The set must match the run exactly — backbone, tasks, adapters, ranks,
target modules — and every mismatch is one message naming the set and what differs.
"""

from __future__ import annotations

from pathlib import Path

from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from ..model import lora_runtime
from ..model.multitask import MultiTaskModel
from ..model.saved_sets import (
    AdapterError,
    check_adapter_files,
    check_backbone,
    load_head_weights,
    read_manifest,
)

__all__ = ["load_initial_weights"]


def load_initial_weights(model: MultiTaskModel, folder: str | Path, tasks: list[str], mode: str, identity) -> None:
    """Copy the adapters and heads of the set in ``folder`` into ``model`` (before training)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_backbone(folder, manifest, identity)
    fix = "train with the flags it was trained with (its peft_mtl.json, \"config\"), or pass another --init-from"
    if manifest.get("mode") != mode:
        raise AdapterError(f"{folder}: a {manifest.get('mode')} set cannot start a --mode {mode} run; {fix}")
    missing = [t for t in tasks if t not in manifest.get("tasks", [])]
    if missing:
        raise AdapterError(f"{folder}: has no {', '.join(missing)} (its tasks: {', '.join(manifest.get('tasks', []))}); {fix}")
    if mode == "lora":
        wanted = {t: list(model.routing[t]) for t in tasks}
        saved = {t: list(manifest["routing"].get(t, [])) for t in tasks}
        if wanted != saved:
            raise AdapterError(f"{folder}: its tasks use the adapters {saved}, this run's {wanted} (a set saved with "
                               f"--keep-best per-task may hold per-epoch copies, a --no-shared run no shared "
                               f"adapter); {fix}")
        for name in sorted({a for route in wanted.values() for a in route}):
            path = check_adapter_files(folder, manifest["adapters"][name])
            state = load_file(str(path / "adapter_model.safetensors"))
            expected = get_peft_model_state_dict(model.encoder, adapter_name=name)
            if set(state) != set(expected):
                raise AdapterError(f"{path}: adapts other modules than this run (--lora-targets, --lora-layers); {fix}")
            for key, tensor in state.items():
                if tensor.shape != expected[key].shape:
                    raise AdapterError(f"{path}: rank {_rank(tensor, key)} but this run has rank "
                                       f"{_rank(expected[key], key)} (--lora-rank); {fix}")
            set_peft_model_state_dict(model.encoder, state, adapter_name=name)
    for task in tasks:
        weights = load_head_weights(folder, manifest["heads"][task])
        head = model.heads[task]
        shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in weights.items()}:
            raise AdapterError(f"{folder / manifest['heads'][task]}: a {task} head of another shape than this run's "
                               f"(--pair-encoding, task labels); {fix}")
        head.load_state_dict(weights)


def _rank(tensor, key: str) -> int:
    return lora_runtime.saved_rank(key, tensor)
