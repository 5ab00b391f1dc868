"""Hyperparameter search on Optuna: a space file, TPE, pruning from the training loop, resumable storage.

A space file (YAML, beside the sweep recipes) names the fixed flags and the searched ones::

    base: --tasks sst,sts --epochs 2 --steps-per-epoch 100     # every trial's fixed flags
    seed: 0                                                    # the sampler's seed and every trial's --seed
    space:
      --lr: {low: 1e-4, high: 3e-3, log: true}                 # float (log-uniform with log: true)
      --lora-rank: [4, 8, 16]                                  # categorical
      --smart-weight: {low: 0.0, high: 1.0}
      --sampling: [uniform, sqrt]
      --pcgrad: [true, false]                                  # a switch: present or not
    pruner: {type: median, startup_trials: 3, warmup_epochs: 0}   # median | percentile | none
    enqueue:                                                   # trials to run first (e.g. the default recipe)
      - {--lr: 1e-3, --lora-rank: 16}

Each trial is ``peft-mtl train BASE PARAMS --seed SEED --out OUT/trials/NNNN`` run in-process;
its objective is the best epoch's dev overall score (one task: its primary metric), and every
epoch's dev overall is reported to the trial by a callback of the training loop, which raises
Optuna's ``TrialPruned`` when the pruner says so (a pruned trial's folder is removed; the study
keeps its record). The study lives in ``--storage`` (default ``sqlite:///OUT/study.db``), so a
search interrupted anywhere resumes where it stopped, and any number of processes — or machines,
with a PostgreSQL/MySQL URL — join one study by pointing at the same storage (Optuna's
distributed mode); ``--trials N`` is the study's total, whoever runs them.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import write_json_atomic, write_text_atomic
from ..training.config import ConfigError, config_from_flags
from ..training.tracking import TrainCallback
from .sweep import load_sweep, plan, run_jobs, summary_paths, write_summary

logger = logging.getLogger(__name__)
PRUNERS = ("median", "percentile", "none")


@dataclass
class Param:
    flag: str
    choices: list | None = None  # categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def name(self) -> str:
        return self.flag.lstrip("-")


@dataclass
class SearchSpace:
    """A space file, checked: fixed flags, searched parameters, pruner, trials to run first."""

    base: list[str]
    params: list[Param]
    seed: int = 0
    pruner: dict = field(default_factory=lambda: {"type": "median"})
    enqueue: list[dict] = field(default_factory=list)
    source: str = "<memory>"

    @property
    def name(self) -> str:
        return Path(self.source).stem


def _param(flag: str, value: Any, where: str) -> Param:
    if not isinstance(flag, str) or not flag.startswith("--"):
        raise ConfigError(f"{where}: space keys are train flags such as --lr, got {flag!r}")
    if isinstance(value, list) and value:
        return Param(flag, choices=value)
    if isinstance(value, dict) and {"low", "high"} <= set(value):
        unknown = set(value) - {"low", "high", "log", "int"}
        if unknown:
            raise ConfigError(f"{where}: {flag}: unknown keys {sorted(unknown)} (low, high, log, int)")
        low, high = float(value["low"]), float(value["high"])
        if not low < high or (value.get("log") and low <= 0):
            raise ConfigError(f"{where}: {flag}: need low < high (and low > 0 with log: true)")
        return Param(flag, low=low, high=high, log=bool(value.get("log")), integer=bool(value.get("int")))
    raise ConfigError(f"{where}: {flag}: give a list of choices or {{low: ..., high: ..., log: true}}")


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file: every combination's flags must parse as `peft-mtl train` would."""
    import yaml  # deferred: PyYAML is a dependency, but only files need it

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the space file ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("space"), dict) or not data["space"]:
        raise ConfigError(f"{path}: a space file needs 'space:' mapping train flags to choices or ranges")
    unknown = set(data) - {"base", "seed", "space", "pruner", "enqueue"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; a space file has base, seed, space, pruner, enqueue")
    base = shlex.split(data.get("base") or "") if isinstance(data.get("base", ""), str) else list(data["base"])
    reserved = {"--out", "--seed", "--resume", "--overwrite"} & set(base) | {"--out", "--seed"} & set(data["space"])
    if reserved:
        raise ConfigError(f"{path}: {sorted(reserved)} are set by the search itself")
    params = [_param(k, v, str(path)) for k, v in data["space"].items()]
    pruner = data.get("pruner") or {"type": "median"}
    if pruner.get("type") not in PRUNERS:
        raise ConfigError(f"{path}: pruner type {pruner.get('type')!r}; choose one of {', '.join(PRUNERS)}")
    space = SearchSpace(base, params, int(data.get("seed", 0)), pruner, list(data.get("enqueue") or []), str(path))
    # The corners of the space must be valid runs: a typo fails now, not after an hour of trials.
    for corner in ({p.flag: (p.choices[0] if p.choices else p.low) for p in params},
                   {p.flag: (p.choices[-1] if p.choices else p.high) for p in params}, *space.enqueue):
        trial_flags(space, corner, "unused", check=True)
    return space


def _value(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def trial_flags(space: SearchSpace, values: dict[str, Any], out: str, check: bool = False) -> list[str]:
    """``peft-mtl train`` flags of one trial: base, then each parameter (a true switch as its flag alone)."""
    flags = list(space.base)
    for flag, value in values.items():
        if isinstance(value, bool):
            flags += [flag] if value else []
        else:
            flags += [flag, _value(value)]
    flags += ["--seed", str(space.seed), "--out", out]
    if check:
        try:
            config_from_flags(flags)
        except ConfigError as err:
            raise ConfigError(f"{space.source}: the trial {shlex.join(flags)} is not a valid run: {err}") from None
    return flags


class EpochReports(TrainCallback):
    """Reports each epoch's dev objective to the trial; raises TrialPruned when the pruner says so."""

    def __init__(self, trial, objective_of):
        self.trial, self.objective_of = trial, objective_of

    def on_epoch(self, epoch: int, step: int, metrics: dict, overall: float | None) -> None:
        import optuna  # deferred: the optional search extra

        value = self.objective_of(metrics, overall)
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: dev {value:.4f}")


def objective_value(metrics: dict, overall: float | None) -> float:
    """Dev overall score; for one task its primary metric (the first recorded)."""
    if overall is not None:
        return float(overall)
    (task_metrics,) = metrics.values()
    return float(next(iter(task_metrics.values())))


def open_study(space: SearchSpace, storage: str, study_name: str | None = None, worker: int = 0):
    """The study in ``storage`` (created or joined), TPE seeded, the space's pruner, crashed trials retried once.

    The sampler's seed is the space's, offset by the worker and by the trials already in the study:
    a resumed search or a second worker seeded alike would propose the same points again."""
    import optuna  # deferred: the optional search extra

    kind = space.pruner.get("type", "median")
    startup = int(space.pruner.get("startup_trials", 3))
    warmup = int(space.pruner.get("warmup_epochs", 0))
    pruner = (optuna.pruners.NopPruner() if kind == "none" else
              optuna.pruners.PercentilePruner(float(space.pruner.get("percentile", 25.0)), n_startup_trials=startup,
                                              n_warmup_steps=warmup) if kind == "percentile" else
              optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup))
    if "://" in storage:
        # A worker that dies leaves its trial RUNNING; the heartbeat marks it failed and the retry callback
        # puts its parameters back in the queue, so a crashed search still finishes every trial.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                storage, heartbeat_interval=30, grace_period=120,
                failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
                engine_kwargs={"connect_args": {"timeout": 60}} if storage.startswith("sqlite:") else {})
    study = optuna.create_study(study_name=study_name or space.name, storage=storage, direction="maximize",
                                pruner=pruner, load_if_exists=True)
    study.sampler = optuna.samplers.TPESampler(seed=space.seed + 10_007 * worker + len(study.trials))
    if space.enqueue and not study.user_attrs.get("enqueued"):
        study.set_user_attr("enqueued", True)
        for values in space.enqueue:
            study.enqueue_trial({k.lstrip("-"): v for k, v in values.items()})
    return study


