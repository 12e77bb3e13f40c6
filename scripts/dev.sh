#!/usr/bin/env bash
# One entry point for a fresh clone:
#   bash scripts/dev.sh demo    set everything up in .venv, then run the training demos (digits, then
#                               the small GPT; "demo lm [options]" runs only the GPT one)
#   bash scripts/dev.sh test    set everything up in .venv, then run every check CI runs
#   bash scripts/dev.sh bench   set everything up in .venv, then write the benchmark report
#   bash scripts/dev.sh setup   only set up .venv
# Extra arguments go to the demo / pytest / bench runner.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${ALIG_TORCH_SPEC:-torch==2.13.0}     # the small CPU wheel
TRITON_SPEC=${ALIG_TRITON_SPEC:-triton==3.6.0}   # what the GPU machines run; its interpreter runs on CPU

log() { printf '\n== %s\n' "$*"; }
# pip, without its notes about configured package locations that do not exist on this machine
pip_install() { "$VENV/bin/pip" install -q "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }; return "${PIPESTATUS[0]}"; }

setup() {
    local t0=$SECONDS
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    log "installing torch, triton and the tools"
    # torch first and pinned, so nothing below pulls a multi-GB CUDA build in its place.
    pip_install "$TORCH_SPEC" "$TRITON_SPEC" numpy setuptools wheel ninja
    pip_install pytest pytest-benchmark pytest-xdist hypothesis scikit-learn matplotlib tqdm
    pip_install --no-deps pytorch_optimizer
    # the reference MoMo (tests/test_momo.py runs it as a client); its only deps are torch and numpy
    pip_install --no-deps momo-opt==0.1.0
    # The frameworks tests/test_integrations.py runs FusedALIG in, at the versions it was tested
    # with (~90 s to install); torch named again so that pip keeps the CPU build.
    pip_install "$TORCH_SPEC" transformers==5.24.0 accelerate==1.15.0 lightning==2.6.6
    log "installing alig_fused (editable; builds the C++ extension against the venv's torch)"
    # No build isolation: an isolated build cannot see the venv's torch, so it would leave
    # the extension to the just-in-time build on first use.
    # A failed build of the extension is a warning (backend "cpp" then says why), except
    # for the tests, which set ALIG_FUSED_EXT_REQUIRED=1.
    ALIG_FUSED_EXT_REQUIRED=${ALIG_FUSED_EXT_REQUIRED:-0} MAX_JOBS=${MAX_JOBS:-2} \
        pip_install --no-build-isolation --no-deps -e .
    "$VENV/bin/python" -c "import alig_fused as a; print('backends on cpu:', a.available_backends('cpu'))"
    log "setup took $((SECONDS - t0)) s"
}

run_tests() {
    local t0=$SECONDS
    # The CUDA build of torch for the nvcc check (~100 s, mostly download and unpacking)
    # installs in the background while the tests run; the build itself waits for it.
    local cuda_prep="" cuda_log=""
    if [ "${ALIG_SKIP_CUDA_BUILD:-0}" != "1" ] && [ -f .ci/build_cuda_ext.sh ]; then
        cuda_log=$(mktemp)
        nice bash .ci/build_cuda_ext.sh --prepare-only >"$cuda_log" 2>&1 &
        cuda_prep=$!
        CUDA_PREP_PID=$cuda_prep
        trap '[ -z "${CUDA_PREP_PID:-}" ] || kill "$CUDA_PREP_PID" 2>/dev/null || true' EXIT  # a failed test stops it
    fi
    export ALIG_FUSED_REQUIRE_BACKENDS=${ALIG_FUSED_REQUIRE_BACKENDS:-torch,cpp,triton}
    export ALIG_FUSED_REQUIRE_INTEGRATIONS=${ALIG_FUSED_REQUIRE_INTEGRATIONS:-1}  # transformers, lightning, accelerate
    log "pytest (all backends on CPU; Triton through its interpreter; kernels compiled for sm_80/sm_90)"
    # Two pytest-xdist workers: most tests are single-threaded Python (the Triton interpreter
    # above all); on the 2-core EPYC the suite took 560 s in one process, 351 s in two.
    "$VENV/bin/python" -m pytest -q -n "${ALIG_TEST_WORKERS:-2}" "$@"
    if [ -x .ci/cmake_test.sh ] || [ -f .ci/cmake_test.sh ]; then
        log "CMake build of the extension against libtorch, and its C++ test"
        bash .ci/cmake_test.sh
    fi
    if [ "${ALIG_SKIP_SDIST_TEST:-0}" != "1" ] && [ -f .ci/sdist_test.sh ]; then
        log "the sdist installed in a fresh venv: isolated (JIT build on first use) and --no-build-isolation"
        bash .ci/sdist_test.sh
    fi
    if [ -n "$cuda_prep" ]; then
        log "CUDA extension compiled and linked with nvcc (separate venv with the CUDA build of torch)"
        local prep_status=0
        wait "$cuda_prep" || prep_status=$?
        CUDA_PREP_PID=""
        cat "$cuda_log"
        rm -f "$cuda_log"
        if [ "$prep_status" -ne 0 ]; then
            echo "installing the CUDA build of torch failed (exit $prep_status)" >&2
            return "$prep_status"
        fi
        bash .ci/build_cuda_ext.sh
    fi
    log "tests took $((SECONDS - t0)) s"
}

cmd=${1:-test}
shift || true
case "$cmd" in
    setup) setup ;;
    demo) setup
        if [ "${1:-}" = lm ]; then "$VENV/bin/alig-fused" demo "$@"
        else "$VENV/bin/alig-fused" demo "$@" && "$VENV/bin/alig-fused" demo lm --out lm_out; fi ;;
    test) export ALIG_FUSED_EXT_REQUIRED=1; setup; run_tests "$@" ;;
    bench) setup; "$VENV/bin/python" -m bench "$@" ;;
    *) echo "usage: bash scripts/dev.sh {demo|test|bench|setup} [args...]" >&2; exit 2 ;;
esac
