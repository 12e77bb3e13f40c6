"""Lookahead (Zhang et al., 2019) around any torch optimizer, with its counter on device.

Every k inner steps:  slow += alpha * (fast - slow);  fast = slow.

The step counter is a device tensor, so the wrapper never reads it on the host when the
parameters live on a GPU: there the update runs every step as a masked lerp whose weight is
alpha on a synchronisation step and 0 otherwise (no branch, CUDA-graph capturable). On the
CPU the counter is host memory and reading it costs nothing, so the update only runs on
synchronisation steps.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["Lookahead"]


class Lookahead(Optimizer):
    """Wrap ``optimizer``: ``Lookahead(FusedALIG(model.parameters(), ...), k=5, alpha=0.5)``.

    ``param_groups`` are the inner optimizer's (LR schedulers work on the wrapper);
    ``step`` forwards every argument (``loss=`` included) to the inner step, and GradScaler's
    fused protocol (``grad_scale``/``found_inf``) reaches the inner optimizer.
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"invalid Lookahead k {k!r}: must be an int >= 1")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"invalid Lookahead alpha {alpha}: must be in [0, 1]")
        if isinstance(optimizer, Lookahead):
            raise TypeError("Lookahead wraps the inner optimizer, not another Lookahead")
        self.optimizer = optimizer
        self.k = k
        self.alpha = float(alpha)
        # Optimizer.__init__ is not called: groups and defaults are the inner optimizer's.
        self.defaults = optimizer.defaults
        self.state: defaultdict = defaultdict(dict)  # slow weights, keyed by parameter
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}
        self._lookahead_step: Tensor | None = None
        for p in self._params():
            self.state[p]["slow_param"] = p.detach().clone()

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
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
        for attr in ("grad_scale", "found_inf"):  # set by GradScaler on this wrapper
            if hasattr(self, attr):
                setattr(self.optimizer, attr, getattr(self, attr))
        try:
            loss = self.optimizer.step(closure, **kwargs) if closure is not None else self.optimizer.step(**kwargs)
        finally:
            for attr in ("grad_scale", "found_inf"):
                if hasattr(self, attr) and hasattr(self.optimizer, attr):
                    delattr(self.optimizer, attr)
        self._sync_slow_weights()
        return loss

    def _sync_slow_weights(self) -> None:
        counter = self.lookahead_step
        counter.add_(1)
        by_key: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for p in self._params():
            if "slow_param" not in self.state[p]:
                self.state[p]["slow_param"] = p.detach().clone()
            fast, slow = by_key.setdefault((p.device, p.dtype), ([], []))
            fast.append(p)
            slow.append(self.state[p]["slow_param"])
        if counter.device.type == "cpu":
            if int(counter) % self.k == 0:  # host memory: no device to wait for
                for fast, slow in by_key.values():
                    torch._foreach_lerp_(slow, fast, self.alpha)
                    torch._foreach_copy_(fast, slow)
            return
        # On a GPU: a masked update every step, weights from the device counter.
        is_sync = (counter % self.k == 0).to(torch.float32)
        for fast, slow in by_key.values():
            slow_weight = (is_sync * self.alpha).to(slow[0].dtype)
            fast_weight = is_sync.to(fast[0].dtype)
            torch._foreach_lerp_(slow, fast, [slow_weight] * len(slow))
            # lerp with weight 1 returns its end point exactly: fast becomes slow bit for bit
            torch._foreach_lerp_(fast, slow, [fast_weight] * len(fast))

    def state_dict(self) -> dict[str, Any]:
        inner = self.optimizer.state_dict()
        slow = {i: self.state[p]["slow_param"] for i, p in enumerate(self._params()) if "slow_param" in self.state[p]}
        return {
            "inner": inner,
            "lookahead": {"k": self.k, "alpha": self.alpha, "step": self.lookahead_step.clone(), "slow_params": slow},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "inner" not in state_dict or "lookahead" not in state_dict:
            raise ValueError("not a Lookahead state_dict (expected keys 'inner' and 'lookahead')")
        self.optimizer.load_state_dict(state_dict["inner"])
        saved = state_dict["lookahead"]
        self.k, self.alpha = int(saved["k"]), float(saved["alpha"])
        self.lookahead_step.copy_(saved["step"])
        params = self._params()
        for i, slow in saved["slow_params"].items():
            p = params[int(i)]
            self.state[p]["slow_param"] = slow.detach().to(device=p.device, dtype=p.dtype).clone()

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)
        for p in self.optimizer.param_groups[-1]["params"]:
            self.state[p]["slow_param"] = p.detach().clone()

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"
