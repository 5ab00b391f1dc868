"""A disk cache of member outputs, so rescoring ensembles does not rerun their members.

Choosing an ensemble (which sets, which weights, per task) means scoring many candidate
combinations of the same members on the same split. The members' raw outputs are all that
combining needs, and computing them is the whole cost (minutes per set on a CPU), so
``peft-mtl ensemble --cache-dir DIR`` stores each member's outputs once per split.

An entry is keyed by everything that decides the numbers in it: the bytes of every file the
set loads, the backbone's fingerprint, the task as the set saved it, the exact token ids fed
to the model (which covers the data file, tokenizer, max length and pair encoding), the
precision, the device kind, the engine (PyTorch or int8 ONNX Runtime) and the versions of
peft_mtl and torch. Change any of them and the entry is simply not found. Entries are written
atomically, so an interrupted run leaves no half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.loading import EncodedSplit

CACHE_FORMAT = 1
# Written while training or tracing, never loaded by a set: they must not change its key.
_NOT_LOADED = ("checkpoint", "trace")


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the relative path and bytes of every file a saved set may load."""
    digest = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(_NOT_LOADED) for part in rel.parts[:-1]):
            continue
        digest.update(str(rel.as_posix()).encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\1")
    return digest.hexdigest()


def inputs_fingerprint(encoded: EncodedSplit) -> str:
    """sha256 of the token ids (and every other model input) of every example, in order."""
    digest = hashlib.sha256()
    for segment in encoded.segments:
        digest.update(b"segment")
        for example in segment:
            for name in sorted(example):
                digest.update(name.encode())
                digest.update(np.asarray(example[name], dtype=np.int64).tobytes())
            digest.update(b"\0")
    return digest.hexdigest()


class OutputCache:
    """Member outputs on encoded splits, stored as ``.npy`` files under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self._folders: dict[Path, str] = {}
        self._inputs: dict[int, str] = {}
        self.hits = 0
        self.misses = 0

    def key(self, base, member: str, task: str, encoded: EncodedSplit) -> str:
        """The entry name for ``member``'s outputs on ``encoded`` as ``base`` would compute them."""
        aset = base.sets[member]
        folder = aset.folder.resolve()
        if folder not in self._folders:
            self._folders[folder] = folder_fingerprint(folder)
        if id(encoded) not in self._inputs:
            self._inputs[id(encoded)] = inputs_fingerprint(encoded)
        parts = {
            "format": CACHE_FORMAT,
            "peft_mtl": __version__,
            "torch": torch.__version__,
            "backbone": base.identity.weights_sha256,
            "set": self._folders[folder],
            "task": task,
            "spec": aset.specs[task].to_dict(),
            "inputs": self._inputs[id(encoded)],
            "precision": str(base.precision),
            "device": base.model.device.type,
            "engine": "int8" if base.int8 is not None else "pytorch",
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str, rows: int) -> np.ndarray | None:
        path = self.root / f"{key}.npy"
        if not path.is_file():
            self.misses += 1
            return None
        outputs = np.load(path, allow_pickle=False)
        if len(outputs) != rows:  # cannot happen for a well-formed key; never trust a wrong-sized entry
            self.misses += 1
            return None
        self.hits += 1
        return outputs

    def put(self, key: str, outputs: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.asarray(outputs), allow_pickle=False)
            os.replace(tmp, self.root / f"{key}.npy")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
