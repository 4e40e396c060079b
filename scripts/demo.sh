#!/usr/bin/env bash
# The main job on the embedded default: builds the environment, the SmolLM2-135M-Instruct model directory and the
# demo corpora, then runs the SmolLM2 LoLCATS recipe end to end on the CPU (attention transfer → LoRA → evaluation)
# and prints its report. Re-running resumes (finished stages are skipped). Extra arguments are config overrides,
# e.g. `bash scripts/demo.sh run.dir=runs/other distill.max_steps=80`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# glibc ≥ 2.35: transparent huge pages for malloc'd memory. XLA:CPU allocates each step's buffers afresh; with 4 KiB
# pages the page faults cost 10-15% of a training step's CPU time here (benchmarks/results/train_steps_cpu.md).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
if [ ! -f data/demo/heldout.txt ]; then
  python -m lolcats_jax.data.prepare --demo --out data/demo
fi
python -m lolcats_jax.train --config configs/smollm2_demo.yaml "$@"
