#!/usr/bin/env bash
# The README's test command: set up .venv, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
# The compile cache stays off: it reused wrong graphs across runs here (see tests/conftest.py).
export MS_COMPILER_CACHE_ENABLE=0
export GLOG_v="${GLOG_v:-3}"
exec "$PY" -m pytest "$@"
