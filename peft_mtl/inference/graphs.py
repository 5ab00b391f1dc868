"""One task of a loaded set as a self-contained ONNX (or OpenVINO) graph: what ``export`` and ``--int8`` build.

A graph maps token ids to the task's logits or scores with the task's LoRA deltas merged into
the frozen weights and pooling and head inside (:class:`TaskGraph`); :func:`export_task` checks
it against the PyTorch outputs of the same set and records the differences; ``quantize_onnx``
makes its int8 copy. The format is described in :mod:`peft_mtl.inference.export`.

The functions here take a loaded host (:class:`~peft_mtl.inference.adapter_host.AdapterHost`)
and never load one, so the int8 runtime the host uses can build its graphs with them;
:mod:`peft_mtl.inference.export` writes a whole set's folder.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer

from ..data.loading import encode_texts, pad_sequences
from ..errors import UserError
from ..model import lora_runtime
from ..model.backbone import load_encoder, resolve_backbone
from ..model.heads import apply_head

PROBES = ["a gorgeous, witty, seductive movie.", "the plot is dull and the acting is worse.", "it is a film.",
          "an ambitious, sprawling and ultimately rewarding story about growing up in a small town."]
PAIR_PROBES = [("how do i learn python?", "what is the best way to learn python?"),
               ("a man is playing a guitar.", "a woman is slicing an onion."),
               ("the cat sits on the mat.", "a cat is sitting on a mat.")]

logger = logging.getLogger(__name__)


class ExportError(UserError):
    """The set cannot be exported as asked; the message says why and what to do."""


class TaskGraph(nn.Module):
    """Encoder (adapters merged) + pooling + head, as one module with tensor inputs only."""

    def __init__(self, encoder: nn.Module, head: nn.Module, pooling: str, kind: str, token_types: bool):
        super().__init__()
        self.encoder, self.head, self.pooling, self.kind, self.token_types = encoder, head, pooling, kind, token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {"token_type_ids": token_type_ids} if self.token_types else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return apply_head(self.head, [(hidden, attention_mask)], self.pooling, self.kind)


def merged_encoder(base, set_name: str, task: str) -> nn.Module:
    """A plain (peft-free) CPU copy of the backbone with ``task``'s active LoRA deltas added to its weights."""
    aset = base.get(set_name)
    if aset.model is not None:  # full fine-tuning: its own encoder already holds everything
        return _on_cpu(aset.model.encoder)
    _, path = resolve_backbone(base.source)
    encoder = load_encoder(path, attn_implementation="eager")
    names = base.routing(set_name, task)
    if not names:
        return encoder

    try:
        deltas = {n: d.cpu() for n, d in lora_runtime.merged_deltas(base.encoder, names).items()}
    except ValueError:
        raise ExportError(f"set {set_name!r} uses DoRA, which this exporter does not merge; "
                          f"export a plain LoRA set") from None
    modules = dict(encoder.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight.add_(delta)
    return encoder


def _inputs(base, spec, max_length: int, pair_encoding: str, token_types: bool):
    probes = PAIR_PROBES if spec.is_pair else PROBES
    enc = encode_texts(spec, probes, base.tokenizer, max_length, pair_encoding)
    batch = pad_sequences(enc.segments[0], base.pad_id)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    return probes, enc, batch, names


def _on_cpu(module: nn.Module) -> nn.Module:
    """``module`` itself when it is on the CPU, else a CPU copy (the host's copy stays where it is)."""
    first = next(module.parameters(), None)
    return module if first is None or first.device.type == "cpu" else copy.deepcopy(module).cpu()


def export_task(base, name: str, task: str, directory: Path, fmt: str = "onnx", int8: bool = False,
                opset: int = 17) -> dict:
    """Write ``directory/task/model[.int8].{onnx|xml}`` for one task of a loaded set; returns its record entry.

    Raises :class:`ExportError` when a graph answers differently from the PyTorch set.
    """

    aset = base.sets[name]
    if aset.pair_encoding != "cross":
        raise ExportError(f"{aset.folder}: bi-encoded sets (--pair-encoding bi) are not exported yet; "
                          f"cross-encoded ones are")
    spec = base.spec(task, name)
    owner = base.owner(name)
    head = _on_cpu(owner.heads[base.head_key(name, task)])  # the graph is traced on the CPU
    pooling = base.pooling(name, task)
    token_types = owner.uses_token_types
    graph = TaskGraph(merged_encoder(base, name, task), head, pooling, spec.kind, token_types).eval()
    probes, enc, batch, names = _inputs(base, spec, aset.max_length, aset.pair_encoding, token_types)
    (directory / task).mkdir(parents=True, exist_ok=True)
    path = directory / task / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(graph, tuple(batch[n] for n in names), str(path), input_names=names,
                          output_names=["output"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names} | {"output": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    # The graphs are fp32, so they are checked against fp32 PyTorch whatever the base computes in
    # (a base loaded with precision auto runs bf16 on a bf16-capable CPU: ~1e-3 off by itself).
    reference = base.outputs(task, enc, name, engine="pytorch", precision="fp32")
    entry = {"kind": spec.kind, "labels": list(spec.labels) if spec.labels else None,
             "label_names": spec.labels is not None and not spec.numeric_labels,
             "output_range": list(spec.output_range) if spec.output_range else None,
             "inputs": names, "pair": spec.is_pair, "pooling": pooling, "files": {}}
    feeds = {n: batch[n].numpy().astype(np.int64) for n in names}
    tolerance = 1e-3 * max(1.0, float(np.abs(reference).max()))
    entry["check"] = {"probes": len(probes)}
    files = {"fp32": path}
    if int8:
        files["int8"] = directory / task / "model.int8.onnx"
        quantize_onnx(path, files["int8"])
    if fmt == "openvino":
        files = {precision: to_openvino(onnx_path) for precision, onnx_path in files.items()}
    for precision, file in files.items():
        got = run_graph(file, feeds)
        diff = float(np.abs(got - reference).max())
        entry["files"][precision] = str(file.relative_to(directory))
        entry["check"][f"{precision}_max_abs_diff"] = diff
        if precision == "int8":
            if spec.kind == "classification":
                entry["check"]["int8_same_argmax"] = float(np.mean(got.argmax(-1) == reference.argmax(-1)))
        elif diff > tolerance:
            raise ExportError(f"{task}: the {fmt} graph differs from PyTorch by {diff:.2e} (> {tolerance:.1e}); "
                              f"not writing an export that answers differently")
    return entry


def quantize_onnx(path: Path, out: Path) -> None:
    """int8 copy of an ONNX graph: per-channel int8 weights, activations quantized per batch.

    Only weight × activation products are quantized (attention's activation × activation
    products stay fp32), so the int8 error is the weights' and the per-batch activation scale's.
    """

    from onnxruntime.quantization import (  # deferred: onnxruntime is the optional export extra
        QuantType,
        quantize_dynamic,
    )

    with _quiet_root_logger():  # ORT logs a "consider pre-processing" notice through the root logger
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"MatMulConstBOnly": True})


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Root-logger records below ERROR are dropped inside the block; the logger is as it was after."""
    root = logging.getLogger()
    drop = logging.Filter()
    drop.filter = lambda record: record.levelno >= logging.ERROR  # type: ignore[method-assign]
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def to_openvino(onnx_path: Path) -> Path:
    """OpenVINO IR (``.xml`` + ``.bin``) beside an ONNX graph; the ONNX file is removed."""
    import openvino as ov  # deferred: openvino is the optional openvino extra

    xml = onnx_path.with_suffix(".xml")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    onnx_path.unlink()
    return xml


def run_graph(path: Path, feeds: dict, threads: int | None = None) -> np.ndarray:
    """Outputs of an exported graph (``.onnx`` on ONNX Runtime, ``.xml`` on OpenVINO) for one batch."""
    if path.suffix == ".xml":
        import openvino as ov  # deferred: openvino is the optional openvino extra

        # OpenVINO's CPU plugin computes in bf16 by default where the CPU has native bf16 (~4e-3
        # off the fp32 graph); f32 keeps an export answering as the PyTorch set it was checked against.
        config = {"INFERENCE_PRECISION_HINT": "f32"} | ({"INFERENCE_NUM_THREADS": threads} if threads else {})
        return ov.Core().compile_model(str(path), "CPU", config)(feeds)[0]
    import onnxruntime as ort  # deferred: onnxruntime is the optional export extra

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def run_onnx(export_dir: str | Path, task: str, inputs: list, precision: str = "fp32") -> np.ndarray:
    """Raw outputs of an exported task for sentences or pairs (what the README snippet does by hand)."""
    export_dir = Path(export_dir)
    record = json.loads((export_dir / "export.json").read_text())
    entry = record["tasks"][task]
    tok = AutoTokenizer.from_pretrained(str(export_dir))
    if entry["pair"]:
        enc = tok([a for a, _ in inputs], [b for _, b in inputs], padding=True, truncation=True,
                  max_length=record["max_length"], return_tensors="np")
    else:
        enc = tok(list(inputs), padding=True, truncation=True, max_length=record["max_length"], return_tensors="np")
    return run_graph(export_dir / entry["files"][precision], {n: enc[n].astype(np.int64) for n in entry["inputs"]})
