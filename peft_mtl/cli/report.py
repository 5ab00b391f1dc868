"""``peft-mtl report``: table + plot of trainable parameters vs score over saved runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "table + plot of trainable parameters vs score over saved runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", help="folders to scan for runs and *.ensemble.json records (default: adapters reports)")
    p.add_argument("--out", default="reports", help="where report.md and params_vs_score.png go (default reports/)")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..experiments.report import write_report  # deferred: matplotlib

    roots = [Path(r) for r in (args.runs or ["adapters", "reports"])]
    rows = write_report(roots, Path(args.out))
    print(json.dumps({"report": str(Path(args.out) / "report.md"), "plot": str(Path(args.out) / "params_vs_score.png"),
                      "runs": len(rows)}))
    return 0
