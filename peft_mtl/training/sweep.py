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
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import write_json_atomic
from .config import ConfigError
from ..runs import MANIFEST

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
    unknown = set(data) - {"base", "seeds", "baseline", "recipes"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; a sweep file has base, seeds, baseline, recipes")
    seeds = data.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a list of integers, e.g. [0, 1, 2]")
    spec = SweepSpec(recipes={str(k): _flags(v, f"{path}: recipe {k!r}") for k, v in data["recipes"].items()},
                     base=_flags(data.get("base"), f"{path}: base"), seeds=seeds, baseline=data.get("baseline"),
                     source=str(path))
    if spec.baseline is not None and spec.baseline not in spec.recipes:
        raise ConfigError(f"{path}: baseline {spec.baseline!r} is not one of the recipes {sorted(spec.recipes)}")
    for name, flags in spec.recipes.items():
        reserved = {"--out", "--seed", "--resume", "--overwrite"} & set(spec.base + flags)
        if reserved:
            raise ConfigError(f"{path}: recipe {name!r}: {sorted(reserved)} are set by the sweep itself")
        _check_flags(spec.base + flags, f"{path}: recipe {name!r}")
    return spec


def _check_flags(flags: list[str], where: str) -> None:
    """Fail now, not after hours of the other recipes' training, on a misspelt flag or bad value."""
    from ..cli import build_parser, config_from_args

    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(["train", *flags, "--out", "unused"])
    except SystemExit:
        raise ConfigError(f"{where}: `peft-mtl train` rejects these flags: {shlex.join(flags)}") from None
    if extras:
        raise ConfigError(f"{where}: unknown train flags {extras}")
    try:
        config_from_args(args)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def plan(spec: SweepSpec, out: Path) -> list[Job]:
    """Every (recipe, seed) run in file order, seeds inner (so early results span the recipes' first seeds)."""
    jobs = []
    for seed in spec.seeds:
        for name, flags in spec.recipes.items():
            folder = out / name / f"seed{seed}"
            jobs.append(Job(name, seed, folder, ["train", *spec.base, *flags, "--seed", str(seed),
                                                 "--out", str(folder), "--overwrite", "--no-progress"]))
    return jobs


def run_jobs(jobs: list[Job], out: Path, workers: int = 1, threads: int | None = None,
             log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> list[Job]:
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


def summarize(spec: SweepSpec, out: Path) -> dict:
    """Mean ± sd over the finished seeds of each recipe, and each recipe against the baseline."""
    recipes: dict[str, dict] = {}
    for name, flags in spec.recipes.items():
        manifests = [json.loads((out / name / f"seed{s}" / MANIFEST).read_text()) for s in spec.seeds
                     if (out / name / f"seed{s}" / MANIFEST).is_file()]
        if not manifests:
            recipes[name] = {"flags": shlex.join(flags), "seeds": []}
            continue
        primary = _primary_metrics(manifests[0])
        scores: dict[str, dict] = {}
        for task, metric in primary.items():
            vals = [m["metrics"]["dev"][task][metric] for m in manifests if task in m["metrics"].get("dev", {})]
            scores[f"{task}/{metric}"] = _mean_sd(vals)
        overall = [m["metrics"]["overall"] for m in manifests if m["metrics"].get("overall") is not None]
        if overall:
            scores["overall"] = _mean_sd(overall)
        recipes[name] = {
            "flags": shlex.join(flags),
            "seeds": [s for s in spec.seeds if (out / name / f"seed{s}" / MANIFEST).is_file()],
            "trainable": manifests[0]["parameters"]["trainable"],
            "percent_trainable": 100.0 * manifests[0]["parameters"]["trainable"] / manifests[0]["parameters"]["total"],
            "train_minutes": statistics.fmean(m["train_seconds"] for m in manifests) / 60,
            "scores": scores,
        }
    machines = sorted({f"{m['device']}, {m['threads']} thread(s) per run" for name in spec.recipes for s in spec.seeds
                       if (out / name / f"seed{s}" / MANIFEST).is_file()
                       for m in [json.loads((out / name / f"seed{s}" / MANIFEST).read_text())]
                       if "device" in m and "threads" in m})
    summary = {"sweep": spec.source, "base": shlex.join(spec.base), "seeds": spec.seeds, "baseline": spec.baseline,
               "machines": machines, "recipes": recipes}
    if spec.baseline and recipes[spec.baseline].get("scores"):
        for name, rec in recipes.items():
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
    if any("overall" in rec.get("scores", {}) for rec in summary["recipes"].values()):
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
    from ..report import folder_bytes

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
