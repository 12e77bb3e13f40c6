#!/usr/bin/env bash
# CMake build of the C++ ops against the project venv's libtorch, then the C++ test (CTest).
#   .ci/cmake_test.sh            (PYTHON=... to use another torch, BUILD_DIR=... elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
BUILD_DIR=${BUILD_DIR:-build/cmake}
prefix=$("$PYTHON" -c "import torch; print(torch.utils.cmake_prefix_path)")
generator=()
if command -v ninja >/dev/null || [ -x "$(dirname "$PYTHON")/ninja" ]; then
  generator=(-G Ninja)
  export PATH="$(dirname "$PYTHON"):$PATH"
fi

start=$(date +%s)
cmake -S . -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD_DIR" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD_DIR" --output-on-failure
echo "cmake_test: OK in $(($(date +%s) - start)) s"
