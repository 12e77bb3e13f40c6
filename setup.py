"""Build script: the package, plus the C++/CUDA extension ``alig_fused._C`` (see csrc/).

    pip install --no-build-isolation -e .      # build isolation would pull a CUDA torch

The CPU kernels are built whenever torch is importable here; the CUDA kernels too when
torch is a CUDA build and nvcc is found (CUDA_HOME), for TORCH_CUDA_ARCH_LIST (default
"8.0;9.0" plus the visible GPUs). Environment:

    ALIG_FUSED_NO_EXT=1        build no extension (backend="cpp" then says so)
    ALIG_FUSED_EXT_REQUIRED=1  a failed compile fails the install (CI); otherwise it warns
                               and installs the pure-Python package
    FORCE_CUDA=1 / FORCE_CUDA=0  build the CUDA kernels / never build them
    MAX_JOBS=N                 parallel compile jobs (ninja)
"""

import os
import sys
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_ERROR_FILE = "_C_build_error.txt"  # next to the extension; cpp_ops.py reports it


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message):
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\nalig_fused: {message}\n{bar}\n\n")


def _cuda_arch_list(torch):
    archs = ["8.0", "9.0"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            if f"{major}.{minor}" not in archs:
                archs.append(f"{major}.{minor}")
    return ";".join(archs)


def _clear_stale_build_error():
    path = os.path.join(ROOT, "alig_fused", BUILD_ERROR_FILE)
    if os.path.exists(path):
        os.remove(path)


def _extension_setup():
    """(ext_modules, cmdclass) for setup(); empty when the extension is not built."""
    if _env_flag("ALIG_FUSED_NO_EXT"):
        _clear_stale_build_error()
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if _env_flag("ALIG_FUSED_EXT_REQUIRED"):
            raise
        _warn(
            f"torch is not importable at build time ({exc}); installing WITHOUT the C++/CUDA "
            "extension (backend='cpp' unavailable). Install torch first, then "
            "`pip install --no-build-isolation -e .`."
        )
        _clear_stale_build_error()
        return [], {}

    force_cuda = os.environ.get("FORCE_CUDA", "").strip()
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if force_cuda in ("1", "true"):
        with_cuda = True
    elif force_cuda in ("0", "false"):
        with_cuda = False

    sources = ["csrc/module.cpp", "csrc/alig_ops.cpp", "csrc/alig_cpu.cpp"]
    # -ffp-contract=off / --fmad=false: no fused multiply-add, so the pass-2 update rounds
    # exactly like the foreach path (alig_math.h). -fopenmp: at::parallel_for is inline
    # and needs it; the runtime is torch's own libgomp.so.1 (same soname).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    nvcc_flags = ["-O3", "--fmad=false", "--expt-relaxed-constexpr"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_arch_list(torch))
        sources.append("csrc/cuda/alig_cuda.cu")
        cxx_flags.append("-DALIG_WITH_CUDA")
        make = cpp_extension.CUDAExtension
        extra_compile_args = {"cxx": cxx_flags, "nvcc": nvcc_flags + ["-DALIG_WITH_CUDA"]}
    else:
        make = cpp_extension.CppExtension
        extra_compile_args = {"cxx": cxx_flags}
    extension = make(
        "alig_fused._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension that warns (unless required) instead of failing the install."""

        def run(self):
            error_file = os.path.join(os.path.dirname(self.get_ext_fullpath(extension.name)), BUILD_ERROR_FILE)
            if os.path.exists(error_file):
                os.remove(error_file)
            try:
                super().run()
            except Exception as exc:  # compiler or linker failure (CompileError, RuntimeError ...)
                if _env_flag("ALIG_FUSED_EXT_REQUIRED"):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
                _warn(
                    f"building the C++/CUDA extension alig_fused._C FAILED ({reason}); installing "
                    "without it: backend='cpp' is unavailable and reports this. Rebuild with "
                    "ALIG_FUSED_EXT_REQUIRED=1 (or `python setup.py build_ext --inplace`) to see the error."
                )
                traceback.print_exc()
                os.makedirs(os.path.dirname(error_file), exist_ok=True)
                with open(error_file, "w") as f:
                    f.write(reason + "\n")
                self.extensions = []  # nothing to copy or list as an output

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_setup()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
