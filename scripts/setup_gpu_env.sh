#!/usr/bin/env bash
# GPU install (one command, on an NVIDIA machine with a CUDA 13 driver and Python 3.12):
#   bash scripts/setup_gpu_env.sh
# creates .venv-gpu from requirements/gpu.txt — jax / jaxlib 0.11.2 with the CUDA 13 plugin (its pip CUDA
# libraries), flax 0.12.12 and the rest of the Python 3.12 lock, triton 3.6.0 + jax-triton 0.3.1 (Backend.TRITON) —
# and this project (editable), then prints the devices JAX sees. Use it as `.venv-gpu/bin/python -m lolcats_jax.train
# --config configs/llama3_1_8b.yaml`. Idempotent: re-running with an unchanged lock only checks.
# PYTHON312=/path/to/python3.12 picks the interpreter; LOLCATS_GPU_VENV another directory.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOLCATS_GPU_VENV:-$ROOT/.venv-gpu}"
LOLCATS_PY312_VENV="$VENV" LOLCATS_PY312_LOCK=requirements/gpu.txt bash "$ROOT/scripts/setup_py312_env.sh"
"$VENV/bin/python" -c 'import jax; print("[setup-gpu] jax", jax.__version__, "devices:", jax.devices())'
