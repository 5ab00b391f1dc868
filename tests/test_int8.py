"""int8 inference (``load_base(int8=True)``, ``--int8``): each set runs as its own int8 graph
with its adapters merged, answers close to the fp32 PyTorch path, and is built once per set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from peft_mtl import load_base  # noqa: E402
from peft_mtl.cli import main  # noqa: E402
from peft_mtl.training.config import TrainConfig  # noqa: E402
from peft_mtl.inference.ensemble import member_outputs  # noqa: E402
from peft_mtl.training.train import train  # noqa: E402

SENTENCES = ["a fine film", "a long and dull film with nothing in it", "ok", "the best movie of the year"]
PAIRS = [("a man plays", "a man sings"), ("the cat", "stock prices fell sharply today")]


@pytest.fixture(autouse=True)
def int8_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_MTL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "int8"


@pytest.fixture(scope="module")
def sets(tiny_backbone, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8sets")
    common = dict(backbone=str(tiny_backbone), data_dir=str(small_data), epochs=1, steps_per_epoch=3, batch_size=4,
                  lr=5e-2, precision="fp32", checkpoint_every=0, max_eval_examples=8)
    train(TrainConfig(tasks=["sst", "sts"], out=str(root / "multi"), seed=1, **common), progress=False)
    train(TrainConfig(tasks=["sst"], out=str(root / "single"), seed=2, **common), progress=False)
    return root


def test_int8_outputs_follow_each_set_and_stay_close_to_fp32(sets, tiny_backbone, int8_cache):
    fp32 = load_base(str(tiny_backbone), precision="fp32")
    int8 = load_base(str(tiny_backbone), int8=True)
    for b in (fp32, int8):
        b.load(sets / "multi", name="multi")
        b.load(sets / "single", name="single")
    for name, task, inputs in (("multi", "sst", SENTENCES), ("single", "sst", SENTENCES), ("multi", "sts", PAIRS)):
        reference = fp32.outputs(task, fp32.encode(task, inputs, name), name)
        got = int8.outputs(task, int8.encode(task, inputs, name), name)
        assert got.shape == reference.shape
        assert np.abs(got - reference).max() < 0.1 * (1 + np.abs(reference).max()), (name, task)
        assert not np.allclose(got, reference, atol=1e-7), "int8 is a different engine, not the fp32 path"
    # The two sets' sst graphs are different graphs: each carries its own merged adapters.
    multi = int8.outputs("sst", int8.encode("sst", SENTENCES, "multi"), "multi")
    single = int8.outputs("sst", int8.encode("sst", SENTENCES, "single"), "single")
    assert np.abs(multi - single).max() > 1e-3
    assert len(list(int8_cache.glob("*/model.int8.onnx"))) == 3  # multi/sst, multi/sts, single/sst
    predictions = int8.predict("sst", SENTENCES, "multi")
    assert all(p["label"] in range(5) and abs(sum(p["probabilities"]) - 1) < 1e-4 for p in predictions)


def test_int8_graphs_are_built_once_and_rebuilt_when_the_set_changes(sets, tiny_backbone, tmp_path, monkeypatch):
    import peft_mtl.inference.export as export

    folder = tmp_path / "single"
    shutil.copytree(sets / "single", folder)
    base = load_base(str(tiny_backbone), int8=True)
    base.load(folder, name="s")
    first = base.outputs("sst", base.encode("sst", SENTENCES, "s"), "s")

    def no_export(*args, **kwargs):
        raise AssertionError("a cached graph must not be exported again")

    monkeypatch.setattr(export, "export_task", no_export)
    again = load_base(str(tiny_backbone), int8=True)
    again.load(folder, name="s")
    np.testing.assert_array_equal(again.outputs("sst", again.encode("sst", SENTENCES, "s"), "s"), first)
    monkeypatch.undo()
    monkeypatch.setenv("PEFT_MTL_CACHE", str(tmp_path / "cache"))

    # Retrain-in-place (new weights in the same folder): the cache must not answer with the old graph.
    weights = next(folder.rglob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    save_file({k: v * 2 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    changed = load_base(str(tiny_backbone), int8=True)
    changed.load(folder, name="s")
    assert np.abs(changed.outputs("sst", changed.encode("sst", SENTENCES, "s"), "s") - first).max() > 1e-4


def test_unloading_a_set_closes_its_int8_sessions(sets, tiny_backbone):
    base = load_base(str(tiny_backbone), int8=True)
    base.load(sets / "single", name="s")
    base.predict("sst", SENTENCES, "s")
    assert ("s", "sst") in base.int8.sessions
    base.unload("s")
    assert not base.int8.sessions


def test_int8_ensembles_run_one_graph_per_member(sets, tiny_backbone):
    base = load_base(str(tiny_backbone), int8=True)
    base.load(sets / "multi", name="a")
    base.load(sets / "single", name="b")
    enc = base.encode("sst", SENTENCES, "a")
    outs = member_outputs(base, "sst", enc, ["a", "b"], batched=True)  # int8: never the stacked PyTorch pass
    assert sorted(base.int8.sessions) == [("a", "sst"), ("b", "sst")], "one int8 graph per member, no more"
    for name, out in zip(("a", "b"), outs):
        np.testing.assert_array_equal(out, base.outputs("sst", enc, name))
    assert len(base.int8.sessions) == 2, "answering each member again reuses its graph"


def test_cli_predict_and_eval_take_int8(sets, small_data, capsys):
    main(["predict", str(sets / "single"), "--task", "sst", "--int8", "a fine film", "dull"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["input"] for line in lines] == ["a fine film", "dull"]
    main(["eval", str(sets / "multi"), "--data-dir", str(small_data), "--no-progress", "--int8"])
    result = json.loads(capsys.readouterr().out)
    assert {"sst", "sts"} <= set(result) and 0 <= result["sst"]["accuracy"] <= 1


def test_int8_on_a_gpu_is_a_clear_error(tiny_backbone):
    import torch

    if not torch.cuda.is_available():
        from peft_mtl.inference.adapter_host import AdapterHost
        from peft_mtl.model.backbone import backbone_identity, load_encoder, load_tokenizer

        encoder = load_encoder(tiny_backbone).to("meta")
        with pytest.raises(ValueError, match="int8 inference runs on the CPU"):
            AdapterHost(encoder, load_tokenizer(tiny_backbone), backbone_identity("tiny", load_encoder(tiny_backbone)),
                      None, "fp32", int8=True)
    else:
        with pytest.raises(ValueError, match="int8 inference runs on the CPU"):
            load_base(str(tiny_backbone), device="cuda", int8=True)
