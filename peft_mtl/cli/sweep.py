"""``peft-mtl sweep``: train each recipe of a sweep file over several seeds; table of mean ± sd (resumable)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..training.config import ConfigError

HELP = "recipe search: train each recipe of a sweep file over several seeds, table of mean ± sd (resumable)"
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="sweep file (YAML/JSON: base, seeds, baseline, recipes); see recipes/")
    p.add_argument("--out", required=True, help="folder for the runs (OUT/RECIPE/seedS) and sweep.{json,md}")
    p.add_argument("--workers", type=int, default=1, help="runs trained side by side (the cores are split)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: cores / workers)")
    p.add_argument("--summary-only", action="store_true", help="train nothing; tabulate the finished runs")
    p.add_argument("--report-to", default=None, metavar="NAME,...",
                   help="track every run (tensorboard, mlflow, trackio, wandb), grouped under the sweep's name")
    p.add_argument("--tracking-dir", default=None, help="default: OUT/tracking")
    p.add_argument("--mlflow-uri", default=None, help="MLflow store or server (default: sqlite under --tracking-dir)")
    p.add_argument("--archive", default=None, help="also copy the manifests (no weights) and the table here, "
                                                   "for `peft-mtl report` (e.g. reports/sweeps/NAME)")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    # deferred: the sweep's summaries read manifests with torch-free code, but its runs import torch
    from ..experiments.sweep import archive, load_sweep, plan, run_jobs, stale_runs, summary_paths, write_summary

    spec = load_sweep(args.file)
    out = Path(args.out)
    tracking = []
    if args.report_to:
        tracking = ["--report-to", args.report_to, "--tracking-dir", args.tracking_dir or str(out / "tracking")]
        tracking += ["--mlflow-uri", args.mlflow_uri] if args.mlflow_uri else []
    jobs = plan(spec, out, tracking)
    stale = stale_runs(jobs)
    if stale:
        raise ConfigError(f"{args.file}: these finished runs in {out} were trained with other settings than their "
                          f"recipe now asks for: " + "; ".join(stale) + ". Move them away (they will be retrained) "
                          "or give the changed recipe a new name.")
    if args.summary_only and not out.is_dir():
        raise ConfigError(f"{out}: no such folder, so no finished runs to tabulate; train them first "
                          f"(`peft-mtl sweep {args.file} --out {out}`) or point --out at the sweep's folder")
    failed = [] if args.summary_only else run_jobs(jobs, out, workers=args.workers, threads=args.threads)
    # The table is a function of the runs, however they were trained: record the command that trains them.
    command = " ".join(a for a in ["peft-mtl", *argv] if a != "--summary-only")
    command = command.split(" --archive ")[0]
    summary = write_summary(spec, out, command)
    done = sum(len(r["seeds"]) for r in summary["recipes"].values())
    json_path, md_path = summary_paths(spec, out)
    logger.info(f"sweep: {done} of {len(jobs)} runs finished; table in {md_path}")
    if args.archive:
        copied = archive(spec, out, Path(args.archive))
        logger.info(f"sweep: {copied} manifests and the table copied to {args.archive} (weights left out)")
    print(json.dumps({"summary": str(json_path), "finished": done, "planned": len(jobs),
                      "failed": [f"{j.recipe}/seed{j.seed}" for j in failed]}))
    return 1 if failed else 0
