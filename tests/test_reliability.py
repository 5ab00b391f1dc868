"""Unlucky and hostile use of the training side: a user's folder is never deleted, output problems are
found before any work, one writer per folder, a dead writer's save is put right, full disks and bad
numbers give one line, and a run killed at random moments resumes to the same bits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peft_mtl.artifacts import atomic_folder, folder_lock, recover_interrupted_save
from peft_mtl.cli import main
from peft_mtl.model.saved_sets import MANIFEST

REPO = Path(__file__).resolve().parents[1]


def train_argv(tiny_backbone, small_data, out, *extra):
    return ["train", "--tasks", "sst", "--out", str(out), "--backbone", str(tiny_backbone), "--data-dir",
            str(small_data), "--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--no-progress", *extra]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peft-mtl: error:")]
    assert len(err) == 1, err
    return err[0]


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tiny_backbone, small_data, tmp_path, capsys):
    """Regression: `--out userdir --overwrite` removed userdir/notes.txt and userdir/sub/."""
    user = tmp_path / "userdir"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    assert main(train_argv(tiny_backbone, small_data, user, "--overwrite")) == 2
    assert "replaces only an earlier run's folder" in one_error_line(capsys)
    assert (user / "notes.txt").read_text() == "mine" and (user / "sub").is_dir()
    # An earlier run's folder (its manifest says so) is replaced, as asked.
    run = tmp_path / "run"
    assert main(train_argv(tiny_backbone, small_data, run)) == 0
    assert main(train_argv(tiny_backbone, small_data, run, "--overwrite", "--seed", "1")) == 0
    assert json.loads((run / MANIFEST).read_text())["config"]["seed"] == 1


@pytest.mark.parametrize("out", [".", "..", "a-file", "a-file/inside"])
def test_output_path_problems_are_found_before_any_work(tiny_backbone, small_data, tmp_path, monkeypatch, capsys, out):
    """Regression: `--out .` trained to the end, then failed and stranded the set in a hidden folder."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "a-file").write_text("x")
    monkeypatch.chdir(work)
    started = time.perf_counter()
    assert main(train_argv(tiny_backbone, small_data, out)) == 2
    one_error_line(capsys)
    assert time.perf_counter() - started < 30
    assert sorted(p.name for p in work.iterdir()) == ["a-file"], "nothing written, nothing hidden left behind"


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(tiny_backbone, small_data, tmp_path, capsys):
    """Regression: two trainings into one --out both exited 0 and one result was silently gone."""
    out = tmp_path / "run"
    with folder_lock(out):  # a run that is writing it
        assert main(train_argv(tiny_backbone, small_data, out)) == 2
        line = one_error_line(capsys)
    assert "another peft-mtl run is writing it" in line and f"pid {os.getpid()}" in line
    assert main(train_argv(tiny_backbone, small_data, out)) == 0  # the lock went with its holder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_save_interrupted_between_its_renames_is_put_right(tmp_path):
    """Regression: a kill between the save's two renames left the output folder missing."""
    final, pid = tmp_path / "run", _dead_pid()
    old = tmp_path / f".run.old-{pid}"
    old.mkdir()
    (old / MANIFEST).write_text("{}")
    partial = tmp_path / f".run.{pid}.abc.partial"
    partial.mkdir()
    (partial / "half").write_text("")
    message = recover_interrupted_save(final)
    assert message and "restored" in message and (final / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "the dead writer's leftovers are gone"
    live = tmp_path / f".run.{os.getpid()}.xyz.partial"  # a live writer's folder is never touched
    live.mkdir()
    assert recover_interrupted_save(final) is None and live.is_dir()


def test_atomic_folder_takes_dot_and_trailing_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with atomic_folder("sub/", overwrite=True) as tmp:
        (tmp / "x").write_text("1")
    assert (tmp_path / "sub" / "x").read_text() == "1"


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--max-grad-norm", "inf"),
                                         ("--smart-weight", "nan")])
def test_non_finite_numbers_are_refused_naming_the_flag(tiny_backbone, small_data, tmp_path, capsys, flag, value):
    """Regression: --lr nan passed validation and the run then advised resuming a checkpoint that did not exist."""
    assert main(train_argv(tiny_backbone, small_data, tmp_path / "run", flag, value)) == 2
    line = one_error_line(capsys)
    assert f"{flag}: " in line and "not a finite number" in line


def test_a_diverged_run_without_a_checkpoint_says_so(tiny_backbone, small_data, tmp_path, capsys):
    assert main(train_argv(tiny_backbone, small_data, tmp_path / "run", "--lr", "1e30", "--checkpoint-every",
                           "0")) == 2
    line = one_error_line(capsys)
    assert "non-finite loss" in line and "no checkpoint was written yet" in line


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), mounted for the test; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a size-limited tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_saying_what_was_kept(tiny_backbone, small_data, small_disk, capsys):
    """Regression: a full disk printed a SafetensorError traceback (rc 1)."""
    (small_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))  # leave 64 KiB
    out = small_disk / "run"
    assert main(train_argv(tiny_backbone, small_data, out)) == 2
    line = one_error_line(capsys)
    assert "could not write the" in line and "kept:" in line and "--resume" in line
    leftovers = [p.name for p in small_disk.iterdir() if p.name not in ("filler", "run")]
    assert not [n for n in leftovers if n.endswith(".partial")], "nothing half-written in place"
    assert not out.exists() or not (out / MANIFEST).exists()


def test_predict_says_when_it_truncates_and_when_a_pair_separator_is_taken_as_text(tiny_backbone, small_data,
                                                                                   tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(tiny_backbone, small_data, out)) == 0
    capsys.readouterr()
    assert main(["predict", str(out), "--task", "sst", " ".join(["word"] * 400), "a ||| b"]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 inputs were longer than 128 tokens and were truncated" in err
    assert "holds the pair separator '|||'" in err


# -- chaos: SIGKILL at random moments ---------------------------------------------------------

@pytest.mark.slow
def test_a_run_killed_at_random_moments_resumes_to_the_same_bits(tiny_backbone, small_data, tmp_path):
    """20 SIGKILLs at random moments (start-up, steps, checkpoint writes, the final save): after each
    the same command (with --resume) carries on; the end equals an uninterrupted run byte for byte,
    and no temporary folder is left (benchmarks/chaos_train.py; reports/reliability.md has 200)."""
    out = tmp_path / "chaos.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "chaos_train.py"), "--kills", "20", "--backbone",
                           str(tiny_backbone), "--data-dir", str(small_data), "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    result = json.loads(out.read_text())
    assert result["kills"] == 20 and not result["failures"], result
    assert result["identical_to_uninterrupted"] and result["leftover_temporary_folders"] == [], result
    assert done.returncode == 0
