"""The one thread that owns the model: dynamic batching across adapter sets and tasks.

HTTP handlers never touch the model. They put jobs on a queue and await a future. The
worker takes the first queued job, keeps collecting until ``max_batch`` rows are waiting
or ``max_wait_ms`` have passed since that first job arrived, and answers every prediction
job of the batch from one forward pass: rows are grouped by (set, task), each group a
contiguous block of the batch with its own LoRA deltas (:func:`peft_mtl.model.lora_runtime.grouped_lora`)
and its own head. The pass runs on one of two engines: the multi-adapter ONNX graph
(:class:`~peft_mtl.inference.adapter_graph.GraphEngine`, the default on a CPU: each row picks its
(set, task) entry, the factors are inputs) or PyTorch (:func:`group_outputs`). Loading and
unloading sets are jobs on the same queue, run between batches, so they can never overlap a
forward pass; a request for a set unloaded before its turn gets a clean "unknown set" error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..data.loading import pad_sequences
from ..inference.adapter_graph import GraphEngine
from ..inference.adapter_host import AdapterHost, format_predictions
from ..device import autocast, enter
from ..model.lora_runtime import RowGroup, grouped_lora


class UnknownName(LookupError):
    """A set or task that is not loaded; the message names what is."""


class HeapTrim:
    """Give freed heap memory back to the OS every ``interval`` seconds (glibc ``malloc_trim``).

    Batches of every size and length allocate activations of every shape; glibc keeps the freed
    blocks in its heap (its mmap threshold grows past the activation sizes), so a server's
    resident memory crept up by ~2.5 MB/s under load though nothing leaked (reports/reliability.md).
    Trimming every second kept it within 10 % of its post-warm-up level with no measurable loss of
    throughput (every 5 s: bounded but swinging ±15 %); a fixed mmap threshold also kept it flat
    but cost 40 % of the throughput."""

    def __init__(self, interval: float):
        self.interval, self.last = interval, time.monotonic()
        try:
            self._trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim
            self._trim = None

    def maybe(self) -> None:
        if self._trim is not None and self.interval > 0 and time.monotonic() - self.last >= self.interval:
            self._trim(0)
            self.last = time.monotonic()


class InvalidInput(ValueError):
    """A request's inputs cannot be answered (e.g. text the tokenizer refuses); only that request fails."""


@dataclass(eq=False)
class PredictJob:
    set: str
    task: str
    inputs: list
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    encoded: list | None = None  # token ids per input, made alone before the job joins a batch

    @property
    def rows(self) -> int:
        return len(self.inputs)


@dataclass(eq=False)
class CallJob:
    """Anything else that must run on the model's thread (ensembles, load, unload)."""

    fn: Callable[[AdapterHost], Any]
    rows: int = 0
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    rows: int
    jobs: int
    queue_seconds: list[float]


