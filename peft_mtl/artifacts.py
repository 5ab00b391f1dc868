"""Writing artefacts atomically: a crash never leaves a half-written file or folder that looks complete."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

import torch
from filelock import FileLock, Timeout
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


def _write_atomic(path: str | os.PathLike, write: Callable[[TextIO], None]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it over: readers see the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _public(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` at ``path``, all or nothing."""
    _write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path: str | os.PathLike, data, indent: int = 2) -> None:
    """``data`` as JSON at ``path``, all or nothing (streamed into the temporary file)."""
    def write(f: TextIO) -> None:
        json.dump(data, f, indent=indent, sort_keys=False, default=_jsonable)
        f.write("\n")

    _write_atomic(path, write)


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _leftovers(final: Path) -> list[tuple[Path, int]]:
    """Temporary siblings of ``final`` (``.NAME.PID.*.partial``, ``.NAME.old-PID``) and their writers' pids."""
    found = []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:(\d+)\..*\.partial|old-(\d+))$")
    for sibling in final.parent.iterdir() if final.parent.is_dir() else []:
        match = pattern.match(sibling.name)
        if match:
            found.append((sibling, int(match.group(1) or match.group(2))))
    return found


def recover_interrupted_save(final: str | os.PathLike) -> str | None:
    """Clean up after a writer of ``final`` that died mid-save; returns a line saying what was done, if anything.

    A save writes ``.NAME.PID.*.partial``, moves the old ``NAME`` to ``.NAME.old-PID`` and the
    partial folder to ``NAME``. Killed before the last rename, ``NAME`` may be missing: the
    complete old folder is put back. Partial folders of dead writers are removed. Folders of
    live writers are left alone (the caller holds ``final``'s lock, so there should be none)."""
    final = Path(final)
    restored = None
    for path, pid in _leftovers(final):
        if _alive(pid):
            continue
        if path.name.startswith(f".{final.name}.old-") and not final.exists():
            os.replace(path, final)
            restored = f"{final}: restored the previous folder from a save interrupted by a dead process (pid {pid})"
        else:
            shutil.rmtree(path, ignore_errors=True)
    return restored


@contextmanager
def folder_lock(final: str | os.PathLike) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``final`` while writing it; a second writer is refused, naming the first.

    The lock is a file lock (filelock: fcntl on Linux), released by the kernel if the holder
    dies, so a killed run never leaves a stale lock. Beside the folder, not in it, because the
    folder itself is replaced by a rename when a set is saved."""
    final = Path(os.path.abspath(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    owner = final.parent / f".{final.name}.lock.owner"
    lock_path.touch()  # an unwritable place fails here, as an OSError, not as "someone holds the lock"
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = owner.read_text(encoding="utf-8").strip() if owner.is_file() else "another process"
        raise FileExistsError(f"{final}: another peft-mtl run is writing it ({holder}); wait for it to finish "
                              f"or choose another --out") from None
    try:
        owner.write_text(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}", encoding="utf-8")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


@contextmanager
def atomic_folder(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``final``; on success it replaces ``final`` in one rename.

    If the block raises, the temporary folder is removed and ``final`` is untouched. The
    temporary names carry the writer's pid, so :func:`recover_interrupted_save` can tell a
    dead writer's leftovers from a live one's.
    """
    final = Path(os.path.abspath(final))  # "." and "dir/" have no name of their own
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
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
