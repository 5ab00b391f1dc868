"""Smoke tests with the real default backbone on small slices of the real data."""

from __future__ import annotations

import json

import pytest

from peft_mtl import load_base
from peft_mtl.cli import main
from peft_mtl.model.saved_sets import MANIFEST

pytestmark = pytest.mark.slow


def test_default_backbone_trains_saves_loads_and_predicts(small_data, tmp_path, capsys):
    out = tmp_path / "sst"
    code = main(["train", "--tasks", "sst", "--out", str(out), "--data-dir", str(small_data), "--epochs", "1",
                 "--max-train-examples", "64", "--batch-size", "16", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["trainable_parameters"] > 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["backbone"]["name"] == "all-MiniLM-L6-v2" and manifest["backbone"]["num_layers"] == 6
    base = load_base()
    base.load(out, name="sst")
    preds = base.predict("sst", ["a gorgeous film", "a dreadful film"])
    assert all(0 <= p["label"] <= 4 for p in preds)
    main(["eval", str(out), "--data-dir", str(small_data), "--no-progress"])
    assert json.loads(capsys.readouterr().out)["sst"]["accuracy"] == pytest.approx(
        manifest["metrics"]["dev"]["sst"]["accuracy"], abs=0.05)


def test_default_backbone_mean_pooled_embeddings_know_similarity():
    """The frozen default backbone alone already separates paraphrases from unrelated sentences."""
    import torch

    from peft_mtl.data.loading import collate, encode_texts
    from peft_mtl.model.heads import pool
    from peft_mtl.data.tasks import get_task

    base = load_base(precision="fp32")
    enc = encode_texts(get_task("sst"), ["A man is playing a guitar.", "Someone plays the guitar.",
                                         "The stock market fell sharply."], base.tokenizer)
    batch = collate(enc, [0, 1, 2])
    with torch.no_grad():
        hidden = base.model.encoder(**batch.inputs[0]).last_hidden_state
    emb = torch.nn.functional.normalize(pool(hidden, batch.inputs[0]["attention_mask"], "mean"), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
