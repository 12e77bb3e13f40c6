"""The ALI-G step: one math definition, several implementations of one contract (``StepInputs``).

Every backend performs the plan of docs/design.md §3:

    pass 1   per-group sums  (||g||^2 always; ||w||^2, ||b||^2, <w,b>, <w,g>, <b,g> for
             groups with a max_norm), gradients unscaled by ``inv_scale``
    finalize G = sum of every group's ||g||^2; per group the step size gamma and the
             coefficients of  w' = (w + a*b - c*g) * scale,  b' = mu*b - d*g
    pass 2   one read-modify-write of parameters and buffers

``finalize`` below is the specification of the between-passes arithmetic; the Triton
kernel and the C++/CUDA code restate it (``csrc/alig_math.h``) and the tests hold all of
them to a plain per-parameter loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "HParam",
    "Sum",
    "Coef",
    "GroupHParams",
    "MAX_GRAD_SQ_NORM",
    "StepInputs",
    "finalize",
    "torch_alig",
]


class HParam:
    """Columns of the per-group hyper-parameter table (float64, shape [n_groups, 7])."""

    LR = 0  # ALI-G's max_lr; +inf = no cap
    MOMENTUM = 1
    ADJUSTED = 2  # 1.0 for adjusted momentum, 0.0 for standard
    MAX_NORM = 3  # +inf = no projection
    EPS = 4
    F_STAR = 5
    SCALING = 6  # c in gamma = (loss - f_star) / (c * G + eps)
    COUNT = 7


class Sum:
    """Columns of the pass-1 sums (float64, shape [n_groups, 6]), gradients unscaled."""

    GG = 0  # ||g||^2 of the group; G is their total
    WW = 1  # the rest only for groups with a max_norm
    BB = 2
    WB = 3
    WG = 4
    BG = 5
    COUNT = 6


class Coef:
    """Columns of the pass-2 coefficients (float32, shape [n_groups, 5])."""

    A = 0  # w' = (w + A*b - C*g) * SCALE
    C = 1
    D = 2  # b' = MU*b - D*g
    MU = 3
    SCALE = 4
    COUNT = 5


MAX_GRAD_SQ_NORM = torch.finfo(torch.float32).max
"""A step whose squared gradient norm G is not below this (float32's max) is skipped."""


class GroupHParams(NamedTuple):
    """One group's hyper-parameters as host numbers (the backends branch on them statically).

    ``lr`` may be a 1-element tensor (on the parameters' device, or any device while compiled):
    ``hparams_table`` then copies it on the device, never reading it on the host.
    """

    lr: float | Tensor
    momentum: float
    adjusted: bool
    max_norm: float
    eps: float
    f_star: float
    scaling: float


def finalize(
    sums: Tensor,
    loss: Tensor,
    hparams: Tensor,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Step sizes, pass-2 coefficients and the skip flag, all on device, no host sync.

    sums: [n_groups, 6] float64 (see ``Sum``), loss: 0-dim, hparams: [n_groups, 7] float64.
    Returns (step_size [n] float64, coefs [n, 5] float64, skip 0-dim bool).
    On a skipped step the coefficients are the identity (a = c = d = 0, mu = scale = 1)
    and the step size is 0; kernels also test ``skip`` and write nothing.
    """
    sums = sums.to(torch.float64)
    loss = loss.to(torch.float64)
    lr, momentum, adjusted = hparams[:, HParam.LR], hparams[:, HParam.MOMENTUM], hparams[:, HParam.ADJUSTED]
    max_norm, eps = hparams[:, HParam.MAX_NORM], hparams[:, HParam.EPS]
    f_star, scaling = hparams[:, HParam.F_STAR], hparams[:, HParam.SCALING]

    grad_sq_norm = sums[:, Sum.GG].sum()
    # Skip when G is not below float32's max (nan, inf included), not merely when it is not
    # finite: the kernels add fp32 partial sums, one of which overflows to inf only where G
    # is at least FLT_MAX anyway (up to its fp32 rounding), while float64 sums of an element
    # of 1e20 give a finite 1e40. With this bound every backend skips the same steps.
    skip = ~(torch.isfinite(loss) & (grad_sq_norm < MAX_GRAD_SQ_NORM))
    if found_inf is not None:
        skip = skip | (found_inf.reshape(()) > 0)

    # gamma = min(lr, max(loss - f_star, 0) / (c * G + eps)); lr = inf means no cap.
    polyak_step = (loss - f_star).clamp(min=0) / (scaling * grad_sq_norm + eps)
    step_size = torch.minimum(polyak_step, lr)

    # standard (reference order: w -= g*gamma; b = mu*b - gamma*g; w += mu*b):
    #   a = mu^2, c = gamma (1 + mu), d = gamma
    # adjusted (w -= gamma*g; b = mu*b - g; w += gamma*mu*b):
    #   a = gamma mu^2, c = gamma (1 + mu), d = 1
    a = torch.where(adjusted > 0, step_size * momentum * momentum, momentum * momentum)
    c = step_size * (1 + momentum)
    d = torch.where(adjusted > 0, torch.ones_like(step_size), step_size)
    d = torch.where(momentum > 0, d, torch.zeros_like(d))

    # ||w + a b - c g||^2 from the pass-1 sums; a group without max_norm keeps scale 1.
    new_norm_sq = (
        sums[:, Sum.WW]
        + a * a * sums[:, Sum.BB]
        + c * c * sums[:, Sum.GG]
        + 2 * a * sums[:, Sum.WB]
        - 2 * c * sums[:, Sum.WG]
        - 2 * a * c * sums[:, Sum.BG]
    ).clamp(min=0)
    scale = projection_scale(new_norm_sq, max_norm)

    # On a skipped step: the identity (a = c = d = 0, mu = scale = 1). Python scalars in
    # torch.where, not a torch.tensor([...]) on the device: that would be a blocking copy.
    coefs = torch.stack(
        [
            torch.where(skip, 0.0, a),
            torch.where(skip, 0.0, c),
            torch.where(skip, 0.0, d),
            torch.where(skip, 1.0, momentum),
            torch.where(skip, 1.0, scale),
        ],
        dim=1,
    )
    step_size = torch.where(skip, 0.0, step_size)
    return step_size, coefs, skip


def projection_scale(norm_sq: Tensor, max_norm: Tensor) -> Tensor:
    """min(1, R / ||w'||): the factor that puts the group back on the ball of radius R."""
    norm = norm_sq.sqrt()
    return torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))


@torch.no_grad()
def project_onto_ball(params: list[Tensor], max_norm: float) -> None:
    """Scale ``params`` jointly onto the l2 ball of radius ``max_norm`` when outside it, with
    no host sync: the one Python projection (FusedALIG at construction, ``l2_projection``).
    Norms per tensor in fp32 (float64 for float64 tensors), their squares summed in float64;
    the kernels project inside the step from their pass sums."""
    if not params:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    norms = [n.to(torch.float64)
             for dtype, ps in by_dtype.items() for n in torch._foreach_norm(ps, 2, dtype=_norm_dtype(dtype))]
    norm_sq = torch.stack(norms).square().sum()
    scale = projection_scale(norm_sq, torch.tensor(float(max_norm), dtype=torch.float64, device=norm_sq.device))
    for dtype, ps in by_dtype.items():
        torch._foreach_mul_(ps, scale.to(dtype))


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# The backend contract: ``backend(StepInputs(...), cache) -> None`` (backends.py registers
# each; docs/backends.md, "Adding a backend").
# ---------------------------------------------------------------------------------------

ReduceSums = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepInputs:
    """What one ALI-G step hands its backend: every backend is ``step(inputs, cache) -> None``.

    Built once per step by FusedALIG from its step plan (keyword-only: ~1 us, the lists are
    the plan's own, not copies). A backend reads these and writes only the parameters, the
    momentum buffers, ``step_size_out`` and ``skipped_steps``; ``cache`` (the second
    argument) is a dict the optimizer keeps between steps, private to the backend.
    """

    params: list[Tensor]  # flat over all groups: only tensors that have a gradient
    grads: list[Tensor]  # same order, each its parameter's dtype, shape, device and layout
    # same order; an EMPTY tensor (numel 0) for a tensor whose group has momentum == 0
    # (never read, never written)
    momentum_buffers: list[Tensor]
    group_index: list[int]  # the group of tensor i, 0 .. n_groups - 1
    # per group, host numbers (backends branch on them statically); lr may be a 1-element
    # device tensor, never read on the host (``hparams_table`` copies it on the device)
    group_hparams: list[GroupHParams]
    loss: Tensor  # 0-dim float64 on the parameters' device
    step_size_out: Tensor  # [n_groups] float32: written with each group's step size
    skipped_steps: Tensor  # 0-dim int64: += 1 when the step is skipped
    grad_scale: Tensor | None = None  # GradScaler's scale (0-dim float32): g = grad / grad_scale
    found_inf: Tensor | None = None  # GradScaler's flag (0-dim float32): > 0 skips the step
    # sharded parameters: ``sums, loss = reduce_sums(sums, loss)`` between pass 1 and the
    # finalize (one all-reduce of the [n_groups, 6] float64 sums and the loss)
    reduce_sums: ReduceSums | None = None
    # ``list(map(Tensor.const_data_ptr, grads))`` when the caller has read it (FusedALIG's per-step
    # check of the gradients does), else None: a backend that recognises tensors by address
    # (triton's table cache) uses it instead of reading the addresses again
    grad_addresses: list[int] | None = None


# ---------------------------------------------------------------------------------------
# The pure-torch path: foreach ops, grouped by dtype, no host sync.
# ---------------------------------------------------------------------------------------


def torch_alig(step: StepInputs, cache: dict | None = None) -> None:
    """One ALI-G step with foreach ops (a backend: see ``StepInputs``).

    Without ``reduce_sums`` the projection is measured after the update (one more norm
    pass); with it, it comes from the pass-1 sums so that they travel in one all-reduce.
    """
    params, grads, momentum_buffers = step.params, step.grads, step.momentum_buffers
    group_index, group_hparams, loss = step.group_index, step.group_hparams, step.loss
    grad_scale, found_inf, reduce_sums = step.grad_scale, step.found_inf, step.reduce_sums
    n_groups = len(group_hparams)
    device = loss.device
    hparams = hparams_table(group_hparams, device, cache)
    by_group = _split_by_group(group_index, n_groups)
    # Without sharding this path measures ||w'|| after the update (one norm pass, exact by
    # definition). Sharded, it needs the projection sums before the update so that they
    # travel in the same single all-reduce as ||g||^2 and the loss (see _dot).
    analytic_projection = reduce_sums is not None

    # Pass 1, a cache-sized batch at a time (see _batches: no full-size temporaries).
    # Unscaled gradients, math in (at least) fp32.
    inv_scale = None if grad_scale is None else grad_scale.to(torch.float32).reciprocal()
    sums = torch.zeros(n_groups, Sum.COUNT, dtype=torch.float64, device=device)
    for k, idx in enumerate(by_group):
        if not idx:
            continue
        g = [grads[i] for i in idx]
        if not (analytic_projection and math.isfinite(group_hparams[k].max_norm)):
            sums[k, Sum.GG] = _total([_dots(_unscaled32(g_part, inv_scale)) for (g_part,) in _batches(g)])
            continue
        w = [params[i] for i in idx]
        b = [momentum_buffers[i] for i in idx] if group_hparams[k].momentum > 0 else None
        group_sums_into(sums[k], w, g, b, inv_scale)
    if reduce_sums is not None:
        sums, loss = reduce_sums(sums, loss)

    step_size, coefs, skip = finalize(sums, loss, hparams, None, found_inf)
    step.step_size_out.copy_(step_size)
    step.skipped_steps.add_(skip.to(step.skipped_steps.dtype))

    # Pass 2: w' = (w + a*b - c*g) * scale (with the old buffer), b' = mu*b - d*g, one batch
    # at a time: the batch's fp32 temporaries stay in cache, so the few foreach ops over a
    # batch cost about one pass over memory. The coefficients: ``pass2_coefficients``.
    inputs = pass2_coefficients(coefs, skip)
    if inputs is None:
        return  # a skipped step, known on the host (CPU)
    coefs_of, keep_bits = inputs
    for k, idx in enumerate(by_group):
        if not idx:
            continue
        b = momentum_buffers if group_hparams[k].momentum > 0 else None
        project = math.isfinite(group_hparams[k].max_norm)
        measure = project and not analytic_projection
        w_squares: list[Tensor] = []
        parts = _split_float64(idx, params)
        for part in parts:
            w_squares += update_part(params, grads, b, part, coefs_of[_coef_dtype(params[part[0]])][k], inv_scale,
                                   keep_bits, scale=project and not measure, measure=measure)
        if measure:
            # The projection, measured over the whole group, whatever the dtypes: one more
            # in-place pass (as the C++ CPU op's pass 3), over the stored w' (rounded once
            # more for bf16/fp16, as there).
            measured = projection_scale(_total(w_squares), hparams[k, HParam.MAX_NORM])
            host = keep_bits is None  # host numbers (pass2_coefficients): no pass where the ball does not bind
            factor = measured.item() if host else torch.where(skip, 1.0, measured)
            if host and factor == 1.0:
                continue
            for part in parts:
                dtype = _coef_dtype(params[part[0]])  # a 0-dim tensor on the host too: see update_part
                torch._foreach_mul_([params[i] for i in part], torch.tensor(factor, dtype=dtype) if host else factor.to(dtype))


# Whether the torch path reads pass 2's numbers on the host when its tensors are on a CPU
# (pass2_coefficients). Tests turn it off to run, on a CPU, the code a GPU runs.
HOST_NUMBERS_ON_CPU = True


def pass2_coefficients(coefs: Tensor, skip: Tensor) -> tuple[dict, Tensor | None] | None:
    """What ``update_part`` takes from finalize's [n_groups, 5] coefficients: the rows per
    working dtype (``coefs_of[dtype][group]``) and ``keep_bits``; None: the step is skipped,
    nothing to update.

    On a CPU outside torch.compile, reading a tensor is a memory read, not a device sync: the
    rows become Python numbers (foreach ops with a scalar, not a 0-dim tensor, run the
    vectorized scalar kernels), and a skipped step is known here, so no non-finite gradient
    reaches the update (keep_bits None). Elsewhere (CUDA; traced by torch.compile) the
    numbers stay on the device. There a non-finite gradient must not reach the update even
    with a coefficient of 0 (0 * inf = nan), and foreach has no select: the batch's gradient
    is first copied with its bits zeroed on a skipped step (an integer multiply by
    keep_bits, ``_kept_grads32``; the coefficients are then the identity, so w and b come
    out bit-identical). On a CPU that copy (an integer multiply by a 0-dim tensor, not
    vectorized) was half of the step's time (ResNet-50 fp32, momentum, a binding ball).
    """
    if HOST_NUMBERS_ON_CPU and coefs.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(skip):
            return None
        return {dtype: [tuple(row) for row in coefs.to(dtype).tolist()] for dtype in (torch.float32, torch.float64)}, None
    return coefficients_by_dtype(coefs), (~skip).to(torch.int32)


def coefficients_by_dtype(coefs: Tensor) -> dict[torch.dtype, Tensor]:
    """The [n_groups, 5] coefficients per working dtype: float32 (the kernels' precision) for
    fp32/bf16/fp16 tensors, float64 for float64 tensors (float32 coefficients would cost them
    ~1e-8 relative per step)."""
    return {torch.float32: coefs.to(torch.float32), torch.float64: coefs.to(torch.float64)}


def _coef_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def update_part(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor] | None,
    part: list[int],
    coefs: Tensor | tuple[float, ...],
    inv_scale: Tensor | None,
    keep_bits: Tensor | None,
    *,
    scale: bool,
    measure: bool = False,
) -> list[Tensor]:
    """Pass 2 over the tensors ``part`` (indices into the lists) of one group and one
    coefficient dtype, a batch at a time: w' = (w + a*b - c*g) [* scale], b' = mu*b - d*g
    (``buffers`` None: the group has no momentum). ``coefs`` is the group's row
    [Coef.COUNT], a tensor or Python numbers (then ``keep_bits`` is None: the gradients are
    finite; ``pass2_coefficients``). Returns ||w'||^2 of the pieces (before rounding to
    storage; ``_dots``, one tensor per batch) when ``measure``. Also FusedMoMo's torch pass 2
    (momo.py)."""
    host = not isinstance(coefs, Tensor)
    a, c, d, mu, factor = coefs if host else coefs.unbind()
    if host:
        # A CPU foreach multiply by a 0-dim tensor: 1.1 us a tensor of 4,096 fp32, by a Python
        # number 3.2 us (it wraps the number in a new tensor for every tensor); the same bits.
        mu, factor = (torch.tensor(x, dtype=_coef_dtype(params[part[0]])) if x != 1.0 else x for x in (mu, factor))
    w_squares: list[Tensor] = []
    lists = [[params[i] for i in part], [grads[i] for i in part]]
    if buffers is not None:
        lists.append([buffers[i] for i in part])
    for w, g_part, *b_part in _batches(*lists):
        w32 = _as_float32(w)
        b32 = _as_float32(b_part[0]) if buffers is not None else None
        g32 = _unscaled32(g_part, inv_scale) if host else _kept_grads32(g_part, inv_scale, keep_bits)
        if host:  # update_element's order (alig_math.h): w - c*g, + a*b, then b
            torch._foreach_add_(w32, g32, alpha=-c)
            if b32 is not None:
                torch._foreach_add_(w32, b32, alpha=a)
                torch._foreach_mul_(b32, mu)
                torch._foreach_add_(b32, g32, alpha=-d)
        else:  # w - c*g is w + g*(-c)
            if b32 is not None:
                torch._foreach_addcmul_(w32, b32, [a] * len(b32))
            torch._foreach_addcmul_(w32, g32, [-c] * len(g32))
            if b32 is not None:
                torch._foreach_mul_(b32, mu)
                torch._foreach_addcmul_(b32, g32, [-d] * len(g32))
        if b32 is not None:
            _copy_back(b_part[0], b32)
        if measure:
            w_squares.append(_dots(w32))
        elif scale and not (host and isinstance(factor, float)):
            torch._foreach_mul_(w32, factor)
        _copy_back(w, w32)
        # Freed before the next batch's copies exist, not as they replace them one by one:
        # ResNet-50 bf16, 2^17 batches, peak 2.0 -> 1.5 MiB over the parameters (bench.peak_memory).
        del w32, b32, g32
    return w_squares


