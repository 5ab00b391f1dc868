"""``peft-mtl train``: adapters (or heads, or the full model) on one or more tasks."""

from __future__ import annotations

import argparse

from ..training.config import add_train_arguments, config_from_args

HELP = "train adapters (or heads, or the full model) on one or more tasks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_train_arguments(p)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..training.train import summary_line, train  # deferred: torch, transformers and peft

    cfg = config_from_args(args)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    if summary.get("rank", 0) == 0:  # one result line per run, not per process
        print(summary_line(summary), flush=True)
    return 130 if summary.get("interrupted") else 0
