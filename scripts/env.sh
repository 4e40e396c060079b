# Sourced by the scripts here: builds the environment and assets if needed (scripts/setup_env.sh), then puts the
# project's venv first on PATH with the offline and allocator settings every command of this project runs with.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# glibc ≥ 2.35: transparent huge pages for malloc'd memory. XLA:CPU allocates each step's buffers afresh; with 4 KiB
# pages the page faults cost 10-15% of a training step's CPU time here (benchmarks/results/train_steps_cpu.md).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
