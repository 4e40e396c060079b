#!/usr/bin/env bash
# Download (on a machine that reaches the package registry) the pure-Python wheels the GPU check needs and the GPU
# image lacks: jax-triton 0.3.1 (pairs with the image's triton 3.6), jaxtyping + wadler_lindig (kernels/lolcats
# annotations). They land in benchmarks/wheels/ (git-ignored): carry that folder to the GPU machine, where
# benchmarks/gpu_check.sh installs whichever of them is not importable there.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
"$PY" -m pip download --no-deps --only-binary :all: --python-version 3.12 -d wheels \
  jax-triton==0.3.1 jaxtyping==0.3.11 wadler_lindig==0.1.8
ls -la wheels
