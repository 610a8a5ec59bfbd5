#!/usr/bin/env bash
# Every GPU check in one command, for a machine with one NVIDIA GPU, no network and its own Python
# (torch, triton, torchvision, pytest, pytest-benchmark):
#
#   OUT=/some/folder bash scripts/gpu_check.sh [--dry-run]        (OUT defaults to gpu-check/)
#
# It installs this package (pip --no-deps --no-build-isolation -e ., the CUDA extension built for
# this GPU's architecture), then runs each step under its own time budget, stopping a step that
# overruns, so the whole run ends within 8 minutes on an H100/H200; $OUT/gpu-summary.md is written
# at the end whatever ran (the steps' logs, JSON records and bench.json sit beside it).  Kernels run
# in strict mode (AERL_FAST_KERNELS=triton): a failed Triton launch fails its check, never hides
# behind the reference.  On a machine without CUDA, and with --dry-run, every step is reported
# "skipped: no CUDA device" and the summary is still written.  The steps live in scripts/gpu_check/.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python}"
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (usage: bash scripts/gpu_check.sh [--dry-run])" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT/steps" && OUT="$(cd "$OUT" && pwd)"
: > "$OUT/steps.tsv"
export PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
export AERL_FAST_KERNELS=triton TRITON_INTERPRET=0
TOTAL_S=470  # the whole run's budget; each step also has its own

MODE=gpu
if [ "$DRY" = 1 ]; then
  MODE=dry-run
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  MODE=cpu
fi

summary() {
  "$PY" -m gpu_check.summary --out "$OUT" --mode "$MODE" > "$OUT/summary.log" 2>&1 \
    || echo "gpu_check.sh: the summary step failed, see $OUT/summary.log" >&2
  echo "summary: $OUT/gpu-summary.md"
}
trap summary EXIT

# step NAME BUDGET_S COMMAND...: run COMMAND with at most BUDGET_S seconds (less if the run's total
# budget is nearly spent), output in $OUT/NAME.log, one line in $OUT/steps.tsv
step() {
  local name="$1" budget="$2" status rc t0
  shift 2
  if [ "$MODE" != gpu ]; then
    printf '%s\tskipped: no CUDA device\t0\t%s\n' "$name" "$budget" >> "$OUT/steps.tsv"
    echo "=== $name: skipped: no CUDA device"
    return 0
  fi
  local left=$((TOTAL_S - SECONDS))
  [ "$left" -lt "$budget" ] && budget="$left"
  if [ "$budget" -lt 5 ]; then
    printf '%s\tnot run: the run'"'"'s %s s are spent\t0\t0\n' "$name" "$TOTAL_S" >> "$OUT/steps.tsv"
    return 0
  fi
  echo "=== $name (budget ${budget} s)"
  t0=$SECONDS
  STEP_BUDGET="$budget" timeout -k 10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case "$rc" in
    0) status="ok" ;;
    124|137) status="stopped: over its ${budget} s budget (what it measured is kept)" ;;
    *) status="failed (exit $rc, see $name.log)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$budget" >> "$OUT/steps.tsv"
  echo "    $status"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
}

install() {
  local arch
  arch="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  TORCH_CUDA_ARCH_LIST="$arch" AERL_FAST_CUDA=1 MAX_JOBS="$(nproc)" \
    "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . || return 1
  "$PY" -c 'import aerl_fast._C as C; assert C.cuda_compiled(), "built without its CUDA kernels"'
}

if [ "$MODE" = dry-run ]; then
  echo "gpu_check.sh --dry-run: the steps and budgets a GPU run takes (total ${TOTAL_S} s):"
fi
step install 120 install
if [ "$MODE" = gpu ] && ! "$PY" -c 'import aerl_fast.kernels' 2>/dev/null; then
  # the install failed: run from the source tree (no extension: its checks fail, the rest runs)
  ln -sfn ../kernels aerl_fast/kernels && ln -sfn ../configs aerl_fast/configs
  export PYTHONPATH="$ROOT:$PYTHONPATH"
fi
step first 85 "$PY" -m gpu_check.first_checks --out "$OUT"
step ext 20 "$PY" -m gpu_check.ext_ops --out "$OUT"
step kernels 60 "$PY" -m pytest tests/kernels -q -m "not slow" -p no:cacheprovider
step bench 50 "$PY" -m pytest bench/bench_kernels.py bench/bench_grad_stats.py bench/bench_speed.py \
  -k "(gpu or cuda) and not step_cuda" --benchmark-only --benchmark-max-time=0.2 \
  --benchmark-json="$OUT/bench.json" -p no:cacheprovider -q
step train 105 "$PY" -m gpu_check.throughput --out "$OUT"
step eval 45 "$PY" -m gpu_check.evaluation --out "$OUT"
exit 0
