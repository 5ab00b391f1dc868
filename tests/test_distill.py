"""Knowledge distillation (--teacher): the student learns the teacher's outputs on its training rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_mtl import load_base
from peft_mtl.data.loading import encode_split, load_split, task_file
from peft_mtl.data.tasks import get_task
from peft_mtl.inference.ensemble import combine
from peft_mtl.training import train as train_module
from peft_mtl.training.config import ConfigError
from peft_mtl.training.distill import Teacher, TeacherError, check_output_is_not_a_member, distillation_loss, load_teacher
from peft_mtl.training.train import train

from .helpers import tiny_config


def test_distillation_loss_is_zero_exactly_when_the_student_matches_the_teacher():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    matching_logits = torch.log(probs) + 3.0  # a shift leaves the softmax unchanged
    for t in (1.0, 2.0, 4.0):
        assert distillation_loss("classification", matching_logits, probs, t).item() == pytest.approx(0, abs=1e-6)
        assert distillation_loss("classification", torch.zeros(2, 3), probs, t).item() > 0.01
    assert distillation_loss("regression", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])).item() == 0
    assert distillation_loss("regression", torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])).item() == 0.5


def test_temperature_softens_the_targets_and_keeps_the_gradient_scale():
    probs = torch.tensor([[0.97, 0.02, 0.01]])
    logits = torch.zeros(1, 3, requires_grad=True)
    grads = {}
    for t in (1.0, 4.0):
        logits.grad = None
        distillation_loss("classification", logits, probs, t).backward()
        grads[t] = logits.grad.clone()
    # Both pull the student toward class 0; T^2 keeps the pulls within a small factor of each other.
    assert grads[1.0][0, 0] < 0 and grads[4.0][0, 0] < 0
    assert 0.2 < (grads[4.0].norm() / grads[1.0].norm()).item() < 5


def _shifted_teacher(raw_train, spec):
    """A teacher that is sure of the *next* class: (gold + 1) mod C on every training row."""
    gold = np.array([int(ex.label) for ex in raw_train["sst"].examples])
    probs = np.full((len(gold), spec.num_labels), 0.02, dtype=np.float32)
    probs[np.arange(len(gold)), (gold + 1) % spec.num_labels] = 1 - 0.02 * (spec.num_labels - 1)
    return Teacher("shifted", {"sst": torch.as_tensor(probs)}, {"sst": 1}), gold


def _train_with_teacher(tiny_backbone, small_data, out, monkeypatch, alpha):
    seen = {}

    def fake_load_teacher(source, raw_train, specs, **_):
        teacher, seen["gold"] = _shifted_teacher(raw_train, specs["sst"])
        return teacher

    monkeypatch.setattr(train_module, "load_teacher", fake_load_teacher)
    record = out.parent / "teacher.ensemble.json"
    record.write_text('{"members": [], "tasks": {}}')  # only has to parse: load_teacher is replaced
    cfg = tiny_config(tiny_backbone, small_data, out, mode="full", lr=1e-3, epochs=1, steps_per_epoch=60,
                      teacher=str(record), distill_weight=alpha, distill_temperature=1.0, head_dropout=0.0,
                      backbone_dropout=0.0)
    train(cfg, progress=False)
    base = load_base(str(tiny_backbone), precision="fp32")
    name = base.load(out)
    split = load_split(task_file(small_data, get_task("sst"), "train"), get_task("sst"))
    encoded = encode_split(split, base.tokenizer)
    predicted = base.outputs("sst", encoded, name).argmax(-1)
    return predicted, seen["gold"]


def test_a_student_with_alpha_1_learns_the_teachers_labels_not_the_gold_ones(tiny_backbone, small_data, tmp_path,
                                                                             monkeypatch):
    predicted, gold = _train_with_teacher(tiny_backbone, small_data, tmp_path / "distilled", monkeypatch, alpha=1.0)
    shifted = (gold + 1) % 5
    assert (predicted == shifted).mean() > 0.8
    assert (predicted == gold).mean() < 0.2
    # The same run on the labels alone (alpha 0) learns the gold labels: the teacher term is what moved it.
    predicted, gold = _train_with_teacher(tiny_backbone, small_data, tmp_path / "labels", monkeypatch, alpha=0.0)
    assert (predicted == gold).mean() > 0.8


@pytest.fixture(scope="module")
def two_sets(tiny_backbone, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for name, seed in (("a", 0), ("b", 1)):
        train(tiny_config(tiny_backbone, small_data, root / name, tasks=["sst", "sts"], epochs=1, steps_per_epoch=3,
                          seed=seed), progress=False)
    return root


def _raw_train(small_data):
    return {t: load_split(task_file(small_data, get_task(t), "train"), get_task(t)) for t in ("sst", "sts")}


def _pair_record(two_sets, tmp_path, **weights):
    """An ensemble record of sets a and b with per-task selected weights ``task=(w_a, w_b)``."""
    a, b = str(two_sets / "a"), str(two_sets / "b")
    record = tmp_path / "pair.ensemble.json"
    record.write_text(json.dumps({
        "members": [a, b], "tasks": {t: [a, b] for t in weights}, "method": "mean", "regression_method": "mean",
        "weights": None,
        "selection": {"tasks": {t: {"weights": {a: wa, b: wb}} for t, (wa, wb) in weights.items()}}}))
    return record


def test_the_teacher_is_the_records_weighted_ensemble_on_the_training_rows_in_order(two_sets, small_data, tiny_backbone,
                                                                                    tmp_path):
    record = _pair_record(two_sets, tmp_path, sst=(0.75, 0.25), sts=(0.0, 1.0))
    raw = _raw_train(small_data)
    specs = {t: get_task(t) for t in raw}
    logs = []
    teacher = load_teacher(record, raw, specs, precision="fp32", cache_dir=tmp_path / "cache", log=logs.append)

    base = load_base(str(tiny_backbone), precision="fp32")
    na, nb = base.load(two_sets / "a"), base.load(two_sets / "b")
    for task, weights in (("sst", [0.75, 0.25]), ("sts", [0.0, 1.0])):
        encoded = encode_split(raw[task], base.tokenizer)
        outs = [base.outputs(task, encoded, n) for n in (na, nb)]
        expected = combine(specs[task].kind, outs, weights)
        np.testing.assert_allclose(teacher.targets[task].numpy(), expected, atol=1e-5)
    assert teacher.members == {"sst": 2, "sts": 1}  # b alone has weight on STS
    # A second student (another seed, a resumed run) reuses the stored outputs.
    logs.clear()
    load_teacher(record, raw, specs, precision="fp32", cache_dir=tmp_path / "cache", log=logs.append)
    assert "3 member outputs from the cache" in logs[0] and "0 computed" in logs[0]


def test_teacher_members_keeps_each_tasks_heaviest_members_renormalised(two_sets, small_data, tmp_path):
    record = _pair_record(two_sets, tmp_path, sst=(0.25, 0.75), sts=(0.6, 0.4))
    raw = _raw_train(small_data)
    specs = {t: get_task(t) for t in raw}
    top1 = load_teacher(record, raw, specs, precision="fp32", cache_dir=tmp_path / "cache", top_members=1,
                        log=lambda _: None)
    alone = {t: load_teacher(two_sets / name, raw, specs, precision="fp32", cache_dir=tmp_path / "cache",
                             log=lambda _: None).targets[t] for t, name in (("sst", "b"), ("sts", "a"))}
    assert top1.members == {"sst": 1, "sts": 1}
    for task in ("sst", "sts"):  # the heaviest member alone, at full weight
        np.testing.assert_allclose(top1.targets[task].numpy(), alone[task].numpy(), atol=1e-6)
    both = load_teacher(record, raw, specs, precision="fp32", cache_dir=tmp_path / "cache", top_members=5,
                        log=lambda _: None)
    assert both.members == {"sst": 2, "sts": 2}  # K above the member count keeps them all
    assert not np.allclose(both.targets["sst"].numpy(), top1.targets["sst"].numpy(), atol=1e-4)


def test_a_set_folder_is_a_teacher_for_all_its_tasks(two_sets, small_data, tmp_path):
    raw = _raw_train(small_data)
    teacher = load_teacher(two_sets / "a", raw, {t: get_task(t) for t in raw}, precision="fp32",
                           cache_dir=tmp_path / "cache", log=lambda m: None)
    assert set(teacher.targets) == {"sst", "sts"}
    assert teacher.targets["sst"].shape == (len(raw["sst"].examples), 5)
    np.testing.assert_allclose(teacher.targets["sst"].sum(-1).numpy(), 1, atol=1e-5)  # probabilities
    assert teacher.targets["sts"].shape == (len(raw["sts"].examples),)


def test_unusable_teachers_fail_with_one_message_naming_the_file(two_sets, small_data, tmp_path, tiny_backbone):
    raw = _raw_train(small_data)
    specs = {t: get_task(t) for t in raw}
    record = tmp_path / "moved.ensemble.json"
    record.write_text(json.dumps({"members": ["gone/set"], "tasks": {"sst": ["gone/set"]}, "weights": None}))
    with pytest.raises(TeacherError, match="moved.ensemble.json: member gone/set not found"):
        load_teacher(record, raw, specs)
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(TeacherError, match="junk.json: not an ensemble record"):
        load_teacher(tmp_path / "junk.json", raw, specs)
    qqp_only = {"qqp": load_split(task_file(small_data, get_task("qqp"), "train"), get_task("qqp"))}
    with pytest.raises(TeacherError, match="covers none of the tasks being trained"):
        load_teacher(two_sets / "a", qqp_only, {"qqp": get_task("qqp")})
    with pytest.raises(ConfigError, match="--teacher: nowhere.json: no such file"):
        tiny_config(tiny_backbone, small_data, tmp_path / "x", teacher="nowhere.json").validate()
    tiny_config(tiny_backbone, small_data, tmp_path / "x", teacher="").validate()  # --teacher "": off
    with pytest.raises(ConfigError, match="--distill-weight"):
        tiny_config(tiny_backbone, small_data, tmp_path / "x", distill_weight=1.5).validate()


def test_a_student_may_not_overwrite_one_of_its_teachers_sets(two_sets, small_data, tiny_backbone, tmp_path):
    record = _pair_record(two_sets, tmp_path, sst=(0.75, 0.25), sts=(0.0, 1.0))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (two_sets / "b").iterdir())
    cfg = tiny_config(tiny_backbone, small_data, two_sets / "b", teacher=str(record), overwrite=True)
    with pytest.raises(TeacherError, match=f"its member {two_sets / 'b'} is this run's --out"):
        train(cfg, progress=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (two_sets / "b").iterdir()) == before
    # Any folder that is not one of the (kept) members may be the output; a set folder teaches as itself.
    check_output_is_not_a_member(record, two_sets / "c", top=1)
    with pytest.raises(TeacherError):
        check_output_is_not_a_member(two_sets / "a", two_sets / "a")
