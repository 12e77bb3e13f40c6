"""Loading the C++/CUDA extension for cpp_ops.py: the prebuilt ``alig_fused._C`` when its
build record (``_C_build.json``, written by setup.py next to it) says it was compiled against
this torch; otherwise a just-in-time build of the installed sources with ninja into torch's
extension cache (``torch.utils.cpp_extension.load``, under $TORCH_EXTENSIONS_DIR or
~/.cache/torch_extensions), announced once on stderr and reused by later runs.
``ALIG_FUSED_NO_JIT=1`` turns the JIT build off. When neither works ``load_extension``
raises ``ExtensionUnavailable`` (an ImportError) saying why, and backends.py records it.

Nothing here runs at import, so the tests drive it without loading or compiling anything.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import time

import torch

from . import _build_config as config

__all__ = ["ExtensionUnavailable", "load_extension", "build_mismatch", "source_dir", "jit_plan"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PREBUILT = f"{__package__}._C"


class ExtensionUnavailable(ImportError):
    """Neither a prebuilt extension for this torch nor a just-in-time build of it; the message says why."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _describe(torch_version: str | None, cuda_version: str | None) -> str:
    return f"torch {torch_version} ({'CUDA ' + cuda_version if cuda_version else 'CPU build'})"


def build_mismatch(record: dict | None, torch_version: str, cuda_version: str | None) -> str:
    """Why a prebuilt extension with build record ``record`` cannot be loaded into this torch ("" if it can).

    Exact versions: a C++ extension links torch's libraries and uses its headers' inline
    code, so it is only known to work with the torch it was compiled against.
    """
    if record is None:
        return (
            f"the prebuilt {_PREBUILT} has no build record ({config.BUILD_RECORD}): it was built by an "
            "older setup.py, against an unknown torch"
        )
    built = (record.get("torch"), record.get("cuda"))
    if built != (torch_version, cuda_version):
        return (
            f"the prebuilt {_PREBUILT} was built for {_describe(*built)}, but this is "
            f"{_describe(torch_version, cuda_version)}; an extension only loads into the torch it was compiled against"
        )
    return ""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _prebuilt_problem() -> str:
    """Why the prebuilt alig_fused._C cannot be used here ("" when it can), without loading it:
    a module built for another torch must never be loaded, since its op registrations would
    then block the JIT build's (one TORCH_LIBRARY per namespace)."""
    spec = importlib.util.find_spec(_PREBUILT)
    if spec is None or not spec.origin:
        note = _read(os.path.join(_PACKAGE_DIR, config.NOT_BUILT_NOTE))
        return f"this install has no prebuilt {_PREBUILT} ({note or 'it was not compiled at install time'})"
    try:
        with open(os.path.join(os.path.dirname(spec.origin), config.BUILD_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    return build_mismatch(record, torch.__version__, torch.version.cuda)


def _ops_registered() -> bool:
    return hasattr(torch.ops.alig_fused, "alig_step_")


def source_dir() -> str | None:
    """The C++/CUDA sources to compile: the installed copy (alig_fused/csrc/) or a clone's csrc/."""
    for candidate in (os.path.join(_PACKAGE_DIR, "csrc"), os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")):
        if all(os.path.isfile(os.path.join(candidate, s)) for s in config.CPU_SOURCES):
            return candidate
    return None


def _ensure_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a venv used without activating it has ninja in its bin/ only."""
    if shutil.which("ninja"):
        return
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if folder and os.access(os.path.join(folder, "ninja"), os.X_OK):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return


def _summarize_build_error(exc: Exception, log_path: str) -> str:
    """The first line and the compiler's error lines of a failed build; the whole output goes to log_path."""
    text = str(exc)
    try:
        with open(log_path, "w") as f:
            f.write(text + "\n")
        saved = f"; the full output is in {log_path}"
    except OSError:
        saved = ""
    lines = text.splitlines()
    errors = [line.strip() for line in lines[1:] if "error:" in line][:3]  # "x.cpp:1:2: error: ...", "fatal error: ..."
    head = lines[0][:300] if lines else ""
    return f"{type(exc).__name__}: {head}" + (f" [{' | '.join(errors)}]" if errors else "") + saved


def jit_plan(src: str, with_cuda: bool) -> dict:
    """The arguments of torch.utils.cpp_extension.load for the JIT build from ``src``.

    The name (and so the cache folder) carries the Python and torch it is built for and a
    digest of the sources, headers and flags: another torch or changed sources get a folder
    of their own instead of rebuilding or mixing with an old one.
    """
    sources = [os.path.join(src, s) for s in config.CPU_SOURCES]
    cflags = list(config.CXX_FLAGS)
    cuda_cflags: list[str] = []
    if with_cuda:
        sources += [os.path.join(src, s) for s in config.CUDA_SOURCES]
        cflags.append(config.CUDA_DEFINE)
        cuda_cflags = [*config.NVCC_FLAGS, config.CUDA_DEFINE]
    digest = hashlib.sha256(repr((torch.__version__, torch.version.cuda, sys.version, cflags, cuda_cflags)).encode())
    for folder, dirs, files in sorted(os.walk(src)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(config.SHIPPED_SUFFIXES):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, src).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    name = f"alig_fused_{python_tag}_{config.torch_tag(torch.__version__, torch.version.cuda)}_{digest.hexdigest()[:10]}"
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return dict(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_cflags,
        extra_ldflags=list(config.LINK_FLAGS),
        extra_include_paths=[src],
        build_directory=os.path.join(root, name),
        with_cuda=with_cuda,
    )


EXTENSION_ORIGIN = ""  # where the loaded extension came from, for `alig-fused backends`


def _jit_load(problem: str):
    global EXTENSION_ORIGIN
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        raise ExtensionUnavailable(f"{problem}, and the C++ sources to compile it from are not installed (alig_fused/csrc)")
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    plan = jit_plan(src, with_cuda)
    build_dir = plan["build_directory"]
    compiled = os.path.isfile(os.path.join(build_dir, plan["name"] + (".pyd" if sys.platform == "win32" else ".so")))
    kernels = "CPU and CUDA kernels" if with_cuda else "CPU kernels"
    estimate = config.JIT_CPU_BUILD_ESTIMATE + (", plus nvcc's time for the CUDA kernels" if with_cuda else "")
    if not compiled:
        sys.stderr.write(
            f"alig_fused: {problem}.\nalig_fused: compiling the extension ({kernels}) from {src} into {build_dir} "
            f"now, once: {estimate}; later runs load it from there (ALIG_FUSED_NO_JIT=1 turns this off).\n"
        )
        sys.stderr.flush()
    start = time.perf_counter()
    try:
        os.makedirs(build_dir, exist_ok=True)
        _ensure_ninja_on_path()
        module = cpp_extension.load(**plan, verbose=False)
    except Exception as exc:  # no compiler or ninja, a compile error, a load error ...
        reason = _summarize_build_error(exc, os.path.join(build_dir, "alig_fused_jit_error.log"))
        sys.stderr.write(f"alig_fused: the just-in-time build failed after {time.perf_counter() - start:.0f} s: {reason}\n")
        raise ExtensionUnavailable(f"{problem}; compiling it just in time failed: {reason}") from exc
    seconds = time.perf_counter() - start
    if not compiled:
        sys.stderr.write(f"alig_fused: compiled the extension in {seconds:.0f} s.\n")
    EXTENSION_ORIGIN = f"loaded from the JIT cache {build_dir}" if compiled else f"compiled just in time into {build_dir}"
    return module


def load_extension():
    """The extension's Python module (prebuilt or JIT-built); raises ExtensionUnavailable."""
    global EXTENSION_ORIGIN
    problem = _prebuilt_problem()
    if not problem:
        try:
            module = importlib.import_module(_PREBUILT)
        except (ImportError, OSError) as exc:
            if _ops_registered():
                raise  # it got far enough to register the ops: a second copy could not register
            problem = f"the prebuilt {_PREBUILT} failed to load ({type(exc).__name__}: {exc})"
        else:
            EXTENSION_ORIGIN = f"prebuilt at install time ({module.__file__})"
            return module
    if _env_flag("ALIG_FUSED_NO_JIT"):
        raise ExtensionUnavailable(
            f"{problem}; ALIG_FUSED_NO_JIT=1 is set, so it is not compiled just in time "
            "(unset it, or install with `pip install --no-build-isolation ...` to compile it at install time)"
        )
    return _jit_load(problem)
