"""Rank compression (`peft-mtl compress`) and warm starts (`--init-from`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peft_mtl import load_base
from peft_mtl.cli import main
from peft_mtl.data.loading import encode_split, load_split, task_file
from peft_mtl.model.compress import compress_set, lora_scale
from peft_mtl.model.saved_sets import MANIFEST, AdapterError
from peft_mtl.training.train import train

from .helpers import tiny_config

TASKS = ["sst", "qqp", "sts"]


@pytest.fixture(scope="module")
def trained_set(tiny_backbone, small_data, tmp_path_factory):
    """A tiny shared + per-task set at rank 4, trained a few real steps."""
    out = tmp_path_factory.mktemp("compress") / "set"
    cfg = tiny_config(tiny_backbone, small_data, out, tasks=TASKS, epochs=1, steps_per_epoch=9)
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    train(cfg, progress=False)
    return out


def _outputs(folder, small_data) -> dict[str, np.ndarray]:
    base = load_base(str(json.loads((folder / MANIFEST).read_text())["backbone_source"]), precision="fp32")
    name = base.load(folder)
    result = {}
    for task in TASKS:
        spec = base.spec(task, name)
        split = encode_split(load_split(task_file(small_data, spec, "dev"), spec), base.tokenizer)
        result[task] = base.outputs(task, split, name)
    return result


def _updates(folder) -> dict[str, dict[str, torch.Tensor]]:
    """Every adapter's scale · B A per module, in float64."""
    manifest = json.loads((folder / MANIFEST).read_text())
    updates = {}
    for name, rel in manifest["adapters"].items():
        config = json.loads((folder / rel / "adapter_config.json").read_text())
        weights = load_file(str(folder / rel / "adapter_model.safetensors"))
        updates[name] = {k[: -len(".lora_A.weight")]: lora_scale(config) * (
            weights[k.replace("lora_A", "lora_B")].double() @ weights[k].double())
            for k in weights if k.endswith(".lora_A.weight")}
    return updates


def test_compressing_a_set_at_its_own_rank_changes_no_prediction(trained_set, small_data, tmp_path):
    result = compress_set(trained_set, tmp_path / "same", rank=4)
    assert result.ranks == {"shared": 4, "sst": 4, "qqp": 4, "sts": 4}
    assert all(v == pytest.approx(1.0) for v in result.energy_kept.values())
    before, after = _outputs(trained_set, small_data), _outputs(tmp_path / "same", small_data)
    for task in TASKS:
        np.testing.assert_allclose(after[task], before[task], atol=1e-4)


def test_a_lower_rank_keeps_the_closest_update_of_that_rank(trained_set, tmp_path):
    """Eckart–Young: the kept update is the truncated SVD, so its error is exactly the dropped
    singular values, and shared and task-private adapters get their own ranks."""
    result = compress_set(trained_set, tmp_path / "low", rank=3, task_rank=1)
    assert result.ranks == {"shared": 3, "sst": 1, "qqp": 1, "sts": 1}
    original, compressed = _updates(trained_set), _updates(tmp_path / "low")
    for name, modules in original.items():
        rank = result.ranks[name]
        shares = []
        for module, delta in modules.items():
            kept = compressed[name][module]
            s = torch.linalg.svdvals(delta)
            assert torch.linalg.matrix_rank(kept, rtol=1e-6).item() <= rank
            error = float(((delta - kept) ** 2).sum())
            assert error == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-3, abs=1e-12)
            shares.append(float((s[:rank] ** 2).sum() / (s ** 2).sum()))
        assert result.energy_kept[name] == pytest.approx(sum(shares) / len(shares), rel=1e-4)
        assert result.energy_kept[name] < 1
    manifest = json.loads((tmp_path / "low" / MANIFEST).read_text())
    stored = sum(t.numel() for rel in manifest["adapters"].values()
                 for t in load_file(str(tmp_path / "low" / rel / "adapter_model.safetensors")).values())
    heads = sum(t.numel() for rel in manifest["heads"].values() for t in load_file(str(tmp_path / "low" / rel)).values())
    assert manifest["parameters"]["trainable"] == stored + heads == result.trainable
    assert manifest["compressed_from"]["ranks"] == result.ranks and manifest["metrics"] == {}
    assert manifest["train_seconds"] is None, "the source's training time is not the compressed set's"
    from peft_mtl.experiments.report import _detail

    assert _detail(manifest) == "set cut to shared 3/sst 1/qqp 1/sts 1 by truncated SVD (peft-mtl compress), no training"


