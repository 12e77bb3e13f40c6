"""MoMo (Schaipp et al., ICML 2024; fabian-sp/MoMo, ``momo/momo.py``) on FusedALIG's kernels.

MoMo needs no kernel of its own. With the gradient average ``d`` (state per tensor) in the
slot of ALI-G's momentum buffer ``b``, pass 1's six sums are what MoMo needs (columns of
``functional.Sum``): ||g||^2, ||w||^2, ||d||^2, <w,d>, <w,g>, <d,g>. The averages after this
step's EMA ``d' = beta*d + (1-beta)*g`` follow from them:

    ||d'||^2  = beta^2 ||d||^2 + 2 beta (1-beta) <d,g> + (1-beta)^2 ||g||^2
    <w,d'>    = beta <w,d> + (1-beta) <w,g>
    gamma_bar = beta gamma_bar + (1-beta) <w,g>,   f_bar = beta f_bar + (1-beta) loss

(on the first step the averages start at d = g, f_bar = loss, gamma_bar = <w,g>, as in the
reference), and pass 2's ``w' = (w + a*d - c*g) * scale, d' = mu*d - D*g`` is MoMo's update
``w' = (w - tau*d') / (1 + lr*lambda)`` with a = -tau*beta, c = tau*(1-beta), D = -(1-beta),
mu = beta, scale = 1/(1 + lr*lambda) (first step: a = 0, c = tau, D = -1, mu = 0), chosen on
the device from the step counter. So a step is pass 1 (every group gets the full sums: its
pass-1 table row has a finite max_norm), ``momo_finalize`` below (torch ops on a few
scalars, no host sync), and pass 2 given the coefficient table.

Each backend provides the two halves (``sums`` and ``apply``); ``momo_step`` runs them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .functional import MAX_GRAD_SQ_NORM, Coef, GroupHParams, StepInputs, Sum, hparams_table

__all__ = ["MomoState", "STATE_NAMES", "MomoResult", "momo_finalize", "momo_step", "momo_group_hparams"]

# The columns of the hparams table a MoMo group uses (the table's other columns are ALI-G's):
# LR = lr, MOMENTUM = beta (> 0: the group has a gradient average), MAX_NORM = 1.0 (finite:
# pass 1 computes every sum), SCALING = weight decay lambda.


def momo_group_hparams(lr, beta: float, weight_decay: float) -> GroupHParams:
    """A MoMo group's row of the hparams table (see the column note above)."""
    return GroupHParams(lr=lr, momentum=beta, adjusted=False, max_norm=1.0, eps=1.0, f_star=0.0, scaling=weight_decay)


class MomoState(NamedTuple):
    """MoMo's global state on the device, updated in place by ``momo_step``.

    The three float64 averages live in one tensor, written by one ``copy_`` per step: under
    torch.compile on CPU (torch 2.13), an in-place write into a 0-dim float64 CPU tensor was
    lost (a compiled ``copy_`` left it unchanged), and ``_foreach_copy_`` over three 0-dim
    tensors read one of them after writing it; a 1-d tensor is written correctly
    (tests/test_compile.py: FusedMoMo compiled against eager).
    """

    step: Tensor  # int64, 0-dim: steps taken (skipped ones not counted)
    averages: Tensor  # float64 [3]: f_bar, gamma_bar, lb (AVERAGES)

    @property
    def f_bar(self) -> Tensor:  # the loss average (a 0-dim view)
        return self.averages[0]

    @property
    def gamma_bar(self) -> Tensor:  # the average of <w, g>
        return self.averages[1]

    @property
    def lb(self) -> Tensor:  # the lower bound in use (use_fstar: its online estimate)
        return self.averages[2]

    def named(self) -> dict[str, Tensor]:
        """The state by name (STATE_NAMES), 0-dim tensors (views: clone to keep them)."""
        return {name: getattr(self, name) for name in STATE_NAMES}


STATE_NAMES = ("step", "f_bar", "gamma_bar", "lb")  # state_dict()["momo"]'s tensors


