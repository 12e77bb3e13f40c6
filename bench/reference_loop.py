"""ALI-G the way the reference repository (oval-group/ali-g) runs it: the "before" every
fused backend is timed against. Not the specification (that is ``tests/reference.py``).

``ReferenceLoopALIG`` transcribes the reference's ``AliG.step`` (alig/th/alig.py) and
``l2_projection`` (alig/th/projection.py) call for call: the squared gradient norm summed
parameter by parameter (``p.grad.data.norm() ** 2``), the step size as a Python float (a
host sync), ``p.add_(-step_size, p.grad)`` (the deprecated scalar-first signature, which
torch still accepts), the momentum through a bound method per parameter, then the
projection (another host sync on its ``if``).

``ModernLoopALIG`` is the same arithmetic written with today's calls (``add_(t, alpha=)``,
no per-parameter method call; each deprecated call costs ~1 µs more): the report shows the
ratio against both.
"""

from __future__ import annotations

import warnings

import torch


def _scalar_first_add_works() -> bool:
    """torch still takes ``add_(Number, Tensor)``; it warns once, which is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.zeros(1).add_(1.0, torch.ones(1))
        except TypeError:
            return False
    return True


SCALAR_FIRST_ADD = _scalar_first_add_works()
NO_SCALAR_FIRST_ADD = "this torch no longer accepts add_(Number, Tensor), the reference's call"


@torch.no_grad()
def l2_projection(parameters, max_norm: float | None) -> None:
    """Scale all ``parameters`` jointly back onto the l2 ball of radius ``max_norm``."""
    if max_norm is None:
        return
    total_norm = torch.sqrt(sum(p.norm() ** 2 for p in parameters))
    if total_norm > max_norm:
        ratio = max_norm / total_norm
        for p in parameters:
            p *= ratio


class ReferenceLoopALIG(torch.optim.Optimizer):
    """The reference ``AliG`` (standard or adjusted Nesterov momentum); ``step(closure)``."""

    def __init__(self, params, max_lr=None, momentum=0.0, projection_fn=None, eps=1e-5, adjusted_momentum=False):
        if not SCALAR_FIRST_ADD:
            raise RuntimeError(NO_SCALAR_FIRST_ADD)
        params_list = list(params)
        super().__init__(params_list, dict(max_lr=max_lr, momentum=momentum, step_size=None))
        self.adjusted_momentum = adjusted_momentum
        self.projection = projection_fn
        self.eps = eps
        for group in self.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.data, requires_grad=False)
        self.apply_momentum = self.apply_momentum_adjusted if adjusted_momentum else self.apply_momentum_standard
        if self.projection is not None:
            self.projection()

    @torch.no_grad()
    def compute_step_size(self, loss):
        grad_sqrd_norm = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad_sqrd_norm += p.grad.data.norm() ** 2
        self.step_size_unclipped = float(loss / (grad_sqrd_norm + self.eps))  # host sync
        for group in self.param_groups:
            if group["max_lr"] is not None:
                group["step_size"] = min(self.step_size_unclipped, group["max_lr"])
            else:
                group["step_size"] = self.step_size_unclipped
        self.step_size = sum([g["step_size"] for g in self.param_groups]) / float(len(self.param_groups))

    @torch.no_grad()
    def step(self, closure):
        loss = closure()
        self.compute_step_size(loss)
        for group in self.param_groups:
            step_size = group["step_size"]
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.add_(-step_size, p.grad)
                if momentum:
                    self.apply_momentum(p, step_size, momentum)
        if self.projection is not None:
            self.projection()

    @torch.no_grad()
    def apply_momentum_standard(self, p, step_size, momentum):
        buffer = self.state[p]["momentum_buffer"]
        buffer.mul_(momentum).add_(-step_size, p.grad)
        p.add_(momentum, buffer)

    @torch.no_grad()
    def apply_momentum_adjusted(self, p, step_size, momentum):
        buffer = self.state[p]["momentum_buffer"]
        buffer.mul_(momentum).sub_(p.grad)
        p.add_(step_size * momentum, buffer)


class ModernLoopALIG(torch.optim.Optimizer):
    """The same per-parameter step (standard momentum) with today's torch calls."""

    def __init__(self, params, max_lr=None, momentum=0.0, max_norm=None, eps=1e-5):
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
