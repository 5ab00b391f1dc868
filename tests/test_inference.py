"""Loading trained folders into one backbone: predict, swap, unload, and clear errors for bad folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from peft_mtl import load_base
from peft_mtl.model.saved_sets import MANIFEST, AdapterError
from peft_mtl.training.train import train

from .helpers import tiny_config


@pytest.fixture(scope="module")
def trained(tiny_backbone, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    train(tiny_config(tiny_backbone, small_data, root / "sst", epochs=1), progress=False)
    train(tiny_config(tiny_backbone, small_data, root / "multi", tasks=["sst", "sts"], epochs=1, steps_per_epoch=4,
                      seed=3), progress=False)
    return root


def test_save_then_load_gives_identical_predictions(trained, tiny_backbone, small_data):
    from peft_mtl.model.backbone import load_encoder, load_tokenizer
    from peft_mtl.training.config import TrainConfig
    from peft_mtl.data.loading import encode_texts
    from peft_mtl.inference.evaluate import raw_outputs
    from peft_mtl.training.train import build_model
    from peft_mtl.data.tasks import get_task

    sentences = ["a gorgeous , witty film", "dull", "it 's fine i guess"]
    base = load_base(str(tiny_backbone), precision="fp32")
    base.load(trained / "sst", name="sst")
    loaded = base.outputs("sst", base.encode("sst", sentences))

    # Rebuild the trained model by hand from the peft files: same numbers.
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg = TrainConfig(tasks=["sst"], mode="heads")
    model = build_model(cfg, load_encoder(tiny_backbone), 32)
    model.encoder = PeftModel.from_pretrained(model.encoder, trained / "sst")
    model.heads["sst"].load_state_dict(load_file(trained / "sst" / "head.safetensors"))
    enc = encode_texts(get_task("sst"), sentences, load_tokenizer(tiny_backbone))
    by_hand = raw_outputs(model, enc, progress=False)
    assert torch.allclose(torch.tensor(loaded), torch.tensor(by_hand), atol=1e-5)


def test_predict_swap_and_unload(trained, tiny_backbone):
    base = load_base(str(tiny_backbone), precision="fp32")
    base.load(trained / "sst", name="a")
    base.load(trained / "multi", name="b")
    pa = base.predict("sst", ["a fine film"], adapters="a")[0]
    pb = base.predict("sst", ["a fine film"], adapters="b")[0]
    assert set(pa) == {"label", "probabilities"} and abs(sum(pa["probabilities"]) - 1) < 1e-4
    assert pa["probabilities"] != pb["probabilities"], "sets must not share adapters"
    sts = base.predict("sts", [("a man plays", "a man is playing")], adapters="b")[0]
    assert 0.0 <= sts["score"] <= 5.0
    base.use("b")
    assert base.predict("sst", ["a fine film"])[0] == pb
    base.unload("b")
    assert base.predict("sst", ["a fine film"], adapters="a")[0] == pa
    assert "b__sst" not in base.model.encoder.peft_config
    with pytest.raises(ValueError, match="no adapter set named"):
        base.predict("sst", ["x"], adapters="b")
    with pytest.raises(ValueError, match="has no 'qqp' head"):
        base.predict("qqp", [("x", "y")], adapters="a")


def test_backbone_weights_are_untouched_by_loading_and_swapping(trained, tiny_backbone):
    base = load_base(str(tiny_backbone), precision="fp32")
    before = {n: p.clone() for n, p in base.model.encoder.named_parameters()}
    base.load(trained / "sst", name="a")
    base.load(trained / "multi", name="b")
    base.predict("sst", ["x"], adapters="a")
    base.predict("sst", ["x"], adapters="b")
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
             for n, p in base.model.encoder.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_adapter_from_another_backbone_is_refused(trained, other_tiny_backbone):
    base = load_base(str(other_tiny_backbone))
    with pytest.raises(AdapterError, match="trained on backbone"):
        base.load(trained / "sst")


@pytest.mark.parametrize("damage, message", [
    ("truncate_adapter", "corrupted safetensors"),
    ("remove_adapter", "missing"),
    ("remove_manifest", "not a peft_mtl adapter folder"),
    ("newer_format", "newer peft_mtl"),
    ("garbage_manifest", "corrupted manifest"),
    ("truncate_head", "corrupted safetensors"),
])
def test_damaged_folders_give_one_clear_error(trained, tiny_backbone, tmp_path, damage, message):
    folder = tmp_path / "copy"
    shutil.copytree(trained / "sst", folder)
    if damage == "truncate_adapter":
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "remove_adapter":
        (folder / "adapter_model.safetensors").unlink()
    elif damage == "remove_manifest":
        (folder / MANIFEST).unlink()
    elif damage == "newer_format":
        m = json.loads((folder / MANIFEST).read_text())
        m["format_version"] = 99
        (folder / MANIFEST).write_text(json.dumps(m))
    elif damage == "garbage_manifest":
        (folder / MANIFEST).write_text("{not json")
    elif damage == "truncate_head":
        data = (folder / "head.safetensors").read_bytes()
        (folder / "head.safetensors").write_bytes(data[:40])
    base = load_base(str(tiny_backbone))
    with pytest.raises(AdapterError, match=message) as info:
        base.load(folder)
    assert str(folder) in str(info.value)
    assert base.sets == {}


def test_heads_only_set_loads_alone_and_beside_adapter_sets(tiny_backbone, small_data, trained, tmp_path):
    train(tiny_config(tiny_backbone, small_data, tmp_path / "heads", epochs=1, mode="heads"), progress=False)
    alone = load_base(str(tiny_backbone), precision="fp32")
    alone.load(tmp_path / "heads", name="h")
    expected = alone.predict("sst", ["a fine film"])[0]
    mixed = load_base(str(tiny_backbone), precision="fp32")
    mixed.load(trained / "sst", name="a")
    mixed.load(tmp_path / "heads", name="h")
    got = mixed.predict("sst", ["a fine film"], adapters="h")[0]
    assert got["label"] == expected["label"]
    assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5), "no LoRA delta may leak in"


def test_sets_loaded_into_existing_lora_layers_predict_as_when_loaded_alone(trained, tiny_backbone, monkeypatch):
    import peft_mtl.inference.adapter_host as inference

    used = []
    real = inference.load_adapter_into_existing_layers
    monkeypatch.setattr(inference, "load_adapter_into_existing_layers",
                        lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    sentences = ["a gorgeous , witty film", "dull"]
    pairs = [("a dog runs", "a dog is running"), ("x", "y")]
    crowded = load_base(str(tiny_backbone), precision="fp32")
    crowded.load(trained / "sst", name="first")  # wraps the backbone with peft
    crowded.load(trained / "multi", name="multi")  # its adapters go into the existing LoRA layers
    assert used and all(used), "the multi-adapter set should take the direct path"
    alone = load_base(str(tiny_backbone), precision="fp32")
    alone.load(trained / "multi", name="multi")
    assert crowded.predict("sst", sentences, "multi") == alone.predict("sst", sentences, "multi")
    assert crowded.predict("sts", pairs, "multi") == alone.predict("sts", pairs, "multi")
    crowded.unload("multi")
    assert not any(name.startswith("multi__") for name in crowded.model.encoder.peft_config)
    first_alone = load_base(str(tiny_backbone), precision="fp32")
    first_alone.load(trained / "sst", name="first")
    assert crowded.predict("sst", sentences, "first") == first_alone.predict("sst", sentences, "first")
