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


def run_docs_snippet(page, marker: str, path_in_snippet: str, real_path) -> list:
    """Run the ``<!-- marker -->`` Python snippet of a docs page (at most 10 lines) with peft_mtl, torch,
    peft and transformers unimportable and ``path_in_snippet`` pointing at ``real_path``; returns the
    Python value it prints last."""
    import re
    import subprocess
    import sys

    text = page.read_text(encoding="utf-8")
    (snippet,) = re.findall(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, flags=re.S)
    assert len(snippet.strip().splitlines()) <= 10
    blocker = "import sys\nfor m in ('peft_mtl', 'torch', 'peft', 'transformers'):\n    sys.modules[m] = None\n"
    code = blocker + snippet.replace(f'"{path_in_snippet}"', repr(str(real_path)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return eval(result.stdout.strip().splitlines()[-1])
