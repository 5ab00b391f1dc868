"""Quantized backbones (bitsandbytes, CPU): LoRA trains on top, across dev evaluations."""

from __future__ import annotations

import json

import pytest

from peft_mtl.model.saved_sets import MANIFEST
from peft_mtl.training.train import train

from .helpers import tiny_config

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_lora_trains_on_a_quantized_backbone_across_dev_evaluations(quantize, tiny_backbone, small_data, tmp_path):
    # Two epochs: the first dev evaluation runs the layers without gradients, which (for nf4)
    # makes bitsandbytes repack the weights for inference; the second epoch must still train.
    cfg = tiny_config(tiny_backbone, small_data, tmp_path / quantize, epochs=2, steps_per_epoch=2, quantize=quantize)
    summary = train(cfg, progress=False)
    manifest = json.loads((tmp_path / quantize / MANIFEST).read_text())
    assert len(manifest["history"]) == 2
    assert manifest["config"]["quantize"] == quantize
    assert summary["best_epoch"] in (1, 2)
