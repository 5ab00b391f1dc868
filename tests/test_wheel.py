"""Installable as a library: the wheel carries every file the package reads at run time.

A wheel is built from this checkout and installed into a fresh virtualenv outside it; there,
`peft-mtl tasks` lists the built-in tasks, and a tiny `train` and `eval` run. The new
environment borrows the test environment's already-installed dependencies (torch,
transformers, peft, ...) through a path file, so it takes seconds and no network; peft_mtl
itself can only come from the wheel (the checkout is not on its path, and the test checks
where the package was imported from).
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILTIN = sorted(p.name for p in (REPO / "peft_mtl" / "data" / "builtin_tasks").glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("peft_mtl-*.whl")
    return path


def test_the_wheel_and_the_sdist_carry_the_builtin_task_files(wheel, tmp_path):
    assert BUILTIN == ["qqp.yaml", "sst.yaml", "sts.yaml"]
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(Path(n).name for n in names if "/builtin_tasks/" in n) == BUILTIN
    result = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(REPO)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (sdist,) = tmp_path.glob("peft_mtl-*.tar.gz")
    with tarfile.open(sdist) as tar:
        assert sorted(Path(n).name for n in tar.getnames() if "/builtin_tasks/" in n) == BUILTIN


def test_installed_wheel_lists_trains_and_evaluates_outside_the_checkout(wheel, tiny_backbone, small_data, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    new_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies, not peft_mtl: the test environment's site-packages (its editable
    # peft_mtl is a path hook that only runs from there, so it is not importable here).
    (new_site / "borrowed_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(new_site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")

    def peft_mtl(*argv: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(python), "-m", "peft_mtl", *argv], cwd=work, capture_output=True, text=True,
                                env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    where = subprocess.run([str(python), "-c", "import peft_mtl; print(peft_mtl.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert Path(where).is_relative_to(new_site), where

    listed = [json.loads(line)["name"] for line in peft_mtl("tasks").stdout.splitlines()]
    assert sorted(listed) == ["qqp", "sst", "sts"]
    out = work / "run"
    peft_mtl("train", "--tasks", "sst", "--out", str(out), "--backbone", str(tiny_backbone), "--data-dir",
             str(small_data), "--epochs", "1", "--batch-size", "8", "--no-progress", "--precision", "fp32")
    scores = json.loads(peft_mtl("eval", str(out), "--data-dir", str(small_data), "--no-progress").stdout)
    assert 0.0 <= scores["sst"]["accuracy"] <= 1.0