# Pieces and batches of the torch path (elements; ``_limits``). fp32 norms of pieces of 2^17
# elements (``_dots``; on a CPU dot products, closer still), added in fp64, are within ~1e-6
# of the fp64 sum of squares (measured on 8M elements: 3e-7 with 2^16, 3e-6 with 2^18; one
# fp32 norm of all 8M is off by 5e-4, and float64 norms materialise a float64 copy of every
# tensor). A batch's fp32 temporaries (the kept gradient copy on a GPU, fp32 copies of
# bf16/fp16 storage) live one batch at a time; smaller pieces cost more op calls (each a
# parallel region on CPU), larger ones leave the cache (pass 2 of ResNet-50 fp32 on the
# 2-core Xeon: 2^16 29.4 ms, 2^17 26.3, 2^18 26.1, 2^20 30.0, 2^22 32.3).
PIECE_ELEMENTS = 1 << 17
BATCH_ELEMENTS = 1 << 17
# fp32/fp64 tensors on a CPU are updated in place (host numbers, no working copy, nothing
# to keep in cache): there the pieces and batches are this many times larger, since each
# piece costs a few op calls and their Python (~0.1 ms a batch). The whole step of ResNet-50
# fp32, momentum and a binding ball, 2-core AMD EPYC, interleaved against foreach SGD (44.8
# ms): 2^16 118 ms, 2^17 88.6, 2^18 74.4, 2^19 63.5, 2^20 63.4, 2^21 69.7, 2^22 79.0. The
# sums of pieces of 2^19: dot products within 9e-7 of the fp64 sum (2^17: 1.5e-7).
IN_PLACE_CPU_FACTOR = 4
_IN_PLACE_DTYPES = (torch.float32, torch.float64)
# bf16/fp16 on a CPU: pieces and batches of this fraction of the group, between 2^16 and
# 2^18 elements (GPT-2 bf16 with the ball, interleaved: 2^19 took 1.5x as long as 2^18).
# Their three fp32 working copies (12 bytes an element, against 2 of storage) then stay
# within ~5% of the group's bytes (bench.peak_memory: 1.5 MiB, 3.1%, on ResNet-50 bf16;
# 0.3-0.7 MiB, 2.1-4.4%, on 2,000 x 4,096, where a fixed 2^17 took 10.5%; the floor of 2^16
# kept that set's step time, 2^14 made it 28% slower), and a large model gets the larger
# pieces that cost fewer calls (ResNet-50 bf16 with the ball: 2^17 109 ms, 2^18 90).
LOW_PRECISION_CPU_FRACTION = 1 / 192
# Elsewhere (a GPU) a foreach op over a batch is one multi-tensor kernel launch of a few us
# whatever the batch's size, and a batch of 2^17 elements made GPT-2's step ~950 batches of
# ~10 launches each. There a batch holds this fraction of the group's elements (at least
# 2^14; pieces at most 2^17, for the norms), so its temporaries stay within ~2% of the parameters:
# fp32 keeps one gradient copy per batch (4 bytes an element: 1/64 of the group is 1.6% of
# its bytes), bf16/fp16 three fp32 working copies (12 bytes an element against 2: 1/256 is
# 2.3%). Not measured on a GPU yet; the CPU tests run this path at small sizes.
DEVICE_BATCH_FRACTION = {torch.float32: 1 / 64, torch.float64: 1 / 64, torch.float16: 1 / 256, torch.bfloat16: 1 / 256}


