"""``peft-mtl eval``: score a trained folder on a labelled split; prints one JSON object."""

from __future__ import annotations

import argparse
import json

from .options import SPLITS, add_engine_options

HELP = "evaluate a trained folder; prints one JSON object"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder")
    p.add_argument("--split", default="dev", choices=SPLITS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--backbone", default=None, help="override the backbone recorded in the folder")
    add_engine_options(p)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..inference.scoring import evaluate_folder  # deferred: torch, transformers and peft

    print(json.dumps(evaluate_folder(args.folder, args.data_dir, args.split, args.strict, args.backbone,
                                     args.precision, args.device, args.int8, progress=not args.no_progress)))
    return 0
