"""``peft-mtl export``: a set as self-contained ONNX or OpenVINO models (adapters merged, heads included)."""

from __future__ import annotations

import argparse
import json

HELP = "export a set as self-contained ONNX or OpenVINO models (adapters merged, heads included)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                   help="onnx (ONNX Runtime) or openvino (OpenVINO IR: model.xml + model.bin)")
    p.add_argument("--int8", action="store_true", help="also write an int8 model (int8 weights per channel, "
                                                       "activations quantized per batch)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..inference.export import export_set  # deferred: torch, transformers, peft, ONNX

    record = export_set(args.folder, args.out, args.format, args.int8, args.backbone, args.overwrite)
    print(json.dumps({"out": args.out, "tasks": {t: e["check"] for t, e in record["tasks"].items()}}))
    return 0
