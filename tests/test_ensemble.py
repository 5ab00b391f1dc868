"""Ensembles of adapter sets on one backbone: combination rules, batched == sequential, mixed batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peft_mtl import load_base
from peft_mtl.cli import main
from peft_mtl.ensemble import combine, ensemble_predict, member_outputs, predict_mixed
from peft_mtl.train import train

from .test_train import tiny_config


@pytest.fixture(scope="module")
def sets(tiny_backbone, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    train(tiny_config(tiny_backbone, small_data, root / "a", tasks=["sst", "sts"], epochs=1, steps_per_epoch=4),
          progress=False)
    train(tiny_config(tiny_backbone, small_data, root / "b", tasks=["sst", "sts"], epochs=1, steps_per_epoch=4,
                      seed=7), progress=False)
    cfg = tiny_config(tiny_backbone, small_data, root / "c", tasks=["sst"], epochs=1, seed=9)
    cfg.lora.rank, cfg.lora.targets = 4, "qv"
    train(cfg, progress=False)
    return root


def test_mean_vote_median_and_weights():
    logit = lambda p: np.log(np.array(p))  # noqa: E731
    a, b, c = logit([[0.6, 0.4]]), logit([[0.45, 0.55]]), logit([[0.4, 0.6]])
    assert np.allclose(combine("classification", [a, b, c]), [[29 / 60, 31 / 60]])
    assert combine("classification", [a, b, c], method="vote").argmax() == 1
    assert combine("classification", [a, b, c], weights=[5, 1, 1], method="vote").argmax() == 0
    scores = [np.array([1.0]), np.array([2.0]), np.array([4.5])]
    assert combine("regression", scores)[0] == pytest.approx(2.5)
    assert combine("regression", scores, method="median")[0] == pytest.approx(2.0)
    assert combine("regression", scores, weights=[0, 0, 1])[0] == pytest.approx(4.5)
    with pytest.raises(ValueError):
        combine("regression", scores, weights=[1, 1])


def test_batched_pass_equals_sequential_passes(sets, tiny_backbone):
    base = load_base(str(tiny_backbone), precision="fp32")
    names = [base.load(sets / n) for n in ("a", "b", "c")]
    for task, inputs in (("sst", ["good", "a long and dull film", "meh"]), ("sts", [("a b", "a c"), ("x", "y z")])):
        members = names if task == "sst" else names[:2]
        enc = base.encode(task, inputs, members[0])
        seq = member_outputs(base, task, enc, members, batched=False)
        bat = member_outputs(base, task, enc, members, batched=True)
        for s, b in zip(seq, bat):
            np.testing.assert_allclose(s, b, atol=1e-5)
    # Members must differ, or the ensemble test above proves nothing.
    enc = base.encode("sst", ["good"], "a")
    outs = member_outputs(base, "sst", enc, names)
    assert not np.allclose(outs[0], outs[1])


def test_ensemble_predict_and_mixed_task_batch(sets, tiny_backbone):
    base = load_base(str(tiny_backbone), precision="fp32")
    base.load(sets / "a", name="a")
    base.load(sets / "b", name="b")
    preds = ensemble_predict(base, "sst", ["good", "bad"], ["a", "b"])
    assert len(preds) == 2 and abs(sum(preds[0]["probabilities"]) - 1) < 1e-5
    requests = [("sst", "good fun"), ("sts", ("a dog", "a cat")), ("sst", "awful")]
    mixed = predict_mixed(base, requests, adapters="a")
    single = [base.predict(t, [x], "a")[0] for t, x in requests]
    for m, s in zip(mixed, single):
        if "score" in s:
            assert m["score"] == pytest.approx(s["score"], abs=1e-4)
        else:
            assert m["label"] == s["label"] and np.allclose(m["probabilities"], s["probabilities"], atol=1e-4)


def test_ensemble_cli_prints_eval_json(sets, small_data, capsys):
    code = main(["ensemble", str(sets / "a"), str(sets / "b"), str(sets / "c"), "--data-dir", str(small_data),
                 "--no-progress", "--precision", "fp32"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result) == {"sst", "overall"}  # the only task all three share
    assert result["overall"] == result["sst"]["accuracy"], "one task: overall is its primary metric"
    assert captured.err.count("member ") == 3
