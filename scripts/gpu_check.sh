#!/usr/bin/env bash
# The first run on a GPU machine (H100/H200, no network; Python 3.12, torch 2.11 + CUDA 13,
# triton 3.6 already installed): one command, at most 7 minutes (it stops itself).
#
#   scripts/gpu_check.sh                 # build, GPU tests, GPU checks, GPU benchmark, summary
#   scripts/gpu_check.sh --dry-run       # print and record the steps, run none (CI, on CPU)
#   PYTHON=python3.12 OUT=dir scripts/gpu_check.sh
#
# Steps (each with its own timeout; a failed step does not stop the next):
#   build     the C++/CUDA extension in place against the installed torch (sm_90)
#   tests     every tests/test_gpu_*.py (Triton, C++, training loops, and test_gpu_check.py:
#             a tensor of 2^31 + 4,099 elements, a graph replayed after an lr change,
#             bitwise repeatability)
#   bench     python -m bench --device cuda on gpt2, llama1b, many_small in fp32 and bf16
# Writes bench/results/<gpu>/ (the benchmark's report, gpu_check.log with every step's
# output, gpu_check_summary.txt: one screen) and prints the summary.
set -uo pipefail
cd "$(dirname "$0")/.."

TOTAL_S=420
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done

# The whole run under one deadline: re-run this script under `timeout` once.
if [ -z "${GPU_CHECK_INNER:-}" ]; then
  GPU_CHECK_INNER=1 exec timeout --kill-after=10 "$TOTAL_S" "$0" "$@"
fi

PYTHON=${PYTHON:-python3}
if [ "$DRY_RUN" = 1 ]; then
  gpu=${GPU_NAME:-dry-run}
else
  gpu=$("$PYTHON" -c "import torch; from bench.core import device_name; print(device_name(torch.device('cuda')))" 2>/dev/null) ||
    { echo "gpu_check: no CUDA device visible to torch ($PYTHON)" >&2; exit 1; }
fi
OUT=${OUT:-bench/results/$gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/gpu_check_summary.txt"
: >"$LOG"
started=$(date +%s)
declare -a rows

# step NAME TIMEOUT_S COMMAND...: run it (or, with --dry-run, record it), log its output.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc status
  t0=$(date +%s)
  printf '\n===== %s (timeout %ss): %s\n' "$name" "$limit" "$*" >>"$LOG"
  if [ "$DRY_RUN" = 1 ]; then
    rc=0
    status="dry-run"
  else
    timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124 | 137) status="TIMEOUT" ;; *) status="FAILED rc=$rc" ;; esac
  fi
  rows+=("$(printf '%-8s %-14s %4ss  %s' "$name" "$status" "$(($(date +%s) - t0))" "$*")")
}

export ALIG_FUSED_REQUIRE_BACKENDS=torch,cpp,triton  # a backend that did not build fails, not skips
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 ALIG_FUSED_EXT_REQUIRED=1
export MAX_JOBS=${MAX_JOBS:-16}

step build 150 "$PYTHON" setup.py build_ext --inplace
step tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu_*.py
step bench 100 "$PYTHON" -m bench --device cuda --sets gpt2,llama1b,many_small --dtypes fp32,bf16 \
  --budget-s 70 --out "$OUT"

{
  echo "gpu_check on ${gpu}: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - started)) s of ${TOTAL_S} s"
  [ "$DRY_RUN" = 1 ] || "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'triton', triton.__version__)" 2>/dev/null
  printf '%s\n' "${rows[@]}"
  if [ "$DRY_RUN" = 0 ]; then
    echo "--- tests (last lines)"
    awk '/^===== tests/{on=1; next} /^===== /{on=0} on' "$LOG" | grep -E "passed|failed|error|FAILED|SKIPPED" | tail -n 8
    echo "--- bench: $OUT/report.md"
    [ -f "$OUT/report.md" ] && grep -E "^\| (gpt2|llama1b|many_small)" "$OUT/report.md" | head -n 12
  fi
  echo "full output: $LOG"
} | tee "$SUMMARY"

grep -qE "FAILED|TIMEOUT" "$SUMMARY" && exit 1
exit 0
