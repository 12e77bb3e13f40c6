"""The extension's loader and packaging, without compiling anything (the compiles themselves
run in .ci/sdist_test.sh): build records against the running torch, ALIG_FUSED_NO_JIT, the
JIT build's plan, announcement and failure, the fallback reason for "auto", the version's
local label.
"""

from __future__ import annotations

import dataclasses

import os
import shutil
import subprocess
import sys

import pytest
import torch

from alig_fused import FusedALIG, _build_config, _cpp_loader, backends, cli
from alig_fused.backends import BackendUnavailableError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.fixture
def fresh_backends(monkeypatch):
    """backends' caches emptied for the test and restored after it."""
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_errors", {})


@pytest.fixture
def no_prebuilt(monkeypatch):
    """The loader sees no usable prebuilt extension; returns its reason."""
    reason = "this install has no prebuilt alig_fused._C (it was not compiled at install time)"
    monkeypatch.setattr(_cpp_loader, "_prebuilt_problem", lambda: reason)
    return reason


@pytest.fixture
def forbid_compile(monkeypatch):
    def load(**kwargs):
        raise AssertionError("the test was about to compile the extension")

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", load)


def test_build_record_of_another_torch_is_refused_with_both_versions():
    record = {"torch": "2.12.0+cu126", "cuda": "12.6", "with_cuda": True}
    message = _cpp_loader.build_mismatch(record, "2.13.0+cpu", None)
    assert "built for torch 2.12.0+cu126 (CUDA 12.6)" in message
    assert "this is torch 2.13.0+cpu (CPU build)" in message
    # a patch release or another CUDA of the same torch is another torch too
    assert _cpp_loader.build_mismatch({"torch": "2.13.0+cpu", "cuda": None}, "2.13.1+cpu", None)
    assert _cpp_loader.build_mismatch({"torch": "2.13.0+cu128", "cuda": "12.8"}, "2.13.0+cu126", "12.6")


def test_build_record_of_this_torch_is_accepted_and_no_record_is_not():
    assert _cpp_loader.build_mismatch({"torch": torch.__version__, "cuda": torch.version.cuda}, torch.__version__, torch.version.cuda) == ""
    assert "no build record" in _cpp_loader.build_mismatch(None, torch.__version__, torch.version.cuda)


