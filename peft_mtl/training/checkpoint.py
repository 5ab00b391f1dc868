"""Resumable training checkpoints inside the output folder (``OUT/.checkpoint/``).

A checkpoint holds everything needed to continue as if never stopped: trainable tensors,
the best state so far, optimiser and scheduler state, batch-stream positions, Bregman's
θ̃, progress counters, the config the run was started with, and every random stream of
every process — the global torch RNG (dropout masks), SMART's noise generator and PCGrad's
shuffling generator, one set per rank. Tensors go to safetensors; the optimiser state
(tensors and numbers only) is read back with ``torch.load(weights_only=True)``, which
refuses to unpickle code. The folder is replaced atomically, so a kill mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import device
from ..artifacts import atomic_folder, save_tensors_atomic, write_json_atomic
from .config import ConfigError, TrainConfig

CHECKPOINT_DIR = ".checkpoint"


class CheckpointMismatch(ConfigError):
    """``--resume`` was asked for with settings other than the interrupted run's."""


@dataclass
class Progress:
    epoch: int = 1  # the epoch being trained (1-based)
    step: int = 0  # steps done in that epoch
    global_step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    best_metrics: dict = field(default_factory=dict)
    epochs_since_best: int = 0
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    best_state: dict | None = None
    # --keep-best per-task: task -> {"score", "epoch", "metrics"} of its best epoch, and the
    # tensors of its routed adapters and head at that epoch.
    task_best: dict = field(default_factory=dict)
    task_best_state: dict | None = None


TASK_KEY_SEP = "::"  # task::parameter in task_best.safetensors (parameter names never hold "::")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trained tensors (checkpoints load on any device)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if _is_trained(n, p)}


def _is_trained(name: str, p: torch.nn.Parameter) -> bool:
    # Adapters of inactive tasks have requires_grad=False at any given moment but are trained.
    return p.requires_grad or "lora_" in name or name.startswith("heads.")


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    if not state:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save(out: Path, *, model, optimizer, scheduler, streams, objective, progress: Progress, cfg: TrainConfig,
         random_states: list[dict], world: int, scaler=None) -> None:
    """Write the checkpoint (rank 0 only; ``random_states`` holds every rank's, in rank order)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out / CHECKPOINT_DIR, overwrite=True) as tmp:
        save_tensors_atomic(trainable_state(model), tmp / "trainable.safetensors")
        if progress.best_state:
            save_tensors_atomic(progress.best_state, tmp / "best.safetensors")
        if progress.task_best_state:
            save_tensors_atomic({f"{t}{TASK_KEY_SEP}{n}": v for t, state in progress.task_best_state.items()
                                 for n, v in state.items()}, tmp / "task_best.safetensors")
        if objective.tensors():
            save_tensors_atomic(objective.tensors(), tmp / "bregman.safetensors")
        rng_tensors = {f"rank{r}.{k}": v for r, s in enumerate(random_states) for k, v in s.items()
                       if isinstance(v, torch.Tensor)}
        save_tensors_atomic(rng_tensors, tmp / "random.safetensors")
        # The fp16 gradient scaler's scale and growth tracker: a resumed run skips and grows as the
        # uninterrupted one would.
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        meta = asdict(progress)
        meta.pop("best_state")
        meta.pop("task_best_state")
        meta["streams"] = {t: s.state() for t, s in streams.items()}
        meta["config"] = cfg.to_dict()
        meta["processes"] = world
        # numpy generator states are dicts of (128-bit) ints: JSON keeps them exactly.
        meta["random"] = [{k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for s in random_states]
        write_json_atomic(tmp / "progress.json", meta)


def load(out: Path) -> dict:
    folder = out / CHECKPOINT_DIR
    if not (folder / "progress.json").is_file():
        raise FileNotFoundError(f"{folder}: no checkpoint to resume from; run without --resume to start afresh")
    meta = json.loads((folder / "progress.json").read_text())
    state = {"meta": meta, "trainable": load_file(str(folder / "trainable.safetensors")),
             "random": load_file(str(folder / "random.safetensors")) if (folder / "random.safetensors").is_file() else {}}
    if (folder / "best.safetensors").is_file():
        state["best"] = load_file(str(folder / "best.safetensors"))
    if (folder / "task_best.safetensors").is_file():
        per_task: dict[str, dict] = {}
        for key, tensor in load_file(str(folder / "task_best.safetensors")).items():
            task, name = key.split(TASK_KEY_SEP, 1)
            per_task.setdefault(task, {})[name] = tensor
        state["task_best"] = per_task
    if (folder / "bregman.safetensors").is_file():
        state["bregman"] = load_file(str(folder / "bregman.safetensors"))
    state["optim"] = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    return state


def check_compatible(state: dict, cfg: TrainConfig, world: int, out: Path) -> None:
    """Refuse to resume with other settings or another number of processes (one line naming them)."""
    try:
        saved = TrainConfig.from_dict(state["meta"]["config"])
    except ConfigError as err:
        raise CheckpointMismatch(f"{out / CHECKPOINT_DIR}: the saved config cannot be read ({err}); "
                                 f"pass --overwrite to start over") from None
    changed = cfg.changed_for_resume(saved)
    saved_world = state["meta"].get("processes", 1)
    if world != saved_world:
        changed.append(f"processes ({saved_world} -> {world})")
    if changed:
        raise CheckpointMismatch(f"--resume: {out} was started with other settings; changed: {', '.join(changed)}. "
                                 f"Resume with the original flags, or pass --overwrite to start over")


def restore(state: dict, *, model, optimizer, scheduler, streams, objective, surgery, progress: Progress,
            rank: int, scaler=None) -> None:
    load_trainable_state(model, state["trainable"])
    optimizer.load_state_dict(state["optim"]["optimizer"])
    scheduler.load_state_dict(state["optim"]["scheduler"])
    if scaler is not None and state["optim"].get("scaler"):
        scaler.load_state_dict(state["optim"]["scaler"])
    meta = dict(state["meta"])
    for t, s in meta.pop("streams").items():
        streams[t].restore(s)
    random = meta.pop("random", [])
    for key in ("config", "processes"):
        meta.pop(key, None)
    for k, v in meta.items():
        setattr(progress, k, v)
    progress.best_state = state.get("best")
    progress.task_best_state = state.get("task_best")
    if "bregman" in state:
        objective.load_tensors(state["bregman"])
    tensors = state["random"]
    if f"rank{rank}.cpu" in tensors:
        torch.set_rng_state(tensors[f"rank{rank}.cpu"])
    if random and random[rank].get("device") == objective.device.type:  # another device: fresh streams
        device.set_rng_state(tensors[f"rank{rank}.torch"], objective.device)
        objective.load_random_state(tensors[f"rank{rank}.smart"])
    if surgery is not None:
        surgery.load_random_state(random[rank]["pcgrad"])


def random_state(objective, surgery) -> dict:
    """This process's random streams, as ``save`` stores them."""
    state = {"torch": device.rng_state(objective.device), "cpu": torch.get_rng_state(),
             "smart": objective.random_state(), "device": objective.device.type}
    if surgery is not None:
        state["pcgrad"] = surgery.random_state()
    return state


def remove(out: Path) -> None:
    """Delete the checkpoint once the set is saved: moved aside in one rename first, so a kill
    midway leaves either the whole checkpoint or none (a dead writer's leftover is cleaned later)."""
    folder = out / CHECKPOINT_DIR
    if folder.is_dir():
        aside = out / f".{CHECKPOINT_DIR}.{os.getpid()}.removed.partial"
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
