"""Tasks declared in a file: formats, labels, metrics, bad input, and mixing with built-in tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from peft_mtl import load_base
from peft_mtl.cli import main
from peft_mtl.training.config import ConfigError, TrainConfig
from peft_mtl.data.loading import DataError, load_split
from peft_mtl.data.metrics import METRICS, overall_score
from peft_mtl.data.tasks import TASKS, TaskFileError, resolve_tasks, spec_from_file
from peft_mtl.training.train import train

WORDS = {"book": "reserve a table for two tonight", "cancel": "cancel my order please",
         "refund": "i want my money back"}


def intent_rows(n: int, offset: int = 0) -> list[dict]:
    labels = sorted(WORDS)
    return [{"utterance": f"{WORDS[labels[(i + offset) % 3]]} {i}", "intent": labels[(i + offset) % 3]}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_file(folder: Path, body: str, name: str = "intent.yaml") -> Path:
    (folder / name).write_text(body, encoding="utf-8")
    return folder / name


@pytest.fixture
def intent(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", intent_rows(30))
    write_jsonl(data / "dev.jsonl", intent_rows(12, 1) + [{"utterance": "what is this", "intent": "complain"}])
    return task_file(tmp_path, "name: intent\ntrain: data/train.jsonl\ndev: data/dev.jsonl\ntext: [utterance]\n"
                               "label: intent\ntype: classification\nmetrics: [accuracy, macro_f1]\n")


def test_labels_are_inferred_sorted_and_unknown_dev_labels_are_counted_skips(intent):
    (spec,) = resolve_tasks([str(intent)])
    assert spec.labels == ("book", "cancel", "refund") and spec.primary_metric == "accuracy"
    dev = load_split(spec.file_for("dev"), spec)
    assert len(dev.examples) == 12 and dev.skipped == [(13, "unknown label 'complain' (classes: book, cancel, refund)")]
    assert {e.label for e in dev.examples} == {0.0, 1.0, 2.0}


def test_mixed_builtin_and_file_tasks_train_evaluate_and_predict_with_label_names(intent, tiny_backbone, small_data,
                                                                                   tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--tasks", f"sts,{intent}", "--out", str(out), "--backbone", str(tiny_backbone),
                 "--data-dir", str(small_data), "--epochs", "1", "--steps-per-epoch", "4", "--batch-size", "4",
                 "--precision", "fp32", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["dev"]) == {"sts", "intent"} and set(summary["dev"]["intent"]) == {"accuracy", "macro_f1"}
    assert set(summary["dev"]["sts"]) == {"pearson", "spearman"}
    expected = np.mean([summary["dev"]["intent"]["accuracy"], (summary["dev"]["sts"]["pearson"] + 1) / 2])
    assert summary["overall"] == pytest.approx(expected)
    # The set describes itself: it loads, evaluates and predicts without the task file.
    intent.unlink()
    TASKS.pop("intent", None)
    base = load_base(str(tiny_backbone))
    base.load(out)
    prediction = base.predict("intent", ["cancel my order please"])[0]
    assert prediction["label"] in WORDS and len(prediction["probabilities"]) == 3
    assert main(["eval", str(out), "--data-dir", str(small_data), "--no-progress"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"sts", "intent", "overall"}
    assert main(["predict", str(out), "--task", "intent", "i want my money back"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in WORDS


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "arrow-folder"])
def test_every_file_format_reads_the_same_rows(fmt, tmp_path):
    rows = intent_rows(9)
    rows[4] = {"utterance": "", "intent": "book"}  # an empty sentence is a counted skip in every format
    path = tmp_path / f"train.{fmt}"
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("utterance" + sep + "intent\n" + "".join(f"{r['utterance']}{sep}{r['intent']}\n" for r in rows))
    elif fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if fmt == "parquet":
            ds.to_parquet(str(path))
        else:
            path = tmp_path / "train_ds"
            ds.save_to_disk(str(path))
    spec_path = task_file(tmp_path, f"name: intent\ntrain: {path.name}\ndev: {path.name}\ntext: utterance\n"
                                    f"label: intent\ntype: classification\nlabels: [book, cancel, refund]\n")
    spec = spec_from_file(spec_path)
    loaded = load_split(spec.file_for("train"), spec)
    assert [e.texts[0] for e in loaded.examples] == [r["utterance"] for i, r in enumerate(rows) if i != 4]
    assert [e.label for e in loaded.examples] == [float(sorted(WORDS).index(r["intent"])) for i, r in enumerate(rows)
                                                   if i != 4]
    assert loaded.skipped == [(5 if fmt in ("jsonl", "parquet", "arrow-folder") else 6, "empty sentence")]


def test_regression_task_with_output_range_clips_predictions(tmp_path, tiny_backbone):
    rows = [{"a": f"sentence {i}", "b": f"other {i}", "y": i % 3 / 2} for i in range(12)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    path = task_file(tmp_path, "name: sim\ntrain: t.jsonl\ndev: t.jsonl\ntext: [a, b]\nlabel: y\ntype: regression\n"
                               "output_range: [0, 1]\nmetrics: [spearman, pearson]\n", "sim.json.yaml")
    (spec,) = resolve_tasks([str(path)])
    assert spec.is_pair and spec.kind == "regression" and spec.primary_metric == "spearman"
    from peft_mtl.inference.evaluate import predictions_from_outputs

    assert predictions_from_outputs(spec, np.array([-3.0, 0.5, 7.0])).tolist() == [0.0, 0.5, 1.0]


BAD = [
    ("train: d.jsonl\ndev: d.jsonl\ntext: [t]\nlabel: y\ntype: classification\n", "'name': missing"),
    ("name: x\ntrain: d.jsonl\ndev: d.jsonl\ntext: [t]\nlabel: y\ntype: ranking\n", "'type': unknown type 'ranking'"),
    ("name: x\ntrain: d.jsonl\ndev: d.jsonl\ntext: [t]\nlabel: y\ntype: classification\nmetrics: [bleu]\n",
     "'metrics': unknown metric 'bleu'"),
    ("name: x\ntrain: d.jsonl\ndev: d.jsonl\ntext: [t]\nlabel: y\ntype: regression\nmetrics: [accuracy]\n",
     "'metrics': accuracy is a classification metric"),
    ("name: x\ndev: d.jsonl\ntext: [t]\nlabel: y\ntype: classification\n", "'train': missing"),
    ("name: x\ntrain: d.jsonl\ndev: d.jsonl\ntext: [a, b, c]\nlabel: y\ntype: classification\n", "'text'"),
    ("name: sst\ntrain: d.jsonl\ndev: d.jsonl\ntext: [t]\nlabel: y\ntype: classification\n",
     "'name': 'sst' is a built-in task"),
    ("name: x\ntrain: d.jsonl\ndev: d.jsonl\ntext: [t]\nlabel: y\ntype: classification\ncolour: red\n",
     "'colour': unknown field"),
    ("name: x\ntrain: one.jsonl\ndev: one.jsonl\ntext: [t]\nlabel: y\ntype: classification\n",
     "'labels': the train file has 1 class"),
    ("name: x\ntrain: d.jsonl\ndev: d.jsonl\ntext: [t]\nlabel: y\ntype: classification\nlabels: [a]\n",
     "'labels': a classifier needs at least two"),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_task_files_are_one_error_naming_file_and_field(body, message, tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", [{"t": "a", "y": "p"}, {"t": "b", "y": "q"}])
    write_jsonl(tmp_path / "one.jsonl", [{"t": "a", "y": "p"}, {"t": "b", "y": "p"}])
    path = task_file(tmp_path, body, "bad.yaml")
    assert main(["train", "--tasks", str(path), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and message in err[0], err
    assert not (tmp_path / "never").exists()


def test_data_problems_are_one_error_naming_the_file(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "y": "1.5"}, {"text": "b", "y": "x"}])
    path = task_file(tmp_path, "name: r\ntrain: d.jsonl\ndev: d.jsonl\ntext: [utterance]\nlabel: y\ntype: regression\n")
    spec = spec_from_file(path)
    with pytest.raises(DataError, match=r"d\.jsonl: missing column\(s\) utterance .* found 'text', 'y'"):
        load_split(spec.file_for("train"), spec)
    path = task_file(tmp_path, "name: r\ntrain: d.jsonl\ndev: d.jsonl\ntext: [text]\nlabel: y\ntype: regression\n")
    loaded = load_split(spec_from_file(path).file_for("train"), spec_from_file(path))
    assert loaded.skipped == [(2, "non-numeric label 'x'")], "labels must be numbers for regression"


def test_two_tasks_with_one_name_are_refused(intent, tmp_path):
    twin = task_file(tmp_path, intent.read_text(), "twin.yaml")
    with pytest.raises(TaskFileError, match="field 'name': task 'intent' is also defined by"):
        TrainConfig(tasks=[str(intent), str(twin)]).validate()


def test_task_options_are_named_by_task_not_built_into_the_code(intent):
    cfg = TrainConfig(tasks=["sst", str(intent)], task_losses={"intent": "dual"}, sampling="staggered",
                      staggered_first="intent")
    assert cfg.validate().task_names == ["sst", "intent"]
    with pytest.raises(ConfigError, match="--task-loss: task 'qqp' is not being trained"):
        TrainConfig(tasks=["sst"], task_losses={"qqp": "dual"}).validate()
    from peft_mtl.training.sampling import task_schedule

    sizes = {"sst": 100, "intent": 10}
    assert set(task_schedule("staggered", sizes, 5, 1, 3, 0)) == {("sst",)}, "default: the largest task first"
    assert set(task_schedule("staggered", sizes, 5, 1, 3, 0, 1, "intent")) == {("intent",)}


def test_metrics_registry_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    assert METRICS["accuracy"].fn(p, y) == pytest.approx(4 / 6)
    # per-class F1: class 0: P 1/2 R 1/2 → 0.5; class 1: P 2/3 R 1 → 0.8; class 2: P 1 R 1/2 → 2/3
    assert METRICS["macro_f1"].fn(p, y) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert METRICS["mcc"].fn(y, y) == pytest.approx(1.0) and METRICS["mcc"].fn(1 - y % 2, y % 2) == pytest.approx(-1.0)
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert METRICS["spearman"].fn(s, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(1.0)
    assert METRICS["pearson"].fn(s, 2 * s + 1) == pytest.approx(1.0)
    cs224n = {"sst": {"accuracy": 0.5}, "qqp": {"accuracy": 0.8}, "sts": {"pearson": 0.6}}
    assert overall_score(cs224n) == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert overall_score({"x": {"mcc": 0.2}}, {"x": "mcc"}) == pytest.approx(0.6)


def test_tasks_command_lists_builtins_and_validates_a_file(intent, capsys):
    assert main(["tasks"]) == 0
    names = [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()]
    assert names == ["qqp", "sst", "sts"]
    assert main(["tasks", str(intent)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] and report["rows"] == {"train": 30, "dev": 12} and report["labels"] == ["book", "cancel",
                                                                                                  "refund"]
