#!/usr/bin/env bash
# The test suite (CPU only): creates the environment and assets if needed, then runs pytest.
# Extra arguments are passed to pytest (e.g. `bash scripts/test.sh tests/test_config.py -x`).
# Tests run in LOLCATS_TEST_WORKERS pytest-xdist processes (default 2: the suite is mostly single-threaded
# compilation, so two workers on two cores take ~13 min instead of ~27; 0 runs them in this process).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# glibc ≥ 2.35: transparent huge pages for malloc'd memory. XLA:CPU allocates each step's buffers afresh; with 4 KiB
# pages the page faults cost 10-15% of a training step's CPU time here (benchmarks/results/train_steps_cpu.md).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
workers="${LOLCATS_TEST_WORKERS:-2}"
if [ "$workers" != "0" ]; then
  exec python -m pytest -q -n "$workers" "$@"
fi
exec python -m pytest -q "$@"
