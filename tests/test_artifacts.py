"""Atomic writes: a crash while saving never leaves a half-written folder that looks complete."""

from __future__ import annotations

import json

import pytest

from peft_mtl import artifacts
from peft_mtl.artifacts import atomic_folder, write_json_atomic
from peft_mtl.training.train import TrainingError
from peft_mtl.model.saved_sets import MANIFEST, read_manifest
from peft_mtl.training.train import train

from .helpers import tiny_config


def test_failed_block_leaves_no_folder_and_keeps_the_old_one(tmp_path):
    final = tmp_path / "run"
    with atomic_folder(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(final, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new, half")
            raise RuntimeError("crash mid-save")
    assert (final / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run"], "no temporary folder may be left behind"


def test_json_write_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"v": 1})

    def explode(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.json, "dump", explode)
    with pytest.raises(OSError):
        write_json_atomic(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_crash_while_saving_a_run_leaves_no_complete_looking_folder(tiny_backbone, small_data, tmp_path, monkeypatch):
    from peft_mtl.model import saved_sets as runs

    real = runs.save_tensors_atomic
    calls = {"n": 0}

    def crash_on_head(tensors, path, metadata=None):
        calls["n"] += 1
        raise OSError("simulated crash while writing the head")

    monkeypatch.setattr(runs, "save_tensors_atomic", crash_on_head)
    out = tmp_path / "run"
    # An I/O error while saving is one user-facing line (reports what is kept), not a traceback.
    with pytest.raises(TrainingError, match="simulated crash"):
        train(tiny_config(tiny_backbone, small_data, out, epochs=1), progress=False)
    assert calls["n"] == 1
    assert not (out / MANIFEST).exists() and not (out / "adapter_model.safetensors").exists()
    with pytest.raises(Exception, match="not a peft_mtl adapter folder"):
        read_manifest(out)
    monkeypatch.setattr(runs, "save_tensors_atomic", real)
