"""Tokenising a task's rows once, and batching them with dynamic padding.

Rows come from :mod:`peft_mtl.data.files` (reading, malformed-row reports); its names are
re-exported here, where the loaders were before.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import UserError
from .files import (DataError, Example, LoadedSplit, default_data_dir, load_split, parse_label,  # noqa: F401
                    read_label_values, task_file)
from .tasks import TaskSpec


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
        batches = length_grouped_batches(self.split.lengths, self.batch_size * self.world, rng)
        # A global batch with fewer rows than ranks (a pass's last, on a small task) repeats
        # rows, so no rank gets an empty shard: every rank takes part in every step.
        return [np.resize(b, self.world) if len(b) < self.world else b for b in batches]

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
