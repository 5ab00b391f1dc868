"""Any Hugging Face encoder: tiny random BERT, RoBERTa, DistilBERT, DeBERTa-v2 and ELECTRA models
train two steps on a single-sentence and a sentence-pair task, save, reload and predict."""

from __future__ import annotations

import pytest
import torch

from peft_mtl import load_base
from peft_mtl.model.adapters import lora_targets
from peft_mtl.model.backbone import load_encoder
from peft_mtl.training.config import TrainConfig
from peft_mtl.training.train import train

SMALL = dict(vocab_size=30522, max_position_embeddings=128)


def _config(kind: str):
    import transformers as tf

    if kind == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **SMALL)
    if kind == "roberta":  # one segment embedding, position ids offset by the padding index
        return tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                type_vocab_size=1, pad_token_id=0, vocab_size=30522, max_position_embeddings=160)
    if kind == "distilbert":  # no token types, no pooler, q_lin/k_lin/v_lin/out_lin + ffn.lin1/lin2
        return tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **SMALL)
    if kind == "deberta-v2":  # disentangled attention: query_proj/key_proj/value_proj, no segment embedding
        return tf.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  type_vocab_size=0, relative_attention=True, position_buckets=16,
                                  pos_att_type=["p2c", "c2p"], **SMALL)
    if kind == "electra":
        return tf.ElectraConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, **SMALL)
    raise ValueError(kind)


ARCHITECTURES = ["bert", "roberta", "distilbert", "deberta-v2", "electra"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def backbone(request, tmp_path_factory, tiny_backbone):
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    AutoModel.from_config(_config(request.param)).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tiny_backbone)).save_pretrained(path)  # the uncased WordPiece vocab
    return request.param, path


def test_lora_targets_are_the_blocks_linear_layers_found_by_structure(backbone):
    kind, path = backbone
    encoder = load_encoder(path)
    every = lora_targets(encoder, "all")
    linear = {n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(every) <= linear and len(every) >= 2 * 4  # two blocks, at least q/k/v/out each
    assert not any("pooler" in n or "embeddings" in n for n in every), every
    qv = lora_targets(encoder, "qv")
    assert len(qv) == 4 and set(qv) <= set(every)
    attention = lora_targets(encoder, "attention")
    assert set(qv) <= set(attention) < set(every)
    assert lora_targets(encoder, "all", layers=[1]) == [n for n in every if ".1." in n]


def test_trains_saves_reloads_and_predicts(backbone, small_data, tmp_path):
    kind, path = backbone
    out = tmp_path / "run"
    cfg = TrainConfig(tasks=["sst", "sts"], out=str(out), backbone=str(path), data_dir=str(small_data), epochs=1,
                      steps_per_epoch=2, batch_size=4, lr=5e-3, precision="fp32", checkpoint_every=0,
                      max_eval_examples=8)
    cfg.smart.weight, cfg.smart.epsilon, cfg.smart.sigma = 1.0, 1e-2, 1e-2  # the embedding hook works too
    summary = train(cfg, progress=False)
    assert summary["overall"] is not None
    base = load_base(str(path))
    base.load(out)
    assert len(base.predict("sst", ["a fine film", "dull"])) == 2
    score = base.predict("sts", [("a man plays", "a man sings")])[0]["score"]
    assert 0.0 <= score <= 5.0


@pytest.mark.parametrize("steps", [0, 1])
def test_every_dropout_replays_its_masks_so_smart_is_zero_at_epsilon_zero(backbone, steps):
    """The CPU kernels (fast dropout, paired masks) apply to the architecture or are bypassed
    cleanly: with dropout live, R_s at ε = 0 is exactly 0 either way."""
    from peft_mtl.data.loading import collate, encode_texts
    from peft_mtl.model.multitask import build_model
    from peft_mtl.training.regularizers import Objective
    from peft_mtl.data.tasks import get_task
    from peft_mtl.model.backbone import load_tokenizer

    kind, path = backbone
    cfg = TrainConfig(tasks=["sts"])
    cfg.smart.weight, cfg.smart.steps, cfg.smart.epsilon, cfg.smart.sigma = 1.0, steps, 0.0, 1e-2
    encoder = load_encoder(path)
    model = build_model(cfg, encoder, encoder.config.hidden_size)
    model.train()
    enc = encode_texts(get_task("sts"), [("a man plays", "a man sings")] * 3, load_tokenizer(path))
    terms = Objective(model, cfg, "fp32").terms(model, collate(enc, [0, 1, 2]))
    assert terms["smart"].item() == pytest.approx(0.0, abs=1e-10)
