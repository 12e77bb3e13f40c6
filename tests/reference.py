"""The specification: ALI-G written plainly, one parameter at a time, as the reference
implementation (oval-group/ali-g, alig/th/alig.py) does it, extended with f_star, the
scaling factor c, per-group hyper-parameters and the l2-ball projection of docs/design.md §1.

Run it on float64 copies of the parameters to get the trajectory every backend must follow.
"""

from __future__ import annotations

import math

import torch

FLT_MAX = float(torch.finfo(torch.float32).max)


class ReferenceALIG:
    """Per-parameter loop. groups: list of dicts with 'params' and the hyper-parameters."""

    def __init__(self, groups, eps_default=1e-5):
        self.groups = []
        for g in groups:
            g = dict(g)
            g.setdefault("lr", None)
            g.setdefault("momentum", 0.0)
            g.setdefault("adjusted_momentum", False)
            g.setdefault("max_norm", None)
            g.setdefault("eps", eps_default)
            g.setdefault("f_star", 0.0)
            g.setdefault("scaling", 1.0)
            g["params"] = list(g["params"])
            self.groups.append(g)
        self.buffers = {}
        self.step_sizes = [None] * len(self.groups)
        self.skipped = 0
        for g in self.groups:  # the reference projects once at construction
            # ... over every parameter of the group. Here frozen ones (requires_grad=False)
            # are left out of the norm and the scaling, as the per-step projection leaves out
            # parameters without a gradient: FusedALIG never touches a frozen parameter.
            self._project(g, [p for p in g["params"] if p.requires_grad])

    @torch.no_grad()
    def step(self, loss: float):
        grads = [p.grad for g in self.groups for p in g["params"] if p.grad is not None]
        grad_sq_norm = 0.0
        for grad in grads:
            grad_sq_norm += float(grad.double().norm()) ** 2
        # Skipped for a non-finite loss, or ||g||^2 not below float32's max (FusedALIG's rule,
        # one for every backend whether it sums in float32 or float64).
        if not (math.isfinite(loss) and grad_sq_norm < FLT_MAX):
            self.skipped += 1
            self.step_sizes = [0.0] * len(self.groups)
            return
        for k, g in enumerate(self.groups):
            step_size = max(loss - g["f_star"], 0.0) / (g["scaling"] * grad_sq_norm + g["eps"])
            if g["lr"] is not None:
                step_size = min(step_size, g["lr"])
            self.step_sizes[k] = step_size
            momentum = g["momentum"]
            stepped = []
            for p in g["params"]:
                if p.grad is None:
                    continue
                stepped.append(p)
                grad = p.grad.to(p.dtype)
                p.add_(grad, alpha=-step_size)
                if momentum:
                    if p not in self.buffers:
                        self.buffers[p] = torch.zeros_like(p)
                    buf = self.buffers[p]
                    if g["adjusted_momentum"]:
                        buf.mul_(momentum).sub_(grad)
                        p.add_(buf, alpha=step_size * momentum)
                    else:
                        buf.mul_(momentum).add_(grad, alpha=-step_size)
                        p.add_(buf, alpha=momentum)
            self._project(g, stepped)

    @staticmethod
    @torch.no_grad()
    def _project(g, params):
        if g["max_norm"] is None or not params:
            return
        total_norm = math.sqrt(sum(float(p.double().norm()) ** 2 for p in params))
        if total_norm > g["max_norm"]:
            for p in params:
                p.mul_(g["max_norm"] / total_norm)