class MomoResult(NamedTuple):
    tau: Tensor  # [n] float64, the step size per group (0 on a skipped step)
    polyak: Tensor  # [n] float64, the unclipped step max(nom, 0)/||d'||^2 (0 when ||d'|| = 0)
    coefs: Tensor  # [n, 5] float64, columns of Coef
    skip: Tensor  # 0-dim bool
    grad_sq_norm: Tensor  # 0-dim float64, ||g||^2 over every group
    f_bar: Tensor
    gamma_bar: Tensor
    lb: Tensor


def momo_finalize(
    sums: Tensor,
    loss: Tensor,
    hparams: Tensor,
    state: MomoState,
    beta: float,
    initial_lb: float,
    use_fstar: bool,
    found_inf: Tensor | None = None,
) -> MomoResult:
    """The specification of MoMo's between-passes arithmetic, in fp64 torch ops, no sync.

    sums: [n_groups, 6] (Sum) of this step's unscaled gradients, the current parameters and
    gradient averages; hparams: the table of ``momo_group_hparams`` rows. Returns the new
    averages without writing ``state`` (``momo_step`` does, unless the step is skipped).
    Groups run in order, as in the reference: with use_fstar, group k's lb update is what
    group k+1 starts from.

    Guards: a step is skipped (identity coefficients, state unchanged) when the loss, <w,d'>,
    ||d'||^2 or gamma_bar is not finite, ||g||^2 is not below float32's max (as ALI-G's
    finalize), or found_inf is set. ||d'||^2 = 0 (MoMo
    divides by it) means d' = 0: there is no direction and the update ``w - tau*d'`` does
    not depend on tau, so tau is set to 0 (the reference would give nan or lr).
    """
    sums = sums.to(torch.float64)
    loss = loss.to(torch.float64).reshape(())
    total = sums.sum(dim=0)
    gg, wg, bb, wb, bg = total[Sum.GG], total[Sum.WG], total[Sum.BB], total[Sum.WB], total[Sum.BG]
    first = state.step == 0
    keep = 1.0 - beta
    norm = torch.where(first, gg, beta * beta * bb + 2 * beta * keep * bg + keep * keep * gg)
    dot = torch.where(first, wg, beta * wb + keep * wg)
    f_bar = torch.where(first, loss, beta * state.f_bar + keep * loss)
    gamma_bar = torch.where(first, wg, beta * state.gamma_bar + keep * wg)

    # ||g||^2 as functional.finalize tests it (an fp32-overflowing G skips: the kernels' fp32 math)
    finite = torch.isfinite(norm) & torch.isfinite(dot) & torch.isfinite(gamma_bar)
    skip = ~(torch.isfinite(loss) & (gg < MAX_GRAD_SQ_NORM) & finite)
    if found_inf is not None:
        skip = skip | (found_inf.reshape(()) > 0)

    lb = state.lb.to(torch.float64)
    taus, polyaks = [], []
    n_groups = hparams.shape[0]
    for k in range(n_groups):
        lr, decay = hparams[k, 0], hparams[k, 6]
        shrink = 1 + lr * decay
        if use_fstar:  # the reference's reset before the step
            cap = shrink * f_bar + dot - shrink * gamma_bar
            lb = torch.where(cap < shrink * lb, torch.clamp(cap / (2 * shrink), min=initial_lb), lb)
        nom = shrink * (f_bar - lb) + dot - shrink * gamma_bar
        polyak = torch.where(norm > 0, nom.clamp(min=0) / torch.where(norm > 0, norm, 1.0), 0.0)
        tau = torch.minimum(lr, polyak)
        if use_fstar:  # and its update after it
            lb = torch.clamp(f_bar + dot - gamma_bar - tau * norm / 2, min=initial_lb)
        taus.append(tau)
        polyaks.append(polyak)
    tau = torch.stack(taus)
    polyak = torch.stack(polyaks)
    shrink = 1 + hparams[:, 0] * hparams[:, 6]
    zero = torch.zeros_like(tau)
    a = torch.where(first, zero, -tau * beta)
    c = torch.where(first, tau, tau * keep)
    d = torch.where(first, -torch.ones_like(tau), zero - keep)
    mu = torch.where(first, zero, zero + beta)
    coefs = torch.stack(
        [
            torch.where(skip, 0.0, a),
            torch.where(skip, 0.0, c),
            torch.where(skip, 0.0, d),
            torch.where(skip, 1.0, mu),
            torch.where(skip, 1.0, 1.0 / shrink),
        ],
        dim=1,
    )
    assert (Coef.A, Coef.C, Coef.D, Coef.MU, Coef.SCALE) == (0, 1, 2, 3, 4)
    return MomoResult(
        tau=torch.where(skip, 0.0, tau),
        polyak=torch.where(skip, 0.0, polyak),
        coefs=coefs,
        skip=skip,
        grad_sq_norm=gg,
        f_bar=torch.where(skip, state.f_bar, f_bar),
        gamma_bar=torch.where(skip, state.gamma_bar, gamma_bar),
        lb=torch.where(skip, state.lb, lb),
    )


