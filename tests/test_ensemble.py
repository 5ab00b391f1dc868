"""Ensembles of adapter sets on one backbone: combination rules, batched == sequential, mixed batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peft_mtl import load_base
from peft_mtl.cli import main
from peft_mtl.inference.ensemble import combine, ensemble_predict, member_outputs, predict_mixed
from peft_mtl.training.train import train

from .helpers import tiny_config


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
    assert set(result) == {"sst", "sts", "overall"}  # every task some member has
    assert captured.err.count("member ") == 3


def test_each_task_is_served_by_the_members_that_have_it(sets, small_data, tmp_path, capsys):
    """Single-task sets combine into one multi-task ensemble (e.g. one set per task trained alone)."""
    flags = ["--data-dir", str(small_data), "--no-progress", "--precision", "fp32"]
    assert main(["eval", str(sets / "a"), *flags]) == 0
    alone = json.loads(capsys.readouterr().out)
    record = tmp_path / "c_a.ensemble.json"
    assert main(["ensemble", str(sets / "c"), str(sets / "a"), *flags, "--weights", "3,1", "--record", str(record)]) == 0
    together = json.loads(capsys.readouterr().out)
    assert together["sts"] == pytest.approx(alone["sts"], abs=1e-5), "sts: a is its only member, whatever the weights"
    rec = json.loads(record.read_text())
    assert rec["tasks"] == {"sst": [str(sets / "c"), str(sets / "a")], "sts": [str(sets / "a")]}
    assert main(["ensemble", str(sets / "c"), str(sets / "a"), *flags, "--weights", "1,2,3"]) == 2
    assert "3 weights for 2 members" in capsys.readouterr().err


def test_greedy_selection_adds_members_only_while_they_help_and_may_repeat_them():
    from peft_mtl.inference.ensemble import cross_fitted_predictions, greedy_weights
    from peft_mtl.data.tasks import get_task

    sst = get_task("sst")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    onehot = np.eye(5)[labels]
    good = np.log(0.7 * onehot + 0.3 * rng.dirichlet(np.ones(5), 400))  # right on most rows
    noise = np.log(rng.dirichlet(np.ones(5), 400))  # uninformative
    anti = np.log(0.9 * np.eye(5)[(labels + 1) % 5] + 0.1 / 5)  # always wrong
    counts = greedy_weights(sst, labels, [noise, good, anti])
    assert counts[1] >= 1 and counts[2] == 0, counts
    # A member that is right exactly where the first is wrong gets picked; equal weights would not beat it alone.
    half = (np.arange(400) < 200)[:, None]
    sure = np.log(0.9 * onehot + 0.02)  # right, confidently
    unsure_wrong = np.log(0.4 * np.eye(5)[(labels + 1) % 5] + 0.3 * onehot + 0.06)  # wrong, barely
    left, right = np.where(half, sure, unsure_wrong), np.where(half, unsure_wrong, sure)
    assert np.mean(left.argmax(1) == labels) == 0.5
    assert greedy_weights(sst, labels, [left, right]) == [1, 1]  # together: right everywhere
    predictions, folds = cross_fitted_predictions(sst, labels, [noise, good, anti])
    assert len(folds) == 2 and all(f[2] == 0 for f in folds)
    assert predictions.shape == (400,) and np.mean(predictions == labels) > 0.6


def test_sorted_initialisation_starts_from_the_best_members_alone():
    from peft_mtl.inference.ensemble import greedy_weights
    from peft_mtl.data.tasks import get_task

    sst = get_task("sst")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 300)
    onehot = np.eye(5)[labels]
    members = [np.log(q * onehot + (1 - q) * rng.dirichlet(np.ones(5), 300)) for q in (0.1, 0.5, 0.3, 0.05)]
    counts = greedy_weights(sst, labels, members, init_best=2)
    assert counts[1] >= 1 and counts[2] >= 1, "the two best alone are in from the start"
    assert greedy_weights(sst, labels, members, init_best=4)[0] >= 1


def test_bagged_selection_spreads_weight_over_equally_good_members_and_still_drops_bad_ones():
    """Caruana's bagging: plain greedy leans on the few members that happen to fit the split best;
    averaging selections over random halves of the members spreads the weight, and a member
    that is always wrong still gets none."""
    from peft_mtl.inference.ensemble import bagged_greedy_weights, cross_fitted_predictions, greedy_weights
    from peft_mtl.data.tasks import get_task

    sst = get_task("sst")
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 400)
    onehot = np.eye(5)[labels]
    good = [np.log(0.35 * onehot + 0.65 * rng.dirichlet(np.ones(5), 400)) for _ in range(8)]  # same skill, own noise
    anti = np.log(0.9 * np.eye(5)[(labels + 1) % 5] + 0.02)
    members = good + [anti]
    plain = np.asarray(greedy_weights(sst, labels, members), dtype=float)
    bagged = np.asarray(bagged_greedy_weights(sst, labels, members))
    assert bagged[-1] == 0 and plain[-1] == 0
    assert bagged.sum() == pytest.approx(1.0)
    assert np.count_nonzero(bagged[:-1]) > np.count_nonzero(plain[:-1])
    assert bagged.max() / bagged.sum() < plain.max() / plain.sum()
    predictions, folds = cross_fitted_predictions(sst, labels, members, select="bagged")
    assert all(f[-1] == 0 for f in folds) and np.mean(predictions == labels) > np.mean(good[0].argmax(1) == labels)


def test_cli_greedy_ensemble_records_its_per_task_selection(sets, small_data, tmp_path, capsys):
    record = tmp_path / "g.ensemble.json"
    members = [str(sets / "a"), str(sets / "b"), str(sets / "c")]  # c has only sst
    main(["ensemble", *members, "--data-dir", str(small_data), "--select", "greedy",
          "--no-progress", "--precision", "fp32", "--record", str(record)])
    result = json.loads(capsys.readouterr().out)
    rec = json.loads(record.read_text())
    assert set(result) == {"sst", "sts", "overall", "selection"}, "greedy: every task some member has"
    assert set(rec["selection"]["tasks"]["sts"]["weights"]) == set(members[:2])
    assert set(rec["selection"]["tasks"]["sst"]["weights"]) == set(members)
    for task, chosen in rec["selection"]["tasks"].items():
        assert sum(chosen["weights"].values()) >= 1 and set(chosen["cross_fitted"]) == set(result[task])
    used = {f for t in rec["selection"]["tasks"].values() for f, w in t["weights"].items() if w}
    assert set(rec["members"]) == used
    assert main(["ensemble", *members, "--select", "greedy", "--weights", "1,2"]) == 2
    assert "--weights conflicts with --select greedy" in capsys.readouterr().err
    bagged = tmp_path / "b.ensemble.json"
    assert main(["ensemble", *members, "--data-dir", str(small_data), "--select", "bagged", "--no-progress",
                 "--precision", "fp32", "--record", str(bagged)]) == 0
    capsys.readouterr()
    rec = json.loads(bagged.read_text())
    assert rec["selection"]["method"].startswith("bagged greedy selection")
    for chosen in rec["selection"]["tasks"].values():
        assert sum(chosen["weights"].values()) == pytest.approx(1.0, abs=1e-4)


def test_output_cache_reuses_member_outputs_exactly_and_misses_when_anything_changes(sets, tiny_backbone, small_data,
                                                                                      tmp_path, capsys, monkeypatch):
    """A second ensemble over the same members runs no forward pass and prints the same scores;
    a changed set file or different inputs are a miss, never a stale answer."""
    import shutil

    from peft_mtl.inference.adapter_host import AdapterHost
    from peft_mtl.inference.output_cache import OutputCache

    cache_dir = tmp_path / "cache"
    flags = ["--data-dir", str(small_data), "--no-progress", "--precision", "fp32", "--cache-dir", str(cache_dir)]
    assert main(["ensemble", str(sets / "a"), str(sets / "b"), str(sets / "c"), *flags]) == 0
    first = capsys.readouterr()
    assert "0 member outputs reused, 5 computed" in first.err  # a, b: sst + sts; c: sst
    assert len(list(cache_dir.glob("*.npy"))) == 5

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("a cached member was run again")

    with monkeypatch.context() as patched:
        patched.setattr(AdapterHost, "outputs", no_forward_pass)
        assert main(["ensemble", str(sets / "a"), str(sets / "b"), "--select", "greedy", *flags]) == 0
        greedy = capsys.readouterr()
        assert main(["ensemble", str(sets / "a"), str(sets / "b"), str(sets / "c"), *flags]) == 0
        again = capsys.readouterr()
    assert "4 member outputs reused, 0 computed" in greedy.err
    assert json.loads(again.out) == json.loads(first.out)

    # Retrained weights under the same folder name: a new key, computed afresh.
    changed = tmp_path / "b_changed"
    shutil.copytree(sets / "b", changed)
    cache = OutputCache(cache_dir)
    base = load_base(str(tiny_backbone), precision="fp32")
    name = base.load(changed, name="bc")
    enc = base.encode("sst", ["good", "bad"], name)
    key = cache.key(base, name, "sst", enc)
    weights = changed / "sst" / "head.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert OutputCache(cache_dir).key(base, name, "sst", enc) != key
    assert cache.key(base, name, "sst", base.encode("sst", ["good", "worse"], name)) != key

