"""One ONNX graph of the backbone that answers for many adapter sets at once.

Every linear layer inside the transformer blocks adds a per-row LoRA delta whose factors are
graph **inputs**, not weights: ``lora_a.i`` ``(E, R, d_in)``, ``lora_b.i`` ``(E, d_out, R)`` and
``lora_s.i`` ``(E, R)`` (the scaling per rank slot) for slot ``i``, with ``row`` ``(N,)`` naming the
entry each input row uses. An entry is one (set, task): its shared and task adapters concatenated
along the rank, its pooling (``pool_mean``: 1 mean, 0 ``[CLS]``) and its head (``head_w``
``(E, C, H)``, ``head_b`` ``(E, C)``, classes padded to the widest). The graph returns
``output`` ``(N, C)``: row n's logits (or score in column 0) under entry ``row[n]``.

So loading or unloading a set never touches the graph: the server feeds the factors of the
entries a batch uses (:class:`GraphEngine`), and an exported table (:func:`export_multi`) can be
fed whole, each row choosing its entry — with ONNX Runtime, tokenizers and numpy alone. The
base weights are fp32, or int8 (ONNX Runtime dynamic quantization of the constant-weight
GEMMs only: the LoRA products, attention and heads stay fp32).

Why per-row gathers rather than merging each set into its own graph (what peft and
optimum-intel offer): one graph's memory for any number of sets, and one coalesced pass for
rows of different sets (reports/serve.md measures both).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from ..data.loading import pad_sequences
from ..errors import UserError
from ..model import lora_runtime
from ..model.backbone import load_encoder, resolve_backbone
from ..model.lora_config import transformer_blocks
from .graphs import PAIR_PROBES, PROBES, quantize_onnx
from .int8 import cache_root

logger = logging.getLogger(__name__)

GRAPH_VERSION = "1"  # bump when the graph's inputs or layout change: cached graphs are rebuilt
_STATE: contextvars.ContextVar = contextvars.ContextVar("peft_mtl_graph_rows", default=None)


class GraphError(UserError):
    """The multi-adapter graph cannot run or be built as asked; the message says why."""


@dataclass(frozen=True)
class Slot:
    """A linear layer of the backbone that takes LoRA factors as inputs."""

    module: str  # its name in the plain encoder (e.g. ``encoder.layer.0.attention.self.query``)
    d_in: int
    d_out: int


class _SlotLinear(nn.Module):
    """``linear(x)`` plus the per-row delta ``((x A[row]ᵀ) · s[row]) B[row]ᵀ`` of the traced inputs."""

    def __init__(self, linear: nn.Linear, index: int):
        super().__init__()
        self.linear, self.index = linear, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        state = _STATE.get()
        if state is None:
            return out
        row, factors = state
        a, b, s = factors[self.index]
        h = torch.matmul(x, a.index_select(0, row).transpose(1, 2)) * s.index_select(0, row).unsqueeze(1)  # (N, T, R)
        return out + torch.matmul(h, b.index_select(0, row).transpose(1, 2))


class AdapterGraph(nn.Module):
    """The traced module: plain encoder with slots, both poolings, a per-row head."""

    def __init__(self, encoder: nn.Module, slots: list[Slot], token_types: bool):
        super().__init__()
        self.encoder, self.slots, self.token_types = encoder, slots, token_types
        modules = dict(encoder.named_modules())
        for i, slot in enumerate(slots):
            parent, _, child = slot.module.rpartition(".")
            # Our own CPU copy of the backbone: its linear layers are wrapped, never patched.
            setattr(modules[parent], child, _SlotLinear(modules[slot.module], i))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = dict(zip(input_names(self.slots, self.token_types), inputs))
        table = [(x[f"lora_a.{i}"], x[f"lora_b.{i}"], x[f"lora_s.{i}"]) for i in range(len(self.slots))]
        row, attention_mask = x["row"], x["attention_mask"]
        token = _STATE.set((row, table))
        try:
            extra = {"token_type_ids": x["token_type_ids"]} if self.token_types else {}
            hidden = self.encoder(input_ids=x["input_ids"], attention_mask=attention_mask, **extra).last_hidden_state
        finally:
            _STATE.reset(token)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        cls = hidden[:, 0]
        pooled = cls + x["pool_mean"].index_select(0, row).unsqueeze(-1) * (mean - cls)
        head_w, head_b = x["head_w"].index_select(0, row), x["head_b"].index_select(0, row)
        return torch.matmul(head_w, pooled.unsqueeze(-1)).squeeze(-1) + head_b


def graph_slots(encoder: nn.Module) -> list[Slot]:
    """Every ``nn.Linear`` inside the transformer blocks (what ``--lora-targets all`` adapts)."""
    prefix, blocks = transformer_blocks(encoder)
    slots = []
    for index, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if isinstance(module, nn.Linear):
                slots.append(Slot(f"{prefix}.{index}.{sub}", module.in_features, module.out_features))
    return slots


def input_names(slots: list[Slot], token_types: bool) -> list[str]:
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    names += ["row", "pool_mean", "head_w", "head_b"]
    for i in range(len(slots)):
        names += [f"lora_a.{i}", f"lora_b.{i}", f"lora_s.{i}"]
    return names


def build_graph(backbone: str | None, out: Path, int8: bool = False, opset: int = 17) -> dict:
    """Write ``out/model.onnx`` (and ``model.int8.onnx``) and ``out/graph.json``; returns the graph record."""
    display, path = resolve_backbone(backbone)
    encoder = load_encoder(path, attn_implementation="eager")
    token_types = getattr(encoder.config, "type_vocab_size", 0) > 1
    slots = graph_slots(encoder)
    graph = AdapterGraph(encoder, slots, token_types).eval()
    hidden = encoder.config.hidden_size
    entries, rank, width, rows, tokens = 2, 4, 3, 2, 7
    generator = torch.Generator().manual_seed(0)
    dummy = {"input_ids": torch.randint(100, 1000, (rows, tokens), generator=generator),
             "attention_mask": torch.ones(rows, tokens, dtype=torch.long),
             "token_type_ids": torch.zeros(rows, tokens, dtype=torch.long),
             "row": torch.tensor([0, 1]), "pool_mean": torch.ones(entries),
             "head_w": torch.randn(entries, width, hidden, generator=generator), "head_b": torch.zeros(entries, width)}
    axes = {"input_ids": {0: "rows", 1: "tokens"}, "attention_mask": {0: "rows", 1: "tokens"},
            "token_type_ids": {0: "rows", 1: "tokens"}, "row": {0: "rows"}, "pool_mean": {0: "entries"},
            "head_w": {0: "entries", 1: "width"}, "head_b": {0: "entries", 1: "width"},
            "output": {0: "rows", 1: "width"}}
    for i, slot in enumerate(slots):
        dummy[f"lora_a.{i}"] = torch.randn(entries, rank, slot.d_in, generator=generator) * 0.01
        dummy[f"lora_b.{i}"] = torch.randn(entries, slot.d_out, rank, generator=generator) * 0.01
        dummy[f"lora_s.{i}"] = torch.ones(entries, rank)
        axes[f"lora_a.{i}"] = {0: "entries", 1: f"rank{i}"}
        axes[f"lora_b.{i}"] = {0: "entries", 2: f"rank{i}"}
        axes[f"lora_s.{i}"] = {0: "entries", 1: f"rank{i}"}
    names = input_names(slots, token_types)
    args = tuple(dummy[n] for n in names)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # transformers' mask code branches on "mask shorter than the keys", never true for an
        # encoder's own mask: the traced branch (none) holds for every length.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # ... and indexes with position ids it builds itself (never negative).
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(graph, args, str(out / "model.onnx"), input_names=names, output_names=["output"],
                          dynamic_axes={n: axes[n] for n in names} | {"output": axes["output"]},
                          opset_version=opset, dynamo=False)
    files = {"fp32": "model.onnx"}
    if int8:
        quantize_onnx(out / "model.onnx", out / "model.int8.onnx")
        files["int8"] = "model.int8.onnx"
    record = {"version": GRAPH_VERSION, "backbone": display, "hidden_size": hidden, "token_types": token_types,
              "inputs": names, "files": files,
              "slots": [{"module": s.module, "d_in": s.d_in, "d_out": s.d_out} for s in slots]}
    (out / "graph.json").write_text(json.dumps(record, indent=1))
    return record


def cached_graph(backbone: str | None, int8: bool, cache: Path | None = None) -> tuple[Path, dict]:
    """The graph file for ``backbone`` (fp32 or int8), built once and kept in the cache."""
    display, path = resolve_backbone(backbone)
    import onnxruntime  # deferred: the optional export extra (its quantizer wrote the int8 file)

    # The traced graph follows transformers' modelling code, the int8 file ONNX Runtime's quantizer.
    digest = hashlib.sha256(f"{GRAPH_VERSION}\0{display}\0{torch.__version__}\0{transformers.__version__}\0"
                            f"{onnxruntime.__version__}".encode())
    for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
        digest.update(f.name.encode() + str(f.stat().st_size).encode())
    root = (cache or cache_root().parent / "multi")
    folder = root / digest.hexdigest()[:24]
    key = "int8" if int8 else "fp32"
    meta = folder / "graph.json"
    if meta.is_file():
        record = json.loads(meta.read_text())
        if key in record["files"]:
            return folder / record["files"][key], record
    root.mkdir(parents=True, exist_ok=True)
    logger.info(f"building the multi-adapter graph of {display} ({key}; once, then cached in {root})")
    with tempfile.TemporaryDirectory(dir=root, prefix=".building-") as tmp:
        record = build_graph(backbone, Path(tmp) / "g", int8=True)
        if folder.exists():  # an fp32-only build from an older run: replaced by the complete one
            shutil.rmtree(folder, ignore_errors=True)
        try:
            (Path(tmp) / "g").rename(folder)  # atomic: a concurrent builder may have won
        except OSError:
            if not meta.is_file():
                raise
    record = json.loads(meta.read_text())
    return folder / record["files"][key], record


# -- entries: one (set, task) as the graph's inputs -------------------------------------------

@dataclass
class Entry:
    """One (set, task) as graph inputs, the factors views of the host's live weights where they can be."""

    factors: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]  # per slot: A (r, d_in), B (d_out, r), s (r,)
    head_w: np.ndarray  # (C, H)
    head_b: np.ndarray  # (C,)
    pool_mean: float
    kind: str
    owner: object = field(repr=False, default=None)  # the AdapterSet it was made from (a reload makes a new one)

    @property
    def width(self) -> int:
        return self.head_w.shape[0]


