#!/usr/bin/env bash
# The Python 3.12 + jax 0.11.2 CPU environment (.venv-py312, requirements/lock-py312.txt): the jax / flax versions
# the GPU machines run, without a GPU, for scripts/test_py312.sh. No torch (no CPU wheel for 3.12 here), so tests
# that compare against transformers' PyTorch models stay in the main suite. Idempotent like setup_env.sh.
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
STAMP="$VENV/.lolcats-lock"
want="$(cat "$LOCK" requirements/lock-py312.txt requirements/assets.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup-py312] creating $VENV with $PY from $LOCK"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-compile -r "$LOCK" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements/assets.txt \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
  echo "$want" > "$STAMP"
fi
