#!/usr/bin/env bash
# The GPU check: LoRA equivalence tests, then B1 and B2 at Llama-3.2-1B's shape in bfloat16
# on CUDA (a small float32 shape on CPU when there is no GPU). A table, then one line of
# JSON, on stdout; bench/gpu_check.py says more. Options: --size test, --out NAME,
# --b1="B1 options", --b2="B2 options".
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m bench.gpu_check "$@"