def unsupported(host, name: str, slots: dict[str, int]) -> str | None:
    """Why set ``name`` cannot run on the graph (None: it can)."""
    aset = host.sets[name]
    if aset.model is not None:
        return "fully fine-tuned (its own encoder)"
    if aset.pair_encoding != "cross":
        return "bi-encoded pairs"
    if aset.manifest["config"]["lora"].get("use_dora"):
        return "DoRA"
    if host.device.type != "cpu":
        return "the backbone is not on the CPU"
    for task in aset.tasks:
        head = host.owner(name).heads[host.head_key(name, task)]
        if getattr(head, "linear", None) is None:
            return "a head without weights (cosine)"
        outside = [m for m in lora_runtime.adapter_factors(host.encoder, host.routing(name, task)) if m not in slots]
        if outside:
            return f"adapts {outside[0]}, which is not a linear layer of the transformer blocks"
    return None


def make_entry(host, name: str, task: str, slots: dict[str, int]) -> Entry:
    """Set ``name``'s ``task`` as graph inputs: one adapter's factors are views (no copy), several are
    concatenated along the rank."""
    factors: list = [None] * len(slots)
    for module, parts in lora_runtime.adapter_factors(host.encoder, host.routing(name, task)).items():
        arrays = [(a.float().numpy(), b.float().numpy(), np.full(a.shape[0], s, np.float32)) for a, b, s in parts]
        if len(arrays) == 1:
            factors[slots[module]] = arrays[0]
        else:
            factors[slots[module]] = (np.concatenate([a for a, _, _ in arrays]),
                                      np.concatenate([b for _, b, _ in arrays], axis=1),
                                      np.concatenate([s for _, _, s in arrays]))
    head = host.owner(name).heads[host.head_key(name, task)].linear
    return Entry(factors, head.weight.detach().float().numpy(), head.bias.detach().float().numpy(),
                 1.0 if host.pooling(name, task) == "mean" else 0.0, host.spec(task, name).kind, host.sets[name])


