"""Lookahead (Zhang et al., 2019) around any torch optimizer, with its counter on device.

Every k inner steps:  slow += alpha * (fast - slow);  fast = slow.

The step counter is a device tensor, so the wrapper never reads it on the host when the
parameters live on a GPU. Backends of the update (``backend=``):

- ``"triton"``: one launch per step for the whole model (``triton_lookahead``); the kernel
  reads the counter, increments it, and touches no parameter unless ``counter % k == 0``.
  No branch on the host, CUDA-graph capturable. CUDA tensors; CPU tensors only through
  the Triton interpreter (TRITON_INTERPRET=1, asked for by name).
- ``"torch"``: on a GPU, a masked lerp pair every step whose weight is alpha on a
  synchronisation step and 0 otherwise (no branch, capturable); on the CPU the counter is
  host memory and reading it costs nothing, so the update only runs on synchronisation steps.
- ``"auto"``: triton for CUDA tensors it can address (one device; float32, bfloat16,
  float16; dense) when triton imports, else torch.

The updates are registered records (``backends.register_lookahead``; docs/backends.md).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends
from .backends import BackendUnavailableError
from .optim import _checked_count

__all__ = ["Lookahead", "torch_lookahead"]

def _check_k_alpha(k: Any, alpha: Any) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"invalid Lookahead k {k!r}: must be an int >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"invalid Lookahead alpha {alpha!r}: must be a number in [0, 1]")


class Lookahead(Optimizer):
    """Wrap ``optimizer``: ``Lookahead(FusedALIG(model.parameters(), ...), k=5, alpha=0.5)``.

    ``param_groups`` are the inner optimizer's (LR schedulers work on the wrapper);
    ``step`` forwards every argument (``loss=`` included) to the inner step, and GradScaler's
    fused protocol (``grad_scale``/``found_inf``) reaches the inner optimizer.
    ``backend``: ``"auto"``, ``"triton"`` or ``"torch"`` (module docstring); ``"triton"``
    asked for where it cannot run raises ``BackendUnavailableError`` with the reason.
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5, backend: str = "auto"):
        choices = ("auto", *backends.LOOKAHEAD_REGISTRY)
        if backend not in choices:
            raise ValueError(f"unknown Lookahead backend {backend!r}; choose from {', '.join(map(repr, choices))}")
        _check_k_alpha(k, alpha)
        if isinstance(optimizer, Lookahead):
            raise TypeError("Lookahead wraps the inner optimizer, not another Lookahead")
        # Optimizer.__init__ gives the wrapper what every torch optimizer has (the hook dicts,
        # ``state``, the profiled and hooked ``step``), whatever the torch version. It runs
        # before ``self.optimizer`` is set, so the groups it would build go nowhere (the
        # setter and add_param_group below): the groups are the inner optimizer's.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.k = k
        self.alpha = float(alpha)
        self._lookahead_step: Tensor | None = None
        self.backend = backend
        self.last_backend: str | None = None  # the backend of the last update
        self._cache: dict = {}  # the triton backend's device tables
        for p in self._params():
            self.state[p]["slow_param"] = p.detach().clone()
        if backend == "triton" and self._params():
            self._pick_backend(self._params())  # a named backend that cannot run fails now

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        if "optimizer" in self.__dict__:  # not during Optimizer.__init__ (see __init__)
            self.optimizer.param_groups = value

    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        return getattr(self.optimizer, "_step_supports_amp_scaling", False)

    @property
    def lookahead_step(self) -> Tensor:
        """Inner steps taken so far (a device tensor)."""
        if self._lookahead_step is None:
            params = self._params()
            device = params[0].device if params else torch.device("cpu")
            self._lookahead_step = torch.zeros((), dtype=torch.int64, device=device)
        return self._lookahead_step

    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        # The update's backend is resolved (and a named one's tensors checked) before the
        # inner step: one that cannot run raises with nothing stepped.
        backend = self._pick_backend(self._params(), check_tensors=True)
        for attr in ("grad_scale", "found_inf"):  # set by GradScaler on this wrapper
            if hasattr(self, attr):
                setattr(self.optimizer, attr, getattr(self, attr))
        try:
            loss = self.optimizer.step(closure, **kwargs) if closure is not None else self.optimizer.step(**kwargs)
        finally:
            for attr in ("grad_scale", "found_inf"):
                if hasattr(self, attr) and hasattr(self.optimizer, attr):
                    delattr(self.optimizer, attr)
        self._sync_slow_weights(backend)
        return loss

    def _pick_backend(self, fast: list[Tensor], check_tensors: bool = False) -> str:
        """``self.backend`` resolved for these parameters from the registered updates, lowest
        auto rank first (raises for a named one that cannot run; with ``check_tensors``, a
        ValueError for a tensor it cannot address)."""
        device = fast[0].device if fast else self.lookahead_step.device
        if self.backend == "auto":
            records = backends.LOOKAHEAD_REGISTRY.values()
            names = [name for _, name in sorted((r.rank(device), r.name) for r in records if r.rank(device) is not None)]
        else:
            names = [self.backend]
        for name in names:
            reason = self._unavailable(name, fast)
            if not reason and backends.LOOKAHEAD_REGISTRY[name].flat_memory and (self.backend == "auto" or check_tensors):
                problem = self._unaddressable(fast)
                if problem and self.backend != "auto":
                    raise ValueError(f"Lookahead backend {name!r}: {problem} (use backend='torch' for these)")
                reason = problem
            if not reason:
                return name
            if self.backend != "auto":
                raise BackendUnavailableError(f"Lookahead backend {name!r}: {reason}")
        raise BackendUnavailableError(f"no registered Lookahead update runs on {device.type}")  # torch always does

    def _unavailable(self, name: str, fast: list[Tensor]) -> str:
        """Why update ``name`` cannot run on these parameters ("" when it can)."""
        record = backends.LOOKAHEAD_REGISTRY[name]
        devices = {p.device for p in fast} | {self.lookahead_step.device}
        if record.dtypes is None:  # torch: any device, any dtype
            return ""
        if len(devices) > 1:
            names = ", ".join(sorted(map(str, devices)))
            return f"the parameters and the step counter are on several devices ({names})"
        (device,) = devices
        interpreted = device.type == "cpu" and self.backend == name and backends.triton_interpreting()
        if device.type != "cuda" and not interpreted:  # decided before importing triton
            return (f"runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 and backend={name!r}), "
                    f"not on {device.type}")
        if backends.load_lookahead(name) is None:
            return f"{name} failed to load: {backends.lookahead_why_unavailable(name)}"
        return record.device_problem(device)

    def _unaddressable(self, fast: list[Tensor]) -> str:
        """What the triton update cannot address in these tensors ("" when nothing)."""
        for i, p in enumerate(fast):
            slow = self.state.get(p, {}).get("slow_param", p)  # a missing one is made as a clone of p
            if p.dtype not in backends.KERNEL_DTYPES:
                return f"parameter {i} is {p.dtype}; the Triton kernel takes float32, bfloat16 and float16 parameters"
            # The kernel's rule (triton_kernels' layout check): dense, the slow weight laid out as
            # its parameter (a clone keeps a dense tensor's strides).
            if not backends.is_dense(p):
                return (f"parameter {i} (shape {tuple(p.shape)}, strides {p.stride()}) is not contiguous nor dense "
                        "(a view with gaps); the Triton kernel addresses tensors as flat spans of memory")
            if slow is not p and slow.stride() != p.stride():
                return (f"the slow weight of parameter {i} has strides {slow.stride()}, its parameter {p.stride()}; "
                        "the Triton kernel needs them laid out alike")
        return ""

    def _sync_slow_weights(self, backend: str | None = None) -> None:
        counter = self.lookahead_step
        params = self._params()
        if backend is None:
            backend = self._pick_backend(params, check_tensors=True)
        for p in params:
            if "slow_param" not in self.state[p]:
                self.state[p]["slow_param"] = p.detach().clone()
        self.last_backend = backend
        slow = [self.state[p]["slow_param"] for p in params]
        backends.load_lookahead(backend)(params, slow, counter, self.alpha, self.k, self._cache)

    def state_dict(self) -> dict[str, Any]:
        inner = self.optimizer.state_dict()
        slow = {i: self.state[p]["slow_param"] for i, p in enumerate(self._params()) if "slow_param" in self.state[p]}
        return {
            "inner": inner,
            "lookahead": {"k": self.k, "alpha": self.alpha, "step": self.lookahead_step.clone(), "slow_params": slow},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lookahead's part is checked first, then the inner optimizer loads (checking its own
        # part before it changes anything), then Lookahead's part is applied: a bad
        # state_dict leaves both as they were.
        if not isinstance(state_dict, dict) or "inner" not in state_dict or "lookahead" not in state_dict:
            raise ValueError("not a Lookahead state_dict (expected keys 'inner' and 'lookahead')")
        saved = state_dict["lookahead"]
        if not isinstance(saved, dict) or not {"k", "alpha", "step", "slow_params"} <= saved.keys():
            raise ValueError("not a Lookahead state_dict: 'lookahead' needs 'k', 'alpha', 'step' and 'slow_params'")
        k, alpha = saved["k"], saved["alpha"]
        _check_k_alpha(k, alpha)
        step = _checked_count(saved["step"], "state_dict['lookahead']['step']")
        params = self._params()
        slow_params = saved["slow_params"]
        if not isinstance(slow_params, dict):
            raise TypeError(f"state_dict['lookahead']['slow_params'] must be a dict, got {type(slow_params).__name__}")
        for i, slow in slow_params.items():
            where = f"state_dict['lookahead']['slow_params'][{i!r}]"
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"{where}: not the index of one of the {len(params)} parameters")
            if not isinstance(slow, Tensor) or slow.is_complex() or not slow.is_floating_point():
                raise ValueError(f"{where} must be a real floating-point tensor")
            if slow.shape != params[i].shape:
                raise ValueError(f"{where} has shape {tuple(slow.shape)}, its parameter {tuple(params[i].shape)}")
        self.optimizer.load_state_dict(state_dict["inner"])
        self.k, self.alpha = k, float(alpha)
        self.lookahead_step.copy_(step)
        for i, slow in slow_params.items():
            p = params[i]
            self.state[p]["slow_param"] = slow.detach().to(device=p.device, dtype=p.dtype).clone()

    def add_param_group(self, param_group: dict) -> None:
        if "optimizer" not in self.__dict__:  # Optimizer.__init__ offering the inner's own groups
            return
        self.optimizer.add_param_group(param_group)
        for p in self.optimizer.param_groups[-1]["params"]:
            self.state[p]["slow_param"] = p.detach().clone()

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, backend={self.backend!r}, optimizer={self.optimizer!r})"


