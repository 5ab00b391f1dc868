"""Which task each training step works on, in a registry users can extend.

A sampler returns, for one epoch, a list with one entry per step: the tuple of tasks whose
batches that step uses (one task, or every task for ``sum``). Sequences depend only on
(seed, epoch), so a resumed run replays exactly the steps it would have taken, and every
process of a distributed run agrees on them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import UnknownName, UserError

Sampler = Callable[..., list[tuple[str, ...]]]
SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
    def wrap(fn: Sampler) -> Sampler:
        if name in SAMPLERS:
            raise UserError(f"sampler {name!r} is already registered")
        SAMPLERS[name] = fn
        return fn

    return wrap


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 0x5A3])


def power_probabilities(sizes: dict[str, int], alpha: float) -> dict[str, float]:
    """p_i ∝ N_i^α."""
    weights = {t: float(n) ** alpha for t, n in sizes.items()}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def annealed_alpha(epoch: int, epochs: int) -> float:
    """α = 1 − 0.8·(e − 1)/(E − 1), e = 1..E (Stickland & Murray 2019): proportional first, near-uniform last."""
    if epochs <= 1:
        return 1.0
    return 1.0 - 0.8 * (epoch - 1) / (epochs - 1)


def _draw(probs: dict[str, float], steps: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    tasks = list(probs)
    picks = rng.choice(len(tasks), size=steps, p=np.array([probs[t] for t in tasks]))
    return [(tasks[i],) for i in picks]


@register_sampler("annealed")
def annealed(sizes: dict[str, int], steps: int, epoch: int, epochs: int, seed: int, **_) -> list[tuple[str, ...]]:
    return _draw(power_probabilities(sizes, annealed_alpha(epoch, epochs)), steps, _rng(seed, epoch))


@register_sampler("proportional")
def proportional(sizes: dict[str, int], steps: int, epoch: int, seed: int, **_) -> list[tuple[str, ...]]:
    return _draw(power_probabilities(sizes, 1.0), steps, _rng(seed, epoch))


@register_sampler("sqrt")
def square_root(sizes: dict[str, int], steps: int, epoch: int, seed: int, **_) -> list[tuple[str, ...]]:
    return _draw(power_probabilities(sizes, 0.5), steps, _rng(seed, epoch))


@register_sampler("uniform")
def uniform(sizes: dict[str, int], steps: int, epoch: int, seed: int, **_) -> list[tuple[str, ...]]:
    return _draw(power_probabilities(sizes, 0.0), steps, _rng(seed, epoch))


@register_sampler("round-robin")
def round_robin(sizes: dict[str, int], steps: int, **_) -> list[tuple[str, ...]]:
    tasks = list(sizes)
    return [(tasks[i % len(tasks)],) for i in range(steps)]


@register_sampler("staggered")
def staggered(sizes: dict[str, int], steps: int, epoch: int, staggered_epochs: int = 1,
              staggered_first: str | None = None, **_) -> list[tuple[str, ...]]:
    """Staggered fine-tuning (seed 001): one task alone first — by default the one with the most
    training rows (QQP for the built-in three) — then round-robin over all."""
    first = staggered_first or max(sizes, key=lambda t: sizes[t])
    if epoch <= staggered_epochs and first in sizes:
        return [(first,)] * steps
    return round_robin(sizes, steps)


@register_sampler("sum")
def summed(sizes: dict[str, int], steps: int, **_) -> list[tuple[str, ...]]:
    """Every step sums the losses of one batch from each task (seed 004's simultaneous training)."""
    return [tuple(sizes)] * steps


def task_schedule(name: str, sizes: dict[str, int], steps: int, epoch: int, epochs: int, seed: int,
                  staggered_epochs: int = 1, staggered_first: str | None = None) -> list[tuple[str, ...]]:
    """The tasks of every step of ``epoch`` (1-based)."""
    try:
        sampler = SAMPLERS[name]
    except KeyError:
        raise UnknownName(f"unknown sampler {name!r}; known: {', '.join(sorted(SAMPLERS))}") from None
    return sampler(sizes=sizes, steps=steps, epoch=epoch, epochs=epochs, seed=seed,
                   staggered_epochs=staggered_epochs, staggered_first=staggered_first)
