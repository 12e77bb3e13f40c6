"""FusedALIG: the ALI-G optimizer with a fused multi-tensor step and no host sync."""

from __future__ import annotations

import itertools
import math
import operator
import sys
import warnings
from collections.abc import Hashable, Mapping
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends, distributed
from .functional import GroupHParams, StepInputs, hparams_table, project_onto_ball

__all__ = ["FusedALIG"]

_UNSET: Any = object()


class _StepState:
    """The Python state a step changes (the plan, the loss flag, the lazily made tensors).

    It lives on this plain object, reached through properties, not in the optimizer's own
    attributes: inside torch.compile, dynamo drops attribute stores on a
    ``torch.optim.Optimizer`` (torch 2.13: ``self.x = v`` in a compiled step leaves ``x`` as
    it was; the accumulated-loss flag, the diagnostics and MoMo's state were lost), while
    stores on any other object are replayed after the graph runs (tests/test_compile.py).
    """

    def __init__(self) -> None:
        self.plan: _StepPlan | None = None
        self.step_sizes: Tensor | None = None
        self.skipped_steps: Tensor | None = None
        # accumulate_loss's running sum: one tensor kept across steps (a CUDA graph that
        # captured the step reads it at the same address), live while loss_pending.
        self.loss_sum: Tensor | None = None
        self.loss_pending = False
        self.warned_no_grad = False
        self.last_backend: str | None = None
        self.wants_diagnostics = False
        self.last_diagnostics: dict[str, Tensor] = {}
        self.history_enabled = False
        self.history_size = 0
        self.history: Tensor | None = None  # enable_history's ring buffer [N, width]
        self.history_row: Tensor | None = None  # int64 0-dim: the next row written
        self.history_step: Tensor | None = None
        self.momo_state: Any = None  # FusedMoMo's MomoState


def _in_step_state(name: str) -> property:
    def get(self):
        return getattr(self._step_state, name)

    def set(self, value):
        setattr(self._step_state, name, value)

    return property(get, set, doc=f"(kept in _StepState.{name}: see _StepState)")


