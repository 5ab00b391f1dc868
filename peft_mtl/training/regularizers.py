"""The training objective of one batch: task loss + λ_s·R_s (SMART) + μ·D_Breg (Bregman)
(+ a teacher's term when distilling: the task loss then weighs 1 - α, the teacher's α).

:class:`Objective` is the one owner of everything these terms share and that is easy to
get wrong when spread over a loop:

* **Dropout replay.** The global RNG state at the start of the clean pass is recorded once;
  SMART's ascent and perturbed passes and Bregman's reference pass all replay it, so each
  term measures only what it is meant to (the perturbation; the parameter change), and R_s
  and the Bregman penalty are exactly 0 when ε = 0 or θ̃ = θ.
* **SMART's own noise.** The random start N(0, σ²) comes from a generator of its own, not the
  global RNG, so drawing it cannot shift the dropout masks a replay expects; it is part of
  the checkpoint.
* **Precision.** bf16's spacing near 1 is 2^-7 ≈ 0.008, far above SMART's ε = 1e-5: a
  perturbed activation cast to bf16 is the clean one. Steps with SMART therefore run in fp32
  unless ``smart.precision = "train"``.
* **Bregman's θ̃**, updated after every optimiser step.
"""

from __future__ import annotations

import logging

import torch

from .. import device
from .config import TrainConfig
from ..model.kernels import all_dropout_pairable
from .distill import Teacher, distillation_loss
from ..data.losses import get_loss
from ..device import autocast
from .smart import BregmanProximal, smart_random_paired, smart_regularizer
from ..data.tasks import TaskSpec, get_task

# Below this ε a bf16 pass cannot see the perturbation (bf16 spacing near 1 is ~0.008).
_BF16_VISIBLE_EPSILON = 2.0 ** -8

logger = logging.getLogger(__name__)


def loss_name_for(cfg: TrainConfig, task: TaskSpec) -> str:
    """``--task-loss TASK=NAME`` if given, else the task file's ``loss``."""
    return cfg.task_losses.get(task.name, task.loss)


class Objective:
    """Callable ``objective(model, batch) -> loss`` with SMART and Bregman as configured.

    Args:
        model: the model being trained (Bregman's θ̃ starts as a copy of its trainable tensors).
        cfg: the run's config (losses, SMART and Bregman settings).
        precision: the run's compute precision (``fp32`` or ``bf16``).
        rank: process rank, so that each process draws its own SMART noise.
        teacher: soft targets of the training rows (``--teacher``), or None.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, precision: str, rank: int = 0,
                 teacher: Teacher | None = None):
        self.cfg, self.smart, self.precision, self.teacher = cfg, cfg.smart, precision, teacher
        self.bregman = (BregmanProximal(model, cfg.smart.bregman_mu, cfg.smart.bregman_beta)
                        if cfg.smart.bregman_mu > 0 else None)
        self.device = model.device  # the run's: the model was placed before its objective is built
        self.noise = device.generator(cfg.seed * 1_000_003 + 7919 * rank + 0x5A, self.device)
        self._pairable: bool | None = None
        if precision == "bf16" and self.smart.precision == "train" and self.uses_smart \
                and self.smart.epsilon < _BF16_VISIBLE_EPSILON:
            logger.warning(f"--smart-precision train with bf16 and --smart-epsilon {self.smart.epsilon:g}: bf16 "
                           f"cannot resolve perturbations below ~{_BF16_VISIBLE_EPSILON:g}, so R_s will be ~0; "
                           f"use --smart-precision fp32 or a larger epsilon")

    @property
    def uses_smart(self) -> bool:
        return any(self.smart.weight_for(t) > 0 for t in self.cfg.task_names)

    def _paired_pass_possible(self, model) -> bool:
        if self._pairable is None:  # one walk over the modules per run; paired masks are the CPU kernels'
            self._pairable = device.uses_cpu_kernels(self.device) and all_dropout_pairable(model)
        return self._pairable

    def precision_for(self, task: str) -> str:
        if self.smart.weight_for(task) > 0 and self.smart.precision == "fp32":
            return "fp32"
        return self.precision

    def __call__(self, model, batch) -> torch.Tensor:
        """The loss to minimise for ``batch``: the sum of :meth:`terms`."""
        return sum(self.terms(model, batch).values())

    def terms(self, model, batch) -> dict[str, torch.Tensor]:
        """``{"task": ℓ, "smart": λ_s·R_s, "bregman": μ·D_Breg, "distill": α·D}``, the last three only when
        enabled (with a teacher for the task, ``task`` is (1 - α)·ℓ)."""
        task = get_task(batch.task)
        loss_fn = get_loss(loss_name_for(self.cfg, task))
        weight = self.smart.weight_for(task.name)
        masks = device.rng_state(self.device)  # the clean pass's dropout masks, replayed by every other pass
        terms: dict[str, torch.Tensor] = {}
        with autocast(self.precision_for(task.name), self.device):
            if weight > 0 and self.smart.steps == 0 and self._paired_pass_possible(model):
                output, reg = smart_random_paired(model, task.name, batch.inputs, task.kind, self.smart, self.noise)
            else:
                with model.capture_embeddings() as embeddings:
                    output = model(task.name, batch.inputs)
                reg = self._smart(model, task, batch, output, list(embeddings), masks) if weight > 0 else None
            terms["task"] = loss_fn(output, batch.labels.to(output.device), alpha=self.cfg.ordinal_alpha)
            targets = self.teacher.batch_targets(task.name, batch.indices, output.device) if self.teacher else None
            if targets is not None:
                alpha = self.cfg.distill_weight
                terms["task"] = (1 - alpha) * terms["task"]
                terms["distill"] = alpha * distillation_loss(task.kind, output, targets, self.cfg.distill_temperature)
            if reg is not None:
                terms["smart"] = weight * reg
            if self.bregman is not None:
                after = device.rng_state(self.device)
                device.set_rng_state(masks, self.device)
                reference = self.bregman.reference_output(model, task.name, batch.inputs)
                device.set_rng_state(after, self.device)
                terms["bregman"] = self.bregman.penalty(task.kind, output, reference)
        return terms

    def _smart(self, model, task: TaskSpec, batch, output, embeddings, masks) -> torch.Tensor:
        def perturbed(noise):
            with model.perturbed_embeddings(noise):
                return model(task.name, batch.inputs)

        attention = [seg["attention_mask"] for seg in batch.inputs]
        return smart_regularizer(perturbed, output, embeddings, attention, task.kind, self.smart, masks, self.noise)

    def after_step(self) -> None:
        """Move θ̃ toward the new θ (call after every optimiser step)."""
        if self.bregman is not None:
            self.bregman.update()

    # -- checkpointing: tensors shared by every rank, random state per rank
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.bregman.state_dict() if self.bregman is not None else {}

    def load_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if self.bregman is not None:
            self.bregman.load_state_dict(state)

    def random_state(self) -> torch.Tensor:
        return self.noise.get_state() if self.noise is not None else torch.empty(0, dtype=torch.uint8, device="cpu")

    def load_random_state(self, state: torch.Tensor) -> None:
        if self.noise is not None:
            self.noise.set_state(state)