def _limits(dtype: torch.dtype, cpu: bool, group_elements: int) -> tuple[int, int]:
    """(piece, batch) elements for tensors of ``dtype`` in a list of ``group_elements``."""
    if cpu and dtype in _IN_PLACE_DTYPES:
        return PIECE_ELEMENTS * IN_PLACE_CPU_FACTOR, BATCH_ELEMENTS * IN_PLACE_CPU_FACTOR
    if cpu:
        size = int(group_elements * LOW_PRECISION_CPU_FRACTION)
        size = max(min(PIECE_ELEMENTS, 1 << 16), min(size, PIECE_ELEMENTS * 2))
        return size, size
    batch = max(min(BATCH_ELEMENTS, 1 << 14), int(group_elements * DEVICE_BATCH_FRACTION.get(dtype, 0)))
    return min(PIECE_ELEMENTS, batch), batch


def _batches(*lists: list[Tensor]):
    """Yields tuples of lists (one per input list) of matching pieces, at most a batch's
    elements per batch (or one larger non-contiguous tensor): contiguous tensors above a
    piece's elements are split into flat views (both sizes per dtype and device: ``_limits``).
    A small tensor costs an index append (2,000 tensors: 1.1 ms a pass, against 3.5 ms when
    each row was zipped into a tuple)."""
    if not lists[0]:
        return
    cpu = lists[0][0].device.type == "cpu"
    whole: list[int] = []  # indices of tensors taken whole
    pieces: list[tuple[Tensor, ...]] = []  # flat views, one per list
    size = 0

    def batch() -> tuple[list[Tensor], ...]:
        return tuple([lst[i] for i in whole] + [p[k] for p in pieces] for k, lst in enumerate(lists))

    limits: dict[torch.dtype, tuple[int, int]] = {}  # (piece, batch elements) per dtype
    group_elements = -1  # counted once, when a dtype's limits need it
    for i, first in enumerate(lists[0]):
        dtype = first.dtype
        if dtype not in limits:
            if group_elements < 0 and not (cpu and dtype in _IN_PLACE_DTYPES):
                group_elements = sum(t.numel() for t in lists[0])
            limits[dtype] = _limits(dtype, cpu, group_elements)
        piece_elements, batch_elements = limits[dtype]
        n = first.numel()
        if n <= piece_elements or not all(lst[i].is_contiguous() for lst in lists):
            if size and size + n > batch_elements:
                yield batch()
                whole, pieces, size = [], [], 0
            whole.append(i)
            size += n
            continue
        for piece in zip(*(lst[i].view(-1).split(piece_elements) for lst in lists)):
            m = piece[0].numel()
            if size and size + m > batch_elements:
                yield batch()
                whole, pieces, size = [], [], 0
            pieces.append(piece)
            size += m
    if whole or pieces:
        yield batch()


