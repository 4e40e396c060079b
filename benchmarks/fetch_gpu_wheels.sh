#!/usr/bin/env bash
# Download (on a machine that reaches the package registry) the pure-Python wheels the GPU check needs and the GPU
# image lacks: jax-triton 0.3.1 (pairs with the image's triton 3.6), jaxtyping + wadler_lindig (kernels/lolcats
# annotations), and for the fla baseline stage fla-core 0.6.0 (flash-linear-attention's kernels, the `fla` package;
# its METADATA requires einops, plus torch >= 2.7 and triton >= 3.3 that the image has; fla's own imports also need
# packaging). The flash-linear-attention wheel itself adds only fla.layers / fla.models and requires transformers:
# not needed. They land in benchmarks/wheels/ (git-ignored): carry that folder to the GPU machine, where
# benchmarks/gpu_check.sh installs whichever of them is not importable there.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
"$PY" -m pip download --no-deps --only-binary :all: --python-version 3.12 -d wheels \
  jax-triton==0.3.1 jaxtyping==0.3.11 wadler_lindig==0.1.8 fla-core==0.6.0 einops==0.8.2 packaging==26.4
ls -la wheels
