"""The multi-adapter ONNX graph: one graph answers rows of different sets and tasks like
``base.predict``; its LoRA factors are inputs (a set loaded later runs without a rebuild); int8
stays close; ``export --multi`` and its docs snippet run with onnxruntime, tokenizers and numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from peft_mtl import load_base  # noqa: E402
from peft_mtl.inference.adapter_graph import GraphEngine, GraphError  # noqa: E402
from peft_mtl.inference.export import export_multi  # noqa: E402

from .helpers import run_docs_snippet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["a fine film", "a long and dull film with nothing in it at all", "ok", "bad"]
PAIRS = [("how do i learn python", "what is the best way to learn python"), ("a cat", "stock prices fell")]


@pytest.fixture(scope="module")
def engine(base):
    return GraphEngine(base)


def reference(base, name: str, task: str, inputs) -> np.ndarray:
    return base.outputs(task, base.encode(task, inputs, name), name, engine="pytorch", precision="fp32")


MIXED = [("multi", "sst", SENTENCES[:3]), ("single", "sst", SENTENCES), ("multi", "qqp", PAIRS),
         ("heads", "sts", PAIRS[:1]), ("multi", "sts", PAIRS), ("heads", "sst", SENTENCES[1:2]),
         ("multi", "sst", SENTENCES[3:])]


def test_one_pass_over_rows_of_different_sets_and_tasks_matches_base_predict(base, engine):
    """Shared+task, single-task and heads-only sets, sentences and pairs, classes of different
    widths and a regression score, all in one call: each within 1e-4 of the fp32 PyTorch set."""
    groups = [(name, task, base.encode(task, inputs, name).segments[0]) for name, task, inputs in MIXED]
    outputs = engine.outputs(groups)
    for (name, task, inputs), got in zip(MIXED, outputs):
        want = reference(base, name, task, inputs)
        assert got.shape == want.shape, (name, task)
        assert np.abs(got - want).max() < 1e-4, (name, task, float(np.abs(got - want).max()))
    # The per-row choice is real: the same sentence under two sets answers as each set.
    single, multi = engine.outputs([(n, "sst", base.encode("sst", SENTENCES[:1], n).segments[0])
                                    for n in ("single", "multi")])
    assert np.abs(single - multi).max() > 1e-3


def test_what_the_graph_cannot_run_is_named(engine):
    assert engine.unsupported("full") == "fully fine-tuned (its own encoder)"
    assert engine.unsupported("multi") is None and engine.unsupported("heads") is None


def test_a_set_loaded_after_the_graph_was_built_runs_on_the_same_session(tiny_backbone, sets_root):
    """The factors are inputs: loading, unloading and reloading under one name never rebuilds the
    graph, and a reused name never answers with the old set's factors."""
    host = load_base(str(tiny_backbone), precision="fp32")
    host.load(sets_root / "single", name="a")
    graph = GraphEngine(host)
    session = graph.session
    for folder in ("multi", "single"):
        host.load(sets_root / folder, name="late")
        graph.refresh()
        (got,) = graph.outputs([("late", "sst", host.encode("sst", SENTENCES, "late").segments[0])])
        assert np.abs(got - reference(host, "late", "sst", SENTENCES)).max() < 1e-4, folder
        host.unload("late")
        graph.refresh()
        assert not [k for k in graph.entries if k[0] == "late"], "an unloaded set's factors are dropped"
    assert graph.session is session


def test_int8_graph_stays_close_to_fp32(base, engine):
    int8 = GraphEngine(base, int8=True)
    assert int8.name == "onnx int8" and int8.path.name == "model.int8.onnx"
    groups = [(name, task, base.encode(task, inputs, name).segments[0]) for name, task, inputs in MIXED]
    for (name, task, _), fp32, q in zip(MIXED, engine.outputs(groups), int8.outputs(groups)):
        # Per-channel int8 weights on a random tiny model: logits within a few hundredths of their range.
        assert np.abs(q - fp32).max() < 0.05 * (1 + np.abs(fp32).max()), (name, task)
        assert not np.array_equal(q, fp32), "the int8 graph really is another graph"


@pytest.fixture(scope="module")
def exported(sets_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi") / "exported"
    export_multi([f"sst={sets_root / 'single'}", f"all={sets_root / 'multi'}"], out, int8=True)
    return out


def test_export_multi_writes_one_graph_a_table_and_a_checked_record(exported):
    record = json.loads((exported / "graph.json").read_text())
    assert record["entries"] == ["sst/sst", "all/sst", "all/qqp", "all/sts"]
    assert {p.name for p in exported.iterdir()} >= {"model.onnx", "model.int8.onnx", "table.npz", "graph.json",
                                                     "tokenizer.json"}
    assert all(c["fp32_max_abs_diff"] < 1e-4 for c in record["check"].values())
    table = np.load(exported / "table.npz")
    assert table["lora_a.0"].shape[0] == 4 and table["head_w"].shape[0] == 4
    assert record["tasks"]["all/sts"] == {"kind": "regression", "pair": True, "width": 1, "labels": None}


def test_export_multi_refuses_a_set_it_cannot_hold(sets_root, tmp_path):
    with pytest.raises(GraphError, match="fully fine-tuned.*without --multi"):
        export_multi([sets_root / "single", sets_root / "full"], tmp_path / "x")
    assert not (tmp_path / "x").exists(), "nothing half-written"


def test_docs_snippet_runs_with_onnxruntime_tokenizers_and_numpy_alone(exported, base):
    labels = run_docs_snippet(REPO / "docs" / "export.md", "multi-export-snippet", "exported/multi", exported)
    assert len(labels) == 2 and all(label in range(5) for label in labels)


def test_the_server_picks_its_engine_and_says_why(base, tiny_backbone, sets_root, caplog):
    import logging

    from peft_mtl.errors import UserError
    from peft_mtl.serving.app import choose_engine
    from peft_mtl.serving.worker import Worker

    with caplog.at_level(logging.INFO, logger="peft_mtl.serving.app"):
        auto = choose_engine(base)
        assert isinstance(auto, GraphEngine) and auto.name == "onnx fp32", "auto on a CPU: the graph"
        assert "set 'full' runs on PyTorch: fully fine-tuned" in caplog.text
        assert choose_engine(base, "onnx", int8=True).name == "onnx int8"
        assert choose_engine(base, "torch") is None
    with pytest.raises(UserError, match="--engine gpu: choose one of auto, onnx, torch"):
        choose_engine(base, "gpu")
    merged = load_base(str(tiny_backbone), precision="fp32", int8=True)  # --engine torch --int8
    merged.load(sets_root / "single", name="single")
    assert choose_engine(merged) is None, "a base with per-set int8 graphs keeps them"
    worker = Worker(merged)
    try:
        assert worker.sets_snapshot["single"]["engine"] == "onnx int8, one merged graph per (set, task)"
    finally:
        worker.stop()


def test_export_flags_that_do_not_go_together_are_one_line_errors(sets_root, tmp_path, capsys):
    from peft_mtl.cli import main

    assert main(["export", str(sets_root / "single"), str(sets_root / "multi"), "--out", str(tmp_path / "a")]) == 2
    assert "export one set at a time, or all as one graph with --multi" in capsys.readouterr().err
    assert main(["export", str(sets_root / "single"), "--multi", "--format", "openvino", "--out",
                 str(tmp_path / "b")]) == 2
    assert "--multi writes an ONNX graph" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
