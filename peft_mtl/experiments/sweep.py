"""Recipe search: train every recipe of a sweep file over several seeds, compare mean ± sd.

A sweep file (YAML or JSON) names a base command, the seeds and the recipes::

    base: --tasks sst,qqp,sts --epochs 2 --steps-per-epoch 400 --sampling uniform
    seeds: [0, 1, 2]
    baseline: shared_r16          # the recipe the others are compared with
    recipes:
      shared_r16: ""
      shared_r4: --lora-rank 4 --lora-alpha 8

Each (recipe, seed) is ``peft-mtl train BASE RECIPE --seed S --out OUT/RECIPE/seedS`` in a
process of its own; several run side by side with the cores split between them. A run whose
manifest exists is not trained again, so an interrupted sweep resumes where it stopped and a
recipe added to the file trains only what is new (two sweep files may share an OUT and so reuse
each other's runs of a common recipe). ``OUT/NAME.sweep.json`` and ``OUT/NAME.sweep.md`` (NAME: the
sweep file's stem) then
hold, per recipe, the mean ± sample sd over seeds of every task's primary metric and of the
overall score, the trainable parameters and the training time, and for each recipe its
difference from the baseline with a verdict: a difference counts as real only when it is larger
than twice the seed sd (the pooled sd of the two recipes) — one seed apart is noise here.

``combine:`` names rows made of single-task recipes, each task served by the run that trained it
alone (what ``peft-mtl ensemble`` of those sets would score: one member per task)::

    combine:
      lora_each_alone: [lora_sst, lora_qqp, lora_sts]

Per seed, the combined row takes each task's dev metrics from its own run and computes the
overall score from them; trainable parameters, bytes and training time add up. It is compared
with the baseline like a recipe, and ``peft-mtl report`` lists it as one row.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts import folder_bytes, write_json_atomic
from ..data.metrics import overall_score
from ..model.saved_sets import MANIFEST
from ..training.config import ConfigError, config_from_flags


def summary_paths(spec: "SweepSpec", out: Path) -> tuple[Path, Path]:
    """Where a sweep's table goes: named after its file, so sweeps sharing a folder keep their own."""
    stem = Path(spec.source).stem
    return out / f"{stem}.sweep.json", out / f"{stem}.sweep.md"


@dataclass
class SweepSpec:
    """What to train: ``base`` flags shared by all, one flag list per recipe, the seeds."""

    recipes: dict[str, list[str]]
    base: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: str | None = None
    source: str = "<memory>"
    combine: dict[str, list[str]] = field(default_factory=dict)  # row name -> single-task recipes


@dataclass
class Job:
    recipe: str
    seed: int
    folder: Path
    argv: list[str]  # the `peft-mtl` arguments (after the program name)

    @property
    def done(self) -> bool:
        return (self.folder / MANIFEST).is_file()


