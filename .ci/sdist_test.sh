#!/usr/bin/env bash
# The sdist, installed the ways a user would, in a fresh venv that has only torch:
#   1. `python -m build --sdist`: the tarball carries csrc/ (headers, sources, the C++ test),
#      CMakeLists.txt and the docs the README links.
#   2. `pip install <sdist>` (build isolation, default flags): torch is not in pip's isolated
#      build env, so a wheel without the extension; the first FusedALIG(backend="cpp") step
#      compiles it just in time into a temporary TORCH_EXTENSIONS_DIR, a second run reuses it.
#   3. `pip install --no-build-isolation <sdist>` with ALIG_FUSED_EXT_REQUIRED=1: compiled at
#      install time; backend="cpp" runs with ALIG_FUSED_NO_JIT=1 (the prebuilt module only).
# Two compiles of the CPU kernels, ~2 min each on 2 cores. Everything lives in a temp dir.
#   .ci/sdist_test.sh          (PYTHON=python3.x, ALIG_TORCH_SPEC=torch==..., MAX_JOBS=N;
#                               SDIST_TEST_VENV=dir reuses that venv, to rerun quickly)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${ALIG_TORCH_SPEC:-torch==2.13.0}   # the small CPU wheel
export MAX_JOBS=${MAX_JOBS:-2}
# Each step sets what it tests; nothing leaks in from the caller (scripts/dev.sh test sets
# ALIG_FUSED_EXT_REQUIRED=1, which would fail the isolated install of step 2 on purpose).
unset ALIG_FUSED_EXT_REQUIRED ALIG_FUSED_NO_EXT ALIG_FUSED_NO_JIT TORCH_EXTENSIONS_DIR
work=$(mktemp -d "${TMPDIR:-/tmp}/alig_sdist.XXXXXX")
trap 'rm -rf "$work"' EXIT
venv=$work/venv
log() { printf 'sdist_test: %s\n' "$*"; }
fail() { printf 'sdist_test: FAILED: %s\n' "$*" >&2; exit 1; }
# pip, without its notes about configured package locations that do not exist on this machine
pip_install() { "$venv/bin/pip" install -q "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }; return "${PIPESTATUS[0]}"; }

t0=$SECONDS
if [ -n "${SDIST_TEST_VENV:-}" ]; then  # to rerun quickly: a venv this script made before, reused
  venv=$SDIST_TEST_VENV
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" uninstall -q -y alig_fused 2>/dev/null || true
else
  "$PYTHON" -m venv "$venv"
fi
# --no-compile: byte-compiling torch's thousands of .py files is most of a torch install's time
pip_install --no-compile "$TORCH_SPEC" numpy ninja setuptools wheel build
log "fresh venv with $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)') in $((SECONDS - t0)) s"

# 1. The sdist, and what it must carry.
t=$SECONDS
"$venv/bin/python" -m build --sdist --no-isolation --outdir "$work/dist" "$repo" >"$work/sdist.log" 2>&1 ||
  { cat "$work/sdist.log"; fail "python -m build --sdist"; }
sdist=$(ls "$work"/dist/*.tar.gz)
tar tzf "$sdist" | sed 's|^[^/]*/||' | sort >"$work/sdist_files.txt"
expected=$( (find csrc -type f ! -path '*/__pycache__/*'; echo CMakeLists.txt; echo README.md; echo MANIFEST.in
            grep -o '](\(docs\|bench\)/[^)#]*' README.md | sed 's/^](//') | sort -u)
missing=$(comm -23 <(echo "$expected") "$work/sdist_files.txt")
[ -z "$missing" ] || fail "the sdist lacks: $missing"
if grep -E '\.so$|_C_build\.json|_C_not_built\.txt' "$work/sdist_files.txt"; then fail "build outputs in the sdist"; fi
log "$(basename "$sdist"): $(wc -l <"$work/sdist_files.txt") files, csrc/ and the README's links included ($((SECONDS - t)) s)"

# A step with backend="cpp" against backend="torch"; $1: where the extension must come from.
cat >"$work/check.py" <<'EOF'
import importlib.metadata
import sys

import torch

import alig_fused
from alig_fused import FusedALIG, _cpp_loader

expected_origin = {"jit": "compiled just in time", "cached": "loaded from the JIT cache", "prebuilt": "prebuilt"}[sys.argv[1]]


def one_step(backend):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen, requires_grad=True) for shape in [(33, 5), (7,), (1,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = FusedALIG(params, lr=0.1, momentum=0.9, max_norm=3.0, backend=backend)
    opt.step(loss=torch.tensor(0.7))
    assert opt.last_backend == backend, opt.last_backend
    return [p.detach() for p in params]


assert "site-packages" in alig_fused.__file__, f"not the installed package: {alig_fused.__file__}"
for cpp, ref in zip(one_step("cpp"), one_step("torch")):
    torch.testing.assert_close(cpp, ref, rtol=1e-6, atol=1e-6)
origin = _cpp_loader.EXTENSION_ORIGIN
assert origin.startswith(expected_origin), f"expected the extension {expected_origin}, got: {origin}"
print(f"alig_fused {importlib.metadata.version('alig_fused')}: a backend='cpp' step matches backend='torch'; "
      f"the extension: {origin}")
EOF
check() { (cd "$work" && "$venv/bin/python" check.py "$@"); }

# 2. Default flags: pip builds in isolation, without torch; the first cpp step compiles.
t=$SECONDS
pip_install "$sdist"
note=$(cd "$work" && "$venv/bin/python" -c 'import alig_fused, os; print(open(os.path.join(os.path.dirname(alig_fused.__file__), "_C_not_built.txt")).read())')
echo "$note" | grep -q "isolated build environment" || fail "the install's note does not say why there is no extension: $note"
log "pip install <sdist> (isolated): no extension, as its note says, in $((SECONDS - t)) s"
export TORCH_EXTENSIONS_DIR=$work/torch_extensions
t=$SECONDS
check jit 2>"$work/jit.err" || { cat "$work/jit.err"; fail "backend='cpp' through the JIT build"; }
[ "$(grep -c 'compiling the extension' "$work/jit.err")" = 1 ] || { cat "$work/jit.err"; fail "the JIT build is not announced once"; }
sed 's/^/  | /' "$work/jit.err"
log "first backend='cpp' step with the JIT build: $((SECONDS - t)) s"
t=$SECONDS
check cached 2>"$work/cached.err" || { cat "$work/cached.err"; fail "backend='cpp' from the JIT cache"; }
if grep -q 'compiling the extension' "$work/cached.err"; then fail "the second run compiled again"; fi
log "second run, from the JIT cache: $((SECONDS - t)) s"
unset TORCH_EXTENSIONS_DIR

# 3. No build isolation: the venv's torch compiles the extension at install time.
t=$SECONDS
ALIG_FUSED_EXT_REQUIRED=1 pip_install --no-build-isolation --no-deps --force-reinstall "$sdist"
log "pip install --no-build-isolation <sdist>: $((SECONDS - t)) s"
ALIG_FUSED_NO_JIT=1 check prebuilt
log "OK in $((SECONDS - t0)) s"
