#!/usr/bin/env bash
# The README's test command: set up .venv, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
export MS_COMPILER_CACHE_ENABLE=1
export MS_COMPILER_CACHE_PATH="${MS_COMPILER_CACHE_PATH:-$ROOT/.ms_cache}"
export GLOG_v="${GLOG_v:-3}"
exec "$PY" -m pytest "$@"
