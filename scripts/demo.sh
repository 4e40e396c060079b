#!/usr/bin/env bash
# The main job on the embedded default: builds the environment, the SmolLM2-135M-Instruct model directory and
# the demo data, then runs the SmolLM2 demo end to end on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m lolcats_jax.generate --model artifacts/smollm2-135m \
  --prompt "Once upon a time, there was a little girl who" --max-new-tokens 48 "$@"