def group_sums_into(row: Tensor, w: list[Tensor], g: list[Tensor], b: list[Tensor] | None, inv_scale: Tensor | None) -> None:
    """All six pass-1 sums of one group into ``row`` ([Sum.COUNT] float64), a batch at a time
    (b None: no buffer, BB = WB = BG = 0). Also FusedMoMo's torch pass 1 (momo.py)."""
    parts: dict[int, list[Tensor]] = {col: [] for col in range(Sum.COUNT)}
    for w_part, g_part, *b_part in _batches(w, g, *([b] if b is not None else [])):
        g32, w32 = _unscaled32(g_part, inv_scale), _as_float32(w_part)
        parts[Sum.GG].append(_dots(g32))
        parts[Sum.WW].append(_dots(w32))
        parts[Sum.WG].append(_dots(w32, g32))
        if b is not None:
            b32 = _as_float32(b_part[0])
            parts[Sum.BB].append(_dots(b32))
            parts[Sum.WB].append(_dots(w32, b32))
            parts[Sum.BG].append(_dots(b32, g32))
            del b32
        del g32, w32  # before the next batch's copies (see update_part)
    for col, values in parts.items():
        if values:
            row[col] = _total(values)


def _unscaled32(grads: list[Tensor], inv_scale: Tensor | None) -> list[Tensor]:
    """The gradients in (at least) fp32, times inv_scale when given (new tensors then)."""
    g32 = _as_float32(grads)
    if inv_scale is None:
        return g32
    if any(x is y for x, y in zip(g32, grads)):
        return torch._foreach_mul(g32, inv_scale)
    torch._foreach_mul_(g32, inv_scale)
    return g32


