"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import signal

from peft_mtl.data.loading import collate, encode_texts
from peft_mtl.data.tasks import get_task
from peft_mtl.model.backbone import load_tokenizer
from peft_mtl.training.config import TrainConfig
from peft_mtl.training.optimization import TrainingStep


def tiny_config(tiny_backbone, small_data, out, **overrides) -> TrainConfig:
    """A fast run on the tiny backbone and the small data slice, fields overridden by keyword."""
    cfg = TrainConfig(tasks=["sst"], out=str(out), backbone=str(tiny_backbone), data_dir=str(small_data), epochs=2,
                      batch_size=8, lr=5e-3, precision="fp32", checkpoint_every=0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def batch(tiny_backbone, task="sst", n=4):
    """A collated batch of ``n`` short inputs of ``task`` with label 1."""
    tok = load_tokenizer(tiny_backbone)
    inputs = [("a fine film", "a good movie")] * n if get_task(task).is_pair else ["a fine film", "dull and long", "ok", "wow"][:n]
    enc = encode_texts(get_task(task), inputs, tok)
    enc.labels[:] = 1
    return collate(enc, list(range(n)))


def interrupt_after(monkeypatch, steps: int) -> None:
    """SIGTERM to ourselves after ``steps`` optimiser steps: the loop checkpoints and returns."""
    real = TrainingStep.__call__
    count = {"n": 0}

    def counting(self, batches):
        loss = real(self, batches)
        count["n"] += 1
        if count["n"] == steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(TrainingStep, "__call__", counting)
