#!/usr/bin/env bash
# Submits the three block-wise jobs with dependencies: collect → one array task per block → stitch+finetune.
#   bash scripts/slurm/submit_blockwise.sh configs/llama3_1_70b_blockwise.yaml [NODES]
# BLOCK_EXTRA: overrides for the one-GPU block tasks (e.g. BLOCK_EXTRA=mesh.tensor=1 for the 405B config).
set -euo pipefail
CONFIG="${1:?usage: submit_blockwise.sh CONFIG [NODES]}"
NODES="${2:-1}"
mkdir -p logs
NBLOCKS=$(python - "$CONFIG" <<'PY'
import sys
from lolcats_jax.config import load_config
from lolcats_jax.plan import llama_config_for
cfg = load_config(sys.argv[1])
L = llama_config_for(cfg).num_layers
print(-(-L // cfg.block.size))
PY
)
echo "$CONFIG: $NBLOCKS blocks"
collect=$(sbatch --parsable --nodes="$NODES" --export=ALL,CONFIG="$CONFIG" scripts/slurm/blockwise_collect.sbatch)
blocks=$(sbatch --parsable --dependency=afterok:"$collect" --array=0-$((NBLOCKS - 1)) \
  --export=ALL,CONFIG="$CONFIG",EXTRA="${BLOCK_EXTRA:-}" scripts/slurm/blockwise_array.sbatch)
final=$(sbatch --parsable --nodes="$NODES" --dependency=afterok:"$blocks" --export=ALL,CONFIG="$CONFIG" \
  scripts/slurm/blockwise_finetune.sbatch)
echo "collect $collect → blocks $blocks (array 0-$((NBLOCKS - 1))) → stitch+finetune $final"