def entry_feeds(entries: list[Entry], slots: list[Slot], hidden: int) -> dict[str, np.ndarray]:
    """The per-entry inputs for ``entries`` (factors stacked, ranks and classes zero-padded)."""
    count = len(entries)
    width = max(e.width for e in entries)
    feeds = {"pool_mean": np.array([e.pool_mean for e in entries], np.float32),
             "head_w": np.zeros((count, width, hidden), np.float32), "head_b": np.zeros((count, width), np.float32)}
    for g, e in enumerate(entries):
        feeds["head_w"][g, :e.width] = e.head_w
        feeds["head_b"][g, :e.width] = e.head_b
    for i, slot in enumerate(slots):
        parts = [e.factors[i] for e in entries]
        ranks = [0 if p is None else p[0].shape[0] for p in parts]
        if all(r == ranks[0] and r > 0 for r in ranks):  # the usual case: one stacking copy each
            a, b, s = (np.stack([p[k] for p in parts]) for k in range(3))
        else:
            rank = max(1, max(ranks))
            a = np.zeros((count, rank, slot.d_in), np.float32)
            b = np.zeros((count, slot.d_out, rank), np.float32)
            s = np.zeros((count, rank), np.float32)
            for g, p in enumerate(parts):
                if p is not None:
                    r = p[0].shape[0]
                    a[g, :r], b[g, :, :r], s[g, :r] = p
        feeds[f"lora_a.{i}"], feeds[f"lora_b.{i}"], feeds[f"lora_s.{i}"] = a, b, s
    return feeds


