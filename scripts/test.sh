#!/usr/bin/env bash
# The test suite (CPU only): creates the environment and assets if needed, then runs pytest.
# Extra arguments are passed to pytest (e.g. `bash scripts/test.sh tests/test_config.py -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
