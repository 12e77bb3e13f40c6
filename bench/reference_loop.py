"""ALI-G the way the reference repository (oval-group/ali-g, alig/th/alig.py) runs it.

One tensor at a time: the squared gradient norm summed over the parameters, the step size
as a Python float (a host sync), ``p.add_`` per parameter, the momentum buffer's
``mul_``/``add_`` and the second ``p.add_``; then ``l2_projection`` over all parameters
(another host sync on its ``if``). This is the "before" every fused backend is timed
against; it is not the specification (that is ``tests/reference.py``).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def l2_projection(parameters, max_norm: float | None) -> None:
    """Scale all ``parameters`` jointly back onto the l2 ball of radius ``max_norm``."""
    if max_norm is None:
        return
    total_norm = torch.sqrt(sum(p.norm() ** 2 for p in parameters))
    if total_norm > max_norm:
        ratio = max_norm / total_norm
        for p in parameters:
            p.mul_(ratio)


class ReferenceLoopALIG(torch.optim.Optimizer):
    """Per-parameter ALI-G with standard Nesterov momentum; ``step(closure)`` as in the reference."""

    def __init__(self, params, max_lr: float | None = None, momentum: float = 0.0, max_norm: float | None = None, eps: float = 1e-5):
        super().__init__(list(params), dict(max_lr=max_lr, momentum=momentum, step_size=None))
        self.eps = eps
        self.max_norm = max_norm
        for group in self.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self._project()

    def _project(self) -> None:
        if self.max_norm is not None:
            l2_projection([p for g in self.param_groups for p in g["params"]], self.max_norm)

    @torch.no_grad()
    def step(self, closure):
        loss = closure()
        grad_sq_norm = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grad_sq_norm += p.grad.norm() ** 2
        step_size_unclipped = float(loss / (grad_sq_norm + self.eps))  # host sync
        for group in self.param_groups:
            step_size = step_size_unclipped if group["max_lr"] is None else min(step_size_unclipped, group["max_lr"])
            group["step_size"] = step_size
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.add_(p.grad, alpha=-step_size)
                if momentum:
                    buffer = self.state[p]["momentum_buffer"]
                    buffer.mul_(momentum).add_(p.grad, alpha=-step_size)
                    p.add_(buffer, alpha=momentum)
        self._project()
        return loss
