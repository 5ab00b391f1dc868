"""Reading a task's data files: rows, labels, and the malformed rows skipped with a report.

The real files are tab-separated with CSV-style quoting and contain malformed rows. A row
that cannot be trusted is skipped and counted (never given an invented label); a problem
that makes the whole file unusable (missing, empty, wrong delimiter, missing columns) is a
:class:`DataError` naming the file, the line and the fix. Plain Python (no torch), so task
files can be checked at once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..errors import UserError

if TYPE_CHECKING:
    from .tasks import TaskSpec

SPLITS = ("train", "dev", "test")


def canonical_label(value: Any) -> str:
    """One spelling per label value: 3, "3", "3.0" → "3"; strings stripped."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)) or (isinstance(value, str) and is_number(value)):
        number = float(value)
        return str(int(number)) if number == int(number) else repr(number)
    return str(value).strip()


def is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


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
        index = task.class_index().get(canonical_label(raw))
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
        import datasets  # deferred: datasets is heavy and only Parquet/Arrow files need it
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

