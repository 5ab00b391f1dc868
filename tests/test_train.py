"""The training loop end to end on the tiny backbone: outputs, resume, interruption, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peft_mtl.training.config import ConfigError, SmartSettings, TrainConfig
from peft_mtl.model.saved_sets import MANIFEST
from peft_mtl.training.train import TrainingError, train

from .conftest import real_data_dir, write_slice
from .helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_single_task_run_writes_exactly_the_documented_files(tiny_backbone, small_data, tmp_path):
    summary = train(tiny_config(tiny_backbone, small_data, tmp_path / "sst"), progress=False)
    files = sorted(p.name for p in (tmp_path / "sst").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "head.safetensors", MANIFEST] or \
        files == ["adapter_config.json", "adapter_model.safetensors", "head.safetensors", MANIFEST]
    manifest = json.loads((tmp_path / "sst" / MANIFEST).read_text())
    assert manifest["tasks"] == ["sst"] and manifest["backbone"]["hidden_size"] == 32
    assert manifest["config"]["lora"]["rank"] == 16
    assert 0 <= manifest["metrics"]["dev"]["sst"]["accuracy"] <= 1
    assert len(manifest["history"]) == 2 and summary["best_epoch"] in (1, 2)


def test_multi_task_run_saves_shared_and_task_adapters_in_peft_format(tiny_backbone, small_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    cfg = tiny_config(tiny_backbone, small_data, tmp_path / "all", tasks=["sst", "qqp", "sts"], epochs=1,
                      steps_per_epoch=6)
    summary = train(cfg, progress=False)
    assert summary["overall"] is not None
    out = tmp_path / "all"
    for name in ("shared", "sst", "qqp", "sts"):
        assert (out / name / "adapter_model.safetensors").is_file()
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone), out / name)
        assert name == "shared" or (out / name / "head.safetensors").is_file()
        del model


def test_training_is_deterministic_for_a_seed(tiny_backbone, small_data, tmp_path):
    a = train(tiny_config(tiny_backbone, small_data, tmp_path / "a", epochs=1), progress=False)
    b = train(tiny_config(tiny_backbone, small_data, tmp_path / "b", epochs=1), progress=False)
    assert a["dev"] == b["dev"]
    ta = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert ta == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()


def test_existing_output_is_never_silently_overwritten(tiny_backbone, small_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="--overwrite"):
        train(tiny_config(tiny_backbone, small_data, out), progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_unwritable_output_fails_before_training(tiny_backbone, small_data, tmp_path):
    if os.geteuid() == 0:
        target = Path("/proc/peft_mtl_cannot_write_here")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    with pytest.raises(TrainingError, match="not writable"):
        train(tiny_config(tiny_backbone, small_data, target), progress=False)


def test_non_finite_loss_stops_with_a_clear_message(tiny_backbone, small_data, tmp_path):
    cfg = tiny_config(tiny_backbone, small_data, tmp_path / "nan", lr=1e30, tasks=["sts"], epochs=2)
    with pytest.raises(TrainingError, match="non-finite loss"):
        train(cfg, progress=False)
    assert not (tmp_path / "nan" / MANIFEST).exists()


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^--sampling: unknown sampler 'random'"):
        TrainConfig(sampling="random").validate()
    with pytest.raises(ConfigError, match="^--bregman-beta: must be in"):
        TrainConfig(smart=SmartSettings(bregman_beta=1.0)).validate()
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ConfigError, match="'epochs'"):
        TrainConfig.from_dict({"epochs": "three"})
    with pytest.raises(ConfigError, match="pcgrad"):
        TrainConfig(tasks=["sst", "qqp"], pcgrad=True).validate()
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def cli(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "peft_mtl", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def longer_data(tmp_path_factory):
    src = real_data_dir()
    dst = tmp_path_factory.mktemp("longer")
    write_slice(src / "ids-sst-train.csv", dst / "ids-sst-train.csv", 240)
    write_slice(src / "ids-sst-dev.csv", dst / "ids-sst-dev.csv", 40)
    return dst


def resumable_args(tiny_backbone, data, out):
    return ["train", "--tasks", "sst", "--out", str(out), "--backbone", str(tiny_backbone), "--data-dir", str(data),
            "--epochs", "2", "--batch-size", "4", "--lr", "5e-3", "--precision", "fp32", "--checkpoint-every", "25",
            "--no-progress"]


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (out / ".checkpoint" / "progress.json").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_backbone, longer_data, tmp_path):
    straight = cli(*resumable_args(tiny_backbone, longer_data, tmp_path / "straight"))
    stdout, stderr = straight.communicate(timeout=300)
    assert straight.returncode == 0, stderr
    expected = json.loads(stdout.strip().splitlines()[-1])

    killed_out = tmp_path / "killed"
    proc = cli(*resumable_args(tiny_backbone, longer_data, killed_out))
    wait_for_checkpoint(killed_out, proc)
    proc.kill()
    proc.wait()
    assert not (killed_out / MANIFEST).exists(), "the run finished before it could be killed"

    resumed = cli(*resumable_args(tiny_backbone, longer_data, killed_out), "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resumed from" in stderr
    got = json.loads(stdout.strip().splitlines()[-1])
    assert got["dev"] == expected["dev"] and got["best_epoch"] == expected["best_epoch"]
    assert (killed_out / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "straight" / "adapter_model.safetensors").read_bytes()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_backbone, longer_data, tmp_path):
    out = tmp_path / "term"
    proc = cli(*resumable_args(tiny_backbone, longer_data, out))
    wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "SIGTERM: checkpoint saved" in stderr and "Traceback" not in stderr
    assert json.loads((out / ".checkpoint" / "progress.json").read_text())["global_step"] >= 25
    assert not (out / MANIFEST).exists()
