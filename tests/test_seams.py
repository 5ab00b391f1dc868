"""The seams hold: one module owns peft's LoRA internals, nothing patches forwards, no hidden globals.

Read from the package's own source (AST), so a new `.forward =` or a `layer.lora_A` outside
``model/lora_runtime.py`` fails here before it can fight the next change. Each rule is also
run on a planted violation, so the checks cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_mtl"
SEAM = PACKAGE / "model" / "lora_runtime.py"

# peft's LoRA layer attributes and saved-key fragments that only the seam may name.
PEFT_ATTRIBUTES = {"lora_A", "lora_B", "base_layer", "lora_variant", "lora_dropout", "scaling", "_active_adapter",
                   "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
PEFT_KEY_FRAGMENTS = ("lora_A", "lora_B", "base_layer")
MUTATORS = {"append", "add", "update", "clear", "pop", "popitem", "setdefault", "extend", "remove", "discard",
            "insert"}
# Registries users extend (tasks, losses, metrics, samplers): filled by register_* functions only.
REGISTRY_WRITERS = "register"


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def forward_assignments(source: str) -> list[int]:
    """Lines that assign a module's ``forward`` (``x.forward = ...`` or ``setattr(x, "forward", ...)``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        lines += [node.lineno for t in targets if isinstance(t, ast.Attribute) and t.attr == "forward"]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "forward"):
            lines.append(node.lineno)
    return lines


def class_assignments(source: str) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Attribute) and t.attr == "__class__" for t in node.targets)]


def global_mutations(source: str) -> list[str]:
    """``global`` statements, and functions that change a module-level dict/list/set in place."""
    tree = ast.parse(source)
    found = [f"line {n.lineno}: global {', '.join(n.names)}" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    mutable = set()
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        is_container = isinstance(value, (ast.Dict, ast.List, ast.Set)) or (
            isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            and value.func.id in {"dict", "list", "set", "defaultdict", "OrderedDict"})
        if is_container:
            mutable |= {t.id for t in targets if isinstance(t, ast.Name)}
    in_registry_writer = {id(inner) for func in ast.walk(tree) if isinstance(func, ast.FunctionDef)
                          and func.name.startswith(REGISTRY_WRITERS) for inner in ast.walk(func)}
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or id(func) in in_registry_writer:
            continue
        for node in ast.walk(func):
            name = None
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                for t in (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]):
                    if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                        name = t.value.id if t.value.id in mutable else name
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
                  and isinstance(node.func.value, ast.Name) and node.func.value.id in mutable):
                name = node.func.value.id
            if name:
                found.append(f"line {node.lineno}: {func.name}() changes module-level {name}")
    return found


def peft_internals(source: str) -> list[str]:
    """Uses of peft's LoRA layer attributes or saved-key strings (docstrings and comments aside)."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PEFT_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
              and any(f in node.value for f in PEFT_KEY_FRAGMENTS)):
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_no_module_assigns_a_forward():
    offenders = {str(p.relative_to(PACKAGE)): lines for p, s in _sources() if (lines := forward_assignments(s))}
    assert offenders == {}, "per-call behaviour goes through lora_runtime's routes, not a replaced forward"


def test_only_the_seam_chooses_a_layer_class():
    offenders = {str(p.relative_to(PACKAGE)) for p, s in _sources() if class_assignments(s)}
    assert offenders <= {"model/lora_runtime.py"}


def test_no_module_global_is_changed_at_run_time():
    offenders = {str(p.relative_to(PACKAGE)): found for p, s in _sources() if (found := global_mutations(s))}
    assert offenders == {}, "per-run state goes in a context (contextvars), an object, or a register_* registry"


def test_peft_internals_are_named_only_in_the_seam():
    offenders = {str(p.relative_to(PACKAGE)): found for p, s in _sources()
                 if p != SEAM and (found := peft_internals(s))}
    assert offenders == {}, "use peft_mtl.model.lora_runtime's functions instead"


@pytest.mark.parametrize("planted, check", [
    ("def f(layer):\n    layer.forward = lambda x: x\n", forward_assignments),
    ("def f(layer):\n    setattr(layer, 'forward', print)\n", forward_assignments),
    ("def f(layer):\n    layer.__class__ = int\n", class_assignments),
    ("_state = {}\ndef f():\n    _state['on'] = True\n", global_mutations),
    ("_seen = set()\ndef f():\n    _seen.add(1)\n", global_mutations),
    ("_flag = False\ndef f():\n    global _flag\n    _flag = True\n", global_mutations),
    ("def f(layer):\n    return layer.lora_A['x'].weight\n", peft_internals),
    ("def f(key):\n    return key.endswith('.lora_B.weight')\n", peft_internals),
])
def test_each_rule_catches_a_planted_violation(planted, check):
    assert check(planted)


def test_registries_may_be_filled_by_their_register_function_only():
    source = "TASKS = {}\ndef register_task(spec):\n    TASKS[spec] = spec\ndef validate(spec):\n    TASKS[spec] = spec\n"
    assert [f for f in global_mutations(source)] == ["line 5: validate() changes module-level TASKS"]


def test_routes_are_per_context_and_reset_on_exit():
    """A route set in one thread is invisible to another, and gone after its block."""
    import threading

    from peft_mtl.model import lora_runtime

    seen = {}
    with lora_runtime.plain_peft():
        inside = lora_runtime._ROUTE.get()
        thread = threading.Thread(target=lambda: seen.setdefault("other", lora_runtime._ROUTE.get()))
        thread.start()
        thread.join()
    assert inside is not None and seen["other"] is None and lora_runtime._ROUTE.get() is None


def long_functions(source: str, limit: int = 60) -> list[str]:
    """Functions over ``limit`` lines whose docstring does not say why ("Long on purpose: ...")."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
            if "Long on purpose" not in (ast.get_docstring(node) or ""):
                found.append(f"{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_functions_stay_short_or_say_why():
    offenders = {str(p.relative_to(PACKAGE)): found for p, s in _sources() if (found := long_functions(s))}
    assert offenders == {}, "split it, or say in its docstring why it is long"


def test_the_length_rule_catches_a_long_function():
    body = "".join(f"    x{i} = {i}\n" for i in range(70))
    assert long_functions(f"def f():\n{body}") == ["f (71 lines)"]
    assert long_functions(f'def f():\n    """Long on purpose: a table."""\n{body}') == []
