"""What the extension is compiled from and how: read by setup.py (which loads this file by
path, since torch may be missing where it runs) and by the JIT build in cpp_ops.py, so both
compile the same sources with the same flags. No imports beyond the standard library.
"""

from __future__ import annotations

import re

# Relative to csrc/: in a clone that is the top-level csrc/; an installed package carries a
# copy in alig_fused/csrc/ (setup.py's build_py puts it there), which the JIT compiles.
CPU_SOURCES = ("module.cpp", "alig_ops.cpp", "alig_cpu.cpp")
CUDA_SOURCES = ("cuda/alig_cuda.cu",)
# What the installed package carries of csrc/ (the C++ test under csrc/test/ stays in the sdist).
SHIPPED_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")
SHIPPED_EXCLUDED_DIRS = ("test",)

# -ffp-contract=off / --fmad=false: no fused multiply-add, so the pass-2 update rounds
# exactly like the foreach path (alig_math.h). -fopenmp: at::parallel_for is inline and
# needs it; the runtime is torch's own libgomp.so.1 (same soname).
CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
NVCC_FLAGS = ("-O3", "--fmad=false", "--expt-relaxed-constexpr")
LINK_FLAGS = ("-fopenmp",)
CUDA_DEFINE = "-DALIG_WITH_CUDA"

# Written next to the compiled module: which torch it was built against (cpp_ops.py
# refuses a mismatch before loading it), or why this install has none.
BUILD_RECORD = "_C_build.json"
NOT_BUILT_NOTE = "_C_not_built.txt"

# The JIT build's time, measured: CPU kernels only, ninja with its default jobs, on this
# project's 2-core machine shared with other jobs (see README, Installing).
JIT_CPU_BUILD_ESTIMATE = "about 2 minutes on 2 cores"


def torch_tag(torch_version: str, cuda_version: str | None) -> str:
    """The local version label of a wheel built against this torch: "pt213cpu", "pt211cu128"."""
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if match is None:
        raise ValueError(f"cannot read a torch version from {torch_version!r}")
    variant = "cu" + cuda_version.replace(".", "") if cuda_version else "cpu"
    return f"pt{match.group(1)}{match.group(2)}{variant}"