class Worker:
    """Owns ``base``; ``submit`` is thread-safe; ``on_batch`` sees every coalesced batch."""

    def __init__(self, base: AdapterHost, max_batch: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[BatchStats], None] | None = None, trim_every_s: float = 1.0,
                 engine: GraphEngine | None = None):
        self.engine = engine  # None: every pass on PyTorch
        self.base, self.max_batch, self.max_wait = base, max(1, max_batch), max(0.0, max_wait_ms) / 1000
        self._heap = HeapTrim(trim_every_s)
        self.on_batch = on_batch or (lambda stats: None)
        self.queue: queue.Queue = queue.Queue()
        self._held: PredictJob | CallJob | None = None  # taken from the queue but not fitting the last batch
        self._stop = threading.Event()
        self._groupable_cache: dict[str, bool] = {}
        self.sets_snapshot: dict[str, dict] = {}
        self._publish()
        self.thread = threading.Thread(target=self._run, name="peft-mtl-model", daemon=True)
        self.thread.start()

    # -- called from any thread ------------------------------------------------------

    def submit(self, job: PredictJob | CallJob) -> Future:
        self.queue.put(job)
        return job.future

    def stop(self) -> None:
        self._stop.set()
        self.queue.put(None)
        self.thread.join(timeout=10)

    # -- the model's thread ------------------------------------------------------------

    def _next(self, timeout: float | None) -> PredictJob | CallJob | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        enter(self.base.device)  # CUDA's current device is per thread: cuda:1 must mean GPU 1 here too
        while not self._stop.is_set():
            first = self._next(None)
            if first is None:
                continue
            if isinstance(first, CallJob):
                self._call(first)
                continue
            batch, rows = [first], first.rows
            deadline = first.enqueued + self.max_wait
            while rows < self.max_batch:
                job = self._next(max(0.0, deadline - time.perf_counter()))
                if job is None:
                    break
                if isinstance(job, CallJob) or rows + job.rows > self.max_batch:
                    self._held = job  # next round: control jobs never run inside a batch
                    break
                batch.append(job)
                rows += job.rows
            self._predict(batch)
            self._heap.maybe()

    def _call(self, job: CallJob) -> None:
        started = time.perf_counter()
        try:
            result, error = job.fn(self.base), None
        except Exception as err:  # the caller decides what the error means
            result, error = None, err
        # The new view of the sets is published before the caller hears back.
        self._groupable_cache.clear()
        if self.engine is not None:
            self.engine.refresh()  # an unloaded set's factors are never fed again
        self._publish()
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)
        if job.rows:  # ensembles count as a batch of their rows
            self.on_batch(BatchStats(job.rows, 1, [started - job.enqueued]))

    def _publish(self) -> None:
        """A read-only view of the loaded sets for handlers on other threads."""
        self.sets_snapshot = {
            name: {"tasks": list(a.tasks), "mode": a.manifest.get("mode"), "folder": str(a.folder),
                   "trainable_parameters": a.manifest.get("parameters", {}).get("trainable"),
                   "task_types": {t: a.specs[t].kind for t in a.tasks if t in a.specs},
                   "engine": self.engine_of(name)}
            for name, a in self.base.sets.items()}

    def engine_of(self, name: str) -> str:
        """Which engine answers set ``name``: the graph's, PyTorch's batched pass, or its own passes."""
        if self.engine is not None and self.engine.unsupported(name) is None:
            return self.engine.name
        if self.base.int8 is not None:
            return "onnx int8, one merged graph per (set, task)"
        return "torch" if self._groupable(name) else "torch, own passes"

    def _groupable(self, name: str) -> bool:
        """Sets whose rows can share the batched pass: on the graph, those it supports; on PyTorch,
        LoRA (or heads-only) sets, cross-encoded, not DoRA (under --int8 each (set, task) has its own graph)."""
        if name not in self._groupable_cache:
            aset = self.base.sets[name]
            if self.engine is not None:  # the rest run alone on PyTorch (the reason is logged at load)
                ok = self.engine.unsupported(name) is None
            else:
                ok = (aset.model is None and aset.pair_encoding == "cross" and self.base.int8 is None
                      and not aset.manifest["config"]["lora"].get("use_dora"))
            self._groupable_cache[name] = bool(ok)
        return self._groupable_cache[name]

    def _predict(self, batch: list[PredictJob]) -> None:
        started = time.perf_counter()
        valid: list[PredictJob] = []
        for job in batch:
            error = self._check(job)
            if error is not None:
                job.future.set_exception(error)
            else:
                valid.append(job)
        grouped = []
        for job in valid:
            if not self._groupable(job.set):  # full fine-tuned, bi-encoder or DoRA sets: their own pass
                self._settle(job, lambda j=job: self.base.predict(j.task, j.inputs, j.set))
            elif self._encode(job):
                grouped.append(job)
        if grouped:
            try:
                results = self._grouped_pass(grouped)
            except Exception as err:
                if len(grouped) == 1:
                    grouped[0].future.set_exception(err)
                else:  # isolate the request that broke the shared pass: each answered on its own
                    for job in grouped:
                        self._settle(job, lambda j=job: self._grouped_pass([j])[0])
            else:
                for job, result in zip(grouped, results):
                    job.future.set_result(result)
        self.on_batch(BatchStats(sum(j.rows for j in batch), len(batch), [started - j.enqueued for j in batch]))

    def _encode(self, job: PredictJob) -> bool:
        """Tokenise one request on its own, so bad text fails that request alone (422), not its batch."""
        try:
            job.encoded = self.base.encode(job.task, job.inputs, job.set).segments[0]
        except Exception as err:
            job.future.set_exception(InvalidInput(f"the inputs cannot be tokenised ({type(err).__name__}: {err})"))
            return False
        return True

    def _settle(self, job: PredictJob, fn: Callable[[], Any]) -> None:
        try:
            job.future.set_result(fn())
        except Exception as err:
            job.future.set_exception(err)

    def _check(self, job: PredictJob) -> Exception | None:
        aset = self.base.sets.get(job.set)
        if aset is None:
            return UnknownName(f"no set named {job.set!r}; loaded: {', '.join(self.base.sets) or 'none'}")
        if job.task not in aset.tasks:
            return UnknownName(f"set {job.set!r} has no task {job.task!r}; it has {', '.join(aset.tasks)}")
        return None

    @torch.inference_mode()
    def _grouped_pass(self, jobs: list[PredictJob]) -> list[list[dict]]:
        """Every job's predictions from as few encoder passes as pay: rows grouped by (set, task),
        each group with its own LoRA deltas and head; one pass, or two split by length when that
        cuts the padded tokens by a quarter or more (short sentences padded to long pairs)."""
        base = self.base
        order: dict[tuple[str, str], list[int]] = {}
        for i, job in enumerate(jobs):
            order.setdefault((job.set, job.task), []).append(i)
        blocks = []  # (set, task, job indices, encoded rows per job)
        for (name, task), members in order.items():
            encoded = [jobs[i].encoded if jobs[i].encoded is not None else base.encode(task, jobs[i].inputs, name).segments[0]
                       for i in members]
            blocks.append((name, task, members, encoded))
        blocks.sort(key=lambda b: max(len(r["input_ids"]) for rows in b[3] for r in rows))
        results: list[list[dict]] = [[] for _ in jobs]
        for part in split_by_length(blocks):
            self._pass(part, results)
        return results

    def _pass(self, blocks: list, results: list[list[dict]]) -> None:
        if self.engine is not None:
            outputs = self.engine.outputs([(name, task, [r for rows in encoded for r in rows])
                                           for name, task, _, encoded in blocks])
        else:
            outputs = [out.cpu().numpy() for out in group_outputs(self.base, blocks)[1]]  # the one read-back
        for (name, task, members, encoded), out in zip(blocks, outputs):
            predictions = format_predictions(self.base.spec(task, name), out)
            start = 0
            for i, rows in zip(members, encoded):
                results[i] = predictions[start:start + len(rows)]
                start += len(rows)


