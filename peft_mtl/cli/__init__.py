"""The ``peft-mtl`` command line: one module per command, registered in :data:`COMMANDS`.

Machine-readable results go to stdout (one JSON object or line); progress bars, per-epoch
summaries and data reports go to stderr through ``logging`` (``-q`` quiet, ``-v`` debug).
A :class:`~peft_mtl.errors.UserError` prints one line and exits 2; anything else is a bug
and keeps its traceback.

Building the parser imports no torch, transformers or peft: each command module declares
its flags with light imports only and loads the heavy libraries when it runs, so
``peft-mtl --help``, ``peft-mtl CMD --help`` and ``peft-mtl tasks`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import UserError
from ..logs import configure as configure_logging

EXIT_USER_ERROR = 2

# Command name -> module under peft_mtl.cli that declares it (add_arguments, run, HELP).
COMMANDS = {
    "train": "train", "eval": "evaluate", "predict": "predict", "ensemble": "ensemble", "tasks": "tasks",
    "serve": "serve", "export": "export", "compress": "compress", "report": "report", "sweep": "sweep",
    "bench": "bench", "search": "search", "card": "card",
}


def _verbosity_flags(default=None) -> argparse.ArgumentParser:
    """-q/-v, accepted before or after the command (after it, SUPPRESS keeps a flag given before)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                       help="warnings and errors only on stderr")
    flags.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=default,
                       help="debug messages on stderr")
    return flags


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; every command's flags come from its own module."""
    parser = argparse.ArgumentParser(prog="peft-mtl", parents=[_verbosity_flags()],
                                     description="Parameter-efficient multi-task fine-tuning of BERT encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", None),
                           parents=[_verbosity_flags(argparse.SUPPRESS)])
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (0, 2 for a user error, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `predict FOLDER --task sst "a" "b"`: sentences may follow the options, which argparse
    # cannot split between two positionals, so leftovers become inputs for predict only.
    args, extras = parser.parse_known_args(argv)
    if extras:
        if args.command != "predict" or any(e.startswith("--") for e in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.inputs = list(args.inputs) + extras
    configure_logging(getattr(args, "verbosity", None) or 0)
    try:
        return args.func(args, argv)
    except (UserError, FileExistsError, FileNotFoundError) as err:
        print(f"peft-mtl: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
