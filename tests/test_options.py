"""Every multi-task option changes what training does (none is a silent no-op)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from peft_mtl.model.backbone import load_tokenizer
from peft_mtl.training.config import TrainConfig
from peft_mtl.data.losses import get_loss
from peft_mtl.data.loading import BatchStream
from peft_mtl.training.optimization import build_optimizer
from peft_mtl.training.regularizers import Objective
from peft_mtl.training.simcse import run_simcse
from peft_mtl.training.train import load_task_data

from .helpers import batch


def test_no_shared_gives_independent_adapters(tiny_model_factory):
    shared = tiny_model_factory(TrainConfig(tasks=["sst", "qqp"]))
    independent = tiny_model_factory(TrainConfig(tasks=["sst", "qqp"], shared_adapter=False))
    assert set(shared.encoder.peft_config) == {"shared", "sst", "qqp"}
    assert set(independent.encoder.peft_config) == {"sst", "qqp"}
    assert independent.routing == {"sst": ["sst"], "qqp": ["qqp"]}


@pytest.mark.parametrize("name", ["dual", "ordinal", "cross_entropy"])
def test_task_loss_option_is_the_loss_training_uses(tiny_model_factory, tiny_backbone, name):
    model = tiny_model_factory(TrainConfig(tasks=["sst"]))
    model.eval()
    b = batch(tiny_backbone)
    cfg = TrainConfig(tasks=["sst"], task_losses={"sst": name})
    with torch.no_grad():
        got = Objective(model, cfg, "fp32")(model, b).item()
        expected = get_loss(name)(model("sst", b.inputs), b.labels, alpha=cfg.ordinal_alpha).item()
    assert got == pytest.approx(expected, rel=1e-5)


def _streams(cfg, tiny_backbone, small_data):
    train, _, sizes = load_task_data(cfg, load_tokenizer(tiny_backbone), Path(small_data))
    return {t: BatchStream(train[t], 4, 0, i, 0) for i, t in enumerate(cfg.tasks)}, sizes, train


def test_simcse_trains_only_the_shared_adapter(tiny_model_factory, tiny_backbone, small_data):
    cfg = TrainConfig(tasks=["sst", "qqp"], simcse_epochs=1, batch_size=8, lr=1e-2)
    model = tiny_model_factory(cfg)
    _, _, train = _streams(cfg, tiny_backbone, small_data)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    losses = run_simcse(model, cfg, train, "fp32", 0, progress=False)
    assert losses and all(np.isfinite(losses))
    moved = {n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, before[n])}
    assert moved and all(".shared." in n for n in moved)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n), "all adapters trainable again"


def test_bi_encoding_uses_two_passes_and_a_cosine_sts_head(tiny_model_factory, tiny_backbone):
    cfg = TrainConfig(tasks=["sts", "qqp"], pair_encoding="bi")
    model = tiny_model_factory(cfg)
    assert model.heads["sts"].cosine and model.heads["sts"].linear is None
    assert model.heads["qqp"].linear.in_features == 3 * 32
    from peft_mtl.data.loading import collate, encode_texts
    from peft_mtl.data.tasks import get_task

    enc = encode_texts(get_task("sts"), [("a man plays", "a man plays"), ("a cat", "stock prices fell")],
                       load_tokenizer(tiny_backbone), pair_encoding="bi")
    b = collate(enc, [0, 1])
    model.eval()
    with torch.no_grad():
        scores = model("sts", b.inputs)
    assert scores[0].item() == pytest.approx(5.0, abs=1e-4), "identical sentences have cosine 1 -> score 5"
    assert scores[1].item() < 5.0


def test_extra_train_rows_do_not_change_sampler_sizes(tiny_backbone, small_data, tmp_path):
    extra = tmp_path / "extra.csv"
    extra.write_text("\tid\tsentence\tsentiment\n0\ta\tnew paraphrased review\t4\n1\tb\tanother one\t0\n")
    cfg = TrainConfig(tasks=["sst"], extra_train={"sst": str(extra)})
    train, _, sizes = load_task_data(cfg, load_tokenizer(tiny_backbone), Path(small_data))
    plain, _, plain_sizes = load_task_data(TrainConfig(tasks=["sst"]), load_tokenizer(tiny_backbone), Path(small_data))
    assert sizes == plain_sizes == {"sst": 48}
    assert len(train["sst"]) == len(plain["sst"]) + 2


def test_lora_variants_reach_peft(tiny_model_factory):
    cfg = TrainConfig(tasks=["sst"])
    cfg.lora.use_rslora, cfg.lora.rank, cfg.lora.targets = True, 4, "qv"
    model = tiny_model_factory(cfg)
    pc = model.encoder.peft_config["sst"]
    assert pc.use_rslora and pc.r == 4
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"query", "value"}
    cfg = TrainConfig(tasks=["sst"], lora_plus_ratio=16.0)
    model = tiny_model_factory(cfg)
    opt = build_optimizer(cfg, model)
    assert sorted({g["lr"] for g in opt.param_groups}) == [cfg.lr, cfg.lr * 16]
    cfg = TrainConfig(tasks=["sst"])
    cfg.lora.use_dora = True
    assert any("lora_magnitude" in n for n, _ in tiny_model_factory(cfg).named_parameters())


def test_row_limits_take_a_seeded_sample_not_a_sorted_prefix():
    """Task files are often ordered by label (SST's are): a prefix would be one-sided."""
    from peft_mtl.training.train import sample_rows

    rows = [("pos", i) for i in range(800)] + [("neg", i) for i in range(800)]
    picked = sample_rows(rows, 200, 0, "sst", "train")
    assert len(picked) == 200 and picked == sorted(picked, key=rows.index), "file order is kept"
    assert 60 < sum(r[0] == "neg" for r in picked) < 140
    assert picked == sample_rows(rows, 200, 0, "sst", "train") != sample_rows(rows, 200, 1, "sst", "train")
    assert sample_rows(rows, 5000, 0, "sst", "train") is rows
