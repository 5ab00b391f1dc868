"""Every combination of training options either trains and saves a loadable set, or is refused
up front with one error naming the conflicting flags.

Factors: SMART (off, T=0, T=1) × Bregman × PCGrad × sampling (sum, uniform, annealed,
staggered) × mode (lora, heads, full) × shared adapter (default, --no-shared) × precision
(fp32, bf16). All 576 combinations go through validation; a pairwise-covering subset (every
pair of option values that is valid together appears in at least one run) trains on the
tiny model. Two processes: tests/test_distributed.py.
"""

from __future__ import annotations

import itertools

import pytest

from peft_mtl import load_base
from peft_mtl.cli import main
from peft_mtl.training.config import ConfigError, TrainConfig
from peft_mtl.training.train import train

FACTORS: dict[str, list] = {
    "smart": [None, 0, 1],
    "bregman": [0.0, 0.5],
    "pcgrad": [False, True],
    "sampling": ["sum", "uniform", "annealed", "staggered"],
    "mode": ["lora", "heads", "full"],
    "shared": [None, False],
    "precision": ["fp32", "bf16"],
}


def make_config(combo: dict, **run) -> TrainConfig:
    cfg = TrainConfig(tasks=["sst", "qqp", "sts"], mode=combo["mode"], sampling=combo["sampling"],
                      pcgrad=combo["pcgrad"], shared_adapter=combo["shared"], precision=combo["precision"],
                      lr=1e-3 if combo["mode"] == "full" else 5e-3, **run)
    if combo["smart"] is not None:
        cfg.smart.weight, cfg.smart.steps, cfg.smart.epsilon, cfg.smart.sigma = 1.0, combo["smart"], 1e-3, 1e-3
    cfg.smart.bregman_mu = combo["bregman"]
    return cfg


def expected_conflicts(combo: dict) -> list[tuple[str, str]]:
    """The pairs of flags that cannot go together in ``combo`` (the error names one pair)."""
    conflicts = []
    if combo["pcgrad"] and combo["sampling"] != "sum":
        conflicts.append(("--pcgrad", "--sampling"))
    if combo["shared"] is not None and combo["mode"] != "lora":
        conflicts.append(("--no-shared", "--mode"))
    return conflicts


def all_combinations() -> list[dict]:
    return [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]


def pairwise_cover(combos: list[dict]) -> list[dict]:
    """A small set of combos in which every pair of factor values seen among ``combos`` occurs."""
    def pairs(c):
        items = sorted(c.items(), key=lambda kv: kv[0])
        return {(a, b) for a, b in itertools.combinations([(k, repr(v)) for k, v in items], 2)}

    uncovered = set().union(*(pairs(c) for c in combos))
    chosen = []
    while uncovered:
        best = max(combos, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def test_every_combination_is_accepted_or_refused_with_both_flags_named():
    refused = 0
    for combo in all_combinations():
        conflicts = expected_conflicts(combo)
        cfg = make_config(combo)
        if not conflicts:
            cfg.validate()
            continue
        refused += 1
        with pytest.raises(ConfigError) as err:
            cfg.validate()
        assert any(all(flag in str(err.value) for flag in pair) for pair in conflicts), (combo, str(err.value))
        assert "\n" not in str(err.value)
    assert 0 < refused < len(all_combinations())


VALID = [c for c in all_combinations() if not expected_conflicts(c)]
COVER = pairwise_cover(VALID)


def _id(combo: dict) -> str:
    smart = "nosmart" if combo["smart"] is None else f"smartT{combo['smart']}"
    return "-".join([smart, f"breg{combo['bregman']}", "pcgrad" if combo["pcgrad"] else "nopcg", combo["sampling"],
                     combo["mode"], "noshared" if combo["shared"] is False else "shared", combo["precision"]])


def test_the_cover_is_small_and_complete():
    assert len(COVER) <= 24
    values = {k: {repr(c[k]) for c in COVER} for k in FACTORS}
    assert all(values[k] == {repr(v) for v in FACTORS[k]} for k in FACTORS)


@pytest.mark.parametrize("combo", COVER, ids=_id)
def test_combination_trains_and_saves_a_loadable_set(combo, tiny_backbone, small_data, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(combo, out=str(out), backbone=str(tiny_backbone), data_dir=str(small_data), epochs=1,
                      steps_per_epoch=2, batch_size=4, checkpoint_every=0, max_eval_examples=8)
    summary = train(cfg, progress=False)
    assert summary["overall"] is not None
    base = load_base(str(tiny_backbone))
    name = base.load(out)
    assert len(base.predict("sst", ["a fine film"], name)) == 1
    assert "score" in base.predict("sts", [("a man plays", "a man sings")], name)[0]


@pytest.mark.parametrize("flags, named", [
    (["--tasks", "sst,qqp", "--pcgrad"], ["--pcgrad", "--sampling"]),
    (["--tasks", "sst,qqp", "--mode", "heads", "--no-shared"], ["--no-shared", "--mode"]),
    (["--tasks", "sst", "--mode", "heads", "--simcse-epochs", "1"], ["--simcse-epochs", "--mode"]),
    (["--tasks", "sst", "--mode", "full", "--quantize", "nf4"], ["--quantize", "--mode"]),
])
def test_refusals_are_one_error_line_before_any_work(flags, named, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peft-mtl: error:") and all(f in err[0] for f in named), err
    assert not out.exists()
