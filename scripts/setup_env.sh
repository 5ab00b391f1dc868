#!/usr/bin/env bash
# Create or reuse .venv with a CPU build of torch and this package installed (editable).
# Sourced by the other scripts; safe to run again: it only installs when something changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEFT_MTL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
# torch 2.13.0's CPU wheel is on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC="${PEFT_MTL_TORCH:-torch==2.13.0}"
STAMP="$VENV/.peft_mtl-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$TORCH_SPEC"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "setup: installing $TORCH_SPEC and peft_mtl[test] (once)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "is ignored" >&2 || true
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" 2>&1 | grep -v "is ignored" >&2 || true
  "$VENV/bin/python" -c "import torch, transformers, peft, peft_mtl" || { echo "setup: install failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
