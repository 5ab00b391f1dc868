"""Shared fixtures: a tiny random BERT saved like a real checkpoint, and small slices of the real data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# The tiny test models are too small to gain from two threads, and two test processes (or a
# test beside a training run) fighting over two cores makes every small op spin: one thread
# each keeps the suite fast. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CPU suite stays on the CPU on a machine with a GPU: `--device auto` resolves to it
# (peft_mtl.device.resolve_device). tests/test_cuda.py asks for "cuda" by name.
os.environ.setdefault("PEFT_MTL_DEVICE", "cpu")
# Graphs built by tests (--int8, the multi-adapter graph) go to a cache of this run, not ~/.cache.
import tempfile  # noqa: E402

os.environ.setdefault("PEFT_MTL_CACHE", tempfile.mkdtemp(prefix="peft_mtl_test_cache_"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_FILES = ["ids-sst-train.csv", "ids-sst-dev.csv", "quora-train.csv", "quora-dev.csv", "sts-train.csv", "sts-dev.csv"]


def real_data_dir() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


def write_slice(src: Path, dst: Path, rows: int) -> None:
    with src.open(encoding="utf-8") as f:
        lines = [next(f) for _ in range(rows + 1)]
    dst.write_text("".join(lines), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with the real uncased WordPiece tokenizer, saved to disk."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from peft_mtl.model.backbone import resolve_backbone

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    _, default_path = resolve_backbone(None)
    AutoTokenizer.from_pretrained(str(default_path)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_tiny_backbone(tmp_path_factory, tiny_backbone) -> Path:
    """Same shape as tiny_backbone, different weights: adapters must not load across them."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-bert-other")
    BertModel(BertConfig.from_pretrained(tiny_backbone)).save_pretrained(path)
    for f in tiny_backbone.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """The first 48 training and 24 dev rows of every real task file."""
    src = real_data_dir()
    dst = tmp_path_factory.mktemp("data")
    for name in DATA_FILES:
        write_slice(src / name, dst / name, 48 if "train" in name else 24)
    return dst


@pytest.fixture
def tiny_model_factory(tiny_backbone):
    """Build a MultiTaskModel on the tiny backbone for a config, without the training loop."""
    from peft_mtl.model.backbone import load_encoder
    from peft_mtl.training.train import build_model

    def make(cfg):
        torch.manual_seed(cfg.seed)
        encoder = load_encoder(tiny_backbone)
        return build_model(cfg, encoder, encoder.config.hidden_size)

    return make


@pytest.fixture(scope="session")
def sets_root(tiny_backbone, small_data, tmp_path_factory) -> Path:
    """Four sets of different kinds: shared+task multi-task, single task, heads only, full fine-tune."""
    from peft_mtl.training.config import TrainConfig
    from peft_mtl.training.train import train

    root = tmp_path_factory.mktemp("sets")
    common = dict(backbone=str(tiny_backbone), data_dir=str(small_data), epochs=1, steps_per_epoch=3, batch_size=4,
                  lr=5e-2, precision="fp32", checkpoint_every=0, max_eval_examples=8)
    runs = {"multi": dict(tasks=["sst", "qqp", "sts"], seed=1), "single": dict(tasks=["sst"], seed=2),
            "heads": dict(tasks=["sts", "sst"], mode="heads", seed=3), "full": dict(tasks=["sst"], mode="full", seed=4)}
    for name, extra in runs.items():
        train(TrainConfig(out=str(root / name), **common, **extra), progress=False)
    return root


@pytest.fixture(scope="session")
def base(tiny_backbone, sets_root):
    """The four sets of ``sets_root`` on one fp32 host, loaded under their folder names."""
    from peft_mtl import load_base

    b = load_base(str(tiny_backbone), precision="fp32")
    for name in ("multi", "single", "heads", "full"):
        b.load(sets_root / name, name=name)
    return b
