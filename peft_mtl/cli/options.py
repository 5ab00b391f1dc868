"""Flags several commands share."""

from __future__ import annotations

import argparse

from ..options import PRECISIONS

SPLITS = ("train", "dev", "test")


INT8_HELP = ("run each set as an int8 ONNX Runtime graph with its adapters merged (CPU; built once, "
             "cached in ~/.cache/peft_mtl). Measured cost: reports/int8.md")


def add_engine_options(p: argparse.ArgumentParser, int8_help: str = INT8_HELP) -> None:
    """How a loaded set runs: the options shared by eval, predict, ensemble and serve."""
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if present, else the CPU) | cpu | cuda | cuda:N")
    p.add_argument("--int8", action="store_true", help=int8_help)