@torch.no_grad()
def torch_lookahead(fast: list[Tensor], slow: list[Tensor], counter: Tensor, alpha: float, k: int,
                    cache: dict | None = None) -> None:
    """The torch update (backends.LOOKAHEAD_REGISTRY): foreach lerps per device and dtype."""
    counter.add_(1)
    by_key: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for p, s in zip(fast, slow):
        fast_part, slow_part = by_key.setdefault((p.device, p.dtype), ([], []))
        fast_part.append(p)
        slow_part.append(s)
    if counter.device.type == "cpu":
        if int(counter) % k == 0:  # host memory: no device to wait for
            for fast_part, slow_part in by_key.values():
                torch._foreach_lerp_(slow_part, fast_part, alpha)
                torch._foreach_copy_(fast_part, slow_part)
        return
    # On a GPU: a masked update every step, weights from the device counter.
    is_sync = (counter % k == 0).to(torch.float32)
    for fast_part, slow_part in by_key.values():
        slow_weight = (is_sync * alpha).to(slow_part[0].dtype)
        fast_weight = is_sync.to(fast_part[0].dtype)
        torch._foreach_lerp_(slow_part, fast_part, [slow_weight] * len(slow_part))
        # lerp with weight 1 returns its end point exactly: fast becomes slow bit for bit
        torch._foreach_lerp_(fast_part, slow_part, [fast_weight] * len(fast_part))
