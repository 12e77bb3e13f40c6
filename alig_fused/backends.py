"""Which implementation of the step runs: the backend registry, the saved import errors, the picker.

Each backend is one record (``Backend``) added with ``register``: its name, the devices and
parameter dtypes it takes, its rank under ``"auto"`` per device, a lazy loader of its step
function and a check of the device once loaded. ``pick``, ``supports`` and
``available_backends`` read only the records (docs/backends.md, "Adding a backend").

A backend chosen by ``"auto"`` that fails to import is passed over, its reason kept for
``why_unavailable`` and ``available_backends`` (``alig-fused backends``); one asked for by
name raises ``BackendUnavailableError`` carrying the reason (the import error, or for "cpp"
why no prebuilt extension fits this torch and what the just-in-time build said).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

# What the fused kernels store (math in fp32); the torch path takes any floating dtype.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ANY_DEVICE = "*"  # an auto_rank key: every device type


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


def _runs_anywhere(device: torch.device) -> str:
    return ""


@dataclass(frozen=True)
class Backend:
    """One implementation of the step.

    The contract: ``load()`` returns ``step_fn(inputs: functional.StepInputs, cache: dict)
    -> None``. It reads the inputs (the flat tensor lists, the groups' hyper-parameters, the
    loss, GradScaler's scale and flag, an optional ``reduce_sums``), updates the parameters
    and momentum buffers in place, writes ``inputs.step_size_out`` and adds the skip to
    ``inputs.skipped_steps``, all without a host sync; ``cache`` is its own, kept by the
    optimizer between steps. It raises ValueError for tensors it cannot address.
    """

    name: str
    load: Callable[[], Callable]  # imports and returns the step function (may raise)
    # device type -> the parameter dtypes it takes there; None: any device, any floating dtype
    dtypes: Mapping[str, frozenset] | None
    # device type (or ANY_DEVICE) -> rank under "auto", lowest first; absent: only by name
    auto_rank: Mapping[str, int] = field(default_factory=dict)
    # device type -> the dtypes "auto" sends to it (None: all of ``dtypes``)
    auto_dtypes: Mapping[str, frozenset] | None = None
    # once loaded: why it cannot run on this device ("" when it can), e.g. no CUDA kernels
    device_problem: Callable[[torch.device], str] = _runs_anywhere
    # its kernels walk each tensor's memory as one flat array (``layout_problem``)
    flat_memory: bool = False

    def takes(self, device: torch.device) -> frozenset | None:
        """The dtypes it takes on ``device`` (None: any; empty: not this device)."""
        return None if self.dtypes is None else self.dtypes.get(device.type, frozenset())

    def auto_takes(self, device: torch.device) -> frozenset | None:
        return self.takes(device) if self.auto_dtypes is None else self.auto_dtypes.get(device.type, frozenset())

    def rank(self, device: torch.device) -> int | None:
        return self.auto_rank.get(device.type, self.auto_rank.get(ANY_DEVICE))


REGISTRY: dict[str, Backend] = {}
BACKENDS: tuple[str, ...] = ()  # the registered names, in registration order
_loaded: dict[str, Callable] = {}
_errors: dict[str, str] = {}


def _add(registry: dict, loaded: dict, errors: dict, backend: Backend) -> Backend:
    registry[backend.name] = backend
    loaded.pop(backend.name, None)
    errors.pop(backend.name, None)
    return backend


def _load_from(registry: dict, loaded: dict, errors: dict, name: str) -> Callable | None:
    """``registry[name].load()``, once; None after a failure, whose reason ``errors`` keeps."""
    if name in loaded:
        return loaded[name]
    if name in errors:
        return None
    try:
        loaded[name] = registry[name].load()
    except Exception as exc:  # ImportError, OSError from a bad .so, a failed build ...
        errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    return loaded[name]


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend; ``FusedALIG(backend=name)`` and ``"auto"`` then see it."""
    global BACKENDS
    _add(REGISTRY, _loaded, _errors, backend)
    BACKENDS = tuple(REGISTRY)
    return backend


def load(name: str) -> Callable | None:
    """The step function of backend ``name``, or None (the reason is kept for ``why``)."""
    return _load_from(REGISTRY, _loaded, _errors, name)


def why_unavailable(name: str) -> str:
    return _errors.get(name, "")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(name: str, device: torch.device) -> tuple[bool, str]:
    """Can backend ``name`` run on ``device``? (ok, reason when not)."""
    backend = REGISTRY.get(name)
    if backend is None:
        return False, f"unknown backend {name!r}"
    if backend.takes(device) == frozenset():
        return False, f"backend {name!r} has no kernels for {device.type} tensors"
    if load(name) is None:
        return False, f"backend {name!r} failed to load: {why_unavailable(name)}"
    problem = backend.device_problem(device)
    return (False, problem) if problem else (True, "")


def _odd_dtypes(takes: frozenset | None, dtypes: frozenset) -> list[torch.dtype]:
    return [] if takes is None else sorted((d for d in dtypes if d not in takes), key=str)


def _dtype_names(dtypes: frozenset) -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def pick(requested: str, device: torch.device, dtypes: frozenset = frozenset()) -> str:
    """Resolve ``"auto"`` (or check a named backend) for parameters on ``device``."""
    if requested != "auto":
        ok, reason = supports(requested, device)
        if not ok:
            raise BackendUnavailableError(reason)
        odd = _odd_dtypes(REGISTRY[requested].takes(device), dtypes)
        if odd:
            raise TypeError(
                f"backend {requested!r} supports {_dtype_names(REGISTRY[requested].takes(device))} parameters on "
                f"{device.type}, got {', '.join(map(str, odd))} (backend='torch' takes any floating dtype)"
            )
        return requested
    ranked = sorted((b.rank(device), b.name) for b in REGISTRY.values() if b.rank(device) is not None)
    for _, name in ranked:
        if not _odd_dtypes(REGISTRY[name].auto_takes(device), dtypes) and supports(name, device)[0]:
            return name
    raise BackendUnavailableError(f"no registered backend runs on {device.type} with {sorted(map(str, dtypes))}")


def layout_problem(name: str, param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None = None) -> str:
    """Why backend ``name`` cannot address this parameter's tensors ("" when it can).

    The kernels walk memory as flat arrays: ``triton`` and ``cpp`` take dense tensors, the
    gradient and momentum buffer in their parameter's layout (all contiguous, or all with
    the same strides, e.g. channels_last): the backends registered with ``flat_memory``;
    ``torch`` takes any. The rule is
    csrc/alig_ops.cpp's ``check_layout`` (and the Triton table builder's), written before
    any state is created so that a rejected step creates none.
    """
    tensors = (("the parameter", param), ("its gradient", grad), ("its momentum buffer", buffer))
    if REGISTRY[name].flat_memory:
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
    """Are ``t``'s elements one gap-free span of memory, from ``data_ptr()`` on? (contiguous,
    channels_last, any permutation of a contiguous tensor: strides are never negative in
    torch, so element 0 is the lowest address.) The rule of every ``flat_memory`` backend."""
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


# ---- the three backends ---------------------------------------------------------------


def _load_torch() -> Callable:
    from .functional import torch_alig

    return torch_alig


def _load_triton() -> Callable:
    from .triton_kernels import triton_alig  # noqa: WPS433 (imports triton)

    return triton_alig


def _triton_device_problem(device: torch.device) -> str:
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
        return ""
    return f"backend 'triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), not on {device.type}"


def _load_cpp() -> Callable:
    from .cpp_ops import cpp_alig  # noqa: WPS433 (loads the compiled extension)

    return cpp_alig


def _cpp_device_problem(device: torch.device) -> str:
    from .cpp_ops import has_device

    return "" if has_device(device.type) else f"the compiled extension has no {device.type} kernels (built without it)"


_KERNEL = frozenset(KERNEL_DTYPES)
# torch: any device, any floating dtype; the last resort of "auto" everywhere.
register(Backend("torch", _load_torch, dtypes=None, auto_rank={ANY_DEVICE: 100}))
# GPU: Triton first, then the CUDA extension. On CPU Triton only runs interpreted (slow, by name).
register(Backend("triton", _load_triton, dtypes={"cuda": _KERNEL, "cpu": _KERNEL}, auto_rank={"cuda": 0},
                 device_problem=_triton_device_problem, flat_memory=True))
# The C++ CPU kernels take float64 storage by name, with their math in fp32: over
# tests/test_cpp.py's 50-step problems 0.6-2.3e-7 from the float64 reference, where the
# torch path (float64 math) is 3e-13-2e-8 off; so "auto" keeps float64 models on torch.
# The CUDA kernel compiles a float64 path that no test has run yet: not offered on CUDA.
register(Backend("cpp", _load_cpp, dtypes={"cpu": _KERNEL | {torch.float64}, "cuda": _KERNEL},
                 auto_rank={"cuda": 1, "cpu": 0}, auto_dtypes={"cpu": _KERNEL, "cuda": _KERNEL},
                 device_problem=_cpp_device_problem, flat_memory=True))


# ---- Lookahead's slow-weight updates: the same records, a registry of their own ---------------
#
# ``load()`` returns ``update(fast, slow, counter, alpha, k, cache) -> None``: ``counter += 1``
# and, when it reaches a multiple of k, ``slow += alpha * (fast - slow); fast = slow``, with
# no host sync on a GPU; ``cache`` is its own (alig_fused/lookahead.py picks one per step).

LOOKAHEAD_REGISTRY: dict[str, Backend] = {}
_lookahead_loaded: dict[str, Callable] = {}
_lookahead_errors: dict[str, str] = {}


def register_lookahead(backend: Backend) -> Backend:
    """Add (or replace) a Lookahead update; ``Lookahead(backend=name)`` and ``"auto"`` see it."""
    return _add(LOOKAHEAD_REGISTRY, _lookahead_loaded, _lookahead_errors, backend)


def load_lookahead(name: str) -> Callable | None:
    """The update function of Lookahead backend ``name``, or None (``lookahead_why_unavailable``)."""
    return _load_from(LOOKAHEAD_REGISTRY, _lookahead_loaded, _lookahead_errors, name)


def lookahead_why_unavailable(name: str) -> str:
    return _lookahead_errors.get(name, "")


def _load_torch_lookahead() -> Callable:
    from .lookahead import torch_lookahead

    return torch_lookahead


def _load_triton_lookahead() -> Callable:
    from .triton_lookahead import triton_lookahead  # noqa: WPS433 (imports triton)

    return triton_lookahead


# torch: any device and dtype, the last resort; triton: one launch on CUDA (interpreted on
# CPU only by name), for the tensors it can address (flat_memory: dense, the slow weight laid
# out as its parameter).
register_lookahead(Backend("torch", _load_torch_lookahead, dtypes=None, auto_rank={ANY_DEVICE: 100}))
register_lookahead(Backend("triton", _load_triton_lookahead, dtypes={"cuda": _KERNEL, "cpu": _KERNEL},
                           auto_rank={"cuda": 0}, device_problem=_triton_device_problem, flat_memory=True))
