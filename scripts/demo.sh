#!/usr/bin/env bash
# The main job on the embedded default: builds the environment, the SmolLM2-135M-Instruct model directory and the
# demo corpora, then runs the SmolLM2 LoLCATS recipe end to end on the CPU (attention transfer → LoRA → evaluation)
# and prints its report. Re-running resumes (finished stages are skipped). Extra arguments are config overrides,
# e.g. `bash scripts/demo.sh run.dir=runs/other distill.max_steps=80`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ ! -f data/demo/heldout.txt ]; then
  python -m lolcats_jax.data.prepare --demo --out data/demo
fi
python -m lolcats_jax.train --config configs/smollm2_demo.yaml "$@"
