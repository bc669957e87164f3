#!/usr/bin/env bash
# The README's first command: set up .venv, then run a small LoRA fine-tune from a shipped YAML config.
# Usage: bash scripts/quickstart.sh [--config configs/quickstart_lora.yaml]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
export GLOG_v="${GLOG_v:-3}"
exec "$PY" examples/quickstart/finetune.py "$@"