def _kept_grads32(grads: list[Tensor], inv_scale: Tensor | None, keep_bits: Tensor) -> list[Tensor]:
    """New fp32 (or fp64) tensors: the unscaled gradients, all-zero bits when keep_bits == 0."""
    g32 = _unscaled32(grads, inv_scale)
    if any(x is y for x, y in zip(g32, grads)):  # fp32/fp64 storage, no grad_scale: one op makes the copy
        kept = torch._foreach_mul([x.view(_SAME_SIZE_INT[x.dtype]) for x in g32], keep_bits)
        return [x.view(y.dtype) for x, y in zip(kept, g32)]
    return _zero_unless(keep_bits, g32)


def _dots(xs: list[Tensor], ys: list[Tensor] | None = None) -> Tensor:
    """<x, y> of each pair of pieces (<x, x> without ys), as one float64 tensor [len(xs)]
    (the pieces are fp32 or fp64; ``_total`` adds them up).

    On a CPU, a dot product for a batch of one piece: against ``_foreach_norm`` it was twice
    as fast (4.5 against 9 ms for ResNet-50's 25.6M fp32 gradients, 2 threads) and closer (1e-8
    against 1e-6 relative to the float64 sum, on pieces of 2^17). Otherwise ops that loop over
    the list in C++ (a Python loop of dots made 2,000 x 4,096 fp32 with momentum and the ball
    50.5 ms a step, against 39.9): one ``_foreach_norm`` (one kernel on CUDA) and, for <x, y>,
    on a CPU the sum of the products (one value for the batch), elsewhere, foreach having no
    dot product, polarization, (||x + y||^2 - ||x - y||^2) / 4 (the rounding error is ~1e-7
    (||x||^2 + ||y||^2), which the projection's norm, a sum of such terms with ||w||^2,
    absorbs)."""
    cpu = xs[0].device.type == "cpu"
    if cpu and len(xs) == 1:
        return _dot_one(xs[0], xs[0] if ys is None else ys[0]).to(torch.float64).reshape(1)
    if cpu and ys is not None:
        products = torch._foreach_mul(xs, ys)
        return torch.cat([p.view(-1) for p in products]).sum().to(torch.float64).reshape(1)
    if ys is None:
        norms = torch.stack(torch._foreach_norm(xs)).to(torch.float64)
        return norms * norms
    plus = torch.stack(torch._foreach_norm(torch._foreach_add(xs, ys))).to(torch.float64)
    minus = torch.stack(torch._foreach_norm(torch._foreach_sub(xs, ys))).to(torch.float64)
    return (plus * plus - minus * minus) / 4