# ---------------------------------------------------------------------------------------
# The two halves per backend: sums(...) -> [n, 6] float64; apply(..., coefs, skip).
# ---------------------------------------------------------------------------------------


class Halves(NamedTuple):
    sums: Callable
    apply: Callable


def _torch_sums(params, grads, buffers, group_index, hparams, group_hparams, grad_scale, cache):
    from .functional import _split_by_group, group_sums_into

    n_groups = len(group_hparams)
    inv_scale = None if grad_scale is None else grad_scale.to(torch.float32).reciprocal()
    sums = torch.zeros(n_groups, Sum.COUNT, dtype=torch.float64, device=hparams.device)
    for k, idx in enumerate(_split_by_group(group_index, n_groups)):
        if idx:
            b = [buffers[i] for i in idx] if group_hparams[k].momentum > 0 else None
            group_sums_into(sums[k], [params[i] for i in idx], [grads[i] for i in idx], b, inv_scale)
    return sums


def _torch_apply(params, grads, buffers, group_index, group_hparams, coefs, skip, grad_scale, cache):
    """Pass 2 with foreach ops: functional.torch_alig's (``update_part``), every group scaled."""
    from .functional import _coef_dtype, _split_by_group, _split_float64, pass2_coefficients, update_part

    inv_scale = None if grad_scale is None else grad_scale.to(torch.float32).reciprocal()
    inputs = pass2_coefficients(coefs, skip)
    if inputs is None:
        return  # a skipped step, known on the host (CPU)
    coefs_of, keep_bits = inputs
    for k, idx in enumerate(_split_by_group(group_index, len(group_hparams))):
        b = buffers if group_hparams[k].momentum > 0 else None
        for part in _split_float64(idx, params):
            update_part(params, grads, b, part, coefs_of[_coef_dtype(params[part[0]])][k], inv_scale, keep_bits,
                        scale=True)


def _cpp_sums(params, grads, buffers, group_index, hparams, group_hparams, grad_scale, cache):
    return torch.ops.alig_fused.alig_sums.default(params, grads, buffers, group_index, hparams, grad_scale)


def _cpp_apply(params, grads, buffers, group_index, group_hparams, coefs, skip, grad_scale, cache):
    # CPU and CUDA kernels; on CUDA the op reads skip on the device (no host sync).
    torch.ops.alig_fused.alig_apply_.default(
        params, grads, buffers, group_index, coefs.to(torch.float32).contiguous(), skip.reshape(()), grad_scale
    )


