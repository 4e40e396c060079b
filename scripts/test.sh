#!/usr/bin/env bash
# The test suite (CPU only): creates the environment and assets if needed, then runs pytest.
# Extra arguments are passed to pytest (e.g. `bash scripts/test.sh tests/test_config.py -x`).
# Tests run in LOLCATS_TEST_WORKERS pytest-xdist processes (default 2: the suite is mostly single-threaded
# compilation; tests marked slow are handed out first, see tests/conftest.py); 0 runs them in this process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
workers="${LOLCATS_TEST_WORKERS:-2}"
if [ "$workers" != "0" ]; then
  exec python -m pytest -q -n "$workers" "$@"
fi
exec python -m pytest -q "$@"