def _dot_one(x: Tensor, y: Tensor) -> Tensor:
    if x.is_contiguous() and y.is_contiguous():
        return torch.dot(x.view(-1), y.view(-1))
    return torch.sum(x * y)  # a dense non-contiguous tensor (channels_last): a rare temporary


def _total(parts: list[Tensor]) -> Tensor:
    """The float64 sum of ``_dots`` results."""
    return torch.cat(parts).sum()


def hparams_table(group_hparams: list[GroupHParams], device: torch.device, cache: dict | None) -> Tensor:
    """The [n_groups, 7] float64 table of ``group_hparams`` on ``device`` (see ``HParam``).

    One table per (device, n_groups) lives in ``cache`` and is rewritten in place, never
    replaced: a captured CUDA graph replays the table's address, so that table must stay
    alive and carry the new values (a scheduler changing lr between replays).

    - Host numbers are compared with those last written (one tuple compare, no tensor work
      when nothing changed); a change is one copy from pinned memory with
      non_blocking=True, no host sync. It cannot run while a CUDA graph is being captured
      (the graph would replay a copy from a host block that is recycled): that is an error.
    - An ``lr`` that is a tensor is never read on the host: it is copied into the table on
      the device at every step (one small kernel, or one foreach copy for many groups), so
      a scheduler's in-place update reaches eager steps, compiled steps and CUDA-graph
      replays alike. (FusedALIG hands over a CPU tensor lr as a host number in eager mode.)
    """
    if cache is None:
        cache = {}
    n_groups = len(group_hparams)
    key, values_key = ("hparams", device, n_groups), ("hparams_values", device, n_groups)
    table = cache.get(key)
    tensor_lrs = [k for k, h in enumerate(group_hparams) if not isinstance(h.lr, (float, int))]
    # None marks a tensor lr's column: never a written value (no lr is None here), so a group
    # whose lr turns from a tensor back into a number always gets its column rewritten.
    values = tuple(group_hparams) if not tensor_lrs else tuple(h._replace(lr=None) if not isinstance(h.lr, (float, int)) else h for h in group_hparams)
    compiling = torch.compiler.is_compiling()
    if compiling:
        # Traced: the host compare would become guards on every value; write the table in the
        # graph instead (a fill of constants) and let the next eager step rewrite it.
        if table is None:
            table = cache[key] = torch.empty(n_groups, HParam.COUNT, dtype=torch.float64, device=device)
        table.copy_(torch.tensor(_rows(values), dtype=torch.float64, device=device))
        cache[values_key] = None  # a store, not a read: no guard on it
    elif table is None or cache.get(values_key) != values:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "FusedALIG's hyper-parameters changed since the last eager step, during CUDA graph "
                "capture: run one eager step with the new values before capturing (or use a CUDA "
                "tensor lr, which a captured step copies on the device)"
            )
        if table is None:
            table = cache[key] = torch.empty(n_groups, HParam.COUNT, dtype=torch.float64, device=device)
        host = torch.tensor(_rows(values), dtype=torch.float64)
        table.copy_(host.pin_memory() if device.type == "cuda" else host, non_blocking=True)
        cache[values_key] = values
    if tensor_lrs:
        if compiling:
            lr_cells = [table[k, HParam.LR] for k in tensor_lrs]
        else:  # the views of the lr column, made once (indexing costs ~1 us a view)
            column = cache.get(("hparams_lr_column", device, n_groups))
            if column is None:
                column = cache[("hparams_lr_column", device, n_groups)] = table.select(1, HParam.LR).unbind(0)
            lr_cells = [column[k] for k in tensor_lrs]
        lrs = [group_hparams[k].lr for k in tensor_lrs]
        torch._foreach_copy_(lr_cells, [lr if lr.dim() == 0 else lr.reshape(()) for lr in lrs])
    return table


