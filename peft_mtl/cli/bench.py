"""``peft-mtl bench``: speed and memory against the plain Hugging Face pipeline -> reports/bench.{json,md}."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "speed/memory benchmark vs the plain Hugging Face pipeline -> reports/bench.{json,md}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="reports")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed repeat (default 12, --quick 6)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5, --quick 3)")
    p.add_argument("--members", type=int, default=5, help="ensemble size")
    p.add_argument("--quick", action="store_true", help="≤ 5 min on 2 cores: fewer repeats; skips full fine-tuning, "
                                                        "SMART T=0, the merged copy and the bert-base-sized model")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..experiments import bench  # deferred: torch, transformers and peft

    # --quick: fewer and shorter repeats (≤ 5 min on 2 cores), unless given explicitly.
    steps = args.steps or (6 if args.quick else 12)
    repeats = args.repeats or (3 if args.quick else 5)
    result = bench.run(Path(args.out), steps=steps, repeats=repeats, ensemble_members=args.members, quick=args.quick)
    bench.write(result, Path(args.out), "peft-mtl bench " + " ".join(argv[1:]))
    print(json.dumps(result["ratios"]))
    return 0
