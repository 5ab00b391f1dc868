"""int8 inference: each (set, task) runs as an int8 ONNX Runtime graph with its adapters merged.

``load_base(int8=True)`` (``--int8`` on predict, eval, ensemble and serve) routes a set's
predictions through :class:`Int8Runtime`: the first use of a (set, task) exports it with
:func:`peft_mtl.inference.graphs.export_task` — adapters merged into the frozen weights, pooling and
head in the graph — quantizes the graph's weight × activation products to int8
(per-channel weights, per-batch activations) and keeps the file in a cache keyed by the
set's files and the backbone, so the next process starts in a second. Sessions stay open
for the most recently used (set, task) pairs.

Why ONNX Runtime: on the 2-core AVX2 CPU of reports/int8.md it ran the int8 graph fastest
of the engines on the package index (ONNX Runtime int8, OpenVINO on the same graph, PyTorch's
deprecated dynamic quantization); the measured cost in dev accuracy per task is in that report.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..data.loading import iterate_batches
from ..errors import UserError
from .graphs import ExportError, export_task

FORMAT_VERSION = "1"  # bump when the exported graph changes, so cached graphs are rebuilt


class Int8Error(UserError):
    """int8 inference cannot run as asked; the message says why and what to do."""


def cache_root() -> Path:
    """``$PEFT_MTL_CACHE/int8`` (default ``~/.cache/peft_mtl/int8``)."""
    root = os.environ.get("PEFT_MTL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_mtl")
    return Path(root) / "int8"


def set_digest(folder: Path, backbone: str, task: str) -> str:
    """Content hash of everything an exported graph depends on: the set's files, the backbone, the task."""
    digest = hashlib.sha256(f"{FORMAT_VERSION}\0{backbone}\0{task}\0".encode())
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix in (".json", ".safetensors", ".yaml", ".yml", ".bin", ".txt"):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


class Int8Runtime:
    """int8 ONNX Runtime sessions for the (set, task) pairs of one :class:`~peft_mtl.inference.adapter_host.AdapterHost`."""

    def __init__(self, threads: int, max_sessions: int = 16, cache: Path | None = None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise Int8Error("--int8 needs onnxruntime and onnx: pip install 'peft_mtl[export]'") from None
        self.threads = threads
        self.max_sessions = max_sessions
        self.cache = cache or cache_root()
        self.sessions: OrderedDict[tuple[str, str], tuple] = OrderedDict()

    def forget(self, set_name: str) -> None:
        """Close the sessions of an unloaded set (its cached files stay for the next load)."""
        for key in [k for k in self.sessions if k[0] == set_name]:
            del self.sessions[key]

    def outputs(self, base, set_name: str, task: str, encoded, batch_size: int = 128) -> np.ndarray:
        """Raw head outputs of ``task`` for ``encoded`` inputs, in their order (like ``AdapterHost.outputs``)."""
        session, names = self._session(base, set_name, task)
        chunks, order = [], []
        for batch in iterate_batches(encoded, batch_size, None, base.pad_id):
            feeds = {n: batch.inputs[0][n].numpy().astype(np.int64) for n in names}  # cross-encoded: one segment
            chunks.append(session.run(None, feeds)[0].astype(np.float32))
            order.append(batch.indices)
        out = np.concatenate(chunks)
        result = np.empty_like(out)
        result[np.concatenate(order)] = out
        return result

    def _session(self, base, set_name: str, task: str):
        import onnxruntime as ort  # deferred: onnxruntime is the optional export extra

        key = (set_name, task)
        if key in self.sessions:
            self.sessions.move_to_end(key)
            return self.sessions[key]
        path, names = self._graph(base, set_name, task)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.sessions[key] = (session, names)
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return self.sessions[key]

    def _graph(self, base, set_name: str, task: str) -> tuple[Path, list[str]]:
        """The cached int8 graph of (set, task), exported and quantized on first use."""
        aset = base.sets[set_name]
        folder = self.cache / set_digest(aset.folder, base.identity.name, task)
        graph, meta = folder / "model.int8.onnx", folder / "inputs.json"
        if graph.is_file() and meta.is_file():
            return graph, json.loads(meta.read_text())
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".building-") as tmp:
            try:
                entry = export_task(base, set_name, task, Path(tmp), "onnx", int8=True)
            except ExportError as err:
                raise Int8Error(f"--int8: {err}") from None
            built = Path(tmp) / task
            (built / "model.onnx").unlink()  # only the int8 graph is kept
            (built / "inputs.json").write_text(json.dumps(entry["inputs"]))
            try:
                built.rename(folder)  # atomic: a concurrent builder of the same graph may have won
            except OSError:
                if not (graph.is_file() and meta.is_file()):
                    raise
        return graph, json.loads(meta.read_text())
