"""Recipe search: each recipe trained over seeds, mean ± sd, verdicts against the baseline, resumable."""

from __future__ import annotations

import json
import statistics

import pytest

from peft_mtl.cli import main
from peft_mtl.training.config import ConfigError
from peft_mtl.model.saved_sets import MANIFEST
from peft_mtl.experiments.sweep import compare, load_sweep


def _sweep_file(path, tiny_backbone, small_data, recipes: dict, baseline="r2", seeds="[0, 1]"):
    base = (f"--tasks sst,qqp,sts --backbone {tiny_backbone} --data-dir {small_data} --epochs 1 --steps-per-epoch 3 "
            f"--batch-size 8 --lr 5e-3 --precision fp32 --checkpoint-every 0")
    lines = [f"base: {base}", f"seeds: {seeds}", f"baseline: {baseline}", "recipes:"]
    lines += [f"  {name}: \"{flags}\"" for name, flags in recipes.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_sweep_trains_every_recipe_per_seed_and_reports_mean_and_sd(tiny_backbone, small_data, tmp_path, capsys):
    spec = _sweep_file(tmp_path / "s.yaml", tiny_backbone, small_data,
                       {"r2": "--lora-rank 2 --lora-alpha 4", "r8": "--lora-rank 8 --lora-alpha 16"})
    out = tmp_path / "runs"
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "2", "--archive", str(tmp_path / "kept")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"summary": str(out / "s.sweep.json"), "finished": 4, "planned": 4, "failed": []}

    manifests = {(r, s): json.loads((out / r / f"seed{s}" / MANIFEST).read_text()) for r in ("r2", "r8") for s in (0, 1)}
    assert {m["config"]["seed"] for m in manifests.values()} == {0, 1}
    assert all(m["threads"] == 1 for m in manifests.values()), "two workers on the machine's cores share them"
    summary = json.loads((out / "s.sweep.json").read_text())
    r2, r8 = summary["recipes"]["r2"], summary["recipes"]["r8"]
    assert r8["trainable"] > r2["trainable"]
    overall = [manifests[("r8", s)]["metrics"]["overall"] for s in (0, 1)]
    assert overall[0] != overall[1], "the seed reaches the run"
    assert r8["scores"]["overall"]["mean"] == pytest.approx(statistics.fmean(overall))
    assert r8["scores"]["overall"]["sd"] == pytest.approx(statistics.stdev(overall))
    assert set(r8["scores"]) == {"sst/accuracy", "qqp/accuracy", "sts/pearson", "overall"}
    assert r8["vs_baseline"]["overall"]["difference"] == pytest.approx(
        r8["scores"]["overall"]["mean"] - r2["scores"]["overall"]["mean"])
    table = (out / "s.sweep.md").read_text()
    assert "| `r2` |" in table and "baseline" in table and " ± " in table
    assert summary["machines"] and all(m.endswith("1 thread(s) per run, fp32") for m in summary["machines"])

    # Resumable: finished runs are never trained again.
    stamps = {k: (out / k[0] / f"seed{k[1]}" / MANIFEST).stat().st_mtime_ns for k in manifests}
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert {k: (out / k[0] / f"seed{k[1]}" / MANIFEST).stat().st_mtime_ns for k in manifests} == stamps
    capsys.readouterr()

    # A second sweep file in the same folder reuses the runs of the recipe they share, keeps its own table.
    table = (out / "s.sweep.md").read_text()
    other = _sweep_file(tmp_path / "t.yaml", tiny_backbone, small_data, {"r2": "--lora-rank 2 --lora-alpha 4",
                                                                         "lr": "--lora-rank 2 --lora-alpha 4 --lr 1e-2"})
    assert main(["sweep", str(other), "--out", str(out), "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["finished"] == 4
    assert {k: (out / k[0] / f"seed{k[1]}" / MANIFEST).stat().st_mtime_ns for k in manifests} == stamps
    assert (out / "t.sweep.md").is_file() and (out / "s.sweep.md").read_text() == table

    # A recipe edited after its runs finished is not silently credited with the old runs' scores.
    edited = _sweep_file(tmp_path / "s.yaml", tiny_backbone, small_data, {"r2": "--lora-rank 4 --lora-alpha 4",
                                                                          "r8": "--lora-rank 8 --lora-alpha 16"})
    assert main(["sweep", str(edited), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out / "r2" / "seed0") in err and "lora" in err and "new name" in err
    assert {k: (out / k[0] / f"seed{k[1]}" / MANIFEST).stat().st_mtime_ns for k in manifests} == stamps

    # The archive keeps manifests (with the weights' size) but no weights, and reports as one row per recipe.
    kept = tmp_path / "kept"
    assert sorted(p.name for p in (kept / "r8" / "seed0").iterdir()) == [MANIFEST]
    assert json.loads((kept / "r8" / "seed0" / MANIFEST).read_text())["bytes_on_disk"] > 10_000
    assert main(["report", str(kept), "--out", str(tmp_path / "rep")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "rep" / "report.json").read_text())}
    assert set(rows) == {"r2", "r8"} or {k.split("/")[-1] for k in rows} == {"r2", "r8"}
    row = next(r for k, r in rows.items() if k.endswith("r8"))
    assert row["seeds"] == 2 and row["overall"] == pytest.approx(statistics.fmean(overall))
    assert row["sd"]["overall"] == pytest.approx(statistics.stdev(overall))
    assert " ± " in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("ran_as, counts", [("fp32", True), ("bf16", False)])
def test_a_run_under_auto_precision_counts_for_a_pinned_recipe_only_if_it_resolved_to_it(tmp_path, ran_as, counts):
    """Seeds of one row trained on different CPU kinds must share a precision: `auto` is fp32 on an
    AVX2 CPU and bf16 on one with native bf16, so a pinned recipe checks what `auto` became."""
    from peft_mtl.cli import build_parser
    from peft_mtl.training.config import config_from_args
    from peft_mtl.experiments.sweep import Job, stale_runs

    folder = tmp_path / "full" / "seed0"
    folder.mkdir(parents=True)
    trained = config_from_args(build_parser().parse_args(["train", "--tasks", "sst", "--out", str(folder)]))
    assert trained.precision == "auto"
    (folder / MANIFEST).write_text(json.dumps({"config": trained.to_dict(), "precision": ran_as}))
    pinned = Job("full", 0, folder, ["train", "--tasks", "sst", "--precision", "fp32", "--out", str(folder)])
    assert (stale_runs([pinned]) == []) is counts
    if not counts:
        assert "precision: trained 'bf16', recipe asks 'fp32'" in stale_runs([pinned])[0]
    unpinned = Job("full", 0, folder, ["train", "--tasks", "sst", "--out", str(folder)])
    assert stale_runs([unpinned]) == [], "a recipe left at auto accepts what auto made of it"


def test_a_misspelt_recipe_fails_before_anything_trains(tiny_backbone, small_data, tmp_path, capsys):
    spec = _sweep_file(tmp_path / "s.yaml", tiny_backbone, small_data, {"r2": "--lora-rank 2", "bad": "--lora-rnak 4"})
    assert main(["sweep", str(spec), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "recipe 'bad'" in err and str(spec) in err
    assert not (tmp_path / "runs").exists()


def test_tabulating_a_folder_that_holds_no_sweep_says_so(tiny_backbone, small_data, tmp_path, capsys):
    spec = _sweep_file(tmp_path / "s.yaml", tiny_backbone, small_data, {"r2": "--lora-rank 2"})
    assert main(["sweep", str(spec), "--out", str(tmp_path / "nowhere"), "--summary-only"]) == 2
    err = capsys.readouterr().err
    assert "nowhere: no such folder" in err and "Traceback" not in err
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("recipes, baseline, message", [
    ({"a": "--out x"}, "a", "set by the sweep itself"),
    ({"a": ""}, "b", "baseline 'b' is not one of the recipes"),
    ({"a": "--lora-rank -1"}, "a", "recipe 'a'"),
])
def test_sweep_files_are_checked(tiny_backbone, small_data, tmp_path, recipes, baseline, message):
    spec = _sweep_file(tmp_path / "s.yaml", tiny_backbone, small_data, recipes, baseline=baseline)
    with pytest.raises(ConfigError, match=message):
        load_sweep(spec)


def test_a_difference_counts_only_beyond_twice_the_seed_sd():
    base = {"overall": {"mean": 0.750, "sd": 0.004}}
    assert compare({"overall": {"mean": 0.760, "sd": 0.004}}, base)["overall"]["verdict"] == "better"
    assert compare({"overall": {"mean": 0.755, "sd": 0.004}}, base)["overall"]["verdict"] == "within noise"
    assert compare({"overall": {"mean": 0.740, "sd": 0.002}}, base)["overall"]["verdict"] == "worse"
    assert compare({"overall": {"mean": 0.790, "sd": None}}, base)["overall"]["verdict"] == "one seed: no verdict"


def test_the_shipped_sweep_files_are_valid():
    from pathlib import Path

    import yaml

    files = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert files, "recipes/ ships the sweeps behind reports/"
    for f in files:
        if "space" in yaml.safe_load(f.read_text()):  # a search space (peft-mtl search) beside the sweeps
            from peft_mtl.experiments.search import load_space

            assert load_space(f).params
            continue
        spec = load_sweep(f)
        assert spec.baseline in spec.recipes and len(spec.seeds) >= 3


def test_a_combined_row_scores_each_task_by_the_run_that_trained_it_alone(tiny_backbone, small_data, tmp_path,
                                                                          capsys):
    spec = _sweep_file(tmp_path / "s.yaml", tiny_backbone, small_data,
                       {"one_sst": "--tasks sst", "one_qqp": "--tasks qqp", "one_sts": "--tasks sts"},
                       baseline="one_sst")
    spec.write_text(spec.read_text() + "combine:\n  each_alone: [one_sst, one_qqp, one_sts]\n")
    out = tmp_path / "runs"
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "2", "--archive", str(tmp_path / "kept")]) == 0
    capsys.readouterr()

    runs = {(r, s): json.loads((out / r / f"seed{s}" / MANIFEST).read_text())
            for r in ("one_sst", "one_qqp", "one_sts") for s in (0, 1)}
    assert all(len(m["tasks"]) == 1 for m in runs.values())
    by_hand = [(runs[("one_sst", s)]["metrics"]["dev"]["sst"]["accuracy"]
                + runs[("one_qqp", s)]["metrics"]["dev"]["qqp"]["accuracy"]
                + (runs[("one_sts", s)]["metrics"]["dev"]["sts"]["pearson"] + 1) / 2) / 3 for s in (0, 1)]
    row = json.loads((out / "s.sweep.json").read_text())["combined"]["each_alone"]
    assert row["seeds"] == [0, 1]
    assert row["scores"]["overall"]["values"] == pytest.approx(by_hand)
    assert row["scores"]["overall"]["sd"] == pytest.approx(statistics.stdev(by_hand))
    assert row["trainable"] == sum(runs[(r, 0)]["parameters"]["trainable"] for r in ("one_sst", "one_qqp", "one_sts"))
    assert row["train_minutes"] == pytest.approx(
        statistics.fmean(sum(runs[(r, s)]["train_seconds"] for r in ("one_sst", "one_qqp", "one_sts"))
                         for s in (0, 1)) / 60)
    assert "vs_baseline" in row and "`each_alone`" in (out / "s.sweep.md").read_text()
    alone = json.loads((out / "s.sweep.json").read_text())["recipes"]["one_qqp"]
    assert set(alone["scores"]) == {"qqp/accuracy"}, "one task's run has no overall to compare with a multi-task one"

    # The report lists the combination as one row, from the archived table alone.
    assert main(["report", str(tmp_path / "kept"), "--out", str(tmp_path / "rep")]) == 0
    rows = {r["name"].split("/")[-1]: r for r in json.loads((tmp_path / "rep" / "report.json").read_text())}
    assert rows["each_alone"]["overall"] == pytest.approx(statistics.fmean(by_hand))
    assert rows["each_alone"]["seeds"] == 2 and rows["each_alone"]["sd"]["overall"] == pytest.approx(
        statistics.stdev(by_hand))
    assert rows["one_sst"]["overall"] is None and rows["one_sst"]["seeds"] == 2


@pytest.mark.parametrize("combine, message", [
    ("  both: [mt, one_sst]\n", "overlapping tasks"),
    ("  both: [one_sst, nope]\n", "'nope'\\] are not recipes"),
    ("  mt: [one_sst]\n", "has the name of a recipe"),
])
def test_combined_rows_are_checked(tiny_backbone, small_data, tmp_path, combine, message):
    spec = _sweep_file(tmp_path / "s.yaml", tiny_backbone, small_data, {"mt": "", "one_sst": "--tasks sst"},
                       baseline="mt")
    spec.write_text(spec.read_text() + "combine:\n" + combine)
    with pytest.raises(ConfigError, match=message):
        load_sweep(spec)


def test_a_sweep_passes_tracking_on_to_every_run_grouped_under_its_name(tmp_path):
    from peft_mtl.experiments.sweep import plan
    from peft_mtl.training.config import config_from_flags

    f = tmp_path / "mysweep.yaml"
    f.write_text("base: --tasks sst\nseeds: [0, 1]\nrecipes:\n  a: ''\n  b: --lora-rank 4\n")
    jobs = plan(load_sweep(f), tmp_path / "out", ["--report-to", "mlflow", "--tracking-dir", str(tmp_path / "t")])
    configs = [config_from_flags(job.argv[1:]) for job in jobs]
    assert {c.tracking.run_name for c in configs} == {"a-seed0", "b-seed0", "a-seed1", "b-seed1"}, "one run per seed"
    assert {c.tracking.group for c in configs} == {"mysweep"} and all(c.tracking.report_to == ["mlflow"] for c in configs)
    assert all("--report-to" not in job.argv for job in plan(load_sweep(f), tmp_path / "out"))
