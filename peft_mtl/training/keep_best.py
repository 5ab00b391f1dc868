"""Per-task best epochs (``--keep-best per-task``): each task keeps the weights of its own best epoch.

Tasks peak at different times: on our data SST overfits after its third epoch while QQP and
STS still improve in the fourth (reports/multitask.md), so the epoch with the best *overall*
score holds SST back or leaves QQP and STS early. Here every task's routed adapters and head
are snapshotted whenever that task's dev score improves; at the end each task gets its own
epoch. A task-private adapter simply takes its snapshot; an adapter several tasks share
whose best epochs differ is saved once per epoch kept (``shared_epoch4``), and each task is
routed to its copy — the saved set holds more parameters, and the manifest counts them.
"""

from __future__ import annotations

import torch

from ..model import lora_runtime
from ..model.multitask import MultiTaskModel
from . import checkpoint as ckpt


def _adapter_of(name: str, adapters: set[str]) -> str | None:
    """The LoRA adapter a parameter belongs to (``...query.lora_A.shared.weight`` -> ``shared``)."""
    return lora_runtime.adapter_of_parameter(name, adapters)


def task_state(model: MultiTaskModel, task: str) -> dict[str, torch.Tensor]:
    """CPU copies of what ``task``'s predictions depend on: its routed adapters and its head."""
    routed = set(model.routing.get(task, []))
    return {n: t for n, t in ckpt.trainable_state(model).items()
            if n.startswith(f"heads.{task}.") or _adapter_of(n, routed) is not None}


def record_task_bests(model: MultiTaskModel, progress: ckpt.Progress, epoch: int, metrics: dict,
                      primary: dict[str, str]) -> None:
    """Snapshot every task whose dev score beat its best so far (call once per evaluated epoch)."""
    if progress.task_best_state is None:
        progress.task_best_state = {}
    if not progress.task_best and progress.best_state:
        # Resumed from a run that only kept its overall best: every task starts from that epoch.
        for t, m in progress.best_metrics.items():
            progress.task_best[t] = {"score": m[primary[t]], "epoch": progress.best_epoch, "metrics": m}
            progress.task_best_state[t] = {n: v for n, v in progress.best_state.items()
                                           if n.startswith(f"heads.{t}.")
                                           or _adapter_of(n, set(model.routing.get(t, []))) is not None}
    for t, m in metrics.items():
        if m[primary[t]] > progress.task_best.get(t, {}).get("score", float("-inf")):
            progress.task_best[t] = {"score": m[primary[t]], "epoch": epoch, "metrics": m}
            progress.task_best_state[t] = task_state(model, t)


def apply_task_bests(model: MultiTaskModel, progress: ckpt.Progress) -> int:
    """Put each task's best-epoch weights into ``model`` (which holds the overall best epoch).

    Returns how many parameters the saved set gains (shared adapters copied per epoch, less
    adapters no task is routed to any more)."""
    params = dict(model.named_parameters())
    original_routing = {k: list(v) for k, v in model.routing.items()}
    copies: dict[tuple[str, int], str] = {}
    with torch.no_grad():
        for task, best in progress.task_best.items():
            epoch, snapshot = best["epoch"], progress.task_best_state[task]
            if epoch == progress.best_epoch:
                continue
            for name, tensor in snapshot.items():
                if name.startswith(f"heads.{task}."):
                    params[name].copy_(tensor)
            route = []
            for adapter in original_routing.get(task, []):
                owners = [k for k, r in original_routing.items() if adapter in r]
                target = adapter
                if owners != [task]:
                    if (adapter, epoch) not in copies:
                        copies[(adapter, epoch)] = f"{adapter}_epoch{epoch}"
                        model.encoder.add_adapter(copies[(adapter, epoch)], model.encoder.peft_config[adapter])
                        params = dict(model.named_parameters())
                    target = copies[(adapter, epoch)]
                for name, tensor in snapshot.items():
                    if _adapter_of(name, {adapter}) is not None:
                        params[_renamed(name, adapter, target)].copy_(tensor)
                route.append(target)
            if task in original_routing:  # heads-only runs route no task through adapters: leave them so
                model.routing[task] = route
    def size(adapter: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if _adapter_of(n, {adapter}) is not None)

    gained = sum(size(copy) for copy in copies.values())
    used = {a for r in model.routing.values() for a in r}
    for adapter in {a for r in original_routing.values() for a in r} - used:
        gained -= size(adapter)
        model.encoder.delete_adapter(adapter)  # every task moved to its own epoch's copy
    model.reset_routing()
    model.eval()
    return gained


def _renamed(name: str, adapter: str, target: str) -> str:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] == adapter and parts[i - 1].startswith("lora_"):
            parts[i] = target
    return ".".join(parts)
