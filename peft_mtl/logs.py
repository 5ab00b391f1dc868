"""How peft_mtl talks to people: ``logging`` under the ``peft_mtl`` logger, configured by the CLI.

Every module logs through ``logging.getLogger(__name__)``; as a library, peft_mtl adds no
handler (Python shows warnings and errors only). The ``peft-mtl`` command calls
:func:`configure` once per invocation: plain messages on stderr at the level its
``--quiet``/``-v`` flags chose, and in a distributed run only rank 0 speaks below WARNING.
Machine-readable results stay on stdout, written by the commands themselves.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "peft_mtl"


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at emit time (test captures, redirects)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def _main_process_only(record: logging.LogRecord) -> bool:
    """Ranks other than 0 of a distributed run (``RANK`` set by the launcher) keep only warnings."""
    return record.levelno >= logging.WARNING or os.environ.get("RANK", "0") == "0"


def configure(verbosity: int = 0) -> None:
    """Set up the ``peft_mtl`` logger for a command: -1 quiet (warnings), 0 progress (info), 1+ debug."""
    logger = logging.getLogger(ROOT)
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_main_process_only)
        logger.addHandler(handler)
        logger.propagate = False  # an application's root handler would print every line twice