def _rows(values: tuple) -> list[list[float]]:
    return [[math.nan if v is None else float(v) for v in h] for h in values]


def _split_float64(idx: list[int], params: list[Tensor]) -> list[list[int]]:
    """``idx`` as [float64 tensors, the others], without the empty part."""
    float64 = [i for i in idx if params[i].dtype == torch.float64]
    others = [i for i in idx if params[i].dtype != torch.float64]
    return [part for part in (float64, others) if part]


def _split_by_group(group_index: list[int], n_groups: int) -> list[list[int]]:
    by_group: list[list[int]] = [[] for _ in range(n_groups)]
    for i, k in enumerate(group_index):
        by_group[k].append(i)
    return by_group


def _as_float32(tensors: list[Tensor]) -> list[Tensor]:
    # fp32 (and fp64) tensors are used in place; fp16/bf16 ones get an fp32 working copy
    # (math in at least fp32 whatever the storage dtype).
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def _copy_back(dst: list[Tensor], src32: list[Tensor]) -> None:
    pairs = [(d, s) for d, s in zip(dst, src32) if d is not s]
    if pairs:
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


def _zero_unless(keep_bits: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """In place: tensors unchanged when keep_bits == 1, all-zero bits (0.0) when 0."""
    torch._foreach_mul_([t.view(_SAME_SIZE_INT[t.dtype]) for t in tensors], keep_bits)
    return tensors


_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64}