class GraphEngine:
    """ONNX Runtime session of the multi-adapter graph for the sets of one host (CPU, fp32 or int8).

    Not thread-safe by itself: the server calls it from its one model thread."""

    def __init__(self, host, int8: bool = False, threads: int | None = None, cache: Path | None = None):
        try:
            import onnxruntime as ort  # deferred: onnxruntime is the optional export extra
        except ImportError:
            raise GraphError("--engine onnx needs onnxruntime and onnx: pip install 'peft_mtl[export]'") from None
        if host.device.type != "cpu":
            raise GraphError("--engine onnx runs on the CPU; use --engine torch for a GPU")
        path, record = cached_graph(host.source, int8, cache)
        if record["backbone"] != host.identity.name:
            raise GraphError(f"{path}: graph of {record['backbone']}, host backbone {host.identity.name}")
        self.host, self.int8, self.path = host, int8, path
        self.slots = [Slot(**s) for s in record["slots"]]
        self.slot_index = {s.module: i for i, s in enumerate(self.slots)}
        self.hidden, self.token_types = record["hidden_size"], record["token_types"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.entries: dict[tuple[str, str], Entry] = {}
        self._reasons: dict[str, str | None] = {}

    @property
    def name(self) -> str:
        return "onnx int8" if self.int8 else "onnx fp32"

    def unsupported(self, name: str) -> str | None:
        """Why set ``name`` runs on PyTorch instead (None: it runs on the graph)."""
        aset = self.host.sets[name]
        if name not in self._reasons or self._reasons[name][0] is not aset:
            self._reasons[name] = (aset, unsupported(self.host, name, self.slot_index))
        return self._reasons[name][1]

    def refresh(self) -> None:
        """Forget entries of sets unloaded (or reloaded under the same name) since they were made."""
        for key in [k for k, e in self.entries.items() if self.host.sets.get(k[0]) is not e.owner]:
            del self.entries[key]
        self._reasons = {n: r for n, r in self._reasons.items() if self.host.sets.get(n) is r[0]}

    def entry(self, name: str, task: str) -> Entry:
        key = (name, task)
        if key not in self.entries or self.entries[key].owner is not self.host.sets[name]:
            self.entries[key] = make_entry(self.host, name, task, self.slot_index)
        return self.entries[key]

    def run(self, rows: list[dict], row_entries: np.ndarray, entries: list[Entry]) -> np.ndarray:
        """``output (N, C)`` for encoded ``rows``, row n under ``entries[row_entries[n]]``."""
        batch = pad_sequences(rows, self.host.pad_id)
        feeds = {n: batch[n].numpy().astype(np.int64) for n in ("input_ids", "attention_mask")}
        if self.token_types:
            feeds["token_type_ids"] = batch["token_type_ids"].numpy().astype(np.int64)
        feeds["row"] = np.asarray(row_entries, np.int64)
        feeds |= entry_feeds(entries, self.slots, self.hidden)
        return self.session.run(None, feeds)[0]

    def outputs(self, groups: list[tuple[str, str, list[dict]]]) -> list[np.ndarray]:
        """Raw outputs (logits, or scores) per ``(set, task, encoded rows)`` group, from one pass."""
        rows, row_entries, entries, index = [], [], [], {}
        for name, task, encoded in groups:
            g = index.setdefault((name, task), len(entries))
            if g == len(entries):
                entries.append(self.entry(name, task))
            rows.extend(encoded)
            row_entries.extend([g] * len(encoded))
        out = self.run(rows, np.array(row_entries), entries)
        results, start = [], 0
        for name, task, encoded in groups:
            e = entries[index[(name, task)]]
            block = out[start:start + len(encoded), :e.width]
            results.append(block[:, 0] if e.kind == "regression" else block)
            start += len(encoded)
        return results


# -- the graph with a table of every entry, written to a folder (peft-mtl export --multi) ----

def write_multi(host, out: Path, int8: bool = False) -> dict:
    """Write the graph, ``table.npz`` (every loaded (set, task) as one entry of the graph's per-entry
    inputs) and ``graph.json`` (the entries, their labels and kinds) into ``out``; returns the record.

    Each entry is checked against fp32 PyTorch on probe inputs (GraphError beyond 1e-4)."""
    record = build_graph(host.source, out, int8=int8)
    slots = [Slot(**s) for s in record["slots"]]
    index = {s.module: i for i, s in enumerate(slots)}
    for name in host.sets:
        reason = unsupported(host, name, index)
        if reason:
            raise GraphError(f"{host.sets[name].folder}: set {name!r} cannot join a multi-adapter graph ({reason}); "
                             f"export it on its own (peft-mtl export without --multi)")
    keys = [(n, t) for n, aset in host.sets.items() for t in aset.tasks]
    entries = [make_entry(host, n, t, index) for n, t in keys]
    table = entry_feeds(entries, slots, record["hidden_size"])
    np.savez(out / "table.npz", **table)
    record["entries"] = [f"{n}/{t}" for n, t in keys]
    record["tasks"] = {}
    record["max_length"] = max(aset.max_length for aset in host.sets.values())
    record["pad_id"] = host.pad_id
    record["check"] = {}
    import onnxruntime as ort  # deferred: onnxruntime is the optional export extra

    sessions = {k: ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"])
                for k, f in record["files"].items()}
    for g, (name, task) in enumerate(keys):
        spec = host.spec(task, name)
        record["tasks"][f"{name}/{task}"] = {
            "kind": spec.kind, "pair": spec.is_pair, "width": entries[g].width,
            "labels": [spec.label_of(i) for i in range(entries[g].width)] if spec.kind == "classification" else None}
        probes = PAIR_PROBES if spec.is_pair else PROBES
        encoded = host.encode(task, probes, name)
        reference = host.outputs(task, encoded, name, engine="pytorch", precision="fp32")
        batch = pad_sequences(encoded.segments[0], host.pad_id)
        feeds = {n: batch[n].numpy().astype(np.int64) for n in record["inputs"][:3] if n in batch}
        feeds |= table | {"row": np.full(len(probes), g, np.int64)}
        check = {}
        for precision, session in sessions.items():
            got = session.run(None, feeds)[0][:, :entries[g].width]
            got = got[:, 0] if spec.kind == "regression" else got
            check[f"{precision}_max_abs_diff"] = float(np.abs(got - reference).max())
        tolerance = 1e-4 * max(1.0, float(np.abs(reference).max()))
        if check["fp32_max_abs_diff"] > tolerance:
            raise GraphError(f"{name}/{task}: the multi-adapter graph differs from PyTorch by "
                             f"{check['fp32_max_abs_diff']:.2e} (> {tolerance:.1e}); not writing it")
        record["check"][f"{name}/{task}"] = check
    (out / "graph.json").write_text(json.dumps(record, indent=1))
    return record
