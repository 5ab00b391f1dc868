"""The command line: train → eval → predict, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from peft_mtl.cli import main


@pytest.fixture(scope="module")
def cli_run(tiny_backbone, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--tasks", "sst,qqp,sts", "--out", str(out), "--backbone", str(tiny_backbone),
                 "--data-dir", str(small_data), "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "4",
                 "--precision", "fp32", "--no-progress"])
    assert code == 0
    return out


def test_train_prints_one_final_json_line(tiny_backbone, small_data, tmp_path, capsys):
    code = main(["train", "--tasks", "sts", "--out", str(tmp_path / "r"), "--backbone", str(tiny_backbone),
                 "--data-dir", str(small_data), "--epochs", "1", "--precision", "fp32", "--no-progress"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "pearson" in json.loads(lines[0])["dev"]["sts"]


def test_eval_prints_only_the_metrics_json(cli_run, small_data, capsys):
    assert main(["eval", str(cli_run), "--data-dir", str(small_data), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"sst", "qqp", "sts", "overall"}
    expected = (result["sst"]["accuracy"] + result["qqp"]["accuracy"] + (result["sts"]["pearson"] + 1) / 2) / 3
    assert result["overall"] == pytest.approx(expected)


def test_eval_matches_the_dev_metrics_recorded_at_training(cli_run, small_data, capsys):
    main(["eval", str(cli_run), "--data-dir", str(small_data), "--no-progress", "--precision", "fp32"])
    result = json.loads(capsys.readouterr().out)
    recorded = json.loads((cli_run / "peft_mtl.json").read_text())["metrics"]["dev"]
    for task, metrics in recorded.items():
        for k, v in metrics.items():
            assert result[task][k] == pytest.approx(v, abs=1e-6)


def test_eval_on_the_test_split_when_a_labelled_file_exists(cli_run, small_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    shutil.copy(data / "ids-sst-dev.csv", data / "ids-sst-test.csv")
    for name in ("quora", "sts"):
        shutil.copy(data / f"{name}-dev.csv", data / f"{name}-test.csv")
    assert main(["eval", str(cli_run), "--split", "test", "--data-dir", str(data), "--no-progress"]) == 0
    assert "overall" in json.loads(capsys.readouterr().out)


def test_predict_sentences_and_pairs(cli_run, capsys):
    assert main(["predict", str(cli_run), "--task", "sst", "great fun", "a bore"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == ["great fun", "a bore"] and all(0 <= r["label"] <= 4 for r in rows)
    assert main(["predict", str(cli_run), "--task", "sts", "a dog runs ||| a dog is running"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["input"] == ["a dog runs", "a dog is running"] and 0 <= row["score"] <= 5


@pytest.mark.parametrize("argv, message", [
    (["eval", "/nonexistent/folder"], "no such folder"),
    (["train", "--tasks", "nope", "--out", "{out}"], "unknown task"),
    (["train", "--tasks", "sst", "--out", "{out}", "--data-dir", "/nonexistent"], "file not found"),
    (["train", "--tasks", "sst", "--out", "{out}", "--backbone", "no-such/model"], "never downloads"),
])
def test_user_errors_are_one_line_with_exit_code_2(argv, message, capsys, tmp_path):
    # A fresh output folder: a fixed path could be an existing, non-empty folder (a checkout, say).
    argv = [a.replace("{out}", str(tmp_path / "run")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peft-mtl: error:") and message in err[0]


def test_predict_pair_task_without_separator_explains_the_format(cli_run, capsys):
    assert main(["predict", str(cli_run), "--task", "qqp", "only one sentence"]) == 2
    assert "|||" in capsys.readouterr().err


def test_every_config_field_is_a_train_flag_and_flags_override_a_config_file(tmp_path):
    """Flags are generated from the dataclasses: a new field is a new flag, named in errors."""
    import argparse

    from peft_mtl.training.config import add_train_arguments as _add_train_args, config_from_args
    from peft_mtl.training.config import TrainConfig
    from peft_mtl.options import config_fields, flag_for

    parser = argparse.ArgumentParser()
    _add_train_args(parser)
    known = {a for action in parser._actions for a in action.option_strings}
    for path, f, _ in config_fields(TrainConfig):
        if f.metadata.get("cli", True):
            assert flag_for(TrainConfig, path) in known, path
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"tasks": ["sst", "qqp"], "out": "x", "lr": 0.5, "lora": {"rank": 4},
                                  "smart": {"task_weights": {"sst": 2.0}}}))
    args = parser.parse_args(["--config", str(config), "--lr", "0.25", "--lora-alpha", "8", "--rslora",
                              "--smart-task-weight", "qqp=1.5", "--no-shared", "--lora-layers", "0,1"])
    cfg = config_from_args(args)
    assert cfg.tasks == ["sst", "qqp"] and cfg.lr == 0.25 and cfg.lora.rank == 4 and cfg.lora.alpha == 8.0
    assert cfg.lora.use_rslora and cfg.lora.layers == [0, 1] and cfg.shared_adapter is False
    assert cfg.smart.task_weights == {"qqp": 1.5}, "a flag replaces the file's value"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_quiet_and_verbose_set_how_much_the_command_says(tiny_backbone, small_data, tmp_path, capsys):
    """-q keeps progress lines off stderr (results stay on stdout); without it they are there."""
    argv = ["train", "--tasks", "sst", "--backbone", str(tiny_backbone), "--data-dir", str(small_data), "--epochs", "1",
            "--batch-size", "8", "--precision", "fp32", "--no-progress"]
    assert main(["-q", *argv, "--out", str(tmp_path / "quiet")]) == 0
    quiet = capsys.readouterr()
    assert "epoch 1/1" not in quiet.err and json.loads(quiet.out.strip().splitlines()[-1])["out"]
    assert main([*argv, "--out", str(tmp_path / "loud"), "-v"]) == 0
    assert "epoch 1/1" in capsys.readouterr().err


def test_the_auto_device_can_be_pinned_by_environment(monkeypatch):
    import torch

    from peft_mtl.device import resolve_device
    from peft_mtl.errors import UserError

    monkeypatch.setenv("PEFT_MTL_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("PEFT_MTL_DEVICE", "cuda")
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("auto")
    monkeypatch.setenv("PEFT_MTL_DEVICE", "tpu")
    with pytest.raises(UserError, match="use auto, cpu, cuda"):
        resolve_device("auto")
