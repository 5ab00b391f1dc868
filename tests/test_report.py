"""The report: one row per run and ensemble, Pareto front, deterministic output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peft_mtl.cli import main
from peft_mtl.experiments.report import pareto
from peft_mtl.training.train import train

from .helpers import tiny_config


def test_pareto_front():
    pts = [(10, 0.5), (100, 0.6), (50, 0.4), (1000, 0.6), (5, 0.1)]
    assert pareto(pts) == {0, 1, 4}


def test_report_from_runs_and_an_ensemble_is_deterministic(tiny_backbone, small_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    train(tiny_config(tiny_backbone, small_data, runs / "lora_r16", tasks=["sst", "qqp", "sts"], epochs=1,
                      steps_per_epoch=3), progress=False)
    train(tiny_config(tiny_backbone, small_data, runs / "heads", tasks=["sst", "qqp", "sts"], epochs=1,
                      steps_per_epoch=3, mode="heads"), progress=False)
    assert main(["ensemble", str(runs / "lora_r16"), str(runs / "heads"), "--data-dir", str(small_data),
                 "--no-progress", "--record", str(runs / "ens.ensemble.json")]) == 0
    capsys.readouterr()
    out = tmp_path / "reports"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == 3
    text = (out / "report.md").read_text()
    assert "| `runs/heads`" in text or "heads" in text
    rows = json.loads((out / "report.json").read_text())
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"lora", "heads", "ensemble"}
    assert by_mode["heads"]["trainable"] < by_mode["lora"]["trainable"]
    assert by_mode["ensemble"]["trainable"] == by_mode["lora"]["trainable"] + by_mode["heads"]["trainable"]
    png = (out / "params_vs_score.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    main(["report", str(runs), "--out", str(out)])
    assert (out / "report.md").read_text() == text
    assert (out / "params_vs_score.png").read_bytes() == png


def test_runs_scored_on_part_of_the_dev_split_are_marked_and_kept_off_the_front(tmp_path):
    from peft_mtl.experiments.report import Row, markdown

    def row(name, score, partial):
        return Row(name=name, mode="lora", backbone="b", trainable=100, total=1000, bytes_on_disk=1,
                   metrics={"sst": score}, overall=None, train_seconds=1.0, detail="", partial_dev=partial)

    text = markdown([row("full", 0.49, False), row("subset", 0.52, True)], None)
    assert "| `full` ★" in text and "| `subset` |" in text


def test_a_greedy_ensemble_is_reported_with_its_cross_fitted_scores(tmp_path):
    from peft_mtl.experiments.report import ensemble_row

    in_sample = {"sst": {"accuracy": 0.52}, "qqp": {"accuracy": 0.86}, "sts": {"pearson": 0.88}, "overall": 0.7800}
    honest = {"sst": {"accuracy": 0.48}, "qqp": {"accuracy": 0.85}, "sts": {"pearson": 0.86}}
    record = tmp_path / "g.ensemble.json"
    record.write_text(json.dumps({
        "members": ["a", "b"], "split": "dev", "metrics": in_sample, "backbone": "b", "trainable": 10, "total": 100,
        "bytes_on_disk": 1, "train_seconds": 1.0,
        "selection": {"tasks": {t: {"weights": {"a": 1, "b": 1}, "cross_fitted": m} for t, m in honest.items()},
                      "cross_fitted_overall": 0.7500}}))
    row = ensemble_row(record, tmp_path)
    assert row.overall == 0.75 and row.metrics == {"sst": 0.48, "qqp": 0.85, "sts": 0.86}
    assert "0.7800" in row.detail, "the in-sample figure is shown beside it, never instead of it"


def test_plot_labels_never_overlap_each_other_a_marker_or_the_legend_and_stay_inside_the_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peft_mtl.experiments.report import MARKER_SIZE, Row, _label_without_overlaps, _marker_boxes

    fig, ax = plt.subplots()
    ax.set_xscale("log")
    crowd = [(Row(name=f"run_{i}", mode="lora", backbone="b", trainable=1000 + i, total=10, bytes_on_disk=1, metrics={},
                  overall=0.5, train_seconds=1.0, detail=""), 0.5 + 1e-4 * i) for i in range(8)]
    # a second cluster of markers right beside the crowd, and one run at the right edge of the axes
    others = [(1000 * 1.02 ** k, 0.5 + 2e-4 * (k % 3)) for k in range(1, 6)]
    edge = (Row(name="a_long_name_at_the_edge", mode="lora", backbone="b", trainable=10_000, total=10,
                bytes_on_disk=1, metrics={}, overall=0.5, train_seconds=1.0, detail=""), 0.5)
    ax.scatter([r.trainable for r, _ in crowd] + [x for x, _ in others] + [10_000],
               [v for _, v in crowd] + [y for _, y in others] + [0.5], s=MARKER_SIZE, label="runs")
    ax.set_xlim(900, 10_000 * 1.05)
    ax.set_ylim(0.45, 0.55)
    ax.legend(loc="upper left")
    _label_without_overlaps(fig, ax, [edge, *crowd])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert 2 <= len(boxes) < len(crowd) + 1, "the ones that fit nowhere are left to the table"
    assert "a_long_name_at_the_edge" in {t.get_text() for t in ax.texts}, "a label moves left rather than out"
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    obstacles = _marker_boxes(fig, ax) + [ax.get_legend().get_window_extent(renderer)]
    assert len(obstacles) == len(crowd) + len(others) + 2
    assert not any(box.overlaps(o) for box in boxes for o in obstacles)
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    plt.close(fig)


def test_a_sweep_run_copied_elsewhere_is_listed_once_inside_its_seed_group(tiny_backbone, small_data, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    for seed in (0, 1):
        train(tiny_config(tiny_backbone, small_data, runs / "sweep" / "r16" / f"seed{seed}", tasks=["sst", "qqp", "sts"],
                          epochs=1, steps_per_epoch=2, seed=seed), progress=False)
    shutil.copytree(runs / "sweep" / "r16" / "seed0", runs / "shipped" / "member_a")  # an ensemble member
    assert main(["report", str(runs), "--out", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["seeds"] for r in rows] == [2] and rows[0]["name"].endswith("sweep/r16")


def test_the_reference_pipeline_is_listed_per_task_and_scored_together_but_never_on_the_front(tmp_path):
    from peft_mtl.experiments.report import collect, markdown

    dev = {"sst": ("accuracy", 0.60), "qqp": ("accuracy", 0.90), "sts": ("pearson", 0.80)}
    for task, (metric, value) in dev.items():
        (tmp_path / f"hf_baseline_{task}.json").write_text(json.dumps({
            "pipeline": "HF Trainer + PEFT LoRA", "task": task, "epochs": 1, "dev": {metric: value},
            "trainable_parameters": 1000, "total_parameters": 100_000, "train_seconds": 60.0}))
    rows = {r.name: r for r in collect([tmp_path], tmp_path)}
    together = rows["hf_baseline (sst + qqp + sts)"]
    assert together.overall == pytest.approx((0.60 + 0.90 + (0.80 + 1) / 2) / 3)
    assert together.trainable == 3000 and together.train_seconds == 180.0 and together.reference
    assert all(r.reference for r in rows.values())
    assert "` ★" not in markdown(list(rows.values()), None), "another pipeline's result is never on our front"

    (tmp_path / "hf_baseline_sts.json").unlink()
    assert "hf_baseline (sst + qqp + sts)" not in {r.name for r in collect([tmp_path], tmp_path)}


@pytest.mark.parametrize("task", ["sst", "sts"])
def test_the_hf_reference_script_runs_and_its_record_is_a_report_row(tiny_backbone, small_data, tmp_path, task):
    # Regression: the script used a task attribute the task refactor renamed and failed on start.
    import subprocess
    import sys
    from pathlib import Path

    from peft_mtl.experiments.report import collect

    root = Path(__file__).parent.parent
    record = tmp_path / f"hf_baseline_{task}.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "hf_baseline.py"), "--task", task, "--epochs", "1",
                    "--backbone", str(tiny_backbone), "--data-dir", str(small_data), "--json", str(record)],
                   check=True, capture_output=True, cwd=tmp_path)
    rec = json.loads(record.read_text())
    assert rec["train_examples"] == 48 and rec["device"] and rec["total_parameters"] > rec["trainable_parameters"]
    metric = {"sst": "accuracy", "sts": "pearson"}[task]
    assert -1.0 <= rec["dev"][metric] <= 1.0
    (row,) = collect([tmp_path], tmp_path)
    assert row.reference and row.metrics == {task: rec["dev"][metric]} and row.total == rec["total_parameters"]


def test_the_zoomed_panel_spreads_out_the_best_runs_and_names_the_main_rows():
    import matplotlib.pyplot as plt

    from peft_mtl.experiments.report import ZOOM_POINTS, Row, figure

    def row(name, trainable, overall, seeds=1, mode="lora"):
        return Row(name=name, mode=mode, backbone="b", trainable=trainable, total=10**8, bytes_on_disk=1,
                   metrics={"sst": 0.5, "qqp": 0.8, "sts": 0.8}, overall=overall, train_seconds=1.0, detail="",
                   seeds=seeds, sd={"overall": 0.002} if seeds > 1 else {})

    rows = [row("heads", 3_000, 0.53, mode="heads"), row("diverged", 2_600_000, 0.52),
            row("sweep/st_r16", 2_600_000, 0.744, seeds=3), row("sweep/r4", 660_000, 0.740, seeds=3),
            row("ens.ensemble.json", 2_000_000, 0.750, mode="ensemble"), row("sweep/full", 22_000_000, 0.738, seeds=3)]
    fig = figure(rows)
    full_range, zoomed = fig.axes[0], fig.axes[1]
    assert full_range.get_ylim()[0] < 0.53
    low, high = zoomed.get_ylim()
    assert low == pytest.approx(0.750 - ZOOM_POINTS / 100) and high > 0.750
    named = {t.get_text() for t in zoomed.texts}
    assert {"st_r16", "r4", "full", "ens"} <= named and "heads" not in named and "diverged" not in named
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in zoomed.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


def test_a_rows_details_name_per_task_smart_and_the_distillation_teacher():
    from peft_mtl.experiments.report import _detail

    manifest = {"mode": "lora", "tasks": ["sst", "qqp"],
                "config": {"lora": {"rank": 16, "targets": "all-linear"}, "sampling": "uniform", "lr": 1e-3,
                           "epochs": 4, "smart": {"weight": 0.0, "task_weights": {"sst": 1.0}, "projection": "normalize"},
                           "teacher": "reports/ensemble_bagged.ensemble.json", "distill_weight": 0.5,
                           "distill_temperature": 2.0}}
    detail = _detail(manifest)
    assert "SMART λ=0, sst=1 normalized" in detail
    assert "distilled from ensemble_bagged.ensemble.json (α 0.5, T 2)" in detail


def test_the_table_gives_every_run_its_budget_in_the_optimiser_steps_it_took(tiny_backbone, small_data, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from peft_mtl.experiments.report import collect, markdown

    taken = []
    hook = register_optimizer_step_post_hook(lambda *_: taken.append(1))
    try:
        runs = tmp_path / "runs"
        steps = {}
        for name, overrides in {"mt_fixed": dict(tasks=["sst", "qqp", "sts"], epochs=2, steps_per_epoch=3),
                                "mt_pass": dict(tasks=["sst", "qqp", "sts"], epochs=1),
                                "sst_alone": dict(tasks=["sst"], epochs=2)}.items():
            before = len(taken)
            train(tiny_config(tiny_backbone, small_data, runs / name, **overrides), progress=False)
            steps[name] = len(taken) - before
    finally:
        hook.remove()
    # Whole passes differ by run: ΣN / batch for the three tasks together, N_sst / batch for SST alone.
    assert steps["mt_fixed"] == 6 and steps["mt_pass"] > steps["sst_alone"] / 2 > 0  # 1 pass of 3 tasks vs 2 of one
    rows = {r.name: r for r in collect([runs], tmp_path)}
    assert {n: rows[f"runs/{n}"].train_steps for n in steps} == steps
    table = markdown(list(rows.values()), None)
    assert "| train steps |" in table and f"| {steps['mt_pass']:,} |" in table


def test_an_early_stopped_run_counts_only_its_epochs_and_a_combined_row_adds_its_parts_steps():
    from peft_mtl.experiments.report import Row, add_up_parts, train_steps

    manifest = {"config": {"batch_size": 32, "epochs": 4, "steps_per_epoch": None},
                "train_examples": {"sst": 8544, "qqp": 16213, "sts": 6040}, "history": [{}, {}, {}, {}]}
    assert train_steps(manifest) == 4 * 963
    assert train_steps({**manifest, "history": [{}, {}]}) == 2 * 963  # stopped early after two epochs
    assert train_steps({**manifest, "config": {**manifest["config"], "steps_per_epoch": 400}}) == 1600
    assert train_steps({**manifest, "compressed_from": {"folder": "adapters/all"}}) is None  # not trained

    def row(name, steps, parts=()):
        return Row(name=name, mode="lora", backbone="b", trainable=1, total=10, bytes_on_disk=1, metrics={},
                   overall=None, train_seconds=1.0, detail="", train_steps=steps, parts=list(parts))

    combined = row("s/each_alone", None, ["s/a", "s/b"])
    add_up_parts([row("s/a", 1068), row("s/b", 2028), combined])
    assert combined.train_steps == 3096
    lacking = row("s/each_alone2", None, ["s/a", "s/missing"])
    add_up_parts([row("s/a", 1068), lacking])
    assert lacking.train_steps is None  # a part not listed: no made-up sum


def test_the_budget_panel_places_trained_runs_at_their_steps_and_names_the_seed_groups():
    import matplotlib.pyplot as plt

    from peft_mtl.experiments.report import Row, figure

    def row(name, steps, overall, mode="lora", grouped=True):
        return Row(name=name, mode=mode, backbone="b", trainable=2_000_000, total=10**8, bytes_on_disk=1,
                   metrics={"sst": 0.5, "qqp": 0.8, "sts": 0.8}, overall=overall, train_seconds=1.0, detail="",
                   seeds=3 if grouped else 1, sd={"overall": 0.002} if grouped else {}, train_steps=steps,
                   grouped=grouped)

    rows = [row("sweep/st_r16", 800, 0.744), row("sweep/full", 800, 0.738, mode="full"),
            row("sweep/st_r16_4ep", 3852, 0.753), row("sweep/full_4ep", 3852, 0.750, mode="full"),
            row("one_off", 3852, 0.751, grouped=False), row("sweep/heads", 800, 0.54, mode="heads"),
            row("stopped_early", 3683, 0.752, grouped=False),  # must not take the 3,852 budget's tick
            row("ens.ensemble.json", None, 0.77, mode="ensemble")]
    fig = figure(rows)
    budget = fig.axes[-1]
    placed = sorted(tuple(xy) for c in budget.collections if hasattr(c, "get_sizes") and len(c.get_sizes())
                    for xy in c.get_offsets())
    assert placed == sorted([(800, 0.744), (800, 0.738), (3852, 0.753), (3852, 0.750), (3852, 0.751),
                             (3683, 0.752)])  # no heads
    assert [t.get_text() for t in budget.get_xticklabels()] == ["800", "3,852"]
    assert {t.get_text() for t in budget.texts} == {"st_r16", "full", "st_r16_4ep", "full_4ep"}
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in budget.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


def test_columns_and_the_overall_rule_come_from_the_runs_tasks_not_a_fixed_list():
    """Tasks from task files get their own columns, headed by the metric their runs recorded first."""
    from peft_mtl.experiments.report import Row, collect, markdown, primary_metrics

    def row(name, metrics, names, overall):
        return Row(name=name, mode="lora", backbone="b", trainable=10, total=100, bytes_on_disk=0, metrics=metrics,
                   metric_names=names, overall=overall, train_seconds=None, detail="")

    names = {"intent": "macro_f1", "sts": "pearson"}
    rows = [row("a", {"intent": 0.8, "sts": 0.7}, names, 0.82), row("b", {"intent": 0.7}, names, 0.7)]
    text = markdown(rows, None)
    assert "| STS r | INTENT macro_f1 | overall |" in text and "SST" not in text  # benchmark tasks first
    assert "only for runs on exactly STS, INTENT" in text
    # The primary metric is the task's registered one, else the first the run recorded.
    assert primary_metrics({"sst": {"macro_f1": 0.4, "accuracy": 0.5}, "intent": {"mcc": 0.3, "accuracy": 0.9}}) == \
        {"sst": ("accuracy", 0.5), "intent": ("mcc", 0.3)}
    assert collect([], Path(".")) == []