def test_the_command_scores_the_new_set_and_records_how_it_was_made(trained_set, small_data, tmp_path, capsys):
    out = tmp_path / "cut"
    argv = ["compress", str(trained_set), "--out", str(out), "--rank", "2", "--data-dir", str(small_data),
            "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((out / MANIFEST).read_text())
    assert printed["trainable_parameters"] == manifest["parameters"]["trainable"]
    assert manifest["compressed_from"]["command"] == "peft-mtl " + " ".join(argv)
    assert main(["eval", str(out), "--data-dir", str(small_data), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert manifest["metrics"]["overall"] == pytest.approx(evaluated.pop("overall"))
    assert set(manifest["metrics"]["dev"]) == set(evaluated) == set(TASKS)
    for task, scores in evaluated.items():
        assert manifest["metrics"]["dev"][task] == pytest.approx(scores)


def test_sets_that_cannot_be_compressed_get_one_message(trained_set, tiny_backbone, small_data, tmp_path, capsys):
    with pytest.raises(AdapterError, match="cannot replace its source"):
        compress_set(trained_set, trained_set, rank=2)
    heads = tmp_path / "heads"
    train(tiny_config(tiny_backbone, small_data, heads, mode="heads", epochs=1, steps_per_epoch=2), progress=False)
    capsys.readouterr()
    assert main(["compress", str(heads), "--out", str(tmp_path / "x"), "--rank", "2", "--no-eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no LoRA adapters to compress" in err[0] and str(heads) in err[0]


def test_a_run_started_from_a_set_starts_where_that_set_is(trained_set, tiny_backbone, small_data, tmp_path):
    """With a learning rate too small to move anything, the run ends as the set it started from;
    from fresh adapters it does not."""
    compress_set(trained_set, tmp_path / "r2", rank=2)
    outputs = {}
    for name, init in (("warm", str(tmp_path / "r2")), ("cold", None)):
        cfg = tiny_config(tiny_backbone, small_data, tmp_path / name, tasks=TASKS, epochs=1, steps_per_epoch=2,
                          lr=1e-12, init_from=init)
        cfg.lora.rank, cfg.lora.alpha = 2, 4.0
        train(cfg, progress=False)
        outputs[name] = _outputs(tmp_path / name, small_data)
    start = _outputs(tmp_path / "r2", small_data)
    for task in TASKS:
        np.testing.assert_allclose(outputs["warm"][task], start[task], atol=1e-4)
        assert not np.allclose(outputs["cold"][task], start[task], atol=1e-3)


def test_a_warm_start_trains_on_from_the_set(trained_set, tiny_backbone, small_data, tmp_path):
    """Real steps after a warm start move the adapters away from the set, by the optimiser's steps."""
    compress_set(trained_set, tmp_path / "r2", rank=2)
    cfg = tiny_config(tiny_backbone, small_data, tmp_path / "ft", tasks=TASKS, epochs=1, steps_per_epoch=6,
                      init_from=str(tmp_path / "r2"))
    cfg.lora.rank, cfg.lora.alpha = 2, 4.0
    train(cfg, progress=False)
    start, end = _updates(tmp_path / "r2"), _updates(tmp_path / "ft")
    moved = [float((end[a][m] - start[a][m]).norm() / start[a][m].norm()) for a in start for m in start[a]]
    assert 0 < min(moved) and max(moved) < 10, "trained on from the set, not from scratch"


@pytest.mark.parametrize("change, message", [
    ({"rank": 3}, "rank 2 but this run has rank 3 (--lora-rank)"),
    ({"tasks": ["sst", "qqp"], "no_shared": True}, "use the adapters"),
    ({"targets": "qv"}, "adapts other modules"),
])
def test_a_set_of_another_shape_is_refused_with_one_message(trained_set, tiny_backbone, small_data, tmp_path, capsys,
                                                            change, message):
    compress_set(trained_set, tmp_path / "r2", rank=2)
    argv = ["train", "--tasks", ",".join(change.get("tasks", TASKS)), "--backbone", str(tiny_backbone),
            "--data-dir", str(small_data), "--epochs", "1", "--steps-per-epoch", "1", "--precision", "fp32",
            "--lora-rank", str(change.get("rank", 2)), "--lora-targets", change.get("targets", "all"),
            "--init-from", str(tmp_path / "r2"), "--out", str(tmp_path / "run"), "--no-progress"]
    if change.get("no_shared"):
        argv.append("--no-shared")
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peft-mtl: error")]
    assert len(err) == 1 and message in err[0] and str(tmp_path / "r2") in err[0]
    assert not (tmp_path / "run" / MANIFEST).exists()


def test_init_from_must_name_an_existing_set(tmp_path, capsys):
    assert main(["train", "--tasks", "sst", "--init-from", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--init-from" in capsys.readouterr().err
