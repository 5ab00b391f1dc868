"""``peft-mtl export``: a self-contained ONNX model per task of an adapter set.

Each task becomes one graph ``(input_ids, attention_mask[, token_type_ids]) → logits`` (or
scores): the set's LoRA deltas for that task (shared + task adapter) are merged into the
frozen weights, and pooling and the task head are part of the graph, so the result runs on
ONNX Runtime alone — no peft, no peft_mtl, no PyTorch. ``--int8`` adds a copy whose linear
layers run int8 matrix products (ONNX Runtime dynamic quantization: int8 weights, activations
quantized per batch). Every export is checked against the PyTorch outputs of the same set on
probe sentences, and the differences are recorded in ``export.json``. The graphs themselves
are built by :mod:`peft_mtl.inference.graphs`.

Layout::

    OUT/export.json          # tasks, labels, pooling, inputs, max length, the parity check
    OUT/tokenizer.json ...   # the backbone's tokenizer (tokenizers/transformers format)
    OUT/{task}/model.onnx    # fp32 (--format openvino: model.xml + model.bin, OpenVINO IR)
    OUT/{task}/model.int8.onnx  (model.int8.xml)
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..artifacts import atomic_folder, write_json_atomic
from ..model.saved_sets import read_manifest
from .adapter_graph import write_multi
from .adapter_host import load_base
from .graphs import (ExportError, TaskGraph, export_task, merged_encoder, quantize_onnx, run_graph,  # noqa: F401
                     run_onnx, to_openvino)

logger = logging.getLogger(__name__)


FORMATS = ("onnx", "openvino")


def export_set(folder: str | Path, out: str | Path, fmt: str = "onnx", int8: bool = False,
               backbone: str | None = None, overwrite: bool = False, opset: int = 17) -> dict:
    """Export every task of the set in ``folder`` to ``out``; returns the export record."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    _require_engines(fmt)
    folder, out = Path(folder), Path(out)
    manifest = read_manifest(folder)
    base = load_base(backbone or manifest.get("backbone_source"), precision="fp32", device="cpu")
    name = base.load(folder)
    aset = base.sets[name]
    record = {"source": str(folder), "backbone": base.identity.name, "format": fmt, "opset": opset,
              "max_length": aset.max_length, "pad_id": base.pad_id, "tasks": {}}
    with atomic_folder(out, overwrite=overwrite) as tmp:
        base.tokenizer.save_pretrained(str(tmp))
        for task in aset.tasks:
            record["tasks"][task] = export_task(base, name, task, tmp, fmt, int8, opset)
        write_json_atomic(tmp / "export.json", record)
    logger.info(f"exported {len(record['tasks'])} task(s) of {folder} to {out} ({fmt}{', int8' if int8 else ''})")
    return record


def export_multi(folders: list[str | Path], out: str | Path, int8: bool = False, backbone: str | None = None,
                 overwrite: bool = False) -> dict:
    """One multi-adapter ONNX graph for every (set, task) of ``folders`` (``peft-mtl export --multi``).

    ``OUT/model.onnx`` (+ ``model.int8.onnx``), ``OUT/table.npz`` (each (set, task) as an entry of
    the graph's factor and head inputs), ``OUT/graph.json`` and the tokenizer; see
    :mod:`peft_mtl.inference.adapter_graph`. Folders are named after themselves (``NAME=DIR`` to rename)."""
    _require_engines("onnx")
    parsed = [_named(f) for f in folders]
    first = read_manifest(parsed[0][1])
    base = load_base(backbone or first.get("backbone_source"), precision="fp32", device="cpu")
    for name, folder in parsed:
        base.load(folder, name=name)
    out = Path(out)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        base.tokenizer.save_pretrained(str(tmp))
        record = write_multi(base, tmp, int8=int8)
    logger.info(f"exported {len(record['entries'])} (set, task) entries of {len(parsed)} set(s) as one "
                f"multi-adapter graph to {out}{' (fp32 + int8)' if int8 else ''}")
    return record


def _named(item: str | Path) -> tuple[str | None, Path]:
    text = str(item)
    if "=" in text and not Path(text).exists():
        name, folder = text.split("=", 1)
        return name, Path(folder)
    return None, Path(text)


def _require_engines(fmt: str) -> None:
    try:
        import onnxruntime  # noqa: F401  (checks every graph, and quantizes --int8)
    except ImportError:
        raise ExportError("export needs onnxruntime and onnx: pip install 'peft_mtl[export]'") from None
    if fmt == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise ExportError("--format openvino needs openvino: pip install 'peft_mtl[openvino]'") from None
