#!/usr/bin/env bash
# The one GPU check (~9.5 min of GPU time: one device-tool call of up to 600 s). Run from anywhere on a GPU machine:
#   bash benchmarks/fetch_gpu_wheels.sh            # beforehand, where the package registry is reachable
#   bash benchmarks/gpu_check.sh [ARGS]            # on the GPU machine; with the device tool:
#       run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/wheels"], timeout_s=600)
# ARGS go to benchmarks/gpu_check.py after these defaults, e.g. one stage with the whole budget:
#   bash benchmarks/gpu_check.sh --skip correctness tuning moe bench fla --model-seconds 530
# Writes under $OUT (default ./gpu_check_out): env.json, pip.log, correctness.md/.json, tuning.md, moe.md/.json,
# attention_gpu.md/.json (with fla's rows), fla_gpu.md/.json, model_gpu.md/.json, status.json, gpu_check.log.
# Exit status 0 only if every stage passed.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
cd "$ROOT"
PY="${PYTHON:-python}"

# wheels the GPU image lacks (module name = wheel name up to the first "-"); install only what is missing
for whl in benchmarks/wheels/*.whl; do
  [ -e "$whl" ] || { echo "no wheels in benchmarks/wheels (see benchmarks/fetch_gpu_wheels.sh)" | tee -a "$OUT/pip.log"; break; }
  mod="$(basename "$whl" | cut -d- -f1)"
  case "$mod" in fla_core) mod=fla ;; esac  # distributions whose module is named otherwise
  if "$PY" -c "import $mod" >/dev/null 2>&1; then
    echo "$mod already importable, not installing $whl" >>"$OUT/pip.log"
  else
    "$PY" -m pip install --no-deps --no-index --quiet "$whl" >>"$OUT/pip.log" 2>&1 \
      && echo "installed $whl" >>"$OUT/pip.log" || echo "FAILED to install $whl" >>"$OUT/pip.log"
  fi
done
cat "$OUT/pip.log"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the benchmark reads memory per cell; allocate on demand
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
# stage limits: see STAGES / planned_seconds in gpu_check.py (540 s planned; the total leaves 20 s of the timeout
# for start-up and the last writes)
timeout 570 "$PY" benchmarks/gpu_check.py --out "$OUT" --total-seconds "${TOTAL_SECONDS:-550}" \
  --correctness-seconds "${CORRECTNESS_SECONDS:-110}" --tuning-seconds "${TUNING_SECONDS:-30}" \
  --bench-seconds "${BENCH_SECONDS:-140}" --fla-seconds "${FLA_SECONDS:-75}" --model-seconds "${MODEL_SECONDS:-160}" \
  "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
