"""Writing artefacts atomically: a crash never leaves a half-written file or folder that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (a run's checkpoint folder left out)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and ".checkpoint" not in f.parts)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: str | os.PathLike, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_json_atomic(path: str | os.PathLike, data, indent: int = 2) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent, sort_keys=False, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _public(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        _public(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``final``; on success it replaces ``final`` in one rename.

    If the block raises, the temporary folder is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    _public(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        if not overwrite and any(final.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{final} exists and is not empty; pass --overwrite to replace it")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