class FusedALIG(Optimizer):
    r"""ALI-G (Berrada, Zisserman & Kumar, ICML 2020) with a fused multi-tensor step.

    .. math::
        \gamma = \min\Big(\text{lr},\ \frac{\max(\ell - f_\star, 0)}{c\,\lVert g\rVert^2 + \epsilon}\Big),
        \qquad \lVert g\rVert^2 = \textstyle\sum_{\text{all params}} \lVert g_i\rVert^2

    then the Nesterov-style momentum update of the reference implementation (standard, or
    "adjusted" when ``adjusted_momentum=True``) and, when ``max_norm`` is set, the
    projection of each group's parameters, jointly, onto the l2 ball of radius ``max_norm``.

    Args:
        params: parameters or param groups; every hyper-parameter may differ per group.
        lr: ALI-G's maximal learning rate ``max_lr`` (``None`` = no cap): a number or, as
            torch's optimizers take it, a 1-element tensor (CPU or the parameters' device),
            which a step reads on the device only, so that a scheduler changing it does not
            recompile a compiled step. Named ``lr`` so learning-rate schedulers work (they
            need a cap to schedule: attaching one to a group with ``lr=None`` is an error);
            ``max_lr=`` is an alias.
        momentum: Nesterov momentum factor in [0, 1).
        adjusted_momentum: the reference's "adjusted" (PyTorch-like) momentum.
        max_norm: radius of the l2 ball the group is projected onto (``None`` = none).
        eps: added to the squared gradient norm (> 0).
        f_star: a lower bound of the loss (the Polyak step's optimal value), default 0.
        scaling: factor c on the squared gradient norm (the Polyak/SPS variants), default 1.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.
        projection_fn: a callable run after every step (and once at construction), as in
            the reference; ``max_norm`` is the fused, sync-free way to project.
        process_group: under torch.distributed, the ranks whose losses are averaged
            (default: the world; for sharded parameters, their device mesh's group).
        average_loss: average the loss across ranks when torch.distributed is initialized
            (each rank sees its own loss, so without it the replicas would drift apart):
            one scalar all-reduce per step, a collective, so every rank of the group must
            step together. An optimizer stepped on some ranks only (a probe, a per-rank
            model) would wait for the others until the process group's timeout: give it
            ``average_loss=False``. Sharded (DTensor/FSDP2) parameters always reduce the
            pass-1 sums across ranks.

    The loss of a step is the sum of every tensor ``backward()`` was called on since the last
    step (or ``zero_grad``), the function whose gradient is in ``.grad``. ``step(closure=None,
    *, loss=None)`` runs ``closure()`` first, if given; then the loss is ``loss=`` if given,
    else the sum of the losses handed to :meth:`accumulate_loss` since the last step, else
    what the closure returned (a number, a numpy scalar or a 0-dim tensor, preferably on the
    parameters' device). The step size
    stays on the device: ``group["step_size"]`` (a 0-dim tensor per group) and
    ``skipped_steps`` (steps skipped for a non-finite loss or gradient) can be logged
    without forcing a sync. Parameters whose ``grad`` is None are left alone.
    """

    # GradScaler hands us grad_scale / found_inf and we unscale inside the step.
    _step_supports_amp_scaling = True

    # The step's Python state, on a plain object (see _StepState).
    _plan = _in_step_state("plan")
    _step_sizes = _in_step_state("step_sizes")
    _skipped_steps = _in_step_state("skipped_steps")
    _loss_sum = _in_step_state("loss_sum")
    _loss_pending = _in_step_state("loss_pending")
    _warned_no_grad = _in_step_state("warned_no_grad")
    last_backend = _in_step_state("last_backend")  # the backend of the last step
    _wants_diagnostics = _in_step_state("wants_diagnostics")
    _last_diagnostics = _in_step_state("last_diagnostics")
    _history_enabled = _in_step_state("history_enabled")
    _history_size = _in_step_state("history_size")
    _history = _in_step_state("history")
    _history_row = _in_step_state("history_row")
    _history_step = _in_step_state("history_step")

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor | None = _UNSET,
        momentum: float = 0.0,
        adjusted_momentum: bool = False,
        max_norm: float | None = None,
        eps: float = 1e-5,
        f_star: float = 0.0,
        scaling: float = 1.0,
        backend: str = "auto",
        projection_fn: Callable[[], Any] | None = None,
        *,
        max_lr: float | Tensor | None = _UNSET,
        process_group: Any = None,
        average_loss: bool = True,
        **unsupported: Any,
    ):
        if unsupported:
            raise TypeError(_unsupported_arguments_message(unsupported))
        if lr is not _UNSET and max_lr is not _UNSET:
            raise ValueError("give the maximal learning rate as lr= or as max_lr=, not both")
        lr = max_lr if lr is _UNSET else lr
        lr = None if lr is _UNSET else lr
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from 'auto', {', '.join(map(repr, backends.BACKENDS))}")
        if not isinstance(average_loss, bool):
            raise TypeError("average_loss must be a bool")
        if projection_fn is not None and not callable(projection_fn):
            raise TypeError(f"projection_fn must be callable, got {type(projection_fn).__name__}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            adjusted_momentum=adjusted_momentum,
            max_norm=max_norm,
            eps=eps,
            f_star=f_star,
            scaling=scaling,
        )
        _check_hparams(defaults, where="defaults", read_device_lr=True)
        self._init_common(params, defaults, backend, projection_fn, process_group, average_loss)
        self._project_at_start()
        if projection_fn is not None:
            projection_fn()

    def _init_common(self, params, defaults, backend, projection_fn, process_group, average_loss) -> None:
        """What FusedALIG and FusedMoMo share once their defaults are checked."""
        self.backend = backend
        self.projection_fn = projection_fn
        self.process_group = process_group
        self.average_loss = bool(average_loss)
        self._step_state = _StepState()
        super().__init__(params, defaults)  # add_param_group checks each group's parameters
        self._cache: dict = {}

    def __setattr__(self, name: str, value: Any) -> None:
        # torch's LRScheduler wraps opt.step (marking the wrapper _wrapped_by_lr_sched) right
        # before its first get_lr(), which scales every group's lr: the moment to check them.
        if name == "step" and getattr(value, "_wrapped_by_lr_sched", False):
            self._prepare_for_scheduler()
        super().__setattr__(name, value)

    def _prepare_for_scheduler(self) -> None:
        """A scheduler is attaching. With lr=None it would fail inside torch ("None * float"):
        say why instead, leaving the groups as they were. Groups sharing one tensor lr (a
        tensor default) get a copy each, so that a per-group schedule stays per group (the
        scheduler fills each group's tensor in place; shared, every group would end with the
        last group's lr, as with torch's own optimizers)."""
        uncapped = [k for k, group in enumerate(self.param_groups) if group["lr"] is None]
        if uncapped:
            for k in uncapped:  # undo the scheduler's setdefault("initial_lr", None)
                if "initial_lr" in self.param_groups[k] and self.param_groups[k]["initial_lr"] is None:
                    del self.param_groups[k]["initial_lr"]
            raise ValueError(
                f"FusedALIG param group {uncapped[0]} has lr=None (no cap on the step size): a learning-rate "
                "scheduler schedules the cap lr (ALI-G's max_lr), so give one to schedule, e.g. "
                "FusedALIG(params, lr=0.1)"
            )
        seen = set()
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, Tensor):
                if id(lr) in seen:
                    group["lr"] = lr.clone()
                seen.add(id(lr))

    # -- groups and state --------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        # Every check runs before Optimizer.add_param_group appends the group, so a rejected
        # group leaves param_groups, the state and the step plan as they were.
        if isinstance(param_group, dict) and "params" in param_group:  # else: Optimizer's error
            params = param_group["params"]
            if not isinstance(params, (Tensor, set)):  # a set: Optimizer's error
                params = param_group["params"] = list(params)  # a generator can be read once
            where = f"param group {len(self.param_groups)}"
            self._check_new_params([params] if isinstance(params, Tensor) else params, where)
            self._check_group({**self.defaults, **param_group}, where=where, read_device_lr=True)
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("step_size", None)
        self._plan = None

    def _check_new_params(self, params: list, where: str) -> None:
        """The dtype and device of a new group's parameters (a named backend must take them)."""
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]  # (name, tensor) pairs
        tensors = [p for p in tensors if isinstance(p, Tensor)]  # anything else: Optimizer's TypeError
        for p in tensors:
            if torch.is_complex(p):
                raise TypeError(
                    f"{where}: FusedALIG does not support complex parameters (view them as real with torch.view_as_real)"
                )
            if not p.is_floating_point():
                raise TypeError(f"{where}: FusedALIG needs floating-point parameters, got {p.dtype}")
        # The groups already added share one device: one of their parameters stands for all.
        known = next((p for g in self.param_groups for p in g["params"]), None)
        device = _common_device(([known] if known is not None else []) + tensors)
        if self.backend != "auto" and tensors:
            backends.pick(self.backend, device, dtypes=frozenset(p.dtype for p in tensors))  # fails now if it cannot run

    @property
    def skipped_steps(self) -> Tensor:
        """Number of steps skipped for a non-finite loss/gradient or AMP overflow (device tensor)."""
        if self._skipped_steps is None:
            self._skipped_steps = torch.zeros((), dtype=torch.int64, device=self._params_device())
        return self._skipped_steps

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checked whole before Optimizer.load_state_dict replaces anything: a bad state_dict
        # leaves the optimizer as it was.
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", None)
        state_dict["param_groups"] = self._checked_groups(state_dict)
        self._check_loaded_state(state_dict)
        if skipped is not None:
            skipped = _checked_count(skipped, "state_dict['skipped_steps']")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._step_sizes = None
        self._plan = None  # new state tensors
        if skipped is not None:
            self._skipped_steps = None
            self.skipped_steps.copy_(skipped)

    def _checked_groups(self, state_dict: dict[str, Any]) -> list[dict]:
        """The saved groups, checked against this optimizer's, ``max_lr`` read as ``lr``."""
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"not an optimizer state_dict: it has no {key!r} entry")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups
        ):
            raise TypeError("state_dict['param_groups'] must be a list of dicts, each with a 'params' list")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has a different number of parameter groups ({len(saved_groups)}) "
                f"than the optimizer ({len(self.param_groups)})"
            )
        groups = []
        for k, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded param group {k} has {len(saved['params'])} parameters, the optimizer's "
                    f"{len(group['params'])}"
                )
            saved = dict(saved)
            if "lr" not in saved and "max_lr" in saved:  # a state_dict of the reference AliG
                saved["lr"] = saved.pop("max_lr")
            self._check_group({**self.defaults, **saved}, where=f"loaded param group {k}", read_device_lr=True)
            groups.append(saved)
        return groups

    def _check_loaded_state(self, state_dict: dict[str, Any]) -> None:
        """Each saved momentum buffer is a real floating-point tensor of its parameter's shape."""
        state = state_dict["state"]
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(state).__name__}")
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for key, p in zip(saved["params"], group["params"]):
                entry = state.get(key) if isinstance(key, Hashable) else None
                buffer = entry.get(self._buffer_key) if isinstance(entry, Mapping) else None
                if buffer is None:  # none saved (the step creates it), as torch's SGD saves it
                    continue
                where = f"state_dict: the {self._buffer_key} of parameter {key!r}"
                if not isinstance(buffer, Tensor) or buffer.is_complex() or not buffer.is_floating_point():
                    kind = buffer.dtype if isinstance(buffer, Tensor) else type(buffer).__name__
                    raise TypeError(f"{where} must be a real floating-point tensor, got {kind}")
                if buffer.shape != p.shape:
                    raise ValueError(f"{where} has shape {tuple(buffer.shape)}, its parameter {tuple(p.shape)}")

    # -- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def accumulate_loss(self, loss: Any) -> None:
        """Add ``loss`` to the loss of the next step: a device-side running sum, no host sync.

        Call it with every tensor you call ``backward()`` on, exactly as backwarded (after
        dividing by the accumulation steps, before ``GradScaler.scale``); ``step()`` then
        uses the sum. ``step`` and ``zero_grad`` reset it; ``state_dict`` does not save it.
        """
        plan = self._plan
        device = plan.device if plan is not None else self._params_device()
        value = _loss_tensor(loss, device)
        total = self._loss_sum
        if total is None or total.device != value.device:
            total = self._loss_sum = torch.zeros((), dtype=torch.float64, device=value.device)
        if self._loss_pending:
            total.add_(value)
        else:
            total.copy_(value)
            self._loss_pending = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The gradients go, and with them the function they were the gradient of.
        self._loss_pending = False
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One ALI-G step on ``loss=``, else the accumulated loss, else ``closure()``'s value."""
        if closure is not None and not callable(closure):
            raise TypeError(_positional_loss_message(closure))
        closure_loss = None
        if closure is not None:  # it may run the last backward (and accumulate its loss)
            with torch.enable_grad():
                closure_loss = closure()
        from_sum = loss is None and self._loss_pending
        if from_sum:
            loss = self._loss_sum
        elif loss is None:
            loss = closure_loss
        if loss is None:
            raise ValueError(
                "FusedALIG needs the current loss to compute its step size: call "
                "optimizer.accumulate_loss(loss) after each backward and then optimizer.step(), "
                "or optimizer.step(loss=loss), or optimizer.step(closure) with a closure that "
                "returns the loss"
            )
        # torch's convention: the closure's value; else the loss used (the sum's value, as the
        # sum tensor itself is overwritten by the next accumulate_loss).
        returned = closure_loss if closure_loss is not None else loss.clone() if from_sum else loss

        group_hparams = []
        for k, group in enumerate(self.param_groups):
            self._check_group(group, where=f"param group {k}")
            group_hparams.append(self._group_hparams(group))
        plan = self._plan
        grads = grad_addresses = None
        if plan is not None and plan.key == self._plan_key(group_hparams):
            grads, grad_addresses = plan.current_grads()
        if grads is None:  # first step, or the params, their gradients or the state changed
            plan = self._make_plan(group_hparams)
            if plan is None:  # no gradient anywhere: nothing to do, once the loss is checked
                _loss_tensor(loss, torch.device("cpu") if not isinstance(loss, Tensor) else loss.device)
                self._loss_pending = False
                if not self._warned_no_grad:
                    self._warned_no_grad = True
                    warnings.warn(
                        "FusedALIG.step: no parameter has a gradient, so the step did nothing "
                        "(did backward() run on a loss of these parameters?)",
                        stacklevel=2,
                    )
                return returned
            grads = [p.grad for p in plan.params]
            grad_addresses = None
        params, buffers, device, backend = plan.params, plan.buffers, plan.device, plan.backend
        _check_lr_devices(group_hparams, device)
        loss_t = _loss_tensor(loss, device)

        # Every check has passed: only now create state and reset the sum (bad input changes nothing).
        self._loss_pending = False
        if plan.missing_buffers:
            for i in plan.missing_buffers:
                p = params[i]
                buffers[i] = self.state[p][self._buffer_key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            plan.missing_buffers = []
        if plan is not self._plan:
            plan.key = self._plan_key(group_hparams)  # after the buffers: len(state) is in it
            self._plan = plan
        group_index, sharded = plan.group_index, plan.sharded

        reduce_sums = None
        if sharded:  # the kernels see local shards; one all-reduce of the sums (and loss)
            process_group = self.process_group or distributed.mesh_group(params)
            reduce_sums = distributed.SumReducer(process_group, self.average_loss)
            params, grads, buffers = (distributed.local_tensors(ts) for ts in (params, grads, buffers))
            grad_addresses = None  # those of the local shards are the backend's to read
        elif self.average_loss and distributed.is_initialized():
            loss_t = distributed.average_loss(loss_t, self.process_group)

        step = StepInputs(
            params=params, grads=grads, momentum_buffers=buffers, group_index=group_index, group_hparams=group_hparams,
            loss=loss_t, step_size_out=self._step_size_tensor(device), skipped_steps=self.skipped_steps,
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
            reduce_sums=reduce_sums, grad_addresses=grad_addresses,
        )
        self._run_backend(backend, step)
        self.last_backend = backend
        if self.projection_fn is not None:
            self.projection_fn()
        return returned

    _buffer_key = "momentum_buffer"  # the per-tensor state pass 2 reads and writes

    def _check_group(self, group: dict, where: str, read_device_lr: bool = False) -> None:
        _check_hparams(group, where=where, read_device_lr=read_device_lr)

    def _group_hparams(self, group: dict) -> GroupHParams:
        return _group_hparams(group)

    def _run_backend(self, backend: str, step: StepInputs) -> None:
        cache = self._cache.setdefault(backend, {})
        if self._history is None and not self._wants_diagnostics:
            backends.get(backend)(step, cache)
            return
        # Diagnostics: G and the unclipped step are not exported by every backend's fused
        # finalize, so they are recomputed from the loss and G on the device; G comes from
        # pass-1-equivalent foreach norms of the unscaled gradients (one read of g).
        skipped_before = self.skipped_steps.clone()
        backends.get(backend)(step, cache)
        grads, grad_scale, reduce_sums, loss = step.grads, step.grad_scale, step.reduce_sums, step.loss
        group_hparams, step_sizes = step.group_hparams, step.step_size_out
        grad_sq_norm = _grad_sq_norm(grads, grad_scale)
        if reduce_sums is not None:  # sharded: local shards' ||g||^2 and the local loss (a second small all-reduce)
            grad_sq_norm, loss = reduce_sums(grad_sq_norm.reshape(1), loss)
            grad_sq_norm = grad_sq_norm.reshape(())
        hparams = hparams_table(group_hparams, loss.device, cache)
        from .functional import HParam

        skipped = self.skipped_steps != skipped_before
        lr = hparams[:, HParam.LR]
        polyak = (loss.to(torch.float64) - hparams[:, HParam.F_STAR]).clamp(min=0) / (
            hparams[:, HParam.SCALING] * grad_sq_norm + hparams[:, HParam.EPS]
        )
        polyak = torch.where(skipped, 0.0, polyak)
        self._record(step_sizes.to(torch.float64), polyak, (polyak > lr) & ~skipped, grad_sq_norm, loss, skipped)


    # -- diagnostics without a sync ------------------------------------------------------

    def diagnostics(self) -> dict[str, Tensor]:
        """The last step's numbers as device tensors (no sync): ``step_size`` [n_groups],
        ``step_size_unclipped`` [n_groups] (the Polyak step before the cap), ``capped``
        [n_groups] bool, ``grad_sq_norm`` and ``loss`` (0-dim), ``skipped`` (0-dim bool);
        FusedMoMo adds ``lb`` and ``f_bar``. On FusedALIG they are off until the first call
        (which returns ``{}`` unless ``enable_history`` turned them on): from the next step on
        a step also takes ||g||^2 with foreach norms (one more read of the gradients, as the
        fused finalizes do not export it) and a few small device ops. FusedMoMo and the
        drop-in AliG keep them from the first step.
        """
        self._wants_diagnostics = True
        return dict(self._last_diagnostics)

    def enable_history(self, n: int) -> None:
        """Keep the last ``n`` steps' diagnostics in a device ring buffer (``history()``):
        a logger reads the window with one transfer every ``n`` steps instead of a sync per step."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"enable_history needs a positive int, got {n!r}")
        self._wants_diagnostics = True
        self._history_size = n
        self._history = None  # made at the next step, on the parameters' device
        self._history_enabled = True

    def history(self) -> dict[str, Tensor]:
        """The ring buffer, oldest row first: {name: tensor [rows, ...]}, with ``step`` the
        index of each row's step (rows not yet written are absent). Still device tensors:
        move them to the host once (``{k: v.cpu() ...}``), every ``n`` steps."""
        if self._history is None:
            return {}
        n = self._history.shape[0]
        row = self._history_row
        order = (torch.arange(n, device=row.device) + row) % n
        window = self._history.index_select(0, order)
        written = window[:, 0] >= 0
        out = {"step": window[:, 0].to(torch.int64)}
        n_groups = len(self.param_groups)
        columns = self._diagnostic_columns(n_groups)
        for name, (start, width) in columns.items():
            value = window[:, start : start + width]
            per_group = name in ("step_size", "step_size_unclipped", "capped")
            out[name] = value if width > 1 or per_group else value[:, 0]
        out["written"] = written
        return out

    def _diagnostic_columns(self, n_groups: int) -> dict[str, tuple[int, int]]:
        names = [("step_size", n_groups), ("step_size_unclipped", n_groups), ("capped", n_groups),
                 ("grad_sq_norm", 1), ("loss", 1), ("skipped", 1)] + [(k, 1) for k in self._extra_diagnostics]
        columns, start = {}, 1
        for name, width in names:
            columns[name] = (start, width)
            start += width
        return columns

    _extra_diagnostics: tuple[str, ...] = ()

    def _record(self, step_size, unclipped, capped, grad_sq_norm, loss, skipped, **extra) -> None:
        """Keep the step's diagnostics (device tensors) and, with a history, write one row."""
        values = dict(
            step_size=step_size, step_size_unclipped=unclipped, capped=capped, grad_sq_norm=grad_sq_norm.reshape(()),
            loss=loss.reshape(()).to(torch.float64), skipped=skipped.reshape(()),
        )
        values.update({k: v.reshape(()) for k, v in extra.items()})
        self._last_diagnostics = values
        if not self._history_enabled:
            return
        n_groups = step_size.shape[0]
        columns = self._diagnostic_columns(n_groups)
        width = 1 + sum(w for _, w in columns.values())
        device = step_size.device
        if self._history is None or self._history.shape[1] != width or self._history.device != device:
            self._history = torch.full((self._history_size, width), -1.0, dtype=torch.float64, device=device)
            self._history_row = torch.zeros((), dtype=torch.int64, device=device)
            self._history_step = torch.zeros((), dtype=torch.int64, device=device)
        row = torch.cat([self._history_step.to(torch.float64).reshape(1)]
                        + [values[name].to(torch.float64).reshape(-1) for name in columns])
        self._history.index_copy_(0, self._history_row.reshape(1), row.reshape(1, -1))
        self._history_row.copy_((self._history_row + 1) % self._history.shape[0])
        self._history_step.add_(1)

    # -- the step plan: the flat tensor lists, rebuilt only when they may have changed ----

    def _plan_key(self, group_hparams: list[GroupHParams]) -> tuple:
        # What a plan is built from, cheap to compare every step. Not covered: a parameter
        # list or a state entry edited in place keeping its length (load_state_dict and
        # add_param_group drop the plan).
        state = self.state
        groups = tuple(
            (id(group["params"]), len(group["params"]), hparams.momentum > 0)
            for group, hparams in zip(self.param_groups, group_hparams)
        )
        return (self.backend, id(state), len(state), groups)

    def _make_plan(self, group_hparams: list[GroupHParams]) -> _StepPlan | None:
        """Collect and check every parameter with a gradient; None when there is none."""
        params, buffers, group_index, without_grad, positions = [], [], [], [], []
        devices, dtypes, missing_buffers = set(), set(), []
        state = self.state
        for k, group in enumerate(self.param_groups):
            has_momentum = group_hparams[k].momentum > 0
            for j, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    without_grad.append(p)
                    continue
                if grad.is_sparse:
                    raise RuntimeError("FusedALIG does not support sparse gradients")
                params.append(p)
                positions.append((k, j))
                group_index.append(k)
                devices.add(p.device)  # autograd keeps each grad on its parameter's device
                dtypes.add(p.dtype)
                if has_momentum:
                    buffer = state.get(p, {}).get(self._buffer_key)  # .get: no defaultdict entry
                    if buffer is None:
                        missing_buffers.append(len(buffers))
                    buffers.append(buffer)
                else:
                    buffers.append(self._no_buffer(p))
        if not params:
            return None
        if len(devices) > 1:
            raise RuntimeError(_mixed_devices_message(*sorted(map(str, devices))[:2]))
        (device,) = devices
        sharded = distributed.is_sharded(params)
        backend = backends.pick(self.backend, device, dtypes=frozenset(dtypes))
        # Layouts too are checked here, before the step creates any state: the backend's own
        # check would come after the missing buffers were made. Those are made with their
        # parameter's layout (zeros_like keeps the strides of a dense tensor).
        if backend != "torch":  # the torch path takes any layout
            for p, buffer, (k, j) in zip(params, buffers, positions):
                problem = backends.layout_problem(backend, p, p.grad, buffer if buffer is not None and buffer.numel() else None)
                if problem:
                    raise ValueError(f"param group {k}, parameter {j} (shape {tuple(p.shape)}): {problem}")
        return _StepPlan(params, without_grad, buffers, group_index, missing_buffers, device, backend, sharded)

    # -- helpers -----------------------------------------------------------------------

    def _params_device(self) -> torch.device:
        return _common_device(p for g in self.param_groups for p in g["params"]) or torch.device("cpu")

    def _step_size_tensor(self, device: torch.device) -> Tensor:
        n = len(self.param_groups)
        if self._step_sizes is None or self._step_sizes.shape[0] != n or self._step_sizes.device != device:
            self._step_sizes = torch.zeros(n, dtype=torch.float32, device=device)
            for k, group in enumerate(self.param_groups):
                group["step_size"] = self._step_sizes[k]
        if self.skipped_steps.device != device:
            self._skipped_steps = self._skipped_steps.to(device)
        return self._step_sizes

    def _no_buffer(self, p: Tensor) -> Tensor:
        key = ("no_buffer", p.device, p.dtype)
        if key not in self._cache:
            self._cache[key] = torch.empty(0, dtype=p.dtype, device=p.device)
        return self._cache[key]

    @torch.no_grad()
    def _project_at_start(self) -> None:
        # The reference projects once at construction (AliG calls projection_fn in
        # __init__), so training starts inside the ball. Frozen parameters
        # (requires_grad=False) are neither scaled nor counted in the group's norm, just as
        # the per-step projection only sees parameters with a gradient.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if group["max_norm"] is None or not params:
                continue
            project_onto_ball(params, group["max_norm"])


class _StepPlan:
    """The flat lists a step hands its backend, kept from one step to the next.

    ``params`` had a gradient when the plan was made and ``without_grad`` had none; the plan
    holds while that stays true and the first gradient keeps the plan's device and dtype.
    Per-tensor device, dtype and layout checks are then left to the backend (each checks
    every tensor it is given).
    """

    def __init__(self, params, without_grad, buffers, group_index, missing_buffers, device, backend, sharded):
        self.key: tuple | None = None
        self.params: list[Tensor] = params
        self.without_grad: list[Tensor] = without_grad
        self.buffers: list[Tensor | None] = buffers
        self.group_index: list[int] = group_index
        self.missing_buffers: list[int] = missing_buffers  # indices whose buffer the step creates
        self.device: torch.device = device
        self.dtype: torch.dtype = params[0].dtype
        self.backend: str = backend
        self.sharded: bool = sharded

    def current_grads(self) -> tuple[list[Tensor] | None, list[int] | None]:
        """This step's gradients and their ``data_ptr``s (None when not read), or (None, None)
        when the plan no longer describes them."""
        if torch.compiler.is_compiling():  # dynamo cannot trace attrgetter; tracing runs once
            grads = [p.grad for p in self.params]
            if any(g is None or g.is_sparse for g in grads) or any(p.grad is not None for p in self.without_grad):
                return None, None
            return grads, None
        # C-level passes (map over attribute getters): the Triton path's host time per step
        # must stay below torch's own per-step grouping (bench/host_cost.py). One pass reads
        # the addresses, which the Triton backend checks its tables against (StepInputs), and
        # is the None and sparse check too: it raises on None and on a sparse tensor.
        grads = list(map(_grad_of, self.params))
        try:
            addresses = list(map(_data_ptr, grads))
        except (TypeError, RuntimeError):  # None, sparse, or a tensor without storage (a DTensor)
            addresses = None
            try:  # a None gradient has no is_sparse
                # A sparse gradient also sends the step to _make_plan, whose check raises the error.
                if any(map(_is_sparse, grads)):
                    return None, None
            except AttributeError:
                return None, None
        if self.without_grad and any(map(operator.is_not, map(_grad_of, self.without_grad), itertools.repeat(None))):
            return None, None
        if grads[0].device != self.device or grads[0].dtype != self.dtype:
            return None, None
        return grads, addresses


_grad_of = operator.attrgetter("grad")
_is_sparse = operator.attrgetter("is_sparse")
# const_data_ptr: 7% cheaper than data_ptr (no copy-on-write check); the Triton tables are
# built with data_ptr, which materialises a lazy copy (a new address: the next step rebuilds).
_data_ptr = Tensor.const_data_ptr


def _group_hparams(group: dict) -> GroupHParams:
    lr, max_norm = group["lr"], group["max_norm"]
    if lr is None:
        lr = math.inf
    elif not isinstance(lr, Tensor):
        lr = float(lr)
    elif lr.device.type == "cpu" and not torch.compiler.is_compiling():
        lr = lr.item()  # host memory: no device sync; a changed value is one pinned copy
    # else a device tensor (or any tensor while compiled): hparams_table copies it on the device
    return GroupHParams(
        lr=lr,
        momentum=float(group["momentum"]),
        adjusted=bool(group["adjusted_momentum"]),
        max_norm=math.inf if max_norm is None else float(max_norm),
        eps=float(group["eps"]),
        f_star=float(group["f_star"]),
        scaling=float(group["scaling"]),
    )


def _grad_sq_norm(grads: list[Tensor], grad_scale: Tensor | None) -> Tensor:
    """||g||^2 of the unscaled gradients, in float64 on the device (no sync)."""
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
    total = torch.stack(norms).square().sum()
    if grad_scale is not None:
        total = total / grad_scale.to(torch.float64).reshape(()).square()
    return total


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, Tensor):
        raise TypeError(f"{where}: {name} must be a Python number, got a tensor")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{where}: {name} is nan")
    return float(value)


