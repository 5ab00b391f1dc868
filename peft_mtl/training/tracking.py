"""Experiment tracking through accelerate's trackers, and the training loop's callbacks.

``peft-mtl train --report-to tensorboard,mlflow,trackio,wandb`` logs, on the main process only:

- at the start, the full config as hyperparameters (nested fields flattened: ``lora.rank``);
- per optimiser step, each task's loss and each term of it (``task``, ``smart``, ``bregman``,
  ``distill``), the learning rate, the gradient norm before clipping and examples per second;
- per epoch, every task's dev metrics and the overall score;
- at the end, trainable parameters and wall time (the output folder is the ``out`` parameter).

The trackers are accelerate's (:mod:`accelerate.tracking`); this module only decides their
places: TensorBoard under ``DIR/tensorboard/GROUP/RUN``, MLflow in ``sqlite:///DIR/mlflow.db``
(a real database file, no server; ``--mlflow-uri`` for any other store or server) with the group
as its experiment, trackio and wandb with the group as their project. ``DIR`` defaults to
``tracking/`` beside the output folder, so the runs of one folder share one database.

The loop calls :class:`TrainCallback` hooks; a tracker is one, a search's pruner another.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .config import TrainConfig
from .optimization import StepRecord

logger = logging.getLogger(__name__)

NESTED = ("lora", "smart", "tracking")  # TrainConfig's nested settings: their fields become lora.rank, ...
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"}


class TrackingError(UserError):
    """A tracker cannot start; the message names the missing package or the bad setting."""


class TrainCallback:
    """Hooks the training loop calls; each does nothing unless overridden."""

    def on_step(self, step: int, record: StepRecord, seconds: float) -> None:
        """After optimiser step ``step`` (1-based, over the whole run), which took ``seconds``."""

    def on_epoch(self, epoch: int, step: int, metrics: dict[str, dict[str, float]], overall: float | None) -> None:
        """After epoch ``epoch``'s dev evaluation; raising here stops the run (a pruned trial)."""

    def on_end(self, summary: dict) -> None:
        """After the set was saved; ``summary`` is what ``train`` returns."""

    def close(self, status: str) -> None:
        """The run is over: ``finished``, ``failed`` or ``stopped`` (pruned or interrupted)."""


def flatten(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config → ``{"lora.rank": 16, ...}``; lists, dicts and None as JSON text (what trackers accept)."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key in NESTED and isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def tracking_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    return Path(cfg.tracking.dir) if cfg.tracking.dir else out.resolve().parent / "tracking"


class Trackers(TrainCallback):
    """accelerate's trackers for one run, opened on construction (main process only)."""

    def __init__(self, cfg: TrainConfig, is_main: bool = True):
        self.cfg, self.trackers, self._mlflow_uri = cfg, [], None
        if not is_main or not cfg.tracking.report_to:
            return
        directory = tracking_dir(cfg)
        directory.mkdir(parents=True, exist_ok=True)
        group = cfg.tracking.group or "peft_mtl"
        run_name = cfg.tracking.run_name or Path(cfg.out).name
        for name in cfg.tracking.report_to:
            self.trackers.append(self._open(name, directory, group, run_name))
        params = flatten(cfg.to_dict())
        for tracker in self.trackers:
            tracker.store_init_configuration(params)
        logger.info(f"tracking: {', '.join(cfg.tracking.report_to)} as run {run_name!r} of {group!r} in {directory}")

    def _open(self, name: str, directory: Path, group: str, run_name: str):
        try:
            __import__(PACKAGES[name])
        except ImportError:
            raise TrackingError(f"--report-to {name}: the {PACKAGES[name]} package is missing; pip install "
                                f"{'peft_mtl[track]' if name in ('tensorboard', 'mlflow') else PACKAGES[name]}") from None
        from accelerate import tracking  # deferred: accelerate imports torch

        if name == "tensorboard":
            tracker = tracking.TensorBoardTracker(run_name, str(directory / "tensorboard" / group))
        elif name == "mlflow":
            import mlflow  # deferred: the optional track extra

            # MLflow keeps its store in a process-wide setting; it is put back when the run closes.
            self._mlflow_uri = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(self.cfg.tracking.mlflow_uri or f"sqlite:///{(directory / 'mlflow.db').resolve()}")
            tracker = tracking.MLflowTracker(experiment_name=group, logging_dir=str(directory / "mlflow-artifacts"),
                                             run_name=run_name)
        elif name == "trackio":
            tracker = tracking.TrackioTracker(group, name=run_name)
        else:
            tracker = tracking.WandBTracker(group, name=run_name, dir=str(directory))
        tracker.start()
        return tracker

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def on_step(self, step: int, record: StepRecord, seconds: float) -> None:
        if not self.trackers:
            return
        values = {"train/lr": record.lr, "train/examples_per_s": record.rows / max(seconds, 1e-9)}
        if record.grad_norm is not None:
            values["train/grad_norm"] = float(record.grad_norm)
        for task, loss in record.losses.items():
            values[f"train/{task}/loss"] = loss
            for term, value in record.terms.get(task, {}).items():
                values[f"train/{task}/{term}"] = value
        self.log(values, step)

    def on_epoch(self, epoch: int, step: int, metrics: dict[str, dict[str, float]], overall: float | None) -> None:
        values = {f"dev/{task}/{name}": float(v) for task, m in metrics.items() for name, v in m.items()}
        values["epoch"] = float(epoch)
        if overall is not None:
            values["dev/overall"] = float(overall)
        self.log(values, step)

    def on_end(self, summary: dict) -> None:
        self.log({"final/trainable_parameters": float(summary["trainable_parameters"]),
                  "final/train_seconds": float(summary["train_seconds"])}, summary.get("step", 0))

    def close(self, status: str) -> None:
        for tracker in self.trackers:
            if getattr(tracker, "name", "") == "mlflow" and status != "finished":
                import mlflow  # deferred: the optional track extra

                mlflow.end_run(status="FAILED" if status == "failed" else "KILLED")
            else:
                tracker.finish()
        if self._mlflow_uri is not None:
            import mlflow  # deferred: the optional track extra

            mlflow.set_tracking_uri(self._mlflow_uri)
        self.trackers = []


class Hooks:
    """The callbacks of one run, called in order."""

    def __init__(self, callbacks: list[TrainCallback]):
        self.callbacks, self.interrupted = callbacks, False

    def step(self, step: int, record: StepRecord | None, seconds: float) -> None:
        if record is not None:
            for c in self.callbacks:
                c.on_step(step, record, seconds)

    def epoch(self, epoch: int, step: int, metrics: dict, overall: float | None) -> None:
        for c in self.callbacks:
            c.on_epoch(epoch, step, metrics, overall)

    def end(self, summary: dict) -> None:
        for c in self.callbacks:
            c.on_end(summary)


@contextmanager
def run_hooks(cfg: TrainConfig, is_main: bool, extra: list[TrainCallback] | None) -> Iterator[Hooks]:
    """The run's trackers and ``extra`` callbacks, each closed with the run's outcome."""
    hooks = Hooks([Trackers(cfg, is_main), *(extra or [])])
    status = "failed"
    try:
        yield hooks
        status = "stopped" if hooks.interrupted else "finished"
    except KeyboardInterrupt:
        status = "stopped"
        raise
    except BaseException as err:
        # optuna.TrialPruned is a pruned trial, not a failure (named here: optuna is optional)
        status = "stopped" if type(err).__name__ == "TrialPruned" else "failed"
        raise
    finally:
        for callback in hooks.callbacks:
            callback.close(status)
