"""``peft-mtl tasks``: list the built-in tasks, or validate task files (one JSON line each).

Needs neither torch nor peft: it answers at once."""

from __future__ import annotations

import argparse
import json
import logging

from ..data.tasks import TASKS, builtin_task_files, read_tasks

HELP = "list the built-in tasks, or validate task files (one JSON line each)"
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", help="task files (YAML or JSON) to validate")
    p.add_argument("--strict", action="store_true", help="malformed rows are errors")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if not args.files:
        for f in builtin_task_files():
            spec = TASKS[f.stem]
            print(json.dumps({"name": spec.name, "type": spec.kind, "text": list(spec.text_columns),
                              "labels": list(spec.labels) if spec.labels else None, "metrics": list(spec.metrics),
                              "loss": spec.loss, "files": spec.files, "description": spec.description}))
        return 0
    from ..data.loading import load_split  # deferred: torch (listing the tasks above needs none)

    for spec in read_tasks(list(args.files), args.strict):
        splits = {}
        for split in ("train", "dev", "test"):
            if split in spec.files:
                loaded = load_split(spec.file_for(split), spec, strict=args.strict)
                if loaded.skip_report():
                    logger.info(loaded.skip_report())
                splits[split] = len(loaded.examples)
        print(json.dumps({"file": spec.source, "name": spec.name, "type": spec.kind,
                          "labels": list(spec.labels) if spec.labels else None, "metrics": list(spec.metrics),
                          "rows": splits, "valid": True}))
    return 0
