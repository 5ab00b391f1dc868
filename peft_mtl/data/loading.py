"""Reading task files, tokenising them once, and batching with dynamic padding.

The real files are tab-separated with CSV-style quoting and contain malformed rows. A row
that cannot be trusted is skipped and counted (never given an invented label); a problem
that makes the whole file unusable (missing, empty, wrong delimiter, missing columns) is a
:class:`DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import UserError
from .tasks import SPLITS, TaskSpec, _canonical

MAX_REPORTED_LINES = 5
# A single field that large is not a sentence: the csv module's 128 KiB default would
# raise deep inside the reader, so the limit is raised and oversized rows are skipped.
csv.field_size_limit(16 * 1024 * 1024)


class DataError(UserError):
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
    position_word: str = "line"  # "row" for Parquet and datasets folders

    def skip_report(self) -> str | None:
        """One line saying how many rows were skipped and the first line numbers, or None."""
        if not self.skipped:
            return None
        shown = ", ".join(f"{self.position_word} {line}: {why}" for line, why in self.skipped[:MAX_REPORTED_LINES])
        more = f", and {len(self.skipped) - MAX_REPORTED_LINES} more" if len(self.skipped) > MAX_REPORTED_LINES else ""
        noun = "row" if len(self.skipped) == 1 else "rows"
        return f"{self.path.name}: skipped {len(self.skipped)} malformed {noun} ({shown}{more})"


def default_data_dir() -> Path:
    """``../shared/data`` when it exists (the project layout), else ``data/``."""
    shared = Path("..") / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def task_file(data_dir: str | os.PathLike | None, task: TaskSpec, split: str) -> Path:
    """The file of ``split`` for ``task``: its task file's path, or a built-in name inside ``data_dir``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    try:
        return task.file_for(split, data_dir)
    except ValueError as err:
        raise DataError(str(err)) from None


def _decode(path: Path, raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        # Keep the good rows; rows holding replacement characters are skipped below.
        return raw.decode("utf-8-sig", errors="replace"), True


def parse_label(task: TaskSpec, raw) -> tuple[float | None, str | None]:
    """(class id or score, None), or (None, why the row is skipped)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None, "missing label"
    shown = str(raw).strip()[:20]
    if task.kind == "classification" and not task.numeric_labels:
        index = task.class_index().get(_canonical(raw))
        if index is None:
            known = ", ".join(str(v) for v in task.labels[:8]) + (", ..." if len(task.labels) > 8 else "")
            return None, f"unknown label {shown!r} (classes: {known})"
        return float(index), None
    if isinstance(raw, bool):
        return None, f"non-numeric label {shown!r}"
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None, f"non-numeric label {shown!r}"
    if not math.isfinite(value):
        return None, f"non-finite label {shown!r}"
    if task.kind == "classification":
        if value != int(value):
            return None, f"non-integer class label {shown}"
        if not 0 <= value < task.num_labels:
            return None, f"label {shown} outside 0..{task.num_labels - 1}"
        return value, None
    if task.label_range is not None:
        low, high = task.label_range
        if not low <= value <= high:
            return None, f"label {shown} outside {low:g}..{high:g}"
    return value, None


# -- reading rows: each reader yields (position, texts or None, raw label, why-skipped or None) --

def _delimiter(path: Path, task: TaskSpec) -> str:
    if task.delimiter:
        return task.delimiter
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _csv_rows(path: Path, task: TaskSpec) -> Iterator[tuple[int, list | None, object, str | None]]:
    delimiter = _delimiter(path, task)
    text, had_bad_bytes = _decode(path, path.read_bytes())
    if not text.strip():
        raise DataError(f"{path}: the file is empty. Expected a header line and rows.")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as err:
        raise DataError(f"{path}: line 1: unreadable header ({err}).") from None
    needed = list(task.text_columns) + [task.label_column]
    missing = [c for c in needed if c not in header]
    if missing:
        others = [d for d in ("\t", ",", ";") if d != delimiter]
        if len(header) == 1 and any(d in header[0] for d in others):
            name = {"\t": "tab", ",": "comma", ";": "semicolon"}.get(delimiter, repr(delimiter))
            raise DataError(f"{path}: line 1: the file is not {name}-separated (the header has no {name}). "
                            f"Save it with {name} delimiters and columns {', '.join(needed)}, or set `delimiter:` "
                            f"in the task file.")
        raise DataError(f"{path}: line 1: missing column(s) {', '.join(missing)} for task {task.name!r}; "
                        f"found {', '.join(repr(h) for h in header)}. Rename the columns or fix the task's "
                        f"`text`/`label` fields.")
    text_idx = [header.index(c) for c in task.text_columns]
    label_idx = header.index(task.label_column)
    line = 2
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield line, None, None, f"unparseable row ({err})"
            line = reader.line_num + 1
            continue
        start, line = line, reader.line_num + 1
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines carry nothing to skip or count
        if len(row) != len(header):
            yield start, None, None, f"{len(row)} fields, expected {len(header)}"
        elif had_bad_bytes and any("\ufffd" in cell for cell in row):
            yield start, None, None, "bytes that are not UTF-8"
        else:
            yield start, [row[i] for i in text_idx], row[label_idx], None


def _check_columns(path: Path, task: TaskSpec, columns: Sequence[str]) -> None:
    missing = [c for c in list(task.text_columns) + [task.label_column] if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} for task {task.name!r}; found "
                        f"{', '.join(repr(c) for c in columns) or 'none'}. Rename the columns or fix the task's "
                        f"`text`/`label` fields.")


def _jsonl_rows(path: Path, task: TaskSpec) -> Iterator[tuple[int, list | None, object, str | None]]:
    """JSON Lines, one object per line; a line that is not a JSON object is a counted skip."""
    text, had_bad_bytes = _decode(path, path.read_bytes())
    lines = text.splitlines()
    if not any(l.strip() for l in lines):
        raise DataError(f"{path}: the file is empty. Expected one JSON object per line.")
    rows, seen_columns = [], set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            rows.append((number, None, f"not JSON ({err.msg})"))
            continue
        if not isinstance(obj, dict):
            rows.append((number, None, "not a JSON object"))
            continue
        seen_columns.update(obj)
        rows.append((number, obj, "bytes that are not UTF-8" if had_bad_bytes and "\ufffd" in raw else None))
    _check_columns(path, task, sorted(seen_columns))
    for number, obj, why in rows:
        if why is not None:
            yield number, None, None, why
            continue
        absent = [c for c in list(task.text_columns) + [task.label_column] if c not in obj]
        if absent:
            yield number, None, None, f"missing field {absent[0]!r}"
        else:
            yield number, [obj[c] for c in task.text_columns], obj[task.label_column], None


def _arrow_rows(path: Path, task: TaskSpec) -> Iterator[tuple[int, list | None, object, str | None]]:
    """Parquet files and ``datasets`` folders (``save_to_disk``), through ``datasets`` (memory-mapped Arrow)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading Parquet or datasets folders needs the `datasets` package "
                        f"(pip install datasets)") from None
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(f"{path}: a DatasetDict (splits {', '.join(ds)}); point `train:`/`dev:` at one "
                                f"split's folder, e.g. {path / next(iter(ds))}")
        else:
            ds = datasets.Dataset.from_parquet(str(path))
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot read it with datasets ({type(err).__name__}: {err})") from None
    if len(ds) == 0:
        raise DataError(f"{path}: the file has no rows.")
    _check_columns(path, task, ds.column_names)
    needed = list(task.text_columns) + [task.label_column]
    for i, row in enumerate(ds.select_columns(needed)):
        yield i + 1, [row[c] for c in task.text_columns], row[task.label_column], None


