"""``peft-mtl export``: a self-contained ONNX model per task of an adapter set.

Each task becomes one graph ``(input_ids, attention_mask[, token_type_ids]) → logits`` (or
scores): the set's LoRA deltas for that task (shared + task adapter) are merged into the
frozen weights, and pooling and the task head are part of the graph, so the result runs on
ONNX Runtime alone — no peft, no peft_mtl, no PyTorch. ``--int8`` adds a copy whose linear
layers run int8 matrix products (ONNX Runtime dynamic quantization: int8 weights, activations
quantized per batch). Every export is checked against the PyTorch outputs of the same set on
probe sentences, and the differences are recorded in ``export.json``.

Layout::

    OUT/export.json          # tasks, labels, pooling, inputs, max length, the parity check
    OUT/tokenizer.json ...   # the backbone's tokenizer (tokenizers/transformers format)
    OUT/{task}/model.onnx    # fp32
    OUT/{task}/model.int8.onnx
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .artifacts import atomic_folder, write_json_atomic
from .heads import pool

PROBES = ["a gorgeous, witty, seductive movie.", "the plot is dull and the acting is worse.", "it is a film.",
          "an ambitious, sprawling and ultimately rewarding story about growing up in a small town."]
PAIR_PROBES = [("how do i learn python?", "what is the best way to learn python?"),
               ("a man is playing a guitar.", "a woman is slicing an onion."),
               ("the cat sits on the mat.", "a cat is sitting on a mat.")]


class ExportError(Exception):
    """The set cannot be exported as asked; the message says why and what to do."""


class TaskGraph(nn.Module):
    """Encoder (adapters merged) + pooling + head, as one module with tensor inputs only."""

    def __init__(self, encoder: nn.Module, head: nn.Module, pooling: str, kind: str, token_types: bool):
        super().__init__()
        self.encoder, self.head, self.pooling, self.kind, self.token_types = encoder, head, pooling, kind, token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {"token_type_ids": token_type_ids} if self.token_types else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        out = self.head([pool(hidden, attention_mask, self.pooling)])
        return out.squeeze(-1) if self.kind == "regression" else out


def merged_encoder(base, set_name: str, task: str) -> nn.Module:
    """A plain (peft-free) copy of the backbone with ``task``'s active LoRA deltas added to its weights."""
    from .backbone import load_encoder, resolve_backbone
    from .inference import SEP
    from .kernels import concat_factors

    aset = base.sets[set_name]
    if aset.model is not None:  # full fine-tuning: its own encoder already holds everything
        return aset.model.encoder
    _, path = resolve_backbone(base.source)
    encoder = load_encoder(path, attn_implementation="eager")
    names = base.model.routing.get(f"{set_name}{SEP}{task}", [])
    if not names:
        return encoder
    from . import peft_compat

    modules = dict(encoder.named_modules())
    with torch.no_grad():
        for name, layer in peft_compat.lora_layers(base.model.encoder).items():
            present = [n for n in names if n in layer.lora_A]
            if not present:
                continue
            if any(peft_compat.is_variant(layer, n) for n in present):
                raise ExportError(f"set {set_name!r} uses DoRA, which this exporter does not merge; "
                                  f"export a plain LoRA set")
            a, b = concat_factors(layer, present)
            clean = name.replace("base_model.model.", "", 1)
            modules[clean].weight.add_(b.float() @ a.float())
    return encoder


def _inputs(base, spec, max_length: int, pair_encoding: str, token_types: bool):
    from .data import encode_texts, pad_sequences

    probes = PAIR_PROBES if spec.is_pair else PROBES
    enc = encode_texts(spec, probes, base.tokenizer, max_length, pair_encoding)
    batch = pad_sequences(enc.segments[0], base.pad_id)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    return probes, enc, batch, names


