"""Drop-in names of the reference implementation (oval-group/ali-g, ``alig.th``).

A user of the reference changes one import line::

    from alig.th import AliG, l2_projection        # before
    from alig_fused import AliG, l2_projection     # after

and keeps the call pattern ``optimizer.step(lambda: float(loss))``. The step runs on the
fused path; ``l2_projection`` needs no host sync (the reference's ``if total_norm > max_norm``
reads the norm on the host).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .functional import project_onto_ball
from .optim import FusedALIG

__all__ = ["AliG", "l2_projection"]


class AliG(FusedALIG):
    """``AliG(params, max_lr=None, momentum=0, projection_fn=None, eps=1e-5, adjusted_momentum=False)``

    The reference's signature and argument order on top of :class:`FusedALIG`
    (``backend="auto"``). ``step_size`` is the mean step size over the groups, as in the
    reference, and ``step_size_unclipped`` the Polyak step before the cap
    (``loss / (||g||^2 + eps)``), both as 0-dim device tensors (the reference's are floats,
    read on the host each step; ``float()`` them where you log, or read
    :meth:`~FusedALIG.history` every N steps to avoid the sync). None before the first step.
    Keeping ``step_size_unclipped`` costs one extra read of the gradients per step (their
    norm: the fused kernels do not export ||g||^2).
    """

    _wants_diagnostics = True

    def __init__(
        self,
        params: Iterable,
        max_lr: float | None = None,
        momentum: float = 0,
        projection_fn: Callable[[], Any] | None = None,
        eps: float = 1e-5,
        adjusted_momentum: bool = False,
    ):
        super().__init__(
            params,
            lr=max_lr,
            momentum=momentum,
            adjusted_momentum=adjusted_momentum,
            eps=eps,
            projection_fn=projection_fn,
        )

    @property
    def step_size(self) -> Tensor | None:
        sizes = [g["step_size"] for g in self.param_groups if isinstance(g.get("step_size"), Tensor)]
        return torch.stack(sizes).mean() if sizes else None

    @property
    def step_size_unclipped(self) -> Tensor | None:
        unclipped = self._last_diagnostics.get("step_size_unclipped")
        return None if unclipped is None else unclipped[0]  # the same for every group (f_star = 0, c = 1)


@torch.no_grad()
def l2_projection(parameters: Iterable[Tensor], max_norm: float | None) -> None:
    """Scale ``parameters`` jointly onto the l2 ball of radius ``max_norm`` (if outside): the
    reference's projection_fn, as ``functional.project_onto_ball``."""
    if max_norm is None:
        return
    project_onto_ball(list(parameters), max_norm)
