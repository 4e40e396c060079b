#!/usr/bin/env bash
# The quality run (issue 14): builds the environment and the larger corpora, trains configs/smollm2_quality.yaml
# (distill + LoRA, ~1 h 40 min on 2 idle CPU cores), scores the run's snapshots for the quality-vs-tokens curve while they
# exist (held-out perplexity only: the short tasks score the same at every point, see quality_smollm2.md), then runs
# the evaluate and export stages (~1 h). Re-running resumes every part. Extra arguments are config overrides.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ ! -f data/quality/heldout_long.txt ]; then
  python -m lolcats_jax.data.prepare --quality --out data/quality
fi
python -m lolcats_jax.train --config configs/smollm2_quality.yaml "$@" "run.stages=[distill,finetune]"
run_dir=runs/smollm2_quality
for arg in "$@"; do
  case "$arg" in run.dir=*) run_dir="${arg#run.dir=}" ;; esac
done
python benchmarks/quality_curve.py --run "$run_dir" --tasks '' --out benchmarks/results/quality_curve_smollm2
python -m lolcats_jax.train --config configs/smollm2_quality.yaml "$@"