def _rows(path: Path, task: TaskSpec) -> tuple[str, Iterator]:
    """(how positions are named, the row reader) for the file's format."""
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".parquet", ".pq", ".arrow"):
        return "row", _arrow_rows(path, task)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "line", _jsonl_rows(path, task)
    return "line", _csv_rows(path, task)


def load_split(path: str | os.PathLike, task: TaskSpec, strict: bool = False) -> LoadedSplit:
    """Read one task file: CSV/TSV, JSON Lines, Parquet, or a ``datasets`` folder.

    Rows with a missing, unknown, non-numeric or out-of-range label, an empty sentence, the
    wrong number of fields or undecodable bytes are skipped and recorded with their line (or
    row) number. With ``strict`` the first such row raises :class:`DataError` instead.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path}: file not found. Put {path.name} in the data folder or pass --data-dir DIR "
            f"pointing at the folder that holds it (or fix the path in the task file)."
        )
    word, rows = _rows(path, task)
    examples: list[Example] = []
    skipped: list[tuple[int, str]] = []
    for position, texts, raw_label, why in rows:
        value = None
        if why is None:
            value, why = parse_label(task, raw_label)
        if why is None:
            texts = tuple("" if t is None else str(t).strip() for t in texts)
            if any(not t for t in texts):
                why = "empty sentence"
        if why is not None:
            if strict:
                raise DataError(f"{path}: {word} {position}: {why}. Fix the row or drop --strict to skip it.")
            skipped.append((position, why))
            continue
        examples.append(Example(texts=texts, label=float(value), line=position))
    if not examples:
        raise DataError(f"{path}: no usable rows (skipped {len(skipped)}"
                        + (f"; first: {word} {skipped[0][0]}: {skipped[0][1]}" if skipped else "")
                        + "). Check the file's columns and labels.")
    return LoadedSplit(task=task, path=path, examples=examples, skipped=skipped, position_word=word)


def read_label_values(task: TaskSpec, path: str | os.PathLike, strict: bool = False) -> list:
    """Every non-missing raw label of a file (to infer a classifier's classes from train)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found (the train file named in {task.source or 'the task'}).")
    _, rows = _rows(path, task)
    return [raw for _, texts, raw, why in rows if why is None and raw is not None and str(raw).strip()]


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
            raise UserError(f"task {task.name!r} takes {kind} per input; input {i} has {len(texts)} part(s)")
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
