"""--keep-best per-task: every task is saved as it was at its own best dev epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peft_mtl import load_base
from peft_mtl.inference.evaluate import raw_outputs
from peft_mtl.training import train as train_module
from peft_mtl.training.config import ConfigError
from peft_mtl.training.train import train

from .helpers import tiny_config

# Scripted dev scores: SST peaks in epoch 1, STS in epoch 3, the overall score in epoch 2.
SCRIPT = {1: {"sst": 0.60, "sts": 0.10}, 2: {"sst": 0.50, "sts": 0.50}, 3: {"sst": 0.20, "sts": 0.55}}


class ScriptedRuns:
    """sst + sts runs of 3 short epochs whose dev scores follow SCRIPT; each epoch's real outputs are kept."""

    def __init__(self, tiny_backbone, small_data, root, monkeypatch):
        self.tiny_backbone, self.small_data, self.root = tiny_backbone, small_data, root
        self.outputs: dict[int, dict[str, np.ndarray]] = {}
        self.splits: dict = {}
        self.epoch = 0
        monkeypatch.setattr(train_module, "evaluate_sharded", self.evaluate)

    def evaluate(self, model, splits, batch_size, precision, progress, pad_id, dist):
        self.epoch += 1
        self.splits.update(splits)
        self.outputs[self.epoch] = {t: raw_outputs(model, s, 64, "fp32", False, pad_id) for t, s in splits.items()}
        return {"sst": {"accuracy": SCRIPT[self.epoch]["sst"]}, "sts": {"pearson": SCRIPT[self.epoch]["sts"]}}

    def train(self, name: str, keep_best: str, resume: bool = False, mode: str = "lora") -> dict:
        if not resume:
            self.epoch = 0
        cfg = tiny_config(self.tiny_backbone, self.small_data, self.root / name, tasks=["sst", "sts"], epochs=3,
                          steps_per_epoch=3, keep_best=keep_best, patience=5, mode=mode)
        return train(cfg, resume=resume, progress=False)

    def manifest(self, name: str) -> dict:
        return json.loads((self.root / name / "peft_mtl.json").read_text())

    def saved_outputs(self, name: str) -> dict[str, np.ndarray]:
        base = load_base(str(self.tiny_backbone), precision="fp32")
        set_name = base.load(self.root / name)
        return {t: base.outputs(t, s, set_name) for t, s in self.splits.items()}


@pytest.fixture
def runs(tiny_backbone, small_data, tmp_path, monkeypatch):
    return ScriptedRuns(tiny_backbone, small_data, tmp_path, monkeypatch)


