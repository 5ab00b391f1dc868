"""Experiment tracking through accelerate's trackers: a real run's config, per-step losses and
terms, per-epoch dev metrics, read back from TensorBoard's event files and MLflow's SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from peft_mtl.training.config import ConfigError, SmartSettings, TrackingSettings, TrainConfig  # noqa: E402
from peft_mtl.training.tracking import Trackers, flatten  # noqa: E402
from peft_mtl.training.train import train  # noqa: E402


@pytest.fixture(scope="module")
def tracked_run(tiny_backbone, small_data, tmp_path_factory) -> tuple[TrainConfig, Path, dict]:
    root = tmp_path_factory.mktemp("tracked")
    cfg = TrainConfig(tasks=["sst", "sts"], out=str(root / "runs" / "r1"), backbone=str(tiny_backbone),
                      data_dir=str(small_data), epochs=2, steps_per_epoch=3, batch_size=4, lr=5e-2, precision="fp32",
                      checkpoint_every=0, max_eval_examples=8, smart=SmartSettings(weight=1.0),
                      tracking=TrackingSettings(report_to=["tensorboard", "mlflow"], run_name="first"))
    summary = train(cfg, progress=False)
    return cfg, root / "runs" / "tracking", summary


def test_tensorboard_holds_every_step_and_epoch(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, tracking, _ = tracked_run
    (run_dir,) = (tracking / "tensorboard" / "peft_mtl").iterdir()  # default: beside the output folder
    assert run_dir.name == "first"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for task in ("sst", "sts"):
        assert {f"train/{task}/loss", f"train/{task}/task", f"train/{task}/smart"} <= tags
    assert {"train/lr", "train/grad_norm", "train/examples_per_s", "dev/sst/accuracy", "dev/sts/pearson",
            "dev/overall", "final/trainable_parameters"} <= tags
    assert [e.step for e in events.Scalars("train/lr")] == list(range(1, 7)), "one point per optimiser step"
    assert [e.step for e in events.Scalars("dev/overall")] == [3, 6], "one point per epoch, at its last step"
    smart = [e.value for e in events.Scalars("train/sst/smart")]
    assert len(smart) >= 1 and all(v >= 0 for v in smart)


def test_mlflow_run_in_sqlite_has_the_config_as_params_and_the_curves(tracked_run):
    from mlflow.tracking import MlflowClient

    cfg, tracking, summary = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tracking / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("peft_mtl")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in flatten(cfg.to_dict()).items()}, "params equal the config"
    assert run.data.params["lr"] == "0.05" and run.data.params["lora.rank"] == "16"
    # uniform sampling trains one task per step: together the tasks' loss curves cover every step once
    steps = [m.step for t in ("sst", "sts") for m in client.get_metric_history(run.info.run_id, f"train/{t}/loss")]
    assert sorted(steps) == list(range(1, 7))
    dev = client.get_metric_history(run.info.run_id, "dev/overall")
    assert [m.step for m in dev] == [3, 6]
    assert max(m.value for m in dev) == pytest.approx(summary["overall"])
    assert run.data.metrics["final/trainable_parameters"] == summary["trainable_parameters"]


def test_only_the_main_process_opens_trackers(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "r"), tracking=TrackingSettings(report_to=["tensorboard"]))
    assert Trackers(cfg, is_main=False).trackers == []
    assert not (tmp_path / "tracking").exists()


def test_an_unknown_tracker_is_a_flag_error():
    with pytest.raises(ConfigError, match="--report-to: unknown tracker 'comet'"):
        TrainConfig(out="x", tracking=TrackingSettings(report_to=["comet"])).validate()


def test_mlflow_uri_and_group_say_where_the_run_goes(tiny_backbone, small_data, tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    cfg = TrainConfig(tasks=["sst"], out=str(tmp_path / "runs" / "r"), backbone=str(tiny_backbone),
                      data_dir=str(small_data), epochs=1, steps_per_epoch=2, batch_size=4, precision="fp32",
                      checkpoint_every=0, max_eval_examples=8,
                      tracking=TrackingSettings(report_to=["mlflow"], mlflow_uri=store, group="mine"))
    train(cfg, progress=False)
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert run.info.run_name == "r" and len(client.get_metric_history(run.info.run_id, "train/sst/loss")) == 2
    assert not (tmp_path / "runs" / "tracking" / "mlflow.db").exists(), "nothing in the default store"
