"""``peft-mtl ensemble``: score an ensemble of adapter sets sharing one backbone."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from .options import SPLITS, add_engine_options

HELP = "evaluate an ensemble of adapter sets on one shared backbone"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="+")
    p.add_argument("--split", default="dev", choices=SPLITS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--method", default="mean", choices=["mean", "vote"], help="classification: mean probability or vote")
    p.add_argument("--regression-method", default="mean", choices=["mean", "median"])
    p.add_argument("--weights", default=None, help="comma-separated member weights (default: equal)")
    p.add_argument("--select", default="all", choices=["all", "greedy", "bagged"],
                   help="greedy: per task, forward selection with replacement on the split (Caruana et al. 2004); "
                        "bagged: the same over 20 random halves of the members, averaged (less overfit on a small "
                        "split); the chosen weights and a cross-fitted score are printed and recorded")
    passes = p.add_mutually_exclusive_group()
    passes.add_argument("--batched", dest="batched", action="store_const", const=True, default=None,
                        help="all members in one forward pass per batch (stacked LoRA factors)")
    passes.add_argument("--sequential", dest="batched", action="store_const", const=False,
                        help="one forward pass per member (default for whole splits: faster on CPU, "
                             "reports/bench.md)")
    p.add_argument("--record", default=None, help="also write the result as NAME.ensemble.json for `peft-mtl report`")
    p.add_argument("--cache-dir", default=None,
                   help="keep each member's outputs on the split here and reuse them (keyed by the set's files, "
                        "the inputs, precision, device and versions), so rescoring other combinations of the "
                        "same members costs no forward pass")
    p.add_argument("--backbone", default=None)
    add_engine_options(p)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _weights(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text}: give comma-separated numbers, one per folder") from None


def run(args: argparse.Namespace, argv: list[str]) -> int:
    # deferred: torch, transformers and peft
    from ..inference.ensemble import EnsembleSettings, evaluate_ensemble, write_ensemble_record

    folders = [Path(f) for f in args.folders]
    settings = EnsembleSettings(method=args.method, regression_method=args.regression_method,
                                weights=_weights(args.weights), select=args.select, batched=args.batched,
                                split=args.split, data_dir=args.data_dir, strict=args.strict,
                                cache_dir=args.cache_dir, progress=not args.no_progress)
    result, host, names = evaluate_ensemble(folders, settings, args.backbone, args.precision, args.device, args.int8)
    if args.record:
        command = "peft-mtl " + " ".join(sys.argv[1:]) if sys.argv else None
        write_ensemble_record(Path(args.record), folders, host, names, result, settings, command)
    print(json.dumps(result))
    return 0
