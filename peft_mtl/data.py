"""Reading task files, tokenising them once, and batching with dynamic padding.

The real files are tab-separated with CSV-style quoting and contain malformed rows. A row
that cannot be trusted is skipped and counted (never given an invented label); a problem
that makes the whole file unusable (missing, empty, wrong delimiter, missing columns) is a
:class:`DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .tasks import TaskSpec

SPLITS = ("train", "dev", "test")
MAX_REPORTED_LINES = 5
# A single field that large is not a sentence: the csv module's 128 KiB default would
# raise deep inside the reader, so the limit is raised and oversized rows are skipped.
csv.field_size_limit(16 * 1024 * 1024)


class DataError(Exception):
    """A data file cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: float
    line: int  # 1-based line in the file where the row starts (the header is line 1)


@dataclass
class LoadedSplit:
    """The usable rows of one task file plus what was skipped and why."""

    task: TaskSpec
    path: Path
    examples: list[Example]
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def skip_report(self) -> str | None:
        """One line saying how many rows were skipped and the first line numbers, or None."""
        if not self.skipped:
            return None
        shown = ", ".join(f"line {line}: {why}" for line, why in self.skipped[:MAX_REPORTED_LINES])
        more = f", and {len(self.skipped) - MAX_REPORTED_LINES} more" if len(self.skipped) > MAX_REPORTED_LINES else ""
        noun = "row" if len(self.skipped) == 1 else "rows"
        return f"{self.path.name}: skipped {len(self.skipped)} malformed {noun} ({shown}{more})"


def default_data_dir() -> Path:
    """``../shared/data`` when it exists (the project layout), else ``data/``."""
    shared = Path("..") / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def task_file(data_dir: str | os.PathLike, task: TaskSpec, split: str) -> Path:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return Path(data_dir) / task.file_name(split)