def test_prebuilt_with_a_foreign_record_is_not_loaded(monkeypatch, tmp_path, forbid_compile):
    """A module built for another torch must not even be imported (its op registrations would
    block the JIT build's): the record next to it decides, before loading."""
    so = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"not a shared object")
    (tmp_path / _build_config.BUILD_RECORD).write_text('{"torch": "1.0.0", "cuda": null}')
    spec = type("Spec", (), {"origin": str(so)})()
    monkeypatch.setattr(_cpp_loader.importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setattr(_cpp_loader.importlib, "import_module", lambda name: pytest.fail(f"imported {name}"))
    monkeypatch.setenv("ALIG_FUSED_NO_JIT", "1")
    with pytest.raises(_cpp_loader.ExtensionUnavailable, match=r"built for torch 1\.0\.0 \(CPU build\).*ALIG_FUSED_NO_JIT=1"):
        _cpp_loader.load_extension()


def test_no_jit_raises_the_reason_without_compiling(monkeypatch, no_prebuilt, forbid_compile):
    monkeypatch.setenv("ALIG_FUSED_NO_JIT", "1")
    with pytest.raises(_cpp_loader.ExtensionUnavailable) as info:
        _cpp_loader.load_extension()
    assert no_prebuilt in str(info.value) and "ALIG_FUSED_NO_JIT=1 is set" in str(info.value)


def test_auto_falls_back_with_the_reason_and_a_named_backend_raises_it(monkeypatch, capsys, fresh_backends, no_prebuilt, forbid_compile):
    monkeypatch.setenv("ALIG_FUSED_NO_JIT", "1")
    cpp = dataclasses.replace(backends.REGISTRY["cpp"], load=lambda: _cpp_loader.load_extension())
    monkeypatch.setitem(backends.REGISTRY, "cpp", cpp)
    assert backends.pick("auto", CPU) == "torch"
    assert no_prebuilt in backends.why_unavailable("cpp")
    assert no_prebuilt in backends.available_backends(CPU)["cpp"]
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "ALIG_FUSED_NO_JIT=1 is set" in out and "auto -> torch on cpu" in out
    param = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(BackendUnavailableError, match="ALIG_FUSED_NO_JIT=1 is set"):
        FusedALIG([param], backend="cpp")
    opt = FusedALIG([param], backend="auto")
    param.grad = torch.ones(3)
    opt.step(loss=1.0)
    assert opt.last_backend == "torch"


def test_jit_plan_compiles_the_shipped_sources_into_a_folder_per_torch_and_source(monkeypatch, tmp_path):
    src = _cpp_loader.source_dir()
    assert src is not None, "no csrc/ next to the package"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    plan = _cpp_loader.jit_plan(src, with_cuda=False)
    assert plan["name"].isidentifier()
    assert os.path.dirname(plan["build_directory"]) == str(tmp_path)
    assert [os.path.relpath(s, src) for s in plan["sources"]] == list(_build_config.CPU_SOURCES)
    assert all(os.path.isfile(s) for s in plan["sources"])
    assert "-ffp-contract=off" in plan["extra_cflags"] and _build_config.CUDA_DEFINE not in plan["extra_cflags"]
    with_cuda = _cpp_loader.jit_plan(src, with_cuda=True)
    assert os.path.relpath(with_cuda["sources"][-1], src) == "cuda/alig_cuda.cu"
    assert _build_config.CUDA_DEFINE in with_cuda["extra_cflags"] and "--fmad=false" in with_cuda["extra_cuda_cflags"]
    assert with_cuda["name"] != plan["name"]
    # an edited header gets a build of its own (torch's cache only tracks the .cpp files)
    copy = tmp_path / "csrc"
    shutil.copytree(src, copy)
    assert _cpp_loader.jit_plan(str(copy), False)["name"] == plan["name"]
    with open(copy / "alig_math.h", "a") as f:
        f.write("\n// edited\n")
    assert _cpp_loader.jit_plan(str(copy), False)["name"] != plan["name"]
    # so does another torch
    monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    assert _cpp_loader.jit_plan(src, False)["name"] != plan["name"]


def test_jit_build_is_announced_once_with_its_time_then_reused(monkeypatch, tmp_path, capsys, no_prebuilt):
    """The loader's side of the JIT build (the compile itself is stood in for: it runs in CI)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("ALIG_FUSED_NO_JIT", raising=False)
    calls = []

    def fake_load(**kwargs):
        calls.append(kwargs)
        open(os.path.join(kwargs["build_directory"], kwargs["name"] + ".so"), "w").close()
        return "module"

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert _cpp_loader.load_extension() == "module"
    err = capsys.readouterr().err
    assert err.count("compiling the extension") == 1
    assert no_prebuilt in err and _build_config.JIT_CPU_BUILD_ESTIMATE in err and "ALIG_FUSED_NO_JIT=1" in err
    assert _cpp_loader.EXTENSION_ORIGIN.startswith("compiled just in time into " + str(tmp_path))
    assert _cpp_loader.load_extension() == "module"  # a later run: the cached build
    assert "compiling" not in capsys.readouterr().err
    assert _cpp_loader.EXTENSION_ORIGIN.startswith("loaded from the JIT cache")
    assert len(calls) == 2 and calls[0]["build_directory"] == calls[1]["build_directory"]


def test_failed_jit_build_says_what_the_compiler_said(monkeypatch, tmp_path, capsys, no_prebuilt):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("ALIG_FUSED_NO_JIT", raising=False)
    output = "Error building extension 'alig_fused_x': [1/3] c++ ...\nalig_cpu.cpp:12:3: error: 'foo' was not declared\nninja: build stopped"

    def failing_load(**kwargs):
        raise RuntimeError(output)

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(_cpp_loader.ExtensionUnavailable) as info:
        _cpp_loader.load_extension()
    message = str(info.value)
    assert no_prebuilt in message and "compiling it just in time failed" in message
    assert "alig_cpu.cpp:12:3: error: 'foo' was not declared" in message
    log = message.rsplit("the full output is in ", 1)[1]
    assert open(log).read().strip() == output
    assert "the just-in-time build failed after" in capsys.readouterr().err


@pytest.mark.parametrize(
    "torch_version, cuda_version, tag",
    [("2.13.0+cpu", None, "pt213cpu"), ("2.11.0+cu128", "12.8", "pt211cu128"), ("2.14.0a0+git1234", None, "pt214cpu")],
)
def test_torch_tag(torch_version, cuda_version, tag):
    assert _build_config.torch_tag(torch_version, cuda_version) == tag


def _setup_version(**env):
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **env}, check=True,
    )
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "setup.py")), reason="needs the source tree's setup.py")
def test_a_build_with_the_extension_carries_the_torch_in_its_version():
    import alig_fused

    tag = _build_config.torch_tag(torch.__version__, torch.version.cuda)
    assert _setup_version() == f"{alig_fused.__version__}+{tag}"
    assert _setup_version(ALIG_FUSED_NO_EXT="1") == alig_fused.__version__


def test_library_imports_no_demo():
    """``import alig_fused`` and ``alig-fused backends`` load no demo (examples/ loads only for ``demo``)."""
    code = (
        "import sys, alig_fused, alig_fused.cli\n"
        "assert alig_fused.cli.main(['backends']) == 0\n"
        "demos = [m for m in sys.modules if 'example' in m or 'demo' in m]\n"
        "assert not demos, demos\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
