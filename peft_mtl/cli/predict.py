"""``peft-mtl predict``: labels or scores for sentences, one JSON line per input."""

from __future__ import annotations

import argparse
import json
import logging

from ..errors import UserError
from .options import add_engine_options

HELP = "predict for sentences; one JSON line per input"
logger = logging.getLogger(__name__)
DESCRIPTION = "Pairs: write each as 'first ||| second', or give --pairs-file with tab-separated pairs, one per line."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder")
    p.add_argument("--task", required=True)
    p.add_argument("inputs", nargs="*")
    p.add_argument("--sep", default="|||", help="separator between the sentences of a pair (default |||)")
    p.add_argument("--pairs-file", default=None)
    p.add_argument("--backbone", default=None)
    add_engine_options(p)


def read_inputs(args: argparse.Namespace, is_pair: bool, task: str) -> list:
    """Sentences (or pairs) from the arguments and ``--pairs-file``."""
    inputs: list = []
    if args.pairs_file:
        with open(args.pairs_file, encoding="utf-8") as f:
            inputs = [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]
    for item in args.inputs:
        if not is_pair:
            if args.sep in item:
                logger.warning(f"input {item!r} holds the pair separator {args.sep!r}, but task {task!r} takes one "
                               f"sentence: it is predicted as one sentence, separator included")
            inputs.append(item)
            continue
        if args.sep not in item:
            raise UserError(f"task {task!r} needs sentence pairs: write \"first{args.sep}second\" "
                            f"(separator set by --sep) or pass --pairs-file")
        a, b = item.split(args.sep, 1)
        inputs.append((a.strip(), b.strip()))
    if not inputs:
        raise UserError("nothing to predict: give sentences as arguments or --pairs-file")
    return inputs


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..inference.adapter_host import format_predictions, load_adapters  # deferred: torch, transformers, peft

    host = load_adapters(args.folder, backbone=args.backbone, precision=args.precision, device=args.device,
                         int8=args.int8)
    task = host.spec(args.task)
    inputs = read_inputs(args, task.is_pair, task.name)
    encoded = host.encode(task.name, inputs)
    if encoded.truncated:
        logger.info(f"{encoded.truncated} of {len(inputs)} inputs were longer than {host.get().max_length} tokens "
                    f"and were truncated")
    predictions = format_predictions(task, host.outputs(task.name, encoded))
    for inp, pred in zip(inputs, predictions):
        print(json.dumps({"input": inp if isinstance(inp, str) else list(inp), **pred}))
    return 0