def group_outputs(base: AdapterHost, blocks: list) -> tuple[list, list[torch.Tensor]]:
    """One encoder pass over every block's rows, each (set, task) group with its own LoRA deltas and
    head; returns the groups ``(set, task, job indices, RowGroup, job row spans)`` and their outputs,
    still on the model's device."""
    rows, groups = [], []
    for name, task, members, encoded in blocks:
        start, spans = len(rows), {}
        for i, job_rows in zip(members, encoded):
            spans[i] = (len(rows), len(rows) + len(job_rows))
            rows.extend(job_rows)
        groups.append((name, task, members, RowGroup(start, len(rows), base.group_factors(name, task)), spans))
    inputs = pad_sequences(rows, base.pad_id)
    with autocast(base.precision, base.device), grouped_lora(base.encoder, [g[3] for g in groups]):
        hidden, mask = base.hidden_states(inputs)
    outputs = [base.head_output(name, task, [(hidden[g.start:g.end], mask[g.start:g.end])])
               for name, task, _, g, _ in groups]
    return groups, outputs


def split_by_length(blocks: list) -> list[list]:
    """Blocks sorted by their longest row → one pass, or two if that saves ≥ 25% of padded tokens."""
    sizes = [sum(len(rows) for rows in b[3]) for b in blocks]
    longest = [max(len(r["input_ids"]) for rows in b[3] for r in rows) for b in blocks]
    single = sum(sizes) * (longest[-1] if longest else 0)
    best, cut = single, None
    for k in range(1, len(blocks)):
        cost = sum(sizes[:k]) * longest[k - 1] + sum(sizes[k:]) * longest[-1]
        if cost < best:
            best, cut = cost, k
    if cut is None or best > 0.75 * single:
        return [blocks]
    return [blocks[:cut], blocks[cut:]]
