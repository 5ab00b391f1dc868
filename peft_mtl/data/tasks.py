"""Task specifications: the single place that says what a task is.

A task is declared in one small YAML or JSON file::

    name: intent
    train: data/intent-train.jsonl      # paths relative to the task file
    dev: data/intent-dev.jsonl
    test: data/intent-test.jsonl        # optional
    text: [utterance]                   # one column, or two for a sentence pair
    label: intent
    type: classification                # classification | regression
    labels: [book, cancel, refund]      # optional: inferred from train (sorted) when absent
    metrics: [accuracy, macro_f1]       # the first one is the task's primary metric
    loss: cross_entropy                 # optional: a name in peft_mtl.data.losses
    output_range: [0, 5]                # regression only, optional: predictions are clipped to it

and ``--tasks sst,tasks/intent.yaml`` mixes built-in and file tasks. The built-in tasks
(SST-5, QQP, STS-B) are task files shipped inside the package (``builtin_tasks/``); their
``data`` field names the files inside ``--data-dir``. Everything task-specific — columns,
labels, loss, metrics, output range — lives in the spec; the training, sampling and
evaluation code never names a task.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..errors import UnknownName, UserError
from .files import SPLITS, canonical_label, is_number, read_label_values
from .losses import LOSSES
from .metrics import METRICS

TaskKind = Literal["classification", "regression"]
KINDS = ("classification", "regression")
TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")
BUILTIN_DIR = Path(__file__).with_name("builtin_tasks")
_FIELDS = {"name", "description", "train", "dev", "test", "data", "delimiter", "text", "label", "type", "labels",
           "metrics", "loss", "output_range", "label_range"}


class TaskFileError(UserError):
    """A task file cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task reads, predicts and is scored by.

    Attributes:
        name: short id used on the command line and as the head's name.
        text_columns: one column (single sentence) or two (sentence pair).
        label_column: column holding the gold label.
        kind: ``classification`` or ``regression``.
        labels: classification: the class values as written in the data; class id = index.
        metrics: names in :data:`peft_mtl.data.metrics.METRICS`; the first is the primary one.
        loss: name in :data:`peft_mtl.data.losses.LOSSES`.
        label_range: regression: inclusive bounds a valid label lies in (None: any number).
        output_range: regression: predictions are clipped to it (None: no clipping).
        files: split → file (absolute, or relative to ``--data-dir`` for built-in tasks).
        delimiter: for CSV/TSV files (None: from the file's extension).
        source: the task file it came from (None for tasks registered in code).
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    kind: TaskKind
    labels: tuple | None = None
    metrics: tuple[str, ...] = ()
    loss: str = ""
    label_range: tuple[float, float] | None = None
    output_range: tuple[float, float] | None = None
    files: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    delimiter: str | None = None
    source: str | None = None
    description: str = ""

    def __post_init__(self):
        if not self.metrics:
            object.__setattr__(self, "metrics", ("accuracy",) if self.kind == "classification" else ("pearson",))
        if not self.loss:
            object.__setattr__(self, "loss", "cross_entropy" if self.kind == "classification" else "mse")

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.kind == "classification" and self.labels else 1

    @property
    def head_outputs(self) -> int:
        return self.num_labels if self.kind == "classification" else 1

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def numeric_labels(self) -> bool:
        """Class values are the integers 0..K-1 in order: predictions report them as ints."""
        return bool(self.labels) and all(canonical_label(v) == str(i) for i, v in enumerate(self.labels))

    def label_of(self, class_id: int):
        """What a prediction reports for a class id: the label's name, or the id itself."""
        if self.numeric_labels or not self.labels:
            return int(class_id)
        return self.labels[class_id]

    def class_index(self) -> dict[str, int]:
        return {canonical_label(v): i for i, v in enumerate(self.labels or ())}

    def file_for(self, split: str, data_dir: str | Path | None = None) -> Path:
        """The file of ``split``: absolute for file tasks, inside ``data_dir`` for built-in ones."""
        if split not in self.files:
            where = f"add `{split}: FILE` to {self.source}" if self.source else f"task {self.name!r} has no {split} file"
            raise TaskFileError(f"task {self.name!r} has no {split} split; {where}")
        path = Path(self.files[split].format(split=split))
        if not path.is_absolute() and data_dir is not None:
            path = Path(data_dir) / path
        return path

    def to_dict(self) -> dict:
        """JSON-safe form, saved in every run folder so a set loads without its task file."""
        d = asdict(self)
        for k in ("text_columns", "labels", "metrics", "label_range", "output_range"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        tup = lambda v: tuple(v) if v is not None else None  # noqa: E731
        return cls(name=d["name"], text_columns=tuple(d["text_columns"]), label_column=d["label_column"],
                   kind=d["kind"], labels=tup(d.get("labels")), metrics=tuple(d.get("metrics") or ()),
                   loss=d.get("loss") or "", label_range=tup(d.get("label_range")),
                   output_range=tup(d.get("output_range")), files=dict(d.get("files") or {}),
                   delimiter=d.get("delimiter"), source=d.get("source"), description=d.get("description", ""))


# ----------------------------------------------------------------------------- task files


def read_task_file(path: str | Path) -> dict:
    """The raw mapping in a YAML or JSON task file (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: task file not found; check the path given to --tasks")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # yaml and json raise their own types; one message is enough
        raise TaskFileError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({err})") from None
    if not isinstance(data, dict):
        raise TaskFileError(f"{path}: a task file is a mapping of fields (name, train, dev, text, label, type, ...)")
    return data


def spec_from_file(path: str | Path, builtin: bool = False) -> TaskSpec:
    """Validate a task file and build its spec (labels not yet inferred: see :func:`infer_labels`).

    Long on purpose: one check per field, in the order a task file is read, each failing with the
    file, the field and the fix.
    """
    path = Path(path)
    data = read_task_file(path)

    def fail(field_name: str, why: str, fix: str) -> None:
        raise TaskFileError(f"{path}: field '{field_name}': {why}; {fix}")

    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        fail(unknown[0], "unknown field", f"known fields: {', '.join(sorted(_FIELDS))}")
    for required in ("name", "text", "label", "type"):
        if required not in data or data[required] in (None, "", []):
            fail(required, "missing", {"name": "add `name: my_task`", "text": "add `text: [column]` (two for a pair)",
                                      "label": "add `label: column`",
                                      "type": "add `type: classification` or `type: regression`"}[required])
    name = data["name"]
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        fail("name", f"{name!r} is not a plain name", "use letters, digits, - and _ only")
    if not builtin and (BUILTIN_DIR / f"{name}.yaml").is_file():
        fail("name", f"'{name}' is a built-in task", "choose another name")
    kind = data["type"]
    if kind not in KINDS:
        fail("type", f"unknown type {kind!r}", "use classification or regression")
    text = data["text"]
    text = [text] if isinstance(text, str) else text
    if not isinstance(text, list) or len(text) not in (1, 2) or not all(isinstance(c, str) for c in text):
        fail("text", f"{data['text']!r} is not one or two column names", "write `text: [col]` or `text: [col1, col2]`")
    metrics = data.get("metrics") or (["accuracy"] if kind == "classification" else ["pearson"])
    metrics = [metrics] if isinstance(metrics, str) else metrics
    for m in metrics:
        if m not in METRICS:
            fail("metrics", f"unknown metric {m!r}", f"known: {', '.join(sorted(METRICS))}")
        if METRICS[m].kind != kind:
            fail("metrics", f"{m} is a {METRICS[m].kind} metric but the task is {kind}",
                 f"use {', '.join(sorted(k for k, v in METRICS.items() if v.kind == kind))}")
    loss = data.get("loss") or ("cross_entropy" if kind == "classification" else "mse")
    if loss not in LOSSES:
        fail("loss", f"unknown loss {loss!r}", f"known: {', '.join(sorted(LOSSES))}")
    labels = data.get("labels")
    if labels is not None:
        if kind == "regression":
            fail("labels", "a regression task has no classes", "remove `labels` or use type: classification")
        if not isinstance(labels, list) or len(labels) < 2:
            fail("labels", "a classifier needs at least two classes", "list every class: `labels: [a, b, ...]`")
        if len({canonical_label(v) for v in labels}) != len(labels):
            fail("labels", "a class is listed twice", "list each class once")
    ranges = {}
    for key in ("output_range", "label_range"):
        value = data.get(key)
        if value is not None:
            if kind != "regression":
                fail(key, "only regression tasks have a range", f"remove `{key}`")
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
                    and value[0] < value[1]):
                fail(key, f"{value!r} is not [low, high]", f"write `{key}: [0, 5]`")
            ranges[key] = (float(value[0]), float(value[1]))
    files = {}
    if "data" in data:  # built-in style: a file-name pattern inside --data-dir
        files = {s: str(data["data"]) for s in SPLITS}
    for split in SPLITS:
        if data.get(split):
            target = Path(str(data[split]))
            files[split] = str(target if target.is_absolute() else (path.parent / target).resolve())
    for split in ("train", "dev"):
        if split not in files:
            fail(split, "missing", f"add `{split}: path/to/{split}-file` (relative to the task file)")
    delimiter = data.get("delimiter")
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1):
        fail("delimiter", f"{delimiter!r} is not one character", 'write `delimiter: ","` or `delimiter: "\\t"`')
    return TaskSpec(name=name, text_columns=tuple(text), label_column=str(data["label"]), kind=kind,
                    labels=tuple(labels) if labels is not None else None, metrics=tuple(metrics), loss=loss,
                    label_range=ranges.get("label_range"), output_range=ranges.get("output_range"), files=files,
                    delimiter=delimiter, source=None if builtin else str(path),
                    description=str(data.get("description", "")))


# ----------------------------------------------------------------------------- the registry

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, replace: bool = False) -> TaskSpec:
    """Add a task to the registry (a different task under an existing name is an error unless ``replace``)."""
    if spec.name in TASKS and TASKS[spec.name] != spec and not replace:
        raise UserError(f"task {spec.name!r} is already registered with another definition")
    if spec.kind == "classification" and (spec.labels is None or len(spec.labels) < 2):
        raise UserError(f"task {spec.name!r}: classification needs at least two labels")
    if len(spec.text_columns) not in (1, 2):
        raise UserError(f"task {spec.name!r}: text_columns must name one or two columns")
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, with an error that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownName(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))} "
                       f"(or give a task file: --tasks path/to/task.yaml)") from None


def is_task_file(item: str) -> bool:
    return Path(item).suffix in TASK_FILE_SUFFIXES


def read_tasks(items: list[str], strict: bool = False) -> list[TaskSpec]:
    """Built-in names and task-file paths → specs (labels inferred where absent), registering nothing.

    Two tasks with one name, or a file task named like a task registered in code, are errors
    naming the files.
    """
    specs: list[TaskSpec] = []
    seen: dict[str, str] = {}
    for item in items:
        if is_task_file(item):
            spec = infer_labels(spec_from_file(item), strict)
        else:
            spec = get_task(item)
        if spec.name in seen:
            raise TaskFileError(f"{item}: field 'name': task {spec.name!r} is also defined by {seen[spec.name]}; "
                                f"give each task its own name")
        seen[spec.name] = item
        existing = TASKS.get(spec.name)
        if spec.source is not None and existing is not None and existing.source is None and existing != spec:
            raise TaskFileError(f"{item}: field 'name': task {spec.name!r} is already registered in code; "
                                f"give the task file another name")
        specs.append(spec)
    return specs


def resolve_tasks(items: list[str], strict: bool = False) -> list[TaskSpec]:
    """:func:`read_tasks`, then every file task registered (so :func:`get_task` finds it by name).

    A file task replaces an earlier file task of its name (the file re-read or edited)."""
    specs = read_tasks(items, strict)
    for spec in specs:
        if spec.source is not None:
            existing = TASKS.get(spec.name)
            register_task(spec, replace=existing is not None and existing.source is not None)
    return specs


def infer_labels(spec: TaskSpec, strict: bool = False) -> TaskSpec:
    """Classification without ``labels``: the sorted distinct labels of the train split."""
    if spec.kind != "classification" or spec.labels is not None:
        return spec
    values = read_label_values(spec, spec.file_for("train"), strict)
    distinct = sorted({canonical_label(v) for v in values}, key=lambda v: (not is_number(v), float(v) if is_number(v) else 0, v))
    if len(distinct) < 2:
        raise TaskFileError(f"{spec.source}: field 'labels': the train file has {len(distinct)} class "
                            f"({', '.join(distinct) or 'none'}); a classifier needs at least two")
    typed = tuple(int(v) if is_number(v) and float(v) == int(float(v)) else v for v in distinct)
    return replace(spec, labels=typed)


def builtin_task_files() -> list[Path]:
    return sorted(BUILTIN_DIR.glob("*.yaml"))


for _file in builtin_task_files():
    register_task(spec_from_file(_file, builtin=True))
