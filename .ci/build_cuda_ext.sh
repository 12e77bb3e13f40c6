#!/usr/bin/env bash
# Compiles and links the CUDA extension (csrc/cuda/*.cu with nvcc, for sm_80 and sm_90)
# against a CUDA build of torch, in a venv of its own; fails if any source fails to build.
# No GPU needed. Output goes to a temp dir: the project's own install is left alone.
#
#   .ci/build_cuda_ext.sh              # venv .venv-cuda (created on first use, ~60 s + ~5.4 GB)
#   .ci/build_cuda_ext.sh --prepare-only  # only create that venv (no build)
#   CUDA_VENV=/path TORCH_CUDA_SPEC="torch==2.14.1" CUDA_HOME=/usr/local/cuda .ci/build_cuda_ext.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VENV=$(realpath -m "${CUDA_VENV:-.venv-cuda}")
TORCH_CUDA_SPEC=${TORCH_CUDA_SPEC:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export FORCE_CUDA=1 ALIG_FUSED_EXT_REQUIRED=1
export PATH="$CUDA_HOME/bin:$PATH"

if ! command -v nvcc >/dev/null; then
  echo "build_cuda_ext: nvcc not found (CUDA_HOME=$CUDA_HOME)" >&2
  exit 1
fi

start=$(date +%s)
if ! "$CUDA_VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "build_cuda_ext: installing $TORCH_CUDA_SPEC into $CUDA_VENV"
  python_bin=${PYTHON:-python3}
  [ -x "$CUDA_VENV/bin/python" ] || "$python_bin" -m venv "$CUDA_VENV"
  # (grep: drops pip's notes about configured local indexes that do not exist here)
  "$CUDA_VENV/bin/pip" install -q "$TORCH_CUDA_SPEC" setuptools wheel ninja numpy 2>&1 |
    { grep -v "^WARNING: Location '.*' is ignored" || true; }
fi
installed=$(date +%s)
if [ "${1:-}" = "--prepare-only" ]; then  # scripts/dev.sh installs it while the tests run
  echo "build_cuda_ext: venv ready in $((installed - start)) s"
  exit 0
fi
"$CUDA_VENV/bin/python" -c "import torch; print('build_cuda_ext: torch', torch.__version__, 'CUDA', torch.version.cuda)"
nvcc --version | tail -n 2

# BUILD_OUT keeps the result (e.g. to inspect it); by default a temp dir, removed at exit.
if [ -n "${BUILD_OUT:-}" ]; then
  out=$BUILD_OUT
  mkdir -p "$out"
else
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
# ptxas's resource report (-Xptxas -v: registers, stack frame, spills per kernel and
# architecture) comes with the build itself: nvcc appends NVCC_APPEND_FLAGS to every
# compile, so nothing is compiled twice. Any spill fails the build (the numbers at the
# top of csrc/cuda/alig_cuda.cu have none).
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas -v"
"$CUDA_VENV/bin/python" setup.py -q build_ext --build-temp "$out/temp" --build-lib "$out/lib" 2>&1 | tee "$out/build.log"
reports=$(grep -c "bytes spill stores" "$out/build.log" || true)
spills=$(grep -E "(^|[^0-9])[1-9][0-9]* bytes spill (stores|loads)" "$out/build.log" || true)
if [ "$reports" -eq 0 ]; then
  echo "build_cuda_ext: no ptxas report in the build output (is -Xptxas -v applied?)" >&2
  exit 1
fi
if [ -n "$spills" ]; then
  echo "build_cuda_ext: ptxas reports register spills in the CUDA kernels:" >&2
  grep -E -B2 "(^|[^0-9])[1-9][0-9]* bytes spill (stores|loads)" "$out/build.log" >&2
  exit 1
fi
echo "build_cuda_ext: ptxas: $reports kernel reports, no spills"
so=$(find "$out/lib" -name '_C*.so' | head -n 1)
if [ -z "$so" ]; then
  echo "build_cuda_ext: no extension was produced" >&2
  exit 1
fi
# The fat binary must hold SASS for every requested architecture. cuobjdump: CUDA's, or
# the copy in the triton wheel that a CUDA torch depends on.
cuobjdump=""
for candidate in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" \
    "$("$CUDA_VENV/bin/python" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then cuobjdump=$candidate; break; fi
done
if [ -z "$cuobjdump" ]; then
  echo "build_cuda_ext: WARNING no cuobjdump found; not checking the architectures in $so" >&2
else
  elves=$("$cuobjdump" --list-elf "$so")
  echo "$elves"
  for arch in $(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' ' '); do
    sm="sm_$(echo "${arch%+PTX}" | tr -d '.')"
    if ! echo "$elves" | grep -q "\.$sm\."; then
      echo "build_cuda_ext: $so has no $sm code" >&2
      exit 1
    fi
  done
fi
# It must load and register the CUDA kernel (no GPU needed for that).
(cd "$out/lib" && "$CUDA_VENV/bin/python" - <<'EOF'
import torch
import alig_fused._C as C
assert C.has_cuda(), "built without the CUDA kernels"
for op in ("alig_step_", "alig_sums", "alig_update_", "alig_apply_"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"alig_fused::{op}", key), (op, key)
print("build_cuda_ext: alig_fused._C loads; alig_step_, alig_sums, alig_update_, alig_apply_ have CPU and CUDA kernels")
EOF
)
end=$(date +%s)
echo "build_cuda_ext: OK ($so); torch install $((installed - start)) s, build $((end - installed)) s"