def _check_hparams(group: dict, where: str, read_device_lr: bool = False) -> None:
    """Reject bad hyper-parameters with a message naming the value and the group.

    A tensor lr is checked for shape and dtype; its value is read where that costs no
    device sync (a CPU tensor), or with ``read_device_lr`` (construction, add_param_group,
    load_state_dict: one sync there, as torch's own optimizers check ``lr < 0``), never in
    a step. Inside torch.compile nothing is checked: the checks are host code that would
    break the graph (math.isnan on a traced float); eager steps and construction check.
    """
    if torch.compiler.is_compiling():
        return
    lr = group.get("lr")
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise TypeError(
                f"{where}: a tensor lr must hold one floating-point number (as torch.tensor(0.1)), "
                f"got {lr.dtype} of shape {tuple(lr.shape)}"
            )
        if lr.device.type != "cpu" and not read_device_lr:
            lr = None  # reading it here would be a host sync in every step
        else:
            lr = lr.item()
    if lr is not None and _number(lr, "lr", where) < 0:
        raise ValueError(f"{where}: invalid lr (max_lr) {lr}: must be >= 0, or None for no cap")
    momentum = _number(group.get("momentum", 0.0), "momentum", where)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: invalid momentum {momentum}: must be in [0, 1)")
    max_norm = group.get("max_norm")
    if max_norm is not None and not _number(max_norm, "max_norm", where) > 0:
        raise ValueError(f"{where}: invalid max_norm {max_norm}: must be > 0, or None for no projection")
    eps = _number(group.get("eps", 1e-5), "eps", where)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{where}: invalid eps {eps}: must be > 0 (it keeps the step finite when the gradient vanishes)")
    f_star = _number(group.get("f_star", 0.0), "f_star", where)
    if not math.isfinite(f_star):
        raise ValueError(f"{where}: invalid f_star {f_star}: must be finite")
    scaling = _number(group.get("scaling", 1.0), "scaling", where)
    if not (scaling > 0 and math.isfinite(scaling)):
        raise ValueError(f"{where}: invalid scaling {scaling}: must be > 0")
    if not isinstance(group.get("adjusted_momentum", False), bool):
        raise TypeError(f"{where}: adjusted_momentum must be a bool")


