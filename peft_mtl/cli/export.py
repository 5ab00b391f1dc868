"""``peft-mtl export``: a set as self-contained ONNX or OpenVINO models (adapters merged, heads included)."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError

HELP = "export sets as ONNX or OpenVINO models: one per task (adapters merged), or --multi: one graph for all"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="+", metavar="SET", help="set folder(s); several only with --multi (NAME=DIR renames)")
    p.add_argument("--multi", action="store_true",
                   help="one ONNX graph for every (set, task): LoRA factors are inputs chosen per row from table.npz")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                   help="onnx (ONNX Runtime) or openvino (OpenVINO IR: model.xml + model.bin)")
    p.add_argument("--int8", action="store_true", help="also write an int8 model (int8 weights per channel, "
                                                       "activations quantized per batch)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..inference.export import export_multi, export_set  # deferred: torch, transformers, peft, ONNX

    if args.multi:
        if args.format != "onnx":
            raise UserError("--multi writes an ONNX graph; drop --format openvino")
        record = export_multi(args.folders, args.out, args.int8, args.backbone, args.overwrite)
        print(json.dumps({"out": args.out, "entries": record["entries"], "check": record["check"]}))
        return 0
    if len(args.folders) > 1:
        raise UserError(f"{len(args.folders)} folders given: export one set at a time, or all as one graph with --multi")
    record = export_set(args.folders[0], args.out, args.format, args.int8, args.backbone, args.overwrite)
    print(json.dumps({"out": args.out, "tasks": {t: e["check"] for t, e in record["tasks"].items()}}))
    return 0
