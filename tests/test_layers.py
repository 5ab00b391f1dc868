"""The architecture's rules, checked: imports only go down, and the command line answers at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft")


def test_import_linter_contracts_hold():
    """pyproject.toml's [tool.importlinter]: the layer order, serving ⟂ experiments, no cycles."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([lint, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") == 3


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["serve", "--help"], ["tasks"]])
def test_the_cli_answers_without_torch_transformers_or_peft(argv):
    """`peft-mtl --help`, `peft-mtl CMD --help` and `peft-mtl tasks` import none of the heavy libraries."""
    probe = ("import json, sys\nfrom peft_mtl.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert json.loads(result.stderr.strip().splitlines()[-1]) == [], result.stderr[-2000:]
    assert result.stdout.strip(), "the command printed its help or task list"


def test_the_heavy_libraries_load_when_a_command_runs(tmp_path):
    """The probe above can fail: loading a public name that needs torch does import it."""
    probe = "import sys, peft_mtl\npeft_mtl.AdapterHost\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr[-2000:]


def unresolved_names(text: str) -> list[str]:
    """Dotted ``peft_mtl.…`` names in ``text`` that import as no module or attribute."""
    import importlib
    import re

    bad = []
    for ref in sorted(set(re.findall(r"\bpeft_mtl(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text))):
        if ref == "peft_mtl.json":  # the manifest's file name
            continue
        parts = ref.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attribute in parts[i:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                bad.append(ref)
            break
        else:
            bad.append(ref)
    return bad


def test_every_peft_mtl_name_in_docstrings_and_docs_resolves():
    """A module that moves takes its references along (seven docstrings once named moved modules)."""
    texts = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8")
             for p in [*(REPO / "peft_mtl").rglob("*.py"), REPO / "README.md", *(REPO / "docs").glob("*.md")]}
    stale = {path: names for path, text in texts.items() if (names := unresolved_names(text))}
    assert stale == {}


def test_the_name_check_catches_a_moved_module():
    assert unresolved_names("see :func:`peft_mtl.stacked.grouped_lora` and peft_mtl.model.lora_runtime.install") \
        == ["peft_mtl.stacked.grouped_lora"]


def undeclared_deferred_imports(source: str) -> list[str]:
    """Imports inside functions without a comment saying why they are deferred (``# deferred: ...``
    on the import or just above it), unless guarded by ``except ImportError`` (an optional extra)."""
    import ast

    tree = ast.parse(source)
    lines = source.split("\n")
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError", "Exception")
                for h in node.handlers):
            guarded |= {id(n) for b in node.body for n in ast.walk(b)}
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in guarded:
                nearby = lines[max(0, node.lineno - 3):node.end_lineno]
                if not any("deferred" in line for line in nearby):
                    found.append(f"line {node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_imports_inside_functions_are_deliberate_deferrals():
    """Imports go at the top; one inside a function defers a heavy or optional library and says so."""
    sources = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in (REPO / "peft_mtl").rglob("*.py")}
    offenders = {path: found for path, text in sources.items() if (found := undeclared_deferred_imports(text))}
    assert offenders == {}


def test_the_deferral_rule_catches_an_unexplained_import():
    assert undeclared_deferred_imports("def f():\n    from .model import x\n    return x\n") == \
        ["line 2: from .model import x"]
    assert undeclared_deferred_imports("def f():\n    import yaml  # deferred: only YAML files need it\n") == []
    assert undeclared_deferred_imports("def f():\n    try:\n        import uvicorn\n    except ImportError:\n"
                                       "        pass\n") == []