def _decode(path: Path, raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        # Keep the good rows; rows holding replacement characters are skipped below.
        return raw.decode("utf-8-sig", errors="replace"), True


def _parse_label(task: TaskSpec, raw: str) -> tuple[float | None, str | None]:
    raw = raw.strip()
    if not raw:
        return None, "missing label"
    try:
        value = float(raw)
    except ValueError:
        return None, f"non-numeric label {raw[:20]!r}"
    if not math.isfinite(value):
        return None, f"non-finite label {raw[:20]!r}"
    low, high = task.label_range
    if not low <= value <= high:
        return None, f"label {raw[:20]} outside {low:g}..{high:g}"
    if task.kind == "classification" and value != int(value):
        return None, f"non-integer class label {raw[:20]}"
    return value, None


def load_split(path: str | os.PathLike, task: TaskSpec, strict: bool = False) -> LoadedSplit:
    """Read one tab-separated task file.

    Rows with a missing, non-numeric or out-of-range label, an empty sentence, the wrong
    number of fields or undecodable bytes are skipped and recorded. With ``strict`` the
    first such row raises :class:`DataError` instead.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: file not found. Put {path.name} in the data folder or pass --data-dir DIR "
            f"pointing at the folder that holds it."
        )
    raw = path.read_bytes()
    text, had_bad_bytes = _decode(path, raw)
    if not text.strip():
        raise DataError(f"{path}: the file is empty. Expected a tab-separated header line and rows.")

    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    try:
        header = next(reader)
    except csv.Error as err:
        raise DataError(f"{path}: line 1: unreadable header ({err}).") from None
    header = [h.strip() for h in header]
    needed = list(task.text_columns) + [task.label_column]
    missing = [c for c in needed if c not in header]
    if missing:
        if len(header) == 1 and ("," in header[0] or ";" in header[0]):
            raise DataError(
                f"{path}: line 1: the file is not tab-separated (the header has no tab). "
                f"Save it with tab delimiters and columns {', '.join(needed)}."
            )
        raise DataError(
            f"{path}: line 1: missing column(s) {', '.join(missing)} for task {task.name!r}; "
            f"found {', '.join(repr(h) for h in header)}. Rename the columns or pick the right --tasks."
        )
    text_idx = [header.index(c) for c in task.text_columns]
    label_idx = header.index(task.label_column)

    examples: list[Example] = []
    skipped: list[tuple[int, str]] = []
    line = 2
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            why = f"unparseable row ({err})"
            if strict:
                raise DataError(f"{path}: line {line}: {why}. Fix the row or drop --strict to skip it.") from None
            skipped.append((line, why))
            line = reader.line_num + 1
            continue
        start, line = line, reader.line_num + 1
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines carry nothing to skip or count
        why = None
        if len(row) != len(header):
            why = f"{len(row)} fields, expected {len(header)}"
        if had_bad_bytes and any("\ufffd" in cell for cell in row):
            why = "bytes that are not UTF-8"
        value = None
        if why is None:
            value, why = _parse_label(task, row[label_idx])
        if why is None:
            texts = tuple(row[i].strip() for i in text_idx)
            if any(not t for t in texts):
                why = "empty sentence"
        if why is not None:
            if strict:
                raise DataError(f"{path}: line {start}: {why}. Fix the row or drop --strict to skip it.")
            skipped.append((start, why))
            continue
        examples.append(Example(texts=texts, label=float(value), line=start))
    if not examples:
        raise DataError(f"{path}: no usable rows (skipped {len(skipped)}). Check the file's columns and labels.")
    return LoadedSplit(task=task, path=path, examples=examples, skipped=skipped)


@dataclass
class EncodedSplit:
    """Token ids for every example of a split, ready for dynamic padding.

    ``segments`` holds one list of encoded sequences per input: one for single sentences
    and cross-encoded pairs, two (sentence 1, sentence 2) for bi-encoded pairs.
    """

    task: TaskSpec
    segments: list[list[dict[str, list[int]]]]
    labels: np.ndarray
    truncated: int

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.array([sum(len(seg[i]["input_ids"]) for seg in self.segments) for i in range(len(self))])


def _tokenize(tokenizer, first: Sequence[str], second: Sequence[str] | None, max_length: int) -> tuple[list[dict], int]:
    # Tokenise untruncated once (a fast tokenizer would hide whether it truncated), then
    # re-tokenise only the few inputs that are too long, with the tokenizer's own strategy.
    enc = tokenizer(list(first), list(second) if second is not None else None, truncation=False,
                    return_attention_mask=False, verbose=False)
    too_long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > max_length]
    out = [{"input_ids": enc["input_ids"][i],
            "token_type_ids": enc["token_type_ids"][i] if "token_type_ids" in enc else [0] * len(enc["input_ids"][i])}
           for i in range(len(first))]
    if too_long:
        cut = tokenizer([first[i] for i in too_long], [second[i] for i in too_long] if second is not None else None,
                        truncation=True, max_length=max_length, return_attention_mask=False)
        for j, i in enumerate(too_long):
            ids = cut["input_ids"][j]
            out[i] = {"input_ids": ids,
                      "token_type_ids": cut["token_type_ids"][j] if "token_type_ids" in cut else [0] * len(ids)}
    return out, len(too_long)


def encode_split(split: LoadedSplit, tokenizer, max_length: int = 128, pair_encoding: str = "cross") -> EncodedSplit:
    """Tokenise a loaded split once; pairs are cross-encoded (``[CLS] a [SEP] b [SEP]``) by default."""
    task = split.task
    labels = np.array([ex.label for ex in split.examples], dtype=np.float32)
    if task.is_pair and pair_encoding == "bi":
        first, t1 = _tokenize(tokenizer, [e.texts[0] for e in split.examples], None, max_length)
        second, t2 = _tokenize(tokenizer, [e.texts[1] for e in split.examples], None, max_length)
        return EncodedSplit(task, [first, second], labels, t1 + t2)
    second_texts = [e.texts[1] for e in split.examples] if task.is_pair else None
    seqs, truncated = _tokenize(tokenizer, [e.texts[0] for e in split.examples], second_texts, max_length)
    return EncodedSplit(task, [seqs], labels, truncated)


def encode_texts(task: TaskSpec, inputs: Sequence[str | Sequence[str]], tokenizer, max_length: int = 128,
                 pair_encoding: str = "cross") -> EncodedSplit:
    """Encode raw inputs for prediction: strings for one-sentence tasks, (a, b) pairs for pair tasks."""
    examples = []
    for i, item in enumerate(inputs):
        texts = (item,) if isinstance(item, str) else tuple(item)
        if len(texts) != len(task.text_columns):
            kind = "a sentence pair (a, b)" if task.is_pair else "one sentence"
            raise ValueError(f"task {task.name!r} takes {kind} per input; input {i} has {len(texts)} part(s)")
        examples.append(Example(texts=tuple(str(t) for t in texts), label=0.0, line=i))
    loaded = LoadedSplit(task=task, path=Path("<inputs>"), examples=examples)
    return encode_split(loaded, tokenizer, max_length, pair_encoding)


def length_grouped_batches(lengths: np.ndarray, batch_size: int, generator: np.random.Generator | None,
                           group_batches: int = 50) -> list[np.ndarray]:
    """Batches of indices whose members have similar lengths, so padding stays small.

    With a generator, examples are shuffled, sorted by length inside windows of
    ``group_batches`` batches, and the batches themselves are shuffled — random enough for
    SGD, with most of the padding gone. Without one (evaluation), all are sorted by length.
    """
    n = len(lengths)
    if generator is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    order = generator.permutation(n)
    window = batch_size * group_batches
    batches = []
    for start in range(0, n, window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    generator.shuffle(batches)
    return batches


def pad_sequences(seqs: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        k = len(s["input_ids"])
        ids[row, :k] = torch.tensor(s["input_ids"])
        types[row, :k] = torch.tensor(s["token_type_ids"])
        mask[row, :k] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


@dataclass
class Batch:
    """One padded batch: ``inputs`` has one dict of tensors per encoded segment."""

    task: str
    inputs: list[dict[str, torch.Tensor]]
    labels: torch.Tensor
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def collate(split: EncodedSplit, indices: np.ndarray, pad_id: int = 0) -> Batch:
    inputs = [pad_sequences([seg[i] for i in indices], pad_id) for seg in split.segments]
    labels = torch.as_tensor(split.labels[indices])
    if split.task.kind == "classification":
        labels = labels.long()
    return Batch(task=split.task.name, inputs=inputs, labels=labels, indices=np.asarray(indices))


def iterate_batches(split: EncodedSplit, batch_size: int, generator: np.random.Generator | None = None,
                    pad_id: int = 0) -> Iterator[Batch]:
    for idx in length_grouped_batches(split.lengths, batch_size, generator):
        yield collate(split, idx, pad_id)


class BatchStream:
    """Endless length-grouped batches of one task; pass k is shuffled by (seed, task, k).

    Its whole state is (pass, cursor), so a resumed run regenerates the same batches. With
    several processes every rank draws the same global batches of ``world × batch_size``
    rows and keeps its own rows (``shard``), so the ranks' data is disjoint.
    """

    def __init__(self, split: EncodedSplit, batch_size: int, seed: int, task_index: int, pad_id: int,
                 world: int = 1, shard=None):
        self.split, self.batch_size, self.seed, self.task_index, self.pad_id = split, batch_size, seed, task_index, pad_id
        self.world, self.shard = world, shard or (lambda idx: idx)
        self.passes, self.cursor = 0, 0
        self._batches = self._make(0)

    def _make(self, k: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.task_index, k, 0xBA7])
        return length_grouped_batches(self.split.lengths, self.batch_size * self.world, rng)

    def next(self) -> "Batch":
        if self.cursor >= len(self._batches):
            self.passes, self.cursor = self.passes + 1, 0
            self._batches = self._make(self.passes)
        idx = self.shard(self._batches[self.cursor])
        self.cursor += 1
        return collate(self.split, idx, self.pad_id)

    def state(self) -> dict:
        return {"passes": self.passes, "cursor": self.cursor}

    def restore(self, state: dict) -> None:
        self.passes, self.cursor = state["passes"], state["cursor"]
        self._batches = self._make(self.passes)
