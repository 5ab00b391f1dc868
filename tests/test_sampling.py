"""Task samplers follow their formulas."""

from __future__ import annotations

from collections import Counter

import pytest

from peft_mtl.training.sampling import annealed_alpha, power_probabilities, task_schedule

SIZES = {"sst": 8544, "qqp": 16213, "sts": 6040}


def freqs(schedule):
    counts = Counter(t for step in schedule for t in step)
    return {t: counts[t] / len(schedule) for t in SIZES}


def test_annealed_alpha_goes_from_proportional_to_near_uniform():
    assert annealed_alpha(1, 5) == 1.0
    assert annealed_alpha(5, 5) == pytest.approx(0.2)
    assert annealed_alpha(3, 5) == pytest.approx(0.6)
    assert annealed_alpha(1, 1) == 1.0


@pytest.mark.parametrize("name, alpha", [("proportional", 1.0), ("sqrt", 0.5), ("uniform", 0.0)])
def test_power_samplers_match_p_proportional_to_n_to_the_alpha(name, alpha):
    expected = power_probabilities(SIZES, alpha)
    got = freqs(task_schedule(name, SIZES, 20000, 1, 3, seed=0))
    for t in SIZES:
        assert got[t] == pytest.approx(expected[t], abs=0.012)


@pytest.mark.parametrize("epoch", [1, 2, 3])
def test_annealed_frequencies_follow_the_epoch_schedule(epoch):
    expected = power_probabilities(SIZES, 1 - 0.8 * (epoch - 1) / 2)
    got = freqs(task_schedule("annealed", SIZES, 20000, epoch, 3, seed=1))
    for t in SIZES:
        assert got[t] == pytest.approx(expected[t], abs=0.012)
    assert expected["qqp"] > expected["sts"]


def test_round_robin_staggered_and_sum():
    rr = task_schedule("round-robin", SIZES, 6, 1, 3, seed=0)
    assert rr == [("sst",), ("qqp",), ("sts",)] * 2
    assert set(task_schedule("staggered", SIZES, 10, 1, 3, seed=0, staggered_epochs=1)) == {("qqp",)}
    assert task_schedule("staggered", SIZES, 6, 2, 3, seed=0, staggered_epochs=1) == rr
    assert task_schedule("sum", SIZES, 2, 1, 3, seed=0) == [("sst", "qqp", "sts")] * 2


def test_schedules_are_reproducible_per_seed_and_epoch():
    a = task_schedule("annealed", SIZES, 100, 2, 3, seed=5)
    assert a == task_schedule("annealed", SIZES, 100, 2, 3, seed=5)
    assert a != task_schedule("annealed", SIZES, 100, 2, 3, seed=6)
