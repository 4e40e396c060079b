#!/usr/bin/env bash
# The Python 3.12 + jax 0.11.2 CPU environment (.venv-py312, requirements/lock-py312.txt): the jax / flax versions
# the GPU machines run, without a GPU, for scripts/test_py312.sh. No torch (no CPU wheel for 3.12 here), so tests
# that compare against transformers' PyTorch models stay in the main suite. Built by setup_env.sh (same steps,
# idempotent) with this interpreter and lock.
# LOLCATS_PY312_VENV / LOLCATS_PY312_LOCK build another environment from another lock the same way (the GPU one:
# scripts/setup_gpu_env.sh); PYTHON312 picks the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${LOLCATS_PY312_VENV:-$ROOT/.venv-py312}"
LOCK="${LOLCATS_PY312_LOCK:-requirements/lock-py312.txt}"
PY="${PYTHON312:-}"
if [ -z "$PY" ] && command -v pyenv >/dev/null; then  # these machines: pyenv's 3.12 (its python3.12 shim needs it selected)
  v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1 || true)"
  [ -n "$v" ] && PY="$(pyenv prefix "$v")/bin/python3.12"
fi
if [ -z "$PY" ] && python3.12 -c '' 2>/dev/null; then
  PY="$(command -v python3.12)"
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  echo "error: no Python 3.12 found (pyenv 3.12.x, python3.12 on PATH, or PYTHON312=/path/to/python3.12)" >&2
  exit 2
fi
LOLCATS_VENV="$VENV" LOLCATS_LOCK="$LOCK" PYTHON="$PY" bash scripts/setup_env.sh
