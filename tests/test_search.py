"""`peft-mtl search` on Optuna with the real components: TPE trials of the tiny model, a trial
pruned from the training loop, a study resumed from its SQLite storage, two worker processes
sharing one study, the report and its plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from peft_mtl.experiments.search import load_space, open_study, run_trials, write_report  # noqa: E402
from peft_mtl.training.config import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def learnable(small_data, tmp_path_factory) -> Path:
    """SST whose dev split is its training slice: a working learning rate raises dev accuracy within
    a few steps even on a tiny random model, a near-zero one leaves it at the class prior."""
    import shutil

    root = tmp_path_factory.mktemp("learnable")
    for f in small_data.iterdir():
        shutil.copy(f, root / f.name)
    shutil.copy(small_data / "ids-sst-train.csv", root / "ids-sst-dev.csv")
    return root


def space_file(tmp_path: Path, tiny_backbone: Path, small_data: Path, enqueue: str = "", pruner: str = "median") -> Path:
    path = tmp_path / "tiny_space.yaml"
    path.write_text(f"""
base: --tasks sst --backbone {tiny_backbone} --data-dir {small_data} --epochs 3 --steps-per-epoch 16 --batch-size 8 --precision fp32 --checkpoint-every 0
seed: 0
space:
  --lr: {{low: 1.0e-6, high: 1.0e-1, log: true}}
  --lora-rank: [2, 4]
pruner: {{type: {pruner}, startup_trials: 3, warmup_epochs: 0}}
{enqueue}""")
    return path


GOOD_THEN_BAD = """enqueue:
  - {--lr: 0.05, --lora-rank: 4}
  - {--lr: 0.05, --lora-rank: 4}
  - {--lr: 0.05, --lora-rank: 4}
  - {--lr: 1.0e-6, --lora-rank: 2}
"""


def states(study) -> list[str]:
    return [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]


def test_a_trial_worse_than_the_median_at_an_epoch_is_pruned_from_the_loop(tmp_path, tiny_backbone, learnable):
    space = load_space(space_file(tmp_path, tiny_backbone, learnable, GOOD_THEN_BAD))
    out, storage = tmp_path / "s", f"sqlite:///{tmp_path / 's.db'}"
    run_trials(space, out, 4, storage)
    study = open_study(space, storage)
    assert states(study) == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    pruned = study.trials[3]
    assert pruned.params == {"lr": 1e-6, "lora-rank": 2}
    assert len(pruned.intermediate_values) < 3, "stopped before its last epoch"
    last = max(pruned.intermediate_values)
    assert pruned.intermediate_values[last] < study.trials[0].intermediate_values[last], "behind the median there"
    assert not (out / "trials" / "0003").exists(), "a pruned trial's weights are not kept"
    assert (out / "trials" / "0000" / "peft_mtl.json").is_file()
    record = write_report(space, out, storage, "peft-mtl search ...")
    assert record["states"] == {"complete": 3, "pruned": 1}
    text = (out / "search.md").read_text()
    assert f"Pruned (stopped after the epochs shown): trial 3 ({last} epoch(s)" in text
    assert "peft-mtl train --tasks sst" in record["best"]["command"] and "--lr 0.05" in record["best"]["command"]
    assert (out / "search_history.png").is_file()


def test_an_interrupted_search_resumes_from_its_storage(tmp_path, tiny_backbone, small_data):
    space = load_space(space_file(tmp_path, tiny_backbone, small_data, pruner="none"))
    out, storage = tmp_path / "s", f"sqlite:///{tmp_path / 's.db'}"
    run_trials(space, out, 2, storage)  # "interrupted" after two trials
    first = {p: (out / "trials" / p / "peft_mtl.json").stat().st_mtime_ns for p in ("0000", "0001")}
    run_trials(space, out, 4, storage)
    study = open_study(space, storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3] and set(states(study)) == {"COMPLETE"}
    assert {p: (out / "trials" / p / "peft_mtl.json").stat().st_mtime_ns for p in first} == first, \
        "the finished trials were not run again"
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4, "TPE proposed four different points"


def test_two_worker_processes_share_one_study_without_running_a_trial_twice(tmp_path, tiny_backbone, small_data):
    path = space_file(tmp_path, tiny_backbone, small_data, pruner="none")
    out = tmp_path / "s"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "peft_mtl", "search", str(path), "--out", str(out), "--trials", "4",
                             "--workers", "2"], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    study = open_study(load_space(path), f"sqlite:///{out / 'study.db'}")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert set(states(study)) == {"COMPLETE"}
    started = {}
    for k in (0, 1):
        for line in (out / "logs" / f"worker{k}.log").read_text().splitlines():
            if "search: trial " in line:
                started.setdefault(int(line.split("search: trial ")[1].split(":")[0]), []).append(k)
    assert sorted(started) == [0, 1, 2, 3] and all(len(w) == 1 for w in started.values()), started
    assert set(w for ws in started.values() for w in ws) == {0, 1}, "both workers ran trials"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["trials"] == {"complete": 4}


def test_space_files_are_checked_before_any_trial(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  --lr: {low: 1, high: 0.1}\n")
    with pytest.raises(ConfigError, match="need low < high"):
        load_space(bad)
    bad.write_text("base: --tasks sst\nspace:\n  --lora-rnak: [2, 4]\n")
    with pytest.raises(ConfigError, match="is not a valid run"):
        load_space(bad)
    bad.write_text("space:\n  --out: [a, b]\n")
    with pytest.raises(ConfigError, match="set by the search itself"):
        load_space(bad)


def test_search_flags_out_of_range_are_one_line_errors(tmp_path, tiny_backbone, small_data, capsys):
    from peft_mtl.cli import main

    path = space_file(tmp_path, tiny_backbone, small_data, pruner="none")
    assert main(["search", str(path), "--out", str(tmp_path / "s"), "--trials", "0"]) == 2
    assert "--trials and --workers must be at least 1" in capsys.readouterr().err
