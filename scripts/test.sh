#!/usr/bin/env bash
# The test suite (CPU only): creates the environment and assets if needed, then runs pytest; without arguments also
# the jax 0.11 subset in the Python 3.12 environment (scripts/test_py312.sh). Extra arguments are passed to pytest
# instead (e.g. `bash scripts/test.sh tests/test_config.py -x`: that file only, main environment).
# Tests run in LOLCATS_TEST_WORKERS pytest-xdist processes (default 2: the suite is mostly single-threaded
# compilation; tests marked slow are handed out first, see tests/conftest.py); 0 runs them in this process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
workers="${LOLCATS_TEST_WORKERS:-2}"
pytest_args=(-q)
if [ "$workers" != "0" ]; then
  # worksteal: an idle worker takes tests queued for the other (with the default "load" scheduling one worker ran
  # alone for the suite's last ~8 minutes)
  pytest_args+=(-n "$workers" --dist worksteal)
fi
if [ "$#" -gt 0 ]; then
  exec python -m pytest "${pytest_args[@]}" "$@"
fi
# the whole suite, then its jax 0.11 subset in the Python 3.12 environment of the GPU machines (scripts/test_py312.sh)
status=0
python -m pytest "${pytest_args[@]}" || status=$?
bash scripts/test_py312.sh || status=$?
exit "$status"
