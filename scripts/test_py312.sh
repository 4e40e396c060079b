#!/usr/bin/env bash
# The jax 0.11 subset: tests run in the Python 3.12 + jax 0.11.2 + flax 0.12.12 CPU environment (.venv-py312, the
# versions of the GPU machines) — the model and its sharded distill / LoRA train steps (built, stepped in Pallas
# interpret mode on a tensor 4 × fsdp 2 mesh, and lowered for CUDA on 8 fake devices), the softmax teacher's compiled
# T = 4096 distill step, parameter sharding, and the Pallas kernels (grouped-query parity, CUDA lowering). The
# PyTorch parity tests stay in the main suite (no torch wheel for 3.12 here). `bash scripts/test.sh` runs this after
# the main suite; extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"  # the main environment's assets (SmolLM2 tokenizer, corpora)
bash scripts/setup_py312_env.sh
workers="${LOLCATS_TEST_WORKERS:-2}"
args=(-q -p no:cacheprovider tests/test_kernel_shards.py tests/test_softmax_teacher.py tests/test_sharding.py
      tests/kernels/test_pallas.py -k "not interpret_matches_reference")  # the 13 K = H parity cases: main suite
if [ "$workers" != "0" ]; then
  args+=(-n "$workers")
fi
exec .venv-py312/bin/python -m pytest "${args[@]}" "$@"
