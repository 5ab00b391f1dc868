"""Task specifications: the single place that says what a task is.

Adding a task means registering one :class:`TaskSpec` (file name, columns, label type,
number of outputs, loss, metric) — nothing else in the package needs to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class TaskSpec:
    """What a task reads, predicts and is scored by.

    Attributes:
        name: short id used on the command line (``sst``).
        file_prefix: data files are ``{file_prefix}-{split}.csv``.
        text_columns: one column (single sentence) or two (sentence pair).
        label_column: column holding the gold label.
        kind: ``classification`` (integer labels ``0..num_labels-1``) or ``regression``.
        num_labels: classes for classification, 1 for regression.
        label_range: inclusive (low, high) bounds a valid label must lie in.
        metric: name in :data:`peft_mtl.metrics.METRICS`.
        default_loss: name in :data:`peft_mtl.losses.LOSSES`.
    """

    name: str
    file_prefix: str
    text_columns: tuple[str, ...]
    label_column: str
    kind: TaskKind
    num_labels: int
    label_range: tuple[float, float]
    metric: str
    default_loss: str

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def head_outputs(self) -> int:
        return self.num_labels if self.kind == "classification" else 1

    def file_name(self, split: str) -> str:
        return f"{self.file_prefix}-{split}.csv"


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task to the registry (overwriting one of the same name is an error)."""
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    if spec.kind == "classification" and spec.num_labels < 2:
        raise ValueError(f"task {spec.name!r}: classification needs num_labels >= 2")
    if len(spec.text_columns) not in (1, 2):
        raise ValueError(f"task {spec.name!r}: text_columns must name one or two columns")
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, with an error that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


register_task(
    TaskSpec(
        name="sst",
        file_prefix="ids-sst",
        text_columns=("sentence",),
        label_column="sentiment",
        kind="classification",
        num_labels=5,
        label_range=(0, 4),
        metric="accuracy",
        default_loss="cross_entropy",
    )
)
register_task(
    TaskSpec(
        name="qqp",
        file_prefix="quora",
        text_columns=("sentence1", "sentence2"),
        label_column="is_duplicate",
        kind="classification",
        num_labels=2,
        label_range=(0, 1),
        metric="accuracy",
        default_loss="cross_entropy",
    )
)
register_task(
    TaskSpec(
        name="sts",
        file_prefix="sts",
        text_columns=("sentence1", "sentence2"),
        label_column="similarity",
        kind="regression",
        num_labels=1,
        label_range=(0.0, 5.0),
        metric="pearson",
        default_loss="mse",
    )
)
