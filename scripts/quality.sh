#!/usr/bin/env bash
# The quality run (issue 14): builds the environment and the larger corpora, then runs configs/smollm2_quality.yaml
# (~2.5 h on 2 idle CPU cores). Re-running resumes. Extra arguments are config overrides.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ ! -f data/quality/heldout_news.txt ]; then
  python -m lolcats_jax.data.prepare --quality --out data/quality
fi
python -m lolcats_jax.train --config configs/smollm2_quality.yaml "$@"