def _suggest(trial, param: Param):
    if param.choices is not None:
        return trial.suggest_categorical(param.name, param.choices)
    if param.integer:
        return trial.suggest_int(param.name, int(param.low), int(param.high), log=param.log)
    return trial.suggest_float(param.name, param.low, param.high, log=param.log)


def run_trials(space: SearchSpace, out: Path, trials: int, storage: str, tracking: list[str] | None = None,
               progress: bool = False, worker: int = 0) -> None:
    """Run trials in this process until the study holds ``trials`` finished or running ones."""
    import optuna  # deferred: the optional search extra

    from ..training.train import train  # deferred: torch

    study = open_study(space, storage, worker=worker)

    def objective(trial) -> float:
        values = {p.flag: _suggest(trial, p) for p in space.params}
        folder = out / "trials" / f"{trial.number:04d}"
        flags = trial_flags(space, values, str(folder)) + ["--overwrite", "--no-progress"]
        flags += tracking or []
        flags += ["--tracking-group", space.name, "--run-name", f"trial-{trial.number:04d}"] if tracking else []
        trial.set_user_attr("flags", flags)
        cfg = config_from_flags(flags)
        logger.info(f"search: trial {trial.number}: {shlex.join(trial_flags(space, values, str(folder)))}")
        try:
            summary = train(cfg, progress=progress, callbacks=[EpochReports(trial, objective_value)])
        except optuna.TrialPruned:
            shutil.rmtree(folder, ignore_errors=True)  # the study keeps the record; the weights are not needed
            raise
        trial.set_user_attr("trainable_parameters", summary["trainable_parameters"])
        trial.set_user_attr("train_seconds", summary["train_seconds"])
        return objective_value(summary["dev"], summary["overall"])

    # Trials finished or running anywhere count (so workers do not overshoot); enqueued ones waiting do not.
    counted = tuple(getattr(optuna.trial.TrialState, s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"))
    if len(study.get_trials(deepcopy=False, states=counted)) < trials:
        study.optimize(objective, n_trials=trials, callbacks=[optuna.study.MaxTrialsCallback(trials, states=counted)],
                       catch=(ConfigError,))


def run_workers(space_file: str, out: Path, trials: int, storage: str, workers: int, extra: list[str]) -> list[int]:
    """``workers`` processes joining one study (each ``peft-mtl search --workers 1``); their exit codes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    procs = []
    for k in range(workers):
        log = open(out / "logs" / f"worker{k}.log", "w", encoding="utf-8")
        cmd = [sys.executable, "-m", "peft_mtl.cli", "search", space_file, "--out", str(out), "--trials", str(trials),
               "--storage", storage, "--workers", "1", "--worker-index", str(k), "--no-report", *extra]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(1.0)  # the first creates the study; the others join it
    codes = []
    for proc, log in procs:
        codes.append(proc.wait())
        log.close()
    return codes


def importances(study) -> dict[str, float]:
    import optuna  # deferred: the optional search extra

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2 or not study.best_trial.params:
        return {}
    try:
        return {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # e.g. every complete trial with the same parameters
        return {}


def write_report(space: SearchSpace, out: Path, storage: str, command: str, confirmed: Path | None = None) -> dict:
    """``OUT/search.md`` + ``search.json`` (best trials, importances, the best command) and Optuna's plots;
    ``confirmed``: the sweep table's JSON of the best recipe re-trained over seeds."""
    import optuna  # deferred: the optional search extra

    study = open_study(space, storage)
    states = {}
    for t in study.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    complete = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: -t.value)
    best = complete[0] if complete else None
    best_flags = trial_flags(space, {p.flag: best.params[p.name] for p in space.params}, str(out / "best")) if best else []
    machine = None
    if best is not None and (out / "trials" / f"{best.number:04d}" / "peft_mtl.json").is_file():
        m = json.loads((out / "trials" / f"{best.number:04d}" / "peft_mtl.json").read_text())
        machine = f"{m.get('device')}, {m.get('threads')} threads, precision {m.get('precision')}"
    record = {"command": command, "study": study.study_name, "storage": storage if "://" in storage else None,
              "machine": machine,
              "states": states, "importances": importances(study) if best else {},
              "best": {"number": best.number, "value": best.value, "params": best.params,
                       "command": "peft-mtl train " + shlex.join(best_flags)} if best else None,
              "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                          "epochs_reported": len(t.intermediate_values),
                          "trainable_parameters": t.user_attrs.get("trainable_parameters"),
                          "train_seconds": t.user_attrs.get("train_seconds")} for t in study.trials]}
    if confirmed is not None and confirmed.is_file():
        best_row = json.loads(confirmed.read_text())["recipes"]["best"]
        record["confirmed"] = {"table": str(confirmed.with_suffix(".md")), "seeds": best_row["seeds"],
                               "scores": {k: {"mean": v["mean"], "sd": v["sd"]} for k, v in best_row["scores"].items()}}
    write_json_atomic(out / "search.json", record)
    plots = _plots(study, out) if complete else []
    write_text_atomic(out / "search.md", markdown(record, space, plots))
    return record


