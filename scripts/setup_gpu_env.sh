#!/usr/bin/env bash
# GPU install (one command, on an NVIDIA machine with a CUDA 13 driver and Python 3.12):
#   bash scripts/setup_gpu_env.sh
# creates .venv-gpu with requirements/gpu.txt — jax / jaxlib 0.11.2 with the CUDA 13 plugin (its pip CUDA
# libraries), flax 0.12.12 and the rest of the Python 3.12 lock, triton 3.6.0 + jax-triton 0.3.1 (Backend.TRITON) —
# and this project (editable), then prints the devices JAX sees. Use it as `.venv-gpu/bin/python -m lolcats_jax.train
# --config configs/llama3_1_8b.yaml`. Idempotent: re-running with an unchanged lock only checks.
# PYTHON=/path/to/python3.12 picks the interpreter; LOLCATS_GPU_VENV another directory.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${LOLCATS_GPU_VENV:-$ROOT/.venv-gpu}"
PY="${PYTHON:-$(command -v python3.12 || command -v python3)}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "error: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); the GPU lock is for 3.12 (set PYTHON=)" >&2
  exit 2
fi
STAMP="$VENV/.lolcats-lock"
want="$(cat requirements/gpu.txt requirements/lock-py312.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup-gpu] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements/gpu.txt
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$STAMP"
fi
"$VENV/bin/python" -c 'import jax; print("[setup-gpu] jax", jax.__version__, "devices:", jax.devices())'
