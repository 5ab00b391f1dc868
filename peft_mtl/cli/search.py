"""``peft-mtl search``: hyperparameter search on Optuna (TPE, pruning, resumable, several workers)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..errors import UserError

HELP = "hyperparameter search on Optuna over a space file (TPE, pruning per epoch, resumable, distributed)"
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="space file (YAML: base, seed, space, pruner, enqueue); see recipes/")
    p.add_argument("--out", required=True, help="folder for the trials (OUT/trials/NNNN), study.db and search.md")
    p.add_argument("--trials", type=int, required=True, help="trials in the study in all (a resumed or shared study "
                                                             "counts the ones already there)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///OUT/study.db); the same URL "
                                                   "from several processes or machines joins one study")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine joining the study")
    p.add_argument("--confirm-seeds", type=int, default=0, metavar="N",
                   help="then re-train the best recipe over N seeds (the sweep table: mean ± sd)")
    p.add_argument("--report-to", default=None, metavar="NAME,...",
                   help="track every trial (tensorboard, mlflow, trackio, wandb), grouped under the study's name")
    p.add_argument("--tracking-dir", default=None, help="default: OUT/tracking")
    p.add_argument("--mlflow-uri", default=None, help="MLflow store or server (default: sqlite under --tracking-dir)")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a worker of a parent search
    p.add_argument("--worker-index", type=int, default=0, metavar="K",
                   help="this process's index among those sharing the study (offsets the sampler's seed: give each "
                        "machine its own; --workers numbers its processes itself)")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    try:  # deferred: optuna is the optional search extra
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("search needs Optuna: pip install 'peft_mtl[search]'") from None
    from ..experiments.search import confirm, load_space, run_trials, run_workers, write_report  # deferred: torch

    if args.trials < 1 or args.workers < 1:
        raise UserError("--trials and --workers must be at least 1")
    space = load_space(args.space)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    tracking = []
    if args.report_to:
        tracking = ["--report-to", args.report_to, "--tracking-dir", args.tracking_dir or str(out / "tracking")]
        tracking += ["--mlflow-uri", args.mlflow_uri] if args.mlflow_uri else []
    if args.workers > 1:
        extra = _without(argv[argv.index(args.space) + 1:], {"--workers", "--out", "--trials", "--storage", "--confirm-seeds", "--worker-index"})
        codes = run_workers(args.space, out, args.trials, storage, args.workers, extra)
        if any(codes):
            logger.warning(f"search: worker exit codes {codes}; see {out / 'logs'}")
    else:
        run_trials(space, out, args.trials, storage, tracking, worker=args.worker_index)
    if args.no_report:
        return 0
    command = "peft-mtl " + " ".join(argv)
    record = write_report(space, out, storage, command)
    if args.confirm_seeds:
        table = confirm(space, out, record, args.confirm_seeds, args.workers)
        record = write_report(space, out, storage, command, confirmed=table)
    print(json.dumps({"report": str(out / "search.md"), "trials": record["states"], "best": record["best"],
                      **({"confirmed": record["confirmed"]} if record.get("confirmed") else {})}))
    return 0


def _without(argv: list[str], flags: set[str]) -> list[str]:
    """``argv`` minus ``flags`` and their values (``--flag V`` or ``--flag=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if a.split("=", 1)[0] in flags:
            continue
        out.append(a)
    return out