def export_set(folder: str | Path, out: str | Path, fmt: str = "onnx", int8: bool = False,
               backbone: str | None = None, overwrite: bool = False, opset: int = 17) -> dict:
    """Export every task of the set in ``folder`` to ``out``; returns the export record."""
    from .inference import load_base
    from .runs import read_manifest

    if fmt != "onnx":
        raise ExportError(f"--format {fmt}: only onnx is implemented (ONNX Runtime runs it on CPU and GPU; "
                          f"OpenVINO reads the .onnx file directly: openvino.compile_model('model.onnx'))")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("export needs onnxruntime and onnx: pip install 'peft_mtl[export]'") from None
    folder, out = Path(folder), Path(out)
    manifest = read_manifest(folder)
    base = load_base(backbone or manifest.get("backbone_source"), precision="fp32")
    name = base.load(folder)
    aset = base.sets[name]
    if aset.pair_encoding != "cross":
        raise ExportError(f"{folder}: bi-encoded sets (--pair-encoding bi) are not exported yet; cross-encoded ones are")
    record = {"source": str(folder), "backbone": base.identity.name, "format": "onnx", "opset": opset,
              "max_length": aset.max_length, "pad_id": base.pad_id, "tasks": {}}
    with atomic_folder(out, overwrite=overwrite) as tmp:
        base.tokenizer.save_pretrained(str(tmp))
        for task in aset.tasks:
            spec = base.spec(task, name)
            key = task if aset.model is not None else f"{name}__{task}"
            head = (aset.model or base.model).heads[key]
            pooling = (aset.model or base.model).head_pooling.get(key, aset.model.pooling if aset.model else "mean")
            token_types = (aset.model or base.model).uses_token_types
            graph = TaskGraph(merged_encoder(base, name, task), head, pooling, spec.kind, token_types).eval()
            probes, enc, batch, names = _inputs(base, spec, aset.max_length, aset.pair_encoding, token_types)
            (tmp / task).mkdir()
            path = tmp / task / "model.onnx"
            args = tuple(batch[n] for n in names)
            with torch.no_grad():
                torch.onnx.export(graph, args, str(path), input_names=names, output_names=["output"],
                                  dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names} | {"output": {0: "batch"}},
                                  opset_version=opset, dynamo=False)
            reference = base.outputs(task, enc, name)
            entry = {"kind": spec.kind, "labels": list(spec.labels) if spec.labels else None,
                     "label_names": spec.labels is not None and not spec.numeric_labels,
                     "output_range": list(spec.output_range) if spec.output_range else None,
                     "inputs": names, "pair": spec.is_pair, "pooling": pooling, "files": {"fp32": f"{task}/model.onnx"}}
            feeds = {n: batch[n].numpy().astype(np.int64) for n in names}
            got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            entry["check"] = {"fp32_max_abs_diff": float(np.abs(got - reference).max()), "probes": len(probes)}
            if int8:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                qpath = tmp / task / "model.int8.onnx"
                # Per-channel int8 weights and only weight × activation products (attention's
                # activation × activation products stay fp32): the int8 error is then the weights'.
                logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" notice
                quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8, per_channel=True,
                                 extra_options={"MatMulConstBOnly": True})
                got8 = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                entry["files"]["int8"] = f"{task}/model.int8.onnx"
                entry["check"]["int8_max_abs_diff"] = float(np.abs(got8 - reference).max())
                if spec.kind == "classification":
                    entry["check"]["int8_same_argmax"] = float(np.mean(got8.argmax(-1) == reference.argmax(-1)))
            tolerance = 1e-3 * max(1.0, float(np.abs(reference).max()))
            if entry["check"]["fp32_max_abs_diff"] > tolerance:
                raise ExportError(f"{task}: the ONNX graph differs from PyTorch by {entry['check']['fp32_max_abs_diff']:.2e} "
                                  f"(> {tolerance:.1e}); not writing an export that answers differently")
            record["tasks"][task] = entry
        write_json_atomic(tmp / "export.json", record)
    print(f"exported {len(record['tasks'])} task(s) of {folder} to {out}", file=sys.stderr)
    return record


def run_onnx(export_dir: str | Path, task: str, inputs: list, precision: str = "fp32") -> np.ndarray:
    """Raw outputs of an exported task for sentences or pairs (what the README snippet does by hand)."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    export_dir = Path(export_dir)
    record = json.loads((export_dir / "export.json").read_text())
    entry = record["tasks"][task]
    tok = AutoTokenizer.from_pretrained(str(export_dir))
    if entry["pair"]:
        enc = tok([a for a, _ in inputs], [b for _, b in inputs], padding=True, truncation=True,
                  max_length=record["max_length"], return_tensors="np")
    else:
        enc = tok(list(inputs), padding=True, truncation=True, max_length=record["max_length"], return_tensors="np")
    session = ort.InferenceSession(str(export_dir / entry["files"][precision]), providers=["CPUExecutionProvider"])
    return session.run(None, {n: enc[n].astype(np.int64) for n in entry["inputs"]})[0]
