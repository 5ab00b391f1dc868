"""Model cards: every saved set carries a README.md in the Hugging Face format that parses with
huggingface_hub, holds the set's dev metrics in its model-index, and `peft-mtl card` rewrites it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

REPO = Path(__file__).resolve().parents[1]


def metrics_of(card: ModelCard) -> dict[tuple[str, str], float]:
    return {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results or []}


def test_a_trained_set_has_a_card_that_parses_and_matches_its_manifest(sets_root):
    folder = sets_root / "multi"
    card = ModelCard.load(folder / "README.md")
    manifest = json.loads((folder / "peft_mtl.json").read_text())
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-classification"
    assert card.data.base_model == str(manifest["backbone"]["name"])
    assert {"peft_mtl", "lora", "multi-task", "sst", "qqp", "sts"} <= set(card.data.tags)
    want = {(t, k): round(v, 4) for t, m in manifest["metrics"]["dev"].items() for k, v in m.items()}
    assert metrics_of(card) == want
    for needle in ("## Tasks", "| qqp | classification |", "trainable parameters:", "peft-mtl train --tasks sst,qqp,sts",
                   "base.load(", "PeftModel.from_pretrained", "peft-mtl serve multi", "## Limits"):
        assert needle in card.content, needle


def test_peft_mtl_card_rewrites_a_card_from_the_manifest(sets_root, tmp_path):
    import shutil

    folder = tmp_path / "single"
    shutil.copytree(sets_root / "single", folder)
    (folder / "README.md").unlink()
    result = subprocess.run([sys.executable, "-m", "peft_mtl", "card", str(folder)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["cards"] == [str(folder / "README.md")]
    assert ModelCard.load(folder / "README.md").data.model_name == "single"
    bad = subprocess.run([sys.executable, "-m", "peft_mtl", "card", str(tmp_path)], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "--recursive" in bad.stderr


def test_a_compressed_set_gets_its_own_card(sets_root, tmp_path):
    from peft_mtl.model.compress import compress_set

    compress_set(sets_root / "multi", tmp_path / "small", rank=2)
    card = ModelCard.load(tmp_path / "small" / "README.md")
    assert "compressed from" in card.content and "LoRA rank 2" in card.content


@pytest.mark.parametrize("manifest", sorted(str(p.relative_to(REPO)) for p in (REPO / "adapters").rglob("peft_mtl.json")))
def test_every_shipped_set_has_a_card_that_parses(manifest):
    folder = (REPO / manifest).parent
    card = ModelCard.load(folder / "README.md")
    recorded = json.loads((folder / "peft_mtl.json").read_text()).get("metrics", {}).get("dev") or {}
    assert len(metrics_of(card)) == sum(len(m) for m in recorded.values())
    assert card.data.library_name in ("peft", "transformers")


def test_peft_mtl_card_recursive_writes_every_set_under_a_folder(sets_root, tmp_path, capsys):
    import shutil

    from peft_mtl.cli import main

    for name in ("single", "heads"):
        shutil.copytree(sets_root / name, tmp_path / "runs" / name)
        (tmp_path / "runs" / name / "README.md").unlink()
    assert main(["card", str(tmp_path / "runs"), "--recursive"]) == 0
    assert json.loads(capsys.readouterr().out)["cards"] == [str(tmp_path / "runs" / n / "README.md")
                                                            for n in ("heads", "single")]
    assert ModelCard.load(tmp_path / "runs" / "heads" / "README.md").data.library_name == "peft"
