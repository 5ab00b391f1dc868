"""Optimiser, learning-rate schedule, and one optimiser step over the tasks a step trains.

A step: for each of its tasks, the objective's loss and its backward pass (PCGrad moves the
shared parameters' gradient aside after each); PCGrad's combination; the all-reduce across
processes; clipping; the optimiser and scheduler step; Bregman's θ̃ update.

The tensors all-reduced and clipped are a fixed list — every tensor the optimiser owns —
not "what has ``requires_grad`` now": peft switches ``requires_grad`` off for the adapters
of tasks that are not active, so after a step that trained several tasks the adapters of
the earlier ones hold gradients with ``requires_grad=False``. Selecting by the flag left
them out of the all-reduce (processes drifted apart) while the clip norm counted them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import TrainConfig
from .distributed import Dist
from ..model import lora_runtime
from ..model.multitask import MultiTaskModel
from .pcgrad import PCGrad
from .regularizers import Objective


class NonFiniteLoss(ArithmeticError):
    """A task's loss is NaN or infinite."""

    def __init__(self, task: str, value: float):
        super().__init__(f"non-finite loss ({value}) on task {task!r}")
        self.task, self.value = task, value


def build_optimizer(cfg: TrainConfig, model: MultiTaskModel) -> torch.optim.Optimizer:
    """AdamW over every trainable tensor; call after all adapters exist and are trainable."""
    groups: dict[str, list] = {"decay": [], "no_decay": [], "head": [], "lora_b": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("heads."):
            groups["head"].append(p)
        elif lora_runtime.is_lora_b(name) and cfg.lora_plus_ratio != 1.0:
            groups["lora_b"].append(p)
        elif p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias"):
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    head_lr = cfg.head_lr or cfg.lr
    param_groups = [
        {"params": groups["decay"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": groups["no_decay"], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": groups["head"], "lr": head_lr, "weight_decay": cfg.weight_decay},
        # LoRA+ (Hayou et al. 2024): B learns faster than A by a fixed ratio.
        {"params": groups["lora_b"], "lr": cfg.lr * cfg.lora_plus_ratio, "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak learning rate, then linear decay to 0."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@dataclass
class StepRecord:
    """What one optimiser step did, for trackers: read back with the losses (one transfer per step)."""

    losses: dict[str, float]  # task -> its summed loss
    terms: dict[str, dict[str, float]]  # task -> {"task", "smart", "bregman", "distill"} (those enabled)
    lr: float  # the first parameter group's learning rate used by this step
    grad_norm: torch.Tensor | None = None  # before clipping; a device tensor, read only by whoever logs it
    rows: int = 0  # training rows in the step (all tasks)


@dataclass
class TrainingStep:
    """Callable ``step(batches) -> summed loss``: one optimiser step over the given task batches."""

    model: MultiTaskModel
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    max_grad_norm: float
    surgery: PCGrad | None = None
    dist: Dist = field(default_factory=Dist)
    scaler: object | None = None  # torch.amp.GradScaler under fp16 autocast (CUDA without bf16)

    def __post_init__(self):
        self.params = optimizer_parameters(self.optimizer)
        self.shared = self.model.shared_parameters() if self.surgery is not None else []
        self.record: StepRecord | None = None  # the last step's, for trackers
        self._terms: list[tuple[str, str, torch.Tensor]] = []

    def gradients(self, batches: dict) -> torch.Tensor:
        """Backward of every task's loss (PCGrad applied); returns the tasks' losses, still on the device."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        self._terms = []
        for task, batch in batches.items():
            terms = self.objective.terms(self.model, batch)
            loss = sum(terms.values())
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses.append(loss.detach().float())
            self._terms += [(task, name, value.detach().float()) for name, value in terms.items()]
            if self.surgery is not None:  # a uniform loss scale leaves PCGrad's projections unchanged
                self.surgery.take(self.shared)
        if self.surgery is not None:
            self.surgery.apply(self.shared)
        return torch.stack(losses)

    def update(self) -> None:
        """All-reduce, clip, step (the gradients must be in place)."""
        self.dist.average_gradients(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.max_grad_norm)
        if self.record is not None:
            self.record.grad_norm = norm.detach()
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the step if fp16 gradients overflowed
            self.scaler.update()
            if self.scaler.get_scale() < scale:
                return  # a skipped step: the schedule and Bregman's average wait for a real one
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.objective.after_step()

    def __call__(self, batches: dict) -> float:
        """One step; returns the summed loss. Reads the losses back once per step (not twice per
        task): a non-finite one stops here, before the update touches any weight."""
        losses = self.gradients(batches)
        read = torch.cat([losses, torch.stack([v for _, _, v in self._terms])]) if self._terms else losses
        read = read.tolist()
        values, parts = read[:len(batches)], read[len(batches):]
        for task, value in zip(batches, values):
            if not math.isfinite(value):
                raise NonFiniteLoss(task, value)
        terms: dict[str, dict[str, float]] = {}
        for (task, name, _), value in zip(self._terms, parts):
            terms.setdefault(task, {})[name] = value
        self.record = StepRecord(dict(zip(batches, values)), terms, float(self.optimizer.param_groups[0]["lr"]),
                                 rows=sum(len(b.indices) for b in batches.values()))
        self.update()
        total = 0.0
        for value in values:
            total += value
        return total