def _flags(value, where: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise ConfigError(f"{where}: give the flags as one string or a list of strings")


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; every recipe's flags are parsed as `peft-mtl train` would."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the sweep file ({err.strerror})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml and json raise their own types; one message is enough
        raise ConfigError(f"{path}: not valid {'YAML' if path.suffix != '.json' else 'JSON'} ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("recipes"), dict) or not data["recipes"]:
        raise ConfigError(f"{path}: a sweep file needs 'recipes:' mapping names to train flags")
    unknown = set(data) - {"base", "seeds", "baseline", "recipes", "combine"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; a sweep file has base, seeds, baseline, "
                          f"recipes, combine")
    seeds = data.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a list of integers, e.g. [0, 1, 2]")
    spec = SweepSpec(recipes={str(k): _flags(v, f"{path}: recipe {k!r}") for k, v in data["recipes"].items()},
                     base=_flags(data.get("base"), f"{path}: base"), seeds=seeds, baseline=data.get("baseline"),
                     source=str(path))
    if spec.baseline is not None and spec.baseline not in spec.recipes:
        raise ConfigError(f"{path}: baseline {spec.baseline!r} is not one of the recipes {sorted(spec.recipes)}")
    tasks: dict[str, list[str]] = {}
    for name, flags in spec.recipes.items():
        reserved = {"--out", "--seed", "--resume", "--overwrite"} & set(spec.base + flags)
        if reserved:
            raise ConfigError(f"{path}: recipe {name!r}: {sorted(reserved)} are set by the sweep itself")
        tasks[name] = _check_flags(spec.base + flags, f"{path}: recipe {name!r}")
    spec.combine = _load_combine(data.get("combine"), spec, tasks, path)
    return spec


def _load_combine(raw, spec: SweepSpec, tasks: dict[str, list[str]], path: Path) -> dict[str, list[str]]:
    """Check ``combine:``: each row joins existing recipes that train different tasks."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, list) and v for v in raw.values()):
        raise ConfigError(f"{path}: 'combine:' maps a row name to a list of recipes, e.g. "
                          f"lora_each_alone: [lora_sst, lora_qqp, lora_sts]")
    combine = {}
    for name, parts in raw.items():
        name, parts = str(name), [str(p) for p in parts]
        if name in spec.recipes:
            raise ConfigError(f"{path}: combined row {name!r} has the name of a recipe; give it its own")
        missing = [p for p in parts if p not in spec.recipes]
        if missing:
            raise ConfigError(f"{path}: combined row {name!r}: {missing} are not recipes of this file")
        trained = [t for p in parts for t in tasks[p]]
        if len(trained) != len(set(trained)):
            raise ConfigError(f"{path}: combined row {name!r}: its recipes train overlapping tasks "
                              f"({', '.join(f'{p}: {tasks[p]}' for p in parts)}); each task must come from one run")
        combine[name] = parts
    return combine


def _check_flags(flags: list[str], where: str) -> list[str]:
    """Fail now, not after hours of the other recipes' training, on a misspelt flag or bad value.
    Returns the tasks the recipe trains."""
    try:
        config = config_from_flags([*flags, "--out", "unused"])
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return list(config.tasks)


def plan(spec: SweepSpec, out: Path, tracking: list[str] | None = None) -> list[Job]:
    """Every (recipe, seed) run in file order, seeds inner (so early results span the recipes' first seeds).

    ``tracking``: ``--report-to ...`` flags passed on to every run, grouped under the sweep's name
    (one tracked run per recipe and seed)."""
    jobs = []
    for seed in spec.seeds:
        for name, flags in spec.recipes.items():
            folder = out / name / f"seed{seed}"
            tracked = [*tracking, "--tracking-group", Path(spec.source).stem, "--run-name", f"{name}-seed{seed}"] \
                if tracking else []
            jobs.append(Job(name, seed, folder, ["train", *spec.base, *flags, "--seed", str(seed),
                                                 "--out", str(folder), "--overwrite", "--no-progress", *tracked]))
    return jobs


# Settings that do not change what a run learns: a finished run may differ in these and still count.
_IGNORED_SETTINGS = {"out", "overwrite", "checkpoint_every", "trace_dir", "eval_batch_size", "tracking"}


def stale_runs(jobs: list[Job]) -> list[str]:
    """Finished runs whose recorded settings differ from what their recipe asks for now.

    Reusing finished runs is what makes a sweep resumable; reusing one trained under other flags
    (a recipe edited in the file, or two files giving one name to different recipes) would put its
    scores under the wrong recipe, so the sweep refuses instead.
    """
    problems = []
    for job in jobs:
        if not job.done:
            continue
        manifest = json.loads((job.folder / MANIFEST).read_text())
        recorded = dict(manifest.get("config") or {})
        wanted = config_from_flags(job.argv[1:]).to_dict()  # argv: ["train", *flags]
        # `auto` is whatever the machine made of it: a run trained under `auto` on a CPU without
        # native bf16 ran in fp32, and counts for a recipe that pins `--precision fp32`.
        if recorded.get("precision") == "auto" and wanted.get("precision") not in (None, "auto"):
            recorded["precision"] = manifest.get("precision", "auto")
        differ = sorted(k for k in set(recorded) & set(wanted) - _IGNORED_SETTINGS if recorded[k] != wanted[k])
        if differ:
            shown = ", ".join(f"{k}: trained {recorded[k]!r}, recipe asks {wanted[k]!r}" for k in differ[:3])
            problems.append(f"{job.folder} ({shown})")
    return problems


def run_jobs(jobs: list[Job], out: Path, workers: int = 1, threads: int | None = None,
             log: Callable[[str], None] = logging.getLogger(__name__).info) -> list[Job]:
    """Train the jobs not yet done, ``workers`` at a time; returns the ones that failed.

    Each process gets ``threads`` CPU threads (default: the cores divided among the workers),
    its output in ``OUT/logs/RECIPE.seedS.log``.
    """
    pending = [j for j in jobs if not j.done]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads or max(1, cores // max(1, workers))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log(f"sweep: {len(jobs) - len(pending)} of {len(jobs)} runs already done; training {len(pending)} "
        f"({workers} at a time, {threads} thread(s) each)")
    running: list[tuple[Job, subprocess.Popen, float, object]] = []
    failed: list[Job] = []
    finished = 0
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop(0)
            handle = open(out / "logs" / f"{job.recipe}.seed{job.seed}.log", "w", encoding="utf-8")
            proc = subprocess.Popen([sys.executable, "-m", "peft_mtl.cli", *job.argv], stdout=handle,
                                    stderr=subprocess.STDOUT, env=env)
            running.append((job, proc, time.monotonic(), handle))
        time.sleep(0.5)
        for item in list(running):
            job, proc, started, handle = item
            if proc.poll() is None:
                continue
            running.remove(item)
            handle.close()
            finished += 1
            took = time.monotonic() - started
            if proc.returncode == 0 and job.done:
                log(f"sweep: [{finished}/{len(jobs)}] {job.recipe} seed {job.seed} done in {took / 60:.1f} min")
            else:
                failed.append(job)
                log(f"sweep: [{finished}/{len(jobs)}] {job.recipe} seed {job.seed} FAILED (exit {proc.returncode}); "
                    f"see {out / 'logs' / f'{job.recipe}.seed{job.seed}.log'}")
    return failed


def _primary_metrics(manifest: dict) -> dict[str, str]:
    return {t: spec["metrics"][0] for t, spec in manifest.get("task_specs", {}).items() if spec.get("metrics")}


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def _manifests(spec: SweepSpec, out: Path) -> dict[str, dict[int, dict]]:
    """recipe -> seed -> manifest, for the finished runs."""
    found: dict[str, dict[int, dict]] = {}
    for name in spec.recipes:
        found[name] = {s: json.loads((out / name / f"seed{s}" / MANIFEST).read_text()) for s in spec.seeds
                       if (out / name / f"seed{s}" / MANIFEST).is_file()}
    return found


def _bytes(manifest: dict, folder: Path) -> int:

    return int(manifest["bytes_on_disk"]) if "bytes_on_disk" in manifest else folder_bytes(folder)


def _recipe_summary(name: str, flags: list[str], runs: dict[int, dict]) -> dict:
    if not runs:
        return {"flags": shlex.join(flags), "seeds": []}
    manifests = list(runs.values())
    scores: dict[str, dict] = {}
    for task, metric in _primary_metrics(manifests[0]).items():
        vals = [m["metrics"]["dev"][task][metric] for m in manifests if task in m["metrics"].get("dev", {})]
        scores[f"{task}/{metric}"] = _mean_sd(vals)
    overall = [m["metrics"]["overall"] for m in manifests if m["metrics"].get("overall") is not None]
    if overall and len(scores) > 1:  # one task's "overall" is its own metric: not comparable with a multi-task one
        scores["overall"] = _mean_sd(overall)
    return {
        "flags": shlex.join(flags),
        "seeds": sorted(runs),
        "trainable": manifests[0]["parameters"]["trainable"],
        "percent_trainable": 100.0 * manifests[0]["parameters"]["trainable"] / manifests[0]["parameters"]["total"],
        "train_minutes": statistics.fmean(m["train_seconds"] for m in manifests) / 60,
        "scores": scores,
    }


def _combined_summary(parts: list[str], runs: dict[str, dict[int, dict]], seeds: list[int], out: Path) -> dict:
    """Each task from the run that trained it, seed by seed (only seeds every part has finished)."""
    complete = [s for s in seeds if all(s in runs[p] for p in parts)]
    if not complete:
        return {"parts": parts, "seeds": []}
    per_seed_dev, per_seed_primary = [], []
    for s in complete:
        dev, primary = {}, {}
        for p in parts:
            dev.update(runs[p][s]["metrics"]["dev"])
            primary.update(_primary_metrics(runs[p][s]))
        per_seed_dev.append(dev)
        per_seed_primary.append(primary)
    scores = {f"{t}/{m}": _mean_sd([dev[t][m] for dev in per_seed_dev]) for t, m in per_seed_primary[0].items()}
    overall = [overall_score(dev, primary) for dev, primary in zip(per_seed_dev, per_seed_primary)]
    if all(o is not None for o in overall):
        scores["overall"] = _mean_sd(overall)
    first = {p: runs[p][complete[0]] for p in parts}
    trainable = sum(m["parameters"]["trainable"] for m in first.values())
    # Parts that adapt one frozen backbone share it; full fine-tunes each carry their own encoder.
    frozen = max(m["parameters"]["total"] - m["parameters"]["trainable"] for m in first.values())
    return {
        "parts": parts,
        "seeds": complete,
        "modes": sorted({m["mode"] for m in first.values()}),
        "backbone": first[parts[0]].get("backbone", {}).get("name"),
        "trainable": trainable,
        "total": frozen + trainable,
        "percent_trainable": 100.0 * trainable / (frozen + trainable),
        "bytes_on_disk": statistics.fmean(sum(_bytes(runs[p][s], out / p / f"seed{s}") for p in parts)
                                          for s in complete),
        "train_minutes": statistics.fmean(sum(runs[p][s]["train_seconds"] for p in parts) for s in complete) / 60,
        "scores": scores,
    }


def summarize(spec: SweepSpec, out: Path) -> dict:
    """Mean ± sd over the finished seeds of each recipe (and combined row), each against the baseline."""
    runs = _manifests(spec, out)
    recipes = {name: _recipe_summary(name, flags, runs[name]) for name, flags in spec.recipes.items()}
    combined = {name: _combined_summary(parts, runs, spec.seeds, out) for name, parts in spec.combine.items()}
    machines = sorted({f"{m['device']}, {m['threads']} thread(s) per run"
                       + (f", {m['precision']}" if m.get("precision") else "")
                       for by_seed in runs.values() for m in by_seed.values() if "device" in m and "threads" in m})
    summary = {"sweep": spec.source, "base": shlex.join(spec.base), "seeds": spec.seeds, "baseline": spec.baseline,
               "machines": machines, "recipes": recipes}
    if combined:
        summary["combined"] = combined
    if spec.baseline and recipes[spec.baseline].get("scores"):
        for name, rec in [*recipes.items(), *combined.items()]:
            if name != spec.baseline and rec.get("scores"):
                rec["vs_baseline"] = compare(rec["scores"], recipes[spec.baseline]["scores"])
    return summary


def compare(scores: dict, baseline: dict) -> dict:
    """Per score: difference of means and whether it exceeds twice the pooled seed sd."""
    result = {}
    for key, s in scores.items():
        b = baseline.get(key)
        if b is None:
            continue
        diff = s["mean"] - b["mean"]
        sds = [x for x in (s["sd"], b["sd"]) if x is not None]
        pooled = (sum(x * x for x in sds) / len(sds)) ** 0.5 if len(sds) == 2 else None
        if pooled is None:
            verdict = "one seed: no verdict"
        elif abs(diff) > 2 * pooled:
            verdict = "better" if diff > 0 else "worse"
        else:
            verdict = "within noise"
        result[key] = {"difference": diff, "pooled_sd": pooled, "verdict": verdict}
    return result


def _pm(score: dict | None) -> str:
    if not score:
        return "—"
    return f"{score['mean']:.4f}" + (f" ± {score['sd']:.4f}" if score["sd"] is not None else "")


def markdown(summary: dict, command: str) -> str:
    keys: list[str] = []
    for rec in summary["recipes"].values():
        keys += [k for k in rec.get("scores", {}) if k not in keys and k != "overall"]
    rows = [*summary["recipes"].values(), *summary.get("combined", {}).values()]
    for rec in rows:
        keys += [k for k in rec.get("scores", {}) if k not in keys and k != "overall"]
    if any("overall" in rec.get("scores", {}) for rec in rows):
        keys.append("overall")
    lines = [f"# Sweep `{summary['sweep']}`", "",
             f"Made by `{command}`; each recipe is `peft-mtl train {summary['base']} <recipe flags> --seed S` "
             f"for seeds {summary['seeds']}. Scores are dev, best epoch, mean ± sample sd over the seeds.",
             "", "Trained on: " + ("; ".join(summary.get("machines") or []) or
                                  "not recorded in the manifests (runs made before peft_mtl recorded it)") + ".",
             ""]
    if summary.get("baseline"):
        lines += [f"vs `{summary['baseline']}`: the difference of means, marked better/worse only when it is "
                  f"larger than 2 × the pooled seed sd.", ""]
    header = ["recipe", "flags", "seeds", "trainable", *keys, "train time"]
    if summary.get("baseline"):
        header.append(f"overall vs {summary['baseline']}")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for name, rec in summary["recipes"].items():
        if not rec.get("scores"):
            flags = f"`{rec['flags']}`" if rec["flags"] else "(base only)"
            lines.append(f"| `{name}` | {flags} | 0 | — |" + " — |" * (len(header) - 4))
            continue
        cells = [f"`{name}`", f"`{rec['flags']}`" if rec["flags"] else "(base only)", str(len(rec["seeds"])),
                 f"{rec['trainable']:,} ({rec['percent_trainable']:.2f}%)",
                 *[_pm(rec["scores"].get(k)) for k in keys], f"{rec['train_minutes']:.1f} min"]
        if summary.get("baseline"):
            vs = rec.get("vs_baseline", {}).get("overall") if "overall" in keys else None
            cells.append("baseline" if name == summary["baseline"] else
                         (f"{vs['difference']:+.4f} ({vs['verdict']})" if vs else "—"))
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("combined"):
        lines += ["", "Combined rows: each task served by the run that trained it alone (seed by seed; what "
                  "`peft-mtl ensemble` of those sets scores); parameters, size and time add up.", "",
                  "| row | recipes | seeds | trainable | " + " | ".join(keys) + " | train time (sum)"
                  + (f" | overall vs {summary['baseline']} |" if summary.get("baseline") else " |"),
                  "|---|---|---|" + "---:|" * (len(keys) + 2 + bool(summary.get("baseline")))]
        for name, rec in summary["combined"].items():
            parts = " + ".join(f"`{p}`" for p in rec["parts"])
            if not rec.get("scores"):
                lines.append(f"| `{name}` | {parts} | 0 | — |" + " — |" * (len(keys) + 1 + bool(summary.get("baseline"))))
                continue
            cells = [f"`{name}`", parts, str(len(rec["seeds"])),
                     f"{rec['trainable']:,} ({rec['percent_trainable']:.2f}%)",
                     *[_pm(rec["scores"].get(k)) for k in keys], f"{rec['train_minutes']:.1f} min"]
            if summary.get("baseline"):
                vs = rec.get("vs_baseline", {}).get("overall")
                cells.append(f"{vs['difference']:+.4f} ({vs['verdict']})" if vs else "—")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(spec: SweepSpec, out: Path, command: str) -> dict:
    summary = {"command": command, **summarize(spec, out)}
    json_path, md_path = summary_paths(spec, out)
    write_json_atomic(json_path, summary)
    tmp = out / f".{md_path.name}.tmp"
    tmp.write_text(markdown(summary, command), encoding="utf-8")
    os.replace(tmp, md_path)
    return summary


def archive(spec: SweepSpec, out: Path, dest: Path) -> int:
    """Copy each finished run's manifest (not its weights) and the summary into ``dest``.

    The manifests keep what the report needs — metrics, parameters, time and the size the
    weights had (``bytes_on_disk``) — so a sweep can be listed in ``peft-mtl report`` from a
    repository that does not carry its weights.
    """
    copied = 0
    for job in plan(spec, out):
        if not job.done:
            continue
        manifest = json.loads((job.folder / MANIFEST).read_text())
        manifest.setdefault("bytes_on_disk", folder_bytes(job.folder))
        target = dest / job.recipe / f"seed{job.seed}"
        target.mkdir(parents=True, exist_ok=True)
        write_json_atomic(target / MANIFEST, manifest)
        copied += 1
    for name in (p.name for p in summary_paths(spec, out)):
        if (out / name).is_file():
            tmp = dest / f".{name}.tmp"
            tmp.write_bytes((out / name).read_bytes())
            os.replace(tmp, dest / name)
    return copied