def _triton_sums(params, grads, buffers, group_index, hparams, group_hparams, grad_scale, cache):
    from . import triton_kernels as tk

    device = hparams.device
    n_groups = len(group_hparams)
    grad_scale = tk._as_scalar(grad_scale if grad_scale is not None else tk._constant(cache, 1.0, device),
                               torch.float32, "grad_scale", device)
    tables = tk._tables(params, grads, buffers, group_index, n_groups, device, cache)
    cache["momo_tables"] = (tables, grad_scale)
    # Pass 1, then the finalize kernel in its group-sums mode (the mode sharded ALI-G steps
    # use before their all-reduce): two launches, whatever the number of tensors.
    dummy_outputs = cache.get(("momo_dummy", device, n_groups))
    if dummy_outputs is None:
        dummy_outputs = cache[("momo_dummy", device, n_groups)] = (
            torch.zeros(n_groups, dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.float64, device=device),
        )
    step_size, skipped, loss = dummy_outputs
    found_inf = tk._constant(cache, 0.0, device)
    with torch.cuda.device(device) if device.type == "cuda" else _null():
        for kernel, grid, args, meta in tk.launches(
            tables, hparams, loss, grad_scale, found_inf, step_size, skipped, reduce_sums=_stop
        ):
            if kernel is tk._alig_pass2_kernel:
                break
            tk._launch(kernel, grid, *args, **meta)
            if meta.get("MODE") == tk._GROUP_SUMS:
                break
    return tables.group_sums.clone()


def _stop(sums, loss):  # launches() runs past the group-sums launch only when iterated on
    return sums, loss


def _triton_apply(params, grads, buffers, group_index, group_hparams, coefs, skip, grad_scale, cache):
    from . import triton_kernels as tk

    tables, grad_scale = cache["momo_tables"]
    tables.coefs.copy_(coefs)
    tables.skip.copy_(skip.reshape(1).to(torch.int32))
    if not tables.n_chunks:
        return
    chunked = dict(CHUNK=tables.chunk, BLOCK=tk.BLOCK, num_warps=tk.NUM_WARPS, enable_fp_fusion=False)
    device = coefs.device
    with torch.cuda.device(device) if device.type == "cuda" else _null():
        tk._launch(tk._alig_pass2_kernel, (tables.n_chunks,), tables.meta, tables.coefs, tables.skip, grad_scale,
                   **chunked)


def _null():
    import contextlib

    return contextlib.nullcontext()


HALVES = {
    "torch": Halves(_torch_sums, _torch_apply),
    "cpp": Halves(_cpp_sums, _cpp_apply),
    "triton": Halves(_triton_sums, _triton_apply),
}


def momo_step(
    backend: str,
    step: StepInputs,
    state: MomoState,
    beta: float,
    initial_lb: float,
    use_fstar: bool,
    cache: dict | None = None,
) -> MomoResult:
    """One MoMo step: pass 1 (backend), momo_finalize, pass 2 (backend); state updated in place.

    ``step`` is FusedALIG's step input (``functional.StepInputs``; the buffers are the
    gradient averages d, ``step_size_out`` is not written: the caller copies ``tau``).
    """
    if cache is None:
        cache = {}
    halves = HALVES[backend]
    params, grads, buffers, group_index = step.params, step.grads, step.momentum_buffers, step.group_index
    group_hparams, loss, grad_scale = step.group_hparams, step.loss, step.grad_scale
    hparams = hparams_table(group_hparams, loss.device, cache)
    sums = halves.sums(params, grads, buffers, group_index, hparams, group_hparams, grad_scale, cache)
    if step.reduce_sums is not None:
        sums, loss = step.reduce_sums(sums, loss)
    result = momo_finalize(sums, loss, hparams, state, beta, initial_lb, use_fstar, step.found_inf)
    halves.apply(params, grads, buffers, group_index, group_hparams, result.coefs, result.skip, grad_scale, cache)
    state.averages.copy_(torch.stack([result.f_bar, result.gamma_bar, result.lb]))  # one write: see MomoState
    not_skipped = (~result.skip).to(torch.int64)
    state.step.add_(not_skipped)
    step.skipped_steps.add_(1 - not_skipped)
    return result
