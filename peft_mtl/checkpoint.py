"""Resumable training checkpoints inside the output folder (``OUT/.checkpoint/``).

A checkpoint holds everything needed to continue as if never stopped: trainable tensors,
the best state so far, optimiser and scheduler state, batch-stream positions, Bregman
averages, RNG state and progress counters. Tensors go to safetensors; the optimiser state
(tensors and numbers only) is read back with ``torch.load(weights_only=True)``, which
refuses to unpickle code. The folder is replaced atomically, so a kill mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .artifacts import atomic_folder, save_tensors_atomic, write_json_atomic

CHECKPOINT_DIR = ".checkpoint"


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if _is_trained(n, p)}


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


def save(out: Path, model, optimizer, scheduler, streams, bregman, progress: Progress, cfg) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out / CHECKPOINT_DIR, overwrite=True) as tmp:
        save_tensors_atomic(trainable_state(model), tmp / "trainable.safetensors")
        if progress.best_state:
            save_tensors_atomic(progress.best_state, tmp / "best.safetensors")
        if bregman is not None:
            save_tensors_atomic(bregman.state_dict(), tmp / "bregman.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        meta = asdict(progress)
        meta.pop("best_state")
        meta["streams"] = {t: s.state() for t, s in streams.items()}
        meta["config"] = cfg.to_dict()
        write_json_atomic(tmp / "progress.json", meta)


def load(out: Path, model) -> dict | None:
    folder = out / CHECKPOINT_DIR
    if not (folder / "progress.json").is_file():
        raise FileNotFoundError(f"{folder}: no checkpoint to resume from; run without --resume to start afresh")
    meta = json.loads((folder / "progress.json").read_text())
    state = {"meta": meta, "trainable": load_file(str(folder / "trainable.safetensors"))}
    if (folder / "best.safetensors").is_file():
        state["best"] = load_file(str(folder / "best.safetensors"))
    if (folder / "bregman.safetensors").is_file():
        state["bregman"] = load_file(str(folder / "bregman.safetensors"))
    state["optim"] = torch.load(folder / "optimizer.pt", weights_only=True)
    return state


def restore(state: dict, model, optimizer, scheduler, streams, bregman, progress: Progress) -> None:
    load_trainable_state(model, state["trainable"])
    optimizer.load_state_dict(state["optim"]["optimizer"])
    scheduler.load_state_dict(state["optim"]["scheduler"])
    torch.set_rng_state(state["optim"]["rng"])
    meta = dict(state["meta"])
    for t, s in meta.pop("streams").items():
        streams[t].restore(s)
    meta.pop("config", None)
    for k, v in meta.items():
        setattr(progress, k, v)
    progress.best_state = state.get("best")
    if bregman is not None and "bregman" in state:
        bregman.load_state_dict(state["bregman"])


def remove(out: Path) -> None:
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
