"""Which implementation of the step runs: discovery, the saved import errors, the picker.

A backend chosen by ``"auto"`` that fails to import is passed over, its reason kept for
``why_unavailable`` and ``available_backends`` (``alig-fused backends``); one asked for by
name raises ``BackendUnavailableError`` carrying the reason (the import error, or for "cpp"
why no prebuilt extension fits this torch and what the just-in-time build said).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cpp")
# What the fused kernels store (math in fp32); the torch path takes any floating dtype.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


def _load_triton() -> Callable:
    from .triton_kernels import triton_alig  # noqa: WPS433 (imports triton)

    return triton_alig


def _load_cpp() -> Callable:
    from .cpp_ops import cpp_alig  # noqa: WPS433 (loads the compiled extension)

    return cpp_alig


def _load_torch() -> Callable:
    from .functional import torch_alig

    return torch_alig


_LOADERS = {"torch": _load_torch, "triton": _load_triton, "cpp": _load_cpp}
_loaded: dict[str, Callable] = {}
_errors: dict[str, str] = {}


def load(name: str) -> Callable | None:
    """The step function of backend ``name``, or None (the reason is kept for ``why``)."""
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    try:
        _loaded[name] = _LOADERS[name]()
    except Exception as exc:  # ImportError, OSError from a bad .so, a failed build ...
        _errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    return _loaded[name]


def why_unavailable(name: str) -> str:
    return _errors.get(name, "")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(name: str, device: torch.device) -> tuple[bool, str]:
    """Can backend ``name`` run on ``device``? (ok, reason when not)."""
    if name == "torch":
        return True, ""
    if load(name) is None:
        return False, f"backend {name!r} failed to load: {why_unavailable(name)}"
    if name == "triton":
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return True, ""
        return False, (
            f"backend 'triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), "
            f"not on {device.type}"
        )
    if name == "cpp":
        from .cpp_ops import has_device

        if has_device(device.type):
            return True, ""
        return False, f"the compiled extension has no {device.type} kernels (built without it)"
    return False, f"unknown backend {name!r}"


def pick(requested: str, device: torch.device, dtypes: frozenset = frozenset()) -> str:
    """Resolve ``"auto"`` (or check a named backend) for parameters on ``device``."""
    odd_dtypes = sorted(str(d) for d in dtypes if d not in KERNEL_DTYPES)
    if requested != "auto":
        ok, reason = supports(requested, device)
        if not ok:
            raise BackendUnavailableError(reason)
        if odd_dtypes and requested != "torch":
            raise TypeError(
                f"backend {requested!r} supports float32, bfloat16 and float16 parameters, got {', '.join(odd_dtypes)} "
                "(backend='torch' takes any floating dtype)"
            )
        return requested
    if odd_dtypes:
        return "torch"
    # GPU: Triton first, then the CUDA extension; CPU: the C++ extension. torch always works.
    order = ("triton", "cpp") if device.type == "cuda" else ("cpp",)
    for name in order:
        if supports(name, device)[0]:
            return name
    return "torch"


def layout_problem(name: str, param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None = None) -> str:
    """Why backend ``name`` cannot address this parameter's tensors ("" when it can).

    The kernels walk memory as flat arrays: ``triton`` and ``cpp`` take dense tensors, the
    gradient and momentum buffer in their parameter's layout (all contiguous, or all with
    the same strides, e.g. channels_last); ``torch`` takes any. The rule is
    csrc/alig_ops.cpp's ``check_layout`` (and the Triton table builder's), written before
    any state is created so that a rejected step creates none.
    """
    tensors = (("the parameter", param), ("its gradient", grad), ("its momentum buffer", buffer))
    if name in ("triton", "cpp"):
        if not is_dense(param):
            return (f"the parameter is not dense (strides {param.stride()}); backend {name!r} walks a tensor's memory "
                    "as one flat array (make it contiguous, or use backend='torch')")
        fix = (f"backend {name!r} needs a gradient and momentum buffer in their parameter's memory layout "
               "(make them all contiguous, or use backend='torch')")
        for what, t in tensors[1:]:
            if t is None:
                continue
            if t.is_contiguous() and not param.is_contiguous():
                return f"{what} is contiguous (strides {t.stride()}) but the parameter is not (strides {param.stride()}); {fix}"
            if not t.is_contiguous() and (t.stride() != param.stride() or not is_dense(t)):
                return (f"{what} is not contiguous (strides {t.stride()}) and the parameter has other strides "
                        f"({param.stride()}); {fix}")
    return ""


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory, in any dimension order."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def get(name: str) -> Callable:
    fn = load(name)
    if fn is None:
        raise BackendUnavailableError(f"backend {name!r} failed to load: {why_unavailable(name)}")
    return fn


def available_backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """{backend: "ok" or the reason it cannot run on ``device``} (for humans and docs)."""
    device = torch.device(device)
    status = {}
    for name in BACKENDS:
        ok, reason = supports(name, device)
        status[name] = "ok" if ok else reason
    return status