def test_each_task_is_saved_from_its_own_best_epoch(runs):
    summary = runs.train("per_task", "per-task")
    manifest = runs.manifest("per_task")
    assert manifest["metrics"]["best_epoch"] == 2
    assert manifest["metrics"]["task_best_epochs"] == {"sst": 1, "sts": 3}
    assert manifest["metrics"]["dev"] == {"sst": {"accuracy": 0.60}, "sts": {"pearson": 0.55}}
    assert manifest["metrics"]["overall"] == pytest.approx((0.60 + (0.55 + 1) / 2) / 2) == summary["overall"]
    # The shared adapter differs between the two epochs kept: one copy per epoch, each task routed to its own.
    assert manifest["routing"] == {"sst": ["shared_epoch1", "sst"], "sts": ["shared_epoch3", "sts"]}
    assert set(manifest["adapters"]) == {"shared_epoch1", "shared_epoch3", "sst", "sts"}
    saved = runs.saved_outputs("per_task")
    np.testing.assert_allclose(saved["sst"], runs.outputs[1]["sst"], atol=1e-5)
    np.testing.assert_allclose(saved["sts"], runs.outputs[3]["sts"], atol=1e-5)
    assert not np.allclose(runs.outputs[1]["sst"], runs.outputs[2]["sst"], atol=1e-3), "epochs must differ"

    plain_summary = runs.train("overall", "overall")
    plain = runs.manifest("overall")
    assert plain["routing"] == {"sst": ["shared", "sst"], "sts": ["shared", "sts"]}
    assert "task_best_epochs" not in plain["metrics"]
    np.testing.assert_allclose(runs.saved_outputs("overall")["sst"], runs.outputs[2]["sst"], atol=1e-5)
    # The set stores one more shared adapter than the plain one, and says so.
    extra = manifest["parameters"]["trainable"] - plain["parameters"]["trainable"]
    assert extra > 0 and manifest["parameters"]["total"] - plain["parameters"]["total"] == extra
    assert summary["overall"] > plain_summary["overall"]

    # benchmarks/keep_best_from_history.py reads both numbers off either run's history.
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "keep_best_from_history.py"),
                            run_name="not_main")
    record_path = runs.root / "keep_best.json"
    assert script["main"]([str(runs.root / "per_task"), str(runs.root / "overall"), "--json", str(record_path)]) == 0
    record = json.loads(record_path.read_text())
    for name in ("per_task", "overall"):
        entry = record["runs"][str(runs.root / name)]
        assert entry["per_task_kept"]["overall"] == pytest.approx(manifest["metrics"]["overall"])
        assert entry["overall_kept"]["overall"] == pytest.approx(plain["metrics"]["overall"])
    assert record["gain"]["mean"] == pytest.approx(manifest["metrics"]["overall"] - plain["metrics"]["overall"])


def test_a_heads_only_run_keeps_each_head_from_its_own_best_epoch(runs):
    # Regression: a heads-only run (no adapters to route) crashed when saving with --keep-best per-task.
    runs.train("heads", "per-task", mode="heads")
    manifest = runs.manifest("heads")
    assert manifest["mode"] == "heads" and manifest["metrics"]["task_best_epochs"] == {"sst": 1, "sts": 3}
    assert not manifest.get("adapters") and not any(manifest.get("routing", {}).values())
    saved = runs.saved_outputs("heads")
    np.testing.assert_allclose(saved["sst"], runs.outputs[1]["sst"], atol=1e-5)
    np.testing.assert_allclose(saved["sts"], runs.outputs[3]["sts"], atol=1e-5)
    assert not np.allclose(runs.outputs[1]["sst"], runs.outputs[2]["sst"], atol=1e-3), "epochs must differ"


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("first_keep", ["per-task", "overall"])
def test_per_task_keeping_survives_an_interruption(runs, monkeypatch, first_keep):
    """Stopped after epoch 1 and resumed, SST still comes from epoch 1: from its snapshot in the
    checkpoint, or — when the interrupted run kept only its overall best — from that best state."""
    original = train_module.record_epoch

    def stop_after_epoch_one(run, epoch, metrics):
        original(run, epoch, metrics)
        run.save_checkpoint()
        raise Interrupt

    with monkeypatch.context() as patched:
        patched.setattr(train_module, "record_epoch", stop_after_epoch_one)
        with pytest.raises(Interrupt):
            runs.train("resumed", first_keep)
    runs.train("resumed", "per-task", resume=True)
    manifest = runs.manifest("resumed")
    assert manifest["metrics"]["task_best_epochs"] == {"sst": 1, "sts": 3}
    saved = runs.saved_outputs("resumed")
    np.testing.assert_allclose(saved["sst"], runs.outputs[1]["sst"], atol=1e-5)
    np.testing.assert_allclose(saved["sts"], runs.outputs[3]["sts"], atol=1e-5)


def test_full_fine_tuning_refuses_per_task_keeping(tiny_backbone, small_data, tmp_path):
    cfg = tiny_config(tiny_backbone, small_data, tmp_path / "x", tasks=["sst", "sts"], mode="full",
                      keep_best="per-task")
    with pytest.raises(ConfigError, match="--keep-best: per-task needs --mode lora or heads"):
        cfg.validate()