def _check_lr_devices(group_hparams: list[GroupHParams], device: torch.device) -> None:
    for k, hparams in enumerate(group_hparams):
        lr = hparams.lr
        if isinstance(lr, Tensor) and lr.device != device and lr.device.type != "cpu":
            raise RuntimeError(f"param group {k}: the tensor lr is on {lr.device}, the parameters on {device}: put it on either {device} or the CPU")


def _checked_count(value: Any, where: str) -> Tensor:
    """A saved counter (a one-element integer tensor, or an int) as a 0-dim tensor, checked."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where} must be one count, got shape {tuple(value.shape)}")
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{where} must be an integer count, got {value.dtype}")
        return value.detach().reshape(())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where} must be an integer count, got {type(value).__name__}")
    return torch.tensor(value, dtype=torch.int64)


def _common_device(tensors: Iterable[Tensor]) -> torch.device | None:
    device = None
    for t in tensors:
        if device is None:
            device = t.device
        elif t.device != device:
            raise RuntimeError(_mixed_devices_message(device, t.device))
    return device


def _mixed_devices_message(first: Any, second: Any) -> str:
    return f"FusedALIG needs all parameters on one device; found {first} and {second} (use one optimizer per device)"


def _loss_tensor(loss: Any, device: torch.device) -> Tensor:
    """The loss as a 0-dim float64 tensor on ``device``, without a device sync."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        if loss.is_complex():
            raise TypeError("the loss must be real, got a complex tensor")
        if loss.dtype == torch.float64 and loss.dim() == 0 and loss.device == device and not loss.requires_grad:
            return loss  # already what the backends take (the common case: accumulate_loss's sum)
        loss = loss.detach().reshape(())
        if loss.device == device:
            return loss.to(torch.float64)
        if loss.device.type == "cpu":  # host memory: reading it syncs nothing
            return torch.full((), loss.item(), dtype=torch.float64, device=device)
        return loss.to(device=device, dtype=torch.float64)
    numpy = sys.modules.get("numpy")  # a numpy loss means numpy is imported
    if numpy is not None and isinstance(loss, (numpy.ndarray, numpy.generic)):
        array = numpy.asarray(loss)
        if array.size != 1:
            raise ValueError(f"the loss must be a scalar, got an array of shape {array.shape}")
        if array.dtype.kind not in "fiu":
            raise TypeError(f"the loss must be a real number, got a numpy {array.dtype}")
        loss = float(array.reshape(()))
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(f"the loss must be a number or a 0-dim tensor, got {type(loss).__name__}")
    return torch.full((), float(loss), dtype=torch.float64, device=device)


def _positional_loss_message(value: Any) -> str:
    if isinstance(value, (Tensor, int, float)) or type(value).__module__ == "numpy":
        return "step()'s first argument is a closure; give the loss as a keyword: optimizer.step(loss=loss)"
    return f"closure must be callable, got {type(value).__name__} (give a loss as optimizer.step(loss=loss))"


# What torch optimizers take and FusedALIG does not, and what it has instead.
_INSTEAD = {
    "weight_decay": "FusedALIG has no weight decay: ALI-G regularises by projecting onto an l2 ball, max_norm=",
    "nesterov": "FusedALIG's momentum is always Nesterov-style (as in the reference); set momentum=",
    "dampening": "FusedALIG's momentum has no dampening; adjusted_momentum=True selects the PyTorch-like form",
}


def _unsupported_arguments_message(unsupported: dict) -> str:
    names = ", ".join(map(repr, unsupported))
    hints = [_INSTEAD[name] for name in unsupported if name in _INSTEAD]
    return f"FusedALIG got unexpected argument(s) {names}" + "".join(f"; {hint}" for hint in hints)
