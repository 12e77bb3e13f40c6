"""FusedMoMo: MoMo (fabian-sp/MoMo) with FusedALIG's fused, sync-free step (see momo.py)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from . import backends
from .functional import GroupHParams, StepInputs
from .momo import STATE_NAMES, MomoState, momo_group_hparams, momo_step
from .optim import FusedALIG, _in_step_state, _number

__all__ = ["FusedMoMo"]


class FusedMoMo(FusedALIG):
    r"""MoMo (Schaipp et al., ICML 2024), the model-based Polyak step with momentum, fused.

    Per step, with the averages (factor ``beta``) of the loss ``f_bar``, of the gradient
    ``d`` (per tensor) and of ``<w, g>`` ``gamma_bar``, and ``dot = <w, d>``,
    ``norm = ||d||^2`` over all parameters, per group with ``lr`` and ``weight_decay``
    lambda:

    .. math::
        \tau = \min\Big(\text{lr},\ \frac{\max((1+\text{lr}\lambda)(\bar f - lb) + dot
               - (1+\text{lr}\lambda)\bar\gamma,\ 0)}{norm}\Big),\qquad
        w \leftarrow \frac{w - \tau d}{1 + \text{lr}\lambda}

    as the reference ``momo.Momo`` with ``bias_correction=False``. ``use_fstar=True`` is its
    online estimate of the lower bound ``lb`` (starting from, and never below, ``lb``).
    ``norm = 0`` (d = 0: no direction) gives tau = 0. Everything FusedALIG's step does
    applies: the loss rule (``loss=``, :meth:`accumulate_loss`, the closure), GradScaler,
    the loss averaged across ranks, sharded sums reduced in one collective, ``skipped_steps``
    (a non-finite loss or gradient skips the step on the device, the averages unchanged),
    :meth:`diagnostics` (tau, the unclipped step, lb) and :meth:`enable_history`.
    ``f_bar``, ``gamma_bar``, ``lb`` and the step counter are device tensors, saved by
    ``state_dict``. ``beta``, ``lb`` and ``use_fstar`` are global (the averages are);
    ``lr`` and ``weight_decay`` may differ per group.
    """

    _buffer_key = "grad_avg"  # the reference's name for d
    _momo_state = _in_step_state("momo_state")  # a plain object's attribute: see optim._StepState
    _extra_diagnostics = ("lb", "f_bar")

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1.0,
        weight_decay: float = 0.0,
        beta: float = 0.9,
        lb: float = 0.0,
        use_fstar: bool = False,
        backend: str = "auto",
        *,
        momentum: float | None = None,
        process_group: Any = None,
        average_loss: bool = True,
        **unsupported: Any,
    ):
        if unsupported:
            names = ", ".join(map(repr, unsupported))
            hint = ""
            if "bias_correction" in unsupported:
                hint = "; only bias_correction=False (the reference's default) is implemented"
            raise TypeError(f"FusedMoMo got unexpected argument(s) {names}{hint}")
        if momentum is not None:  # torch's name for the same factor
            beta = momentum
        beta = _number(beta, "beta", "FusedMoMo")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"FusedMoMo: invalid beta {beta}: must be in [0, 1)")
        lb = _number(lb, "lb", "FusedMoMo")
        if not math.isfinite(lb):
            raise ValueError(f"FusedMoMo: invalid lb {lb}: must be finite")
        if not isinstance(use_fstar, bool):
            raise TypeError("FusedMoMo: use_fstar must be a bool")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from 'auto', {', '.join(map(repr, backends.BACKENDS))}")
        if not isinstance(average_loss, bool):
            raise TypeError("average_loss must be a bool")
        defaults = dict(lr=lr, weight_decay=weight_decay)
        _check_momo_group(defaults, "defaults", read_device_lr=True)
        self.beta = beta
        self.initial_lb = lb
        self.use_fstar = use_fstar
        self._init_common(params, defaults, backend, None, process_group, average_loss)

    # -- the hooks FusedALIG's step calls ------------------------------------------------

    def _check_group(self, group: dict, where: str, read_device_lr: bool = False) -> None:
        _check_momo_group(group, where, read_device_lr)

    def _group_hparams(self, group: dict) -> GroupHParams:
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            lr = float(lr)
        elif lr.device.type == "cpu" and not torch.compiler.is_compiling():
            lr = lr.item()  # host memory: no device sync
        return momo_group_hparams(lr, self.beta, float(group["weight_decay"]))

    def _project_at_start(self) -> None:  # MoMo has no projection
        return None

    def _prepare_for_scheduler(self) -> None:
        seen = set()
        for group in self.param_groups:  # per-group tensors, as FusedALIG does
            lr = group["lr"]
            if isinstance(lr, Tensor):
                if id(lr) in seen:
                    group["lr"] = lr.clone()
                seen.add(id(lr))

    def _run_backend(self, backend: str, step: StepInputs) -> None:
        loss = step.loss
        state = self.momo_state(loss.device)
        result = momo_step(backend, step, state, self.beta, self.initial_lb, self.use_fstar,
                           self._cache.setdefault(("momo", backend), {}))
        step.step_size_out.copy_(result.tau)
        self._record(
            result.tau,
            result.polyak,
            (result.polyak > result.tau) & ~result.skip,
            result.grad_sq_norm,
            loss,
            result.skip,
            lb=state.lb,
            f_bar=state.f_bar,
        )

    # -- state ----------------------------------------------------------------------------

    def momo_state(self, device: torch.device | None = None) -> MomoState:
        """MoMo's global state on the device: ``.step``, ``.f_bar``, ``.gamma_bar``, ``.lb`` (0-dim)."""
        if device is None:
            device = self._params_device()
        state = self._momo_state
        if state is None:
            state = MomoState(
                step=torch.zeros((), dtype=torch.int64, device=device),
                averages=torch.tensor([0.0, 0.0, self.initial_lb], dtype=torch.float64, device=device),
            )
        elif state.step.device != device:
            state = MomoState(*(t.to(device) for t in state))
        self._momo_state = state
        return state

    @property
    def lb(self) -> Tensor:
        """The lower bound in use (with use_fstar: its current estimate), a device tensor."""
        return self.momo_state().lb

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["momo"] = {name: t.clone() for name, t in self.momo_state().named().items()}
        state["momo"].update(beta=self.beta, initial_lb=self.initial_lb, use_fstar=self.use_fstar)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        momo = state_dict.pop("momo", None)
        tensors = None
        if momo is not None:  # checked before anything changes
            if not isinstance(momo, dict) or any(k not in momo for k in STATE_NAMES):
                raise ValueError(f"FusedMoMo.load_state_dict: 'momo' must hold {', '.join(STATE_NAMES)}")
            tensors = []
            for name in STATE_NAMES:
                value = momo[name]
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise ValueError(f"FusedMoMo.load_state_dict: momo[{name!r}] must be a one-element tensor")
                tensors.append(value.reshape(()))
        super().load_state_dict(state_dict)
        if tensors is not None:
            state = self.momo_state()
            for mine, saved in zip(state.named().values(), tensors):
                mine.copy_(saved)


def _check_momo_group(group: dict, where: str, read_device_lr: bool = False) -> None:
    if torch.compiler.is_compiling():
        return
    lr = group.get("lr")
    if lr is None:
        raise ValueError(f"{where}: FusedMoMo needs an lr (the cap on tau), got None")
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise TypeError(
                f"{where}: a tensor lr must hold one floating-point number, got {lr.dtype} of shape {tuple(lr.shape)}"
            )
        lr = lr.item() if (lr.device.type == "cpu" or read_device_lr) else None
    if lr is not None:
        lr = _number(lr, "lr", where)
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"{where}: invalid lr {lr}: must be finite and >= 0")
    decay = _number(group.get("weight_decay", 0.0), "weight_decay", where)
    if not (decay >= 0 and math.isfinite(decay)):
        raise ValueError(f"{where}: invalid weight_decay {decay}: must be finite and >= 0")
