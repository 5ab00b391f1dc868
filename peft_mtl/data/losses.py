"""Task losses, in a registry users can extend with :func:`register_loss`.

Every loss takes ``(outputs, labels, **options)``: logits ``(B, C)`` and integer labels for
classification, scores ``(B,)`` and float labels for regression, and returns a scalar.

The registry sits beside the task specs (``data``) because a task file names its loss and is
checked against it; the module imports without torch (``peft-mtl tasks`` answers at once),
so each built-in loss imports torch when it first runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..errors import UnknownName, UserError

if TYPE_CHECKING:
    import torch

LossFn = Callable[..., "torch.Tensor"]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise UserError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return wrap


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise UnknownName(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None


@register_loss("cross_entropy")
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    import torch.nn.functional as F  # deferred: the registry imports without torch

    return F.cross_entropy(logits.float(), labels)


@register_loss("dual")
def dual_objective(logits: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    """Dual-objective cross-entropy (Le & Lin, seed 001): one-vs-all binary cross-entropy.

    ``L = -1/N Σ_i Σ_j [y_ij log σ(x_ij) + (1 - y_ij) log(1 - σ(x_ij))]`` — each class is its
    own binary problem; the sum over classes is averaged over the batch.
    """
    import torch  # deferred: the registry imports without torch
    import torch.nn.functional as F  # deferred: as above

    targets = F.one_hot(labels, logits.shape[-1]).to(torch.float32)
    per_class = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return per_class.sum(-1).mean()


@register_loss("ordinal")
def ordinal_log_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 1.5, **_) -> torch.Tensor:
    """Ordinal log-loss (Castagnos et al. 2022): ``-Σ_i log(1 - p_i) · |y - i|^α``.

    Probability mass on classes far from the gold one costs more; the gold class itself
    costs nothing, so the loss is 0 only for a one-hot prediction of the right class.
    """
    import torch  # deferred: the registry imports without torch

    probs = torch.softmax(logits.float(), dim=-1)
    classes = torch.arange(logits.shape[-1], device=logits.device)
    distance = (labels.unsqueeze(-1) - classes).abs().to(torch.float32) ** alpha
    return -(torch.log1p(-probs.clamp(max=1 - 1e-6)) * distance).sum(-1).mean()


@register_loss("mse")
def mse(scores: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    import torch.nn.functional as F  # deferred: the registry imports without torch

    return F.mse_loss(scores.float(), labels.float())
