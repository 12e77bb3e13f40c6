"""Build script: the package, plus the C++/CUDA extension ``alig_fused._C`` (see csrc/).

    pip install --no-build-isolation -e .   # compile the extension now, against the installed torch
    pip install .                           # isolated build: no torch there, so no extension now;
                                            # backend="cpp" compiles it on first use (cpp_ops.py)

The CPU kernels are built whenever torch is importable here; the CUDA kernels too when
torch is a CUDA build and nvcc is found (CUDA_HOME), for TORCH_CUDA_ARCH_LIST (default
"8.0;9.0" plus the visible GPUs). Every wheel carries csrc/ as alig_fused/csrc/ for the JIT
build. A wheel with the extension, built from a clone, carries the torch it was built
against in its version's local label (0.1.0+pt213cpu). Environment:

    ALIG_FUSED_NO_EXT=1        build no extension (backend="cpp" then compiles it on first use)
    ALIG_FUSED_EXT_REQUIRED=1  a failed compile fails the install (CI); otherwise it warns
                               and installs the pure-Python package
    FORCE_CUDA=1 / FORCE_CUDA=0  build the CUDA kernels / never build them
    MAX_JOBS=N                 parallel compile jobs (ninja)
"""

import importlib.util
import json
import os
import re
import shutil
import sys
import traceback

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    path = os.path.join(ROOT, "alig_fused", "_build_config.py")
    spec = importlib.util.spec_from_file_location("_alig_fused_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIG = _load_build_config()


def _base_version():
    with open(os.path.join(ROOT, "alig_fused", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message):
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\nalig_fused: {message}\n{bar}\n\n")


def _in_isolated_build_env():
    """Whether this runs in a build frontend's throw-away environment (PEP 517 build isolation):
    pip's "pip-build-env-*" overlay or the "build-env-*" venv of `python -m build`."""
    return any("pip-build-env-" in p or f"{os.sep}build-env-" in p for p in [sys.prefix, *sys.path])


def _cuda_arch_list(torch):
    archs = ["8.0", "9.0"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            if f"{major}.{minor}" not in archs:
                archs.append(f"{major}.{minor}")
    return ";".join(archs)


def _remove(path):
    if os.path.exists(path):
        os.remove(path)


def _extension_setup():
    """(ext_modules, cmdclass extras, local version label, why no extension is built or None)."""
    if "sdist" in sys.argv[1:]:
        return [], {}, "", None  # the sdist carries csrc/ (MANIFEST.in); nothing to compile
    if _env_flag("ALIG_FUSED_NO_EXT"):
        return [], {}, "", "it was skipped at install time (ALIG_FUSED_NO_EXT=1)"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if _in_isolated_build_env():
            reason = (
                "torch was not importable in the isolated build environment that pip (or python -m build) "
                "installs with only setuptools and wheel, so it was not compiled at install time; to compile "
                "it at install time against your torch: `pip install --no-build-isolation <what you installed>`"
            )
        else:
            reason = f"torch was not installed where the package was built ({exc}); install torch first"
        if _env_flag("ALIG_FUSED_EXT_REQUIRED"):
            raise RuntimeError(f"ALIG_FUSED_EXT_REQUIRED=1, but {reason}") from exc
        _warn(
            f"installing WITHOUT the compiled C++/CUDA extension: {reason}. The package carries the "
            f"sources: backend='cpp' compiles them on first use ({CONFIG.JIT_CPU_BUILD_ESTIMATE}, once; "
            "ALIG_FUSED_NO_JIT=1 turns that off)."
        )
        return [], {}, "", reason

    force_cuda = os.environ.get("FORCE_CUDA", "").strip()
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if force_cuda in ("1", "true"):
        with_cuda = True
    elif force_cuda in ("0", "false"):
        with_cuda = False

    sources = [f"csrc/{s}" for s in CONFIG.CPU_SOURCES]
    cxx_flags = list(CONFIG.CXX_FLAGS)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_arch_list(torch))
        sources += [f"csrc/{s}" for s in CONFIG.CUDA_SOURCES]
        cxx_flags.append(CONFIG.CUDA_DEFINE)
        make = cpp_extension.CUDAExtension
        extra_compile_args = {"cxx": cxx_flags, "nvcc": [*CONFIG.NVCC_FLAGS, CONFIG.CUDA_DEFINE]}
    else:
        make = cpp_extension.CppExtension
        extra_compile_args = {"cxx": cxx_flags}
    extension = make(
        "alig_fused._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=list(CONFIG.LINK_FLAGS),
    )
    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "with_cuda": with_cuda, "built_by": "setup.py"}

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension that records what it built against, and warns (unless
        required) instead of failing the install."""

        def run(self):
            out_dir = os.path.dirname(self.get_ext_fullpath(extension.name))
            note, record_path = os.path.join(out_dir, CONFIG.NOT_BUILT_NOTE), os.path.join(out_dir, CONFIG.BUILD_RECORD)
            _remove(note)
            _remove(record_path)
            try:
                super().run()
            except Exception as exc:  # compiler or linker failure (CompileError, RuntimeError ...)
                if _env_flag("ALIG_FUSED_EXT_REQUIRED"):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
                _warn(
                    f"building the C++/CUDA extension alig_fused._C FAILED ({reason}); installing "
                    "without it: backend='cpp' tries to compile it on first use and reports the error. "
                    "Rebuild with ALIG_FUSED_EXT_REQUIRED=1 (or `python setup.py build_ext --inplace`) to see it."
                )
                traceback.print_exc()
                os.makedirs(out_dir, exist_ok=True)
                with open(note, "w") as f:
                    f.write(f"compiling it at install time failed ({reason})\n")
                self.extensions = []  # nothing to copy or list as an output
                return
            with open(record_path, "w") as f:
                json.dump(record, f)
                f.write("\n")

    # Built from a clone, the version says which torch the binary is for (0.1.0+pt213cpu).
    # Not from an unpacked sdist (it has PKG-INFO): pip checks a downloaded sdist's metadata
    # against its file name (0.1.0) and would reject the build. The build record says it there.
    from_sdist = os.path.exists(os.path.join(ROOT, "PKG-INFO"))
    label = "" if from_sdist else CONFIG.torch_tag(torch.__version__, torch.version.cuda)
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}, label, None


class BuildPyWithSources(build_py):
    """build_py that also puts csrc/ into the package (alig_fused/csrc/, for the JIT build) and
    writes the note saying why there is no compiled extension, when there is none."""

    def run(self):
        super().run()
        package_dir = os.path.join(ROOT, "alig_fused") if self.editable_mode else os.path.join(self.build_lib, "alig_fused")
        note = os.path.join(package_dir, CONFIG.NOT_BUILT_NOTE)
        if NOT_BUILT_REASON:
            os.makedirs(package_dir, exist_ok=True)
            with open(note, "w") as f:
                f.write(NOT_BUILT_REASON + "\n")
        else:
            _remove(note)
        if self.editable_mode:
            return  # the JIT build finds the clone's csrc/ itself
        target = os.path.join(package_dir, "csrc")
        if os.path.isdir(target):
            shutil.rmtree(target)
        source = os.path.join(ROOT, "csrc")
        for folder, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if d not in CONFIG.SHIPPED_EXCLUDED_DIRS)
            for name in sorted(files):
                if name.endswith(CONFIG.SHIPPED_SUFFIXES):
                    relative = os.path.relpath(os.path.join(folder, name), source)
                    self.mkpath(os.path.dirname(os.path.join(target, relative)))
                    self.copy_file(os.path.join(folder, name), os.path.join(target, relative))


ext_modules, ext_cmdclass, LOCAL_LABEL, NOT_BUILT_REASON = _extension_setup()
VERSION = _base_version() + (f"+{LOCAL_LABEL}" if LOCAL_LABEL else "")
setup(version=VERSION, ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **ext_cmdclass})
