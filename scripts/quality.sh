#!/usr/bin/env bash
# The quality run (issue 14): builds the environment and the larger corpora, runs configs/smollm2_quality.yaml
# (~2.5 h on 2 idle CPU cores), then scores its snapshots for the quality-vs-tokens curve (~40 min; it needs the
# run's snapshots, so it runs here, while they exist). Re-running resumes both. Extra arguments are config overrides.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ ! -f data/quality/heldout_news.txt ]; then
  python -m lolcats_jax.data.prepare --quality --out data/quality
fi
python -m lolcats_jax.train --config configs/smollm2_quality.yaml "$@"
run_dir=runs/smollm2_quality
for arg in "$@"; do
  case "$arg" in run.dir=*) run_dir="${arg#run.dir=}" ;; esac
done
python benchmarks/quality_curve.py --run "$run_dir" --out benchmarks/results/quality_curve_smollm2