def _plots(study, out: Path) -> list[str]:
    import matplotlib  # deferred: plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plots only

    from optuna.visualization import matplotlib as ovm  # deferred: the optional search extra

    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, fn in (("history", ovm.plot_optimization_history), ("importances", ovm.plot_param_importances)):
            try:
                ax = fn(study)
            except (ValueError, RuntimeError):  # importances need two or more complete trials that differ
                continue
            figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            figure.set_size_inches(7, 4)
            figure.tight_layout()
            figure.savefig(out / f"search_{name}.png", dpi=110)
            written.append(f"search_{name}.png")
            plt.close(figure)
    return written


def markdown(record: dict, space: SearchSpace, plots: list[str]) -> str:
    names = [p.name for p in space.params]
    lines = [f"# Search: {record['study']}", "", f"Command: `{record['command']}`"
             + (f" — the trials ran on {record['machine']}." if record.get("machine") else ""), "",
             f"Fixed flags: `{shlex.join(space.base)}`; seed {space.seed}; objective: the best epoch's dev overall "
             f"score (one task: its primary metric); pruner: {space.pruner.get('type')}.", "",
             "Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(record["states"].items())) + ".", ""]
    ranked = sorted((t for t in record["trials"] if t["state"] == "complete"), key=lambda t: -t["value"])
    if ranked:
        lines += ["## Best trials", "", "| trial | dev | " + " | ".join(names) + " | trainable | s |",
                  "|---:|---:|" + "---|" * len(names) + "---:|---:|"]
        for t in ranked[:10]:
            lines.append(f"| {t['number']} | {t['value']:.4f} | " + " | ".join(_value(t["params"].get(n)) for n in names)
                         + f" | {t['trainable_parameters'] or ''} | {t['train_seconds'] or ''} |")
    pruned = [t for t in record["trials"] if t["state"] == "pruned"]
    if pruned:
        lines += ["", "Pruned (stopped after the epochs shown): " + ", ".join(
            f"trial {t['number']} ({t['epochs_reported']} epoch(s); " + ", ".join(
                f"{k}={_value(v)}" for k, v in t["params"].items()) + ")" for t in pruned) + "."]
    if record["importances"]:
        lines += ["", "## Parameter importances (Optuna's default evaluator, PED-ANOVA, over the complete trials)", "",
                  "| parameter | importance |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in record["importances"].items()]
    if record["best"]:
        lines += ["", "## The best trial's recipe", "", "```bash", record["best"]["command"], "```", ""]
        c = record.get("confirmed")
        if c:
            shown = ", ".join(f"{k} {v['mean']:.4f} ± {v['sd']:.4f}" if v["sd"] is not None else f"{k} {v['mean']:.4f}"
                              for k, v in c["scores"].items())
            lines.append(f"Re-trained over seeds {c['seeds']} (`--confirm-seeds`): {shown} (mean ± sd; "
                         f"table: `{c['table']}`). Its search score was one seed's.")
        else:
            lines.append("One seed decides nothing: `--confirm-seeds 3` re-trains it over seeds (mean ± sd in the "
                         "sweep table).")
    for plot in plots:
        lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


def confirm(space: SearchSpace, out: Path, record: dict, seeds: int, workers: int) -> Path | None:
    """Re-train the best recipe over ``seeds`` seeds through the sweep table; returns the table's JSON path."""
    if not record.get("best"):
        return None
    flags = trial_flags(space, {p.flag: record["best"]["params"][p.name] for p in space.params}, "unused")
    flags = flags[:flags.index("--seed")]  # the sweep sets --seed and --out
    base_len = len(space.base)
    sweep_file = out / "confirm.yaml"
    write_text_atomic(sweep_file, json.dumps({"base": shlex.join(flags[:base_len]), "seeds": list(range(seeds)),
                                              "recipes": {"best": shlex.join(flags[base_len:])}}, indent=1))
    spec = load_sweep(sweep_file)
    runs = out / "confirm"
    run_jobs(plan(spec, runs), runs, workers=workers)
    write_summary(spec, runs, f"peft-mtl sweep {sweep_file} --out {runs}")
    return summary_paths(spec, runs)[0]
