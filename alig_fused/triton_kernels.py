"""The ALI-G step in Triton: three launches per step for the whole model.

Launches (one grid each, however many tensors the model has):

    pass 1    grid = (n_chunks,)  per chunk, fp32 partial sums (columns of ``Sum``) into
              ``partial[n_chunks, 6]``; every entry is written, no atomics
    finalize  grid = (1,)         per group, the partial sums added in fp64 in a fixed
              order, then ``functional.finalize``: the step sizes into ``step_size_out``,
              ``coefs[n_groups, 5]`` (columns of ``Coef``), the skip flag, and
              ``skipped_steps += skip``
    pass 2    grid = (n_chunks,)  reads the skip flag and its group's coefficients from
              device memory; w' = (w + a*b - c*g) * scale, b' = mu*b - d*g; on a skipped
              step it writes nothing

The chunk table (its layout: ``triton_tables``) lists every chunk of every tensor.
Addresses are ``data_ptr()``s cast to pointers in the kernels; the dtype code picks the
pointer type at run time (a uniform branch per program), so a model mixing fp32, bf16 and
fp16 tensors still takes three launches. w, g and b of one tensor share its dtype; the
math is fp32 whatever the storage (the finalize: fp64). Tensors must be dense (contiguous,
channels_last or another permutation: the elements are one span of memory from
``data_ptr()``, which the chunks cut as a flat array) and a tensor's gradient and buffer
laid out as its parameter (same strides: element k of each is the same element). A
tensor without a buffer (its group has no momentum) has has_buffer = 0 and b = g: its
"buffer" is never read nor written.

No host sync in the step: no ``.item()``; the table goes to the device through pinned
memory with ``non_blocking=True``, and only when the tensors change (addresses or groups,
checked in C-level passes: ``_tables``). Tables used on another stream than the one they
were made on are recorded on it (``record_stream``). ``grad_scale``/``found_inf`` of None
become cached device constants 1.0 and 0.0 (unscaling by 1.0 is exact), so they add no
kernel variant.

With ``reduce_sums`` (parameters sharded across ranks) the finalize runs twice around it:
once to write the per-group fp64 sums, once to finish from the reduced sums and loss:
four launches and one collective.

Capturing a step in a CUDA graph (every launch reads its scalars from device memory, so
the step is capturable):

- params, grads and buffers must be static: keep the same ``.grad`` tensors
  (``zero_grad(set_to_none=False)``, or capture forward and backward too);
- the loss must be a device tensor, float64 (another dtype adds a cast kernel whose
  output the graph then owns), refilled in place before each replay;
- run at least one eager step first (on a side stream, as ``torch.cuda.graphs`` asks for
  warm-up): it compiles the kernels, creates the momentum buffers and builds this
  backend's device tables, so the captured step only launches the three kernels (a step
  that would build new tables inside a capture raises RuntimeError instead);
- the chunk tables a capture used stay alive as long as the optimizer (pinned in its
  cache), so later eager steps with new tensors do not free what the graph replays;
- hyper-parameters are baked in at capture: the hparams table
  (``functional.hparams_table``) is a cached device tensor whose address the graph holds;
  changing ``group["lr"]`` (e.g. a scheduler) makes the next eager step build a new table
  that the graph never reads. Recapture after changing hyper-parameters or parameters.

    static_loss = torch.zeros((), dtype=torch.float64, device="cuda")
    opt.step(loss=static_loss)                           # eager warm-up (side stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(loss=static_loss)
    ...
    static_loss.copy_(loss); graph.replay()
"""

from __future__ import annotations

import contextlib
import itertools
from typing import NamedTuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from . import triton_tables
from .functional import Coef, HParam, StepInputs, Sum, hparams_table

__all__ = ["triton_alig", "launches", "KERNELS", "CHUNK", "BLOCK"]

# The spec's table columns (functional.HParam, Sum, Coef) as compile-time constants: the
# kernels index the tables only through these, so a column added to the spec reaches them.
HP_COUNT, SUM_COUNT, COEF_COUNT = (tl.constexpr(n) for n in (HParam.COUNT, Sum.COUNT, Coef.COUNT))
HP_LR, HP_MOMENTUM, HP_ADJUSTED, HP_MAX_NORM, HP_EPS, HP_F_STAR, HP_SCALING = (
    tl.constexpr(c) for c in (HParam.LR, HParam.MOMENTUM, HParam.ADJUSTED, HParam.MAX_NORM, HParam.EPS,
                              HParam.F_STAR, HParam.SCALING))
SUM_GG, SUM_WW, SUM_BB, SUM_WB, SUM_WG, SUM_BG = (
    tl.constexpr(c) for c in (Sum.GG, Sum.WW, Sum.BB, Sum.WB, Sum.WG, Sum.BG))
COEF_A, COEF_C, COEF_D, COEF_MU, COEF_SCALE = (tl.constexpr(c) for c in (Coef.A, Coef.C, Coef.D, Coef.MU, Coef.SCALE))

# Elements per chunk (one program of pass 1 / pass 2) and per loop iteration; warps.
# Reasoned defaults, not autotuned (autotuning on H100 is unmeasured): 16 iterations per
# program, ~6k programs per 100M parameters; 8 warps x 32 threads x 4 elements = BLOCK,
# so fp32 loads and stores are 16-byte vectors (bf16/fp16: 8-byte in pass 2; pass 1: see
# PASS1_UNROLL) with no layout change
# between them (with 4 warps the compiler loads 8 and stores 4 elements per thread, a
# shared-memory round trip per block: read in the TTGIR for sm_90, not timed).
# CHUNK must be a multiple of BLOCK, BLOCK a power of two >= 16.
CHUNK = 16384
BLOCK = 1024
NUM_WARPS = 8
# The finalize (one program) works on tiles of up to FINALIZE_TILE groups, reading
# FINALIZE_LANES partial-sum rows per load (1 group: 1,024 chunks at a time; 32 groups: 32
# chunks of each). Registers stay bounded whatever the number of groups.
FINALIZE_TILE = 32
FINALIZE_LANES = 1024
FINALIZE_WARPS = 4
# Pass 1 on a whole chunk is a pure stream of loads, so it needs bytes in flight: bf16/fp16
# take blocks of 2 * BLOCK (8 elements, 16 bytes per thread and load, as fp32's 4) and the
# loop is unrolled PASS1_UNROLL times (the loads of 4 iterations are issued together). For
# sm_90 (tests/test_triton_compile.py reads the SASS): 9 x UNROLL LDG.E.128 on the three
# whole-chunk paths, 102 registers (2 CTAs of 256 threads per SM), no spills. In flight per
# SM: 2 CTAs x 256 threads x 4 iterations x 16 B = 32 KiB when only g is read (no
# max_norm), 96 KiB with w and b; Little's law at ~700 ns asks ~15.5 KiB on an H100 (3.35
# TB/s, 132 SMs), ~22 KiB on an H200 (4.8 TB/s). Before: 58-60 registers, 4 CTAs, one
# 16 B (fp32) or 8 B (bf16) load per thread per array: 16 / 8 KiB (g only). Estimated,
# not measured (no GPU run yet).
PASS1_UNROLL = 4

# finalize modes: the whole finalize; only the per-group sums; finish from given sums
_FINALIZE, _GROUP_SUMS, _FROM_SUMS = 0, 1, 2


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
#
# A program of pass 1 / pass 2 takes one of two paths (a uniform branch):
# - full chunk, 16-byte aligned: no element mask; the pointers carry a divisibility hint
#   and the w/b limits are visible multiples of CHUNK, so loads and stores are 16-byte
#   vectors; a constant trip count.
# - the rest (a tensor's last chunk, unaligned tensors): element masks, no hints.
# Conditions (read w? has a buffer?) become element limits (w is read below ``w_end``, b
# below ``b_end``: a load whose mask is all false moves no memory) rather than a scalar
# flag and-ed into a mask: the interpreter of triton 3.6 mistypes bitwise ops on the
# result of a float compare. Run-time loops are ``while`` loops: ``range(0, n)`` with an
# ``n`` that depends on ``tl.program_id`` fails in that interpreter with numpy >= 2.4
# (triton-lang/triton#9171). Helpers are few: each @jit call costs the interpreter ~1 ms.
# That interpreter also truncates fp32 -> bf16 conversions where the GPU rounds to nearest
# even (cvt.rn.bf16.f32); tests/test_triton.py makes it round as the GPU does.


@triton.jit
def _sums_full(w_addr, g_addr, b_addr, read_w, read_b, inv_scale, DTYPE: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """fp32 sums (GG, WW, BB, WB, WG, BG) over a whole aligned chunk."""
    # The casts are made here, so the hints stay on this path.
    w_ptr = tl.multiple_of(w_addr.to(tl.pointer_type(DTYPE)), 16)
    g_ptr = tl.multiple_of(g_addr.to(tl.pointer_type(DTYPE)), 16)
    b_ptr = tl.multiple_of(b_addr.to(tl.pointer_type(DTYPE)), 16)
    w_end = CHUNK * read_w  # 0 or CHUNK
    b_end = CHUNK * read_b
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    ww = tl.zeros([BLOCK], dtype=tl.float32)
    bb = tl.zeros([BLOCK], dtype=tl.float32)
    wb = tl.zeros([BLOCK], dtype=tl.float32)
    wg = tl.zeros([BLOCK], dtype=tl.float32)
    bg = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(CHUNK // BLOCK, loop_unroll_factor=UNROLL):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs).to(tl.float32) * inv_scale
        w = tl.load(w_ptr + offs, mask=offs < w_end, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=offs < b_end, other=0.0).to(tl.float32)
        gg += g * g
        ww += w * w
        bb += b * b
        wb += w * b
        wg += w * g
        bg += b * g
    return tl.sum(gg), tl.sum(ww), tl.sum(bb), tl.sum(wb), tl.sum(wg), tl.sum(bg)


@triton.jit
def _sums_masked(w_addr, g_addr, b_addr, count, read_w, read_b, inv_scale, DTYPE: tl.constexpr,
                 BLOCK: tl.constexpr):
    """fp32 sums (GG, WW, BB, WB, WG, BG) over the first ``count`` elements."""
    w_ptr = w_addr.to(tl.pointer_type(DTYPE))
    g_ptr = g_addr.to(tl.pointer_type(DTYPE))
    b_ptr = b_addr.to(tl.pointer_type(DTYPE))
    w_end = count * read_w
    b_end = count * read_b
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    ww = tl.zeros([BLOCK], dtype=tl.float32)
    bb = tl.zeros([BLOCK], dtype=tl.float32)
    wb = tl.zeros([BLOCK], dtype=tl.float32)
    wg = tl.zeros([BLOCK], dtype=tl.float32)
    bg = tl.zeros([BLOCK], dtype=tl.float32)
    start = count * 0
    while start < count:
        offs = start + tl.arange(0, BLOCK)
        start += BLOCK
        g = tl.load(g_ptr + offs, mask=offs < count, other=0.0).to(tl.float32) * inv_scale
        w = tl.load(w_ptr + offs, mask=offs < w_end, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=offs < b_end, other=0.0).to(tl.float32)
        gg += g * g
        ww += w * w
        bb += b * b
        wb += w * b
        wg += w * g
        bg += b * g
    return tl.sum(gg), tl.sum(ww), tl.sum(bb), tl.sum(wb), tl.sum(wg), tl.sum(bg)


@triton.jit
def _alig_pass1_kernel(meta_ptr, partial_ptr, hparams_ptr, grad_scale_ptr,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr, BLOCK16: tl.constexpr, UNROLL: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = meta_ptr + 8 + 8 * pid
    w_addr = tl.load(row)
    g_addr = tl.load(row + 1)
    b_addr = tl.load(row + 2)
    count = tl.load(row + 3).to(tl.int32)
    group = tl.load(row + 4)
    dtype_code = tl.load(row + 5)
    # w (and b, if any) are read only for a group with a max_norm (+inf: none).
    max_norm = tl.load(hparams_ptr + HP_COUNT * group + HP_MAX_NORM)
    read_w = tl.where(max_norm < float("inf"), 1, 0)
    read_b = read_w * tl.load(row + 6).to(tl.int32)
    # 1 / grad_scale rounded once to fp32: the fp64 quotient rounded to fp32 is the
    # correctly rounded fp32 reciprocal (53 >= 2*24 + 2), as torch's reciprocal.
    inv_scale = (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(tl.float32)
    if tl.load(row + 7) != 0:
        if dtype_code == 0:
            gg, ww, bb, wb, wg, bg = _sums_full(w_addr, g_addr, b_addr, read_w, read_b, inv_scale,
                                                tl.float32, CHUNK, BLOCK, UNROLL)
        elif dtype_code == 1:
            gg, ww, bb, wb, wg, bg = _sums_full(w_addr, g_addr, b_addr, read_w, read_b, inv_scale,
                                                tl.bfloat16, CHUNK, BLOCK16, UNROLL)
        else:
            gg, ww, bb, wb, wg, bg = _sums_full(w_addr, g_addr, b_addr, read_w, read_b, inv_scale,
                                                tl.float16, CHUNK, BLOCK16, UNROLL)
    else:
        if dtype_code == 0:
            gg, ww, bb, wb, wg, bg = _sums_masked(w_addr, g_addr, b_addr, count, read_w, read_b, inv_scale,
                                                  tl.float32, BLOCK)
        elif dtype_code == 1:
            gg, ww, bb, wb, wg, bg = _sums_masked(w_addr, g_addr, b_addr, count, read_w, read_b, inv_scale,
                                                  tl.bfloat16, BLOCK)
        else:
            gg, ww, bb, wb, wg, bg = _sums_masked(w_addr, g_addr, b_addr, count, read_w, read_b, inv_scale,
                                                  tl.float16, BLOCK)
    out = partial_ptr + SUM_COUNT * pid
    tl.store(out + SUM_GG, gg)
    tl.store(out + SUM_WW, ww)
    tl.store(out + SUM_BB, bb)
    tl.store(out + SUM_WB, wb)
    tl.store(out + SUM_WG, wg)
    tl.store(out + SUM_BG, bg)


@triton.jit
def _alig_finalize_kernel(meta_ptr, partial_ptr, group_sums_ptr, hparams_ptr, loss_ptr, found_inf_ptr,
                          step_size_ptr, skipped_steps_ptr, coefs_ptr, skip_ptr,
                          TILE: tl.constexpr, FBLOCK: tl.constexpr, MODE: tl.constexpr):
    """MODE 0: the whole finalize; 1: only write the fp64 group sums; 2: finish from them.

    Two stages over tiles of TILE groups, so registers do not grow with the number of
    groups (before: one [groups, 8] fp64 tile, a per-group select over it, ~groups^2 work
    and spills past 512 groups). Stage 1: per tile, the partial sums of its groups' chunks,
    TILE groups x FBLOCK chunks per load (all groups of a tile at once, not one after the
    other), added in fp64 in a fixed order, into ``group_sums``, and the tile's share of G.
    Stage 2: per tile, the coefficients from ``group_sums``, once G (all groups) is known.
    """
    n_groups = tl.load(meta_ptr + 1)
    tile = tl.arange(0, TILE)
    grad_sq_acc = tl.zeros([TILE], dtype=tl.float64)
    base = n_groups * 0
    if MODE == 2:
        while base < n_groups:
            groups = base + tile
            grad_sq_acc += tl.load(group_sums_ptr + SUM_COUNT * groups + SUM_GG, mask=groups < n_groups, other=0.0).to(tl.float64)
            base += TILE
    else:
        # Per group, the partial sums of its chunks in fp64, always in the same order.
        group_rows = tl.load(meta_ptr + 2)
        lanes = tl.arange(0, FBLOCK)
        while base < n_groups:
            groups = base + tile
            in_group = groups < n_groups
            first = tl.load(meta_ptr + group_rows + 2 * groups, mask=in_group, other=0)
            end = tl.load(meta_ptr + group_rows + 2 * groups + 1, mask=in_group, other=0)
            longest = tl.max(end - first, axis=0)
            s_gg = tl.zeros([TILE], dtype=tl.float64)
            s_ww = tl.zeros([TILE], dtype=tl.float64)
            s_bb = tl.zeros([TILE], dtype=tl.float64)
            s_wb = tl.zeros([TILE], dtype=tl.float64)
            s_wg = tl.zeros([TILE], dtype=tl.float64)
            s_bg = tl.zeros([TILE], dtype=tl.float64)
            start = longest * 0
            while start < longest:
                chunks = first[:, None] + start + lanes[None, :]
                mask = chunks < end[:, None]
                row = partial_ptr + SUM_COUNT * chunks
                s_gg += tl.sum(tl.load(row + SUM_GG, mask=mask, other=0.0).to(tl.float64), axis=1)
                s_ww += tl.sum(tl.load(row + SUM_WW, mask=mask, other=0.0).to(tl.float64), axis=1)
                s_bb += tl.sum(tl.load(row + SUM_BB, mask=mask, other=0.0).to(tl.float64), axis=1)
                s_wb += tl.sum(tl.load(row + SUM_WB, mask=mask, other=0.0).to(tl.float64), axis=1)
                s_wg += tl.sum(tl.load(row + SUM_WG, mask=mask, other=0.0).to(tl.float64), axis=1)
                s_bg += tl.sum(tl.load(row + SUM_BG, mask=mask, other=0.0).to(tl.float64), axis=1)
                start += FBLOCK
            out = group_sums_ptr + SUM_COUNT * groups
            tl.store(out + SUM_GG, s_gg, mask=in_group)
            tl.store(out + SUM_WW, s_ww, mask=in_group)
            tl.store(out + SUM_BB, s_bb, mask=in_group)
            tl.store(out + SUM_WB, s_wb, mask=in_group)
            tl.store(out + SUM_WG, s_wg, mask=in_group)
            tl.store(out + SUM_BG, s_bg, mask=in_group)
            grad_sq_acc += s_gg
            base += TILE
    if MODE != 1:
        # stage 2 reads what other threads of this program stored in stage 1
        tl.debug_barrier()
        # From here on functional.finalize, line by line, in fp64.
        loss = tl.load(loss_ptr).to(tl.float64)
        grad_sq_norm = tl.sum(grad_sq_acc, axis=0)
        # skip = !isfinite(loss) || !(G < FLT_MAX) || found_inf > 0, through integers (see the
        # note above); |x| < inf is false for inf and for nan. FLT_MAX: functional.finalize.
        loss_ok = tl.where(tl.abs(loss) < float("inf"), 1, 0)
        grad_ok = tl.where(grad_sq_norm < 3.4028234663852886e38, 1, 0)
        no_inf = tl.where(tl.load(found_inf_ptr) > 0, 0, 1)
        skip = loss_ok * grad_ok * no_inf == 0  # the skip condition
        tl.store(skip_ptr, skip.to(tl.int32))
        tl.store(skipped_steps_ptr, tl.load(skipped_steps_ptr) + skip.to(tl.int64))

        base = n_groups * 0
        while base < n_groups:
            groups = base + tile
            in_group = groups < n_groups
            sums = group_sums_ptr + SUM_COUNT * groups
            sum_gg = tl.load(sums + SUM_GG, mask=in_group, other=0.0).to(tl.float64)
            sum_ww = tl.load(sums + SUM_WW, mask=in_group, other=0.0).to(tl.float64)
            sum_bb = tl.load(sums + SUM_BB, mask=in_group, other=0.0).to(tl.float64)
            sum_wb = tl.load(sums + SUM_WB, mask=in_group, other=0.0).to(tl.float64)
            sum_wg = tl.load(sums + SUM_WG, mask=in_group, other=0.0).to(tl.float64)
            sum_bg = tl.load(sums + SUM_BG, mask=in_group, other=0.0).to(tl.float64)

            hp = hparams_ptr + HP_COUNT * groups
            lr = tl.load(hp + HP_LR, mask=in_group, other=0.0)
            momentum = tl.load(hp + HP_MOMENTUM, mask=in_group, other=0.0)
            adjusted = tl.load(hp + HP_ADJUSTED, mask=in_group, other=0.0)
            max_norm = tl.load(hp + HP_MAX_NORM, mask=in_group, other=1.0)
            eps = tl.load(hp + HP_EPS, mask=in_group, other=1.0)
            f_star = tl.load(hp + HP_F_STAR, mask=in_group, other=0.0)
            scaling = tl.load(hp + HP_SCALING, mask=in_group, other=1.0)

            polyak_step = tl.maximum(loss - f_star, 0.0) / (scaling * grad_sq_norm + eps)
            step_size = tl.minimum(polyak_step, lr)

            a = tl.where(adjusted > 0, step_size * momentum * momentum, momentum * momentum)
            c = step_size * (1 + momentum)
            d = tl.where(adjusted > 0, 1.0, step_size)
            d = tl.where(momentum > 0, d, 0.0)

            new_norm_sq = (
                sum_ww
                + a * a * sum_bb
                + c * c * sum_gg
                + 2 * a * sum_wb
                - 2 * c * sum_wg
                - 2 * a * c * sum_bg
            )
            norm = tl.sqrt(tl.maximum(new_norm_sq, 0.0))
            outside = norm > max_norm
            scale = tl.where(outside, max_norm / tl.where(outside, norm, 1.0), 1.0)  # no 0/0 on padding rows

            # A skipped step: identity coefficients, step size 0 (and pass 2 writes nothing).
            out = coefs_ptr + COEF_COUNT * groups
            tl.store(out + COEF_A, tl.where(skip, 0.0, a).to(tl.float32), mask=in_group)
            tl.store(out + COEF_C, tl.where(skip, 0.0, c).to(tl.float32), mask=in_group)
            tl.store(out + COEF_D, tl.where(skip, 0.0, d).to(tl.float32), mask=in_group)
            tl.store(out + COEF_MU, tl.where(skip, 1.0, momentum).to(tl.float32), mask=in_group)
            tl.store(out + COEF_SCALE, tl.where(skip, 1.0, scale).to(tl.float32), mask=in_group)
            tl.store(step_size_ptr + groups, tl.where(skip, 0.0, step_size).to(tl.float32), mask=in_group)
            base += TILE


@triton.jit
def _update_full(w_addr, g_addr, b_addr, has_buffer, inv_scale, a, c, d, mu, scale, DTYPE: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """w' = (w + a*b - c*g) * scale, b' = mu*b - d*g (if has_buffer) over a whole aligned chunk."""
    w_ptr = tl.multiple_of(w_addr.to(tl.pointer_type(DTYPE)), 16)
    g_ptr = tl.multiple_of(g_addr.to(tl.pointer_type(DTYPE)), 16)
    b_ptr = tl.multiple_of(b_addr.to(tl.pointer_type(DTYPE)), 16)
    b_end = CHUNK * has_buffer
    for i in range(CHUNK // BLOCK):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask_b = offs < b_end
        w = tl.load(w_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32) * inv_scale
        b = tl.load(b_ptr + offs, mask=mask_b, other=0.0).to(tl.float32)
        # functional.torch_alig's order: w + a*b, then - c*g, then * scale; stores round
        # to the storage dtype (to nearest even).
        tl.store(w_ptr + offs, (w + a * b - c * g) * scale)
        tl.store(b_ptr + offs, mu * b - d * g, mask=mask_b)


@triton.jit
def _update_masked(w_addr, g_addr, b_addr, count, has_buffer, inv_scale, a, c, d, mu, scale,
                   DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """w' = (w + a*b - c*g) * scale, b' = mu*b - d*g (if has_buffer) over ``count`` elements."""
    w_ptr = w_addr.to(tl.pointer_type(DTYPE))
    g_ptr = g_addr.to(tl.pointer_type(DTYPE))
    b_ptr = b_addr.to(tl.pointer_type(DTYPE))
    b_end = count * has_buffer
    start = count * 0
    while start < count:
        offs = start + tl.arange(0, BLOCK)
        start += BLOCK
        mask = offs < count
        mask_b = offs < b_end
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
        b = tl.load(b_ptr + offs, mask=mask_b, other=0.0).to(tl.float32)
        tl.store(w_ptr + offs, (w + a * b - c * g) * scale, mask=mask)
        tl.store(b_ptr + offs, mu * b - d * g, mask=mask_b)


@triton.jit
def _alig_pass2_kernel(meta_ptr, coefs_ptr, skip_ptr, grad_scale_ptr,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    if tl.load(skip_ptr) == 0:
        row = meta_ptr + 8 + 8 * tl.program_id(0).to(tl.int64)
        w_addr = tl.load(row)
        g_addr = tl.load(row + 1)
        b_addr = tl.load(row + 2)
        count = tl.load(row + 3).to(tl.int32)
        coef = coefs_ptr + COEF_COUNT * tl.load(row + 4)
        dtype_code = tl.load(row + 5)
        has_buffer = tl.load(row + 6).to(tl.int32)
        a = tl.load(coef + COEF_A)
        c = tl.load(coef + COEF_C)
        d = tl.load(coef + COEF_D)
        mu = tl.load(coef + COEF_MU)
        scale = tl.load(coef + COEF_SCALE)
        inv_scale = (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(tl.float32)  # see pass 1
        if tl.load(row + 7) != 0:
            if dtype_code == 0:
                _update_full(w_addr, g_addr, b_addr, has_buffer, inv_scale, a, c, d, mu, scale,
                             tl.float32, CHUNK, BLOCK)
            elif dtype_code == 1:
                _update_full(w_addr, g_addr, b_addr, has_buffer, inv_scale, a, c, d, mu, scale,
                             tl.bfloat16, CHUNK, BLOCK)
            else:
                _update_full(w_addr, g_addr, b_addr, has_buffer, inv_scale, a, c, d, mu, scale,
                             tl.float16, CHUNK, BLOCK)
        else:
            if dtype_code == 0:
                _update_masked(w_addr, g_addr, b_addr, count, has_buffer, inv_scale, a, c, d, mu, scale,
                               tl.float32, BLOCK)
            elif dtype_code == 1:
                _update_masked(w_addr, g_addr, b_addr, count, has_buffer, inv_scale, a, c, d, mu, scale,
                               tl.bfloat16, BLOCK)
            else:
                _update_masked(w_addr, g_addr, b_addr, count, has_buffer, inv_scale, a, c, d, mu, scale,
                               tl.float16, BLOCK)


# The kernels the launcher launches (the compile test compiles each launch of a step).
KERNELS = (_alig_pass1_kernel, _alig_finalize_kernel, _alig_pass2_kernel)


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------


class _Tables(NamedTuple):
    meta: Tensor  # int64, the layout in the module docstring
    partial: Tensor  # [n_chunks, 6] float32 scratch, written in full by pass 1
    group_sums: Tensor  # [n_groups, 6] float64: the finalize's per-group sums (reduce_sums reads them)
    coefs: Tensor  # [n_groups, 5] float32, written by the finalize
    skip: Tensor  # [1] int32, written by the finalize
    n_chunks: int
    n_groups: int
    chunk: int  # the CHUNK the rows were cut with


def _launch(kernel, grid, *args, **meta) -> None:
    """Every launch goes through here (the tests count and record them)."""
    kernel[grid](*args, **meta)


def triton_alig(step: StepInputs, cache: dict | None = None) -> None:
    """One ALI-G step in three Triton launches (a backend: see ``functional.StepInputs``).

    Raises ValueError for what the kernels cannot address: non-dense tensors, a gradient or
    buffer laid out unlike its parameter, dtypes
    other than float32/bfloat16/float16, a gradient or buffer whose dtype or shape is not
    its parameter's.
    """
    group_hparams, loss, grad_scale, found_inf = step.group_hparams, step.loss, step.grad_scale, step.found_inf
    step_size_out, skipped_steps = step.step_size_out, step.skipped_steps
    if cache is None:
        cache = {}
    device = loss.device
    n_groups = len(group_hparams)
    _check_outputs(step_size_out, skipped_steps, n_groups, device)
    loss = _as_scalar(loss, torch.float64, "loss", device)
    if grad_scale is None:
        grad_scale = _constant(cache, 1.0, device)
    if found_inf is None:
        found_inf = _constant(cache, 0.0, device)
    grad_scale = _as_scalar(grad_scale, torch.float32, "grad_scale", device)
    found_inf = _as_scalar(found_inf, torch.float32, "found_inf", device)
    hparams = hparams_table(group_hparams, device, cache)
    tables = _tables(step.params, step.grads, step.momentum_buffers, step.group_index, n_groups, device, cache,
                     step.grad_addresses)
    # Triton launches on the current device: make it the tensors' one (cuda:1 while cuda:0 is current).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for kernel, grid, args, meta in launches(
            tables, hparams, loss, grad_scale, found_inf, step_size_out, skipped_steps, step.reduce_sums
        ):
            _launch(kernel, grid, *args, **meta)


def launches(tables, hparams, loss, grad_scale, found_inf, step_size_out, skipped_steps, reduce_sums=None):
    """The launches of one step, in order: (kernel, grid, args, constexprs and options).

    The one place where launch configurations are chosen (the compile test compiles what
    this yields). A generator: with ``reduce_sums``, it runs after the first finalize
    launch was made, and its results are the arguments of the second.
    """
    # No fp contraction (enable_fp_fusion=False): w + a*b - c*g, mu*b - d*g and the
    # finalize's fp64 formulas round after every operation, as functional.torch_alig, the
    # interpreter and the CUDA extension (built with --fmad=false) do, rather than ~1 ulp
    # per step apart (FFMA, checked absent in the SASS by tests/test_triton_compile.py).
    # Cost: ~2 more FMUL/FADD per element, in a pass that moves 16-20 bytes per element.
    chunked = dict(CHUNK=tables.chunk, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    tile = _finalize_tile(tables.n_groups)
    finalize = dict(TILE=tile, FBLOCK=FINALIZE_LANES // tile, num_warps=FINALIZE_WARPS, enable_fp_fusion=False)
    outputs = (step_size_out, skipped_steps, tables.coefs, tables.skip)
    if tables.n_chunks:
        yield _alig_pass1_kernel, (tables.n_chunks,), (tables.meta, tables.partial, hparams, grad_scale), \
            dict(chunked, BLOCK16=min(2 * BLOCK, tables.chunk), UNROLL=PASS1_UNROLL)
    if reduce_sums is None:
        args = (tables.meta, tables.partial, tables.group_sums, hparams, loss, found_inf) + outputs
        yield _alig_finalize_kernel, (1,), args, dict(finalize, MODE=_FINALIZE)
    else:
        args = (tables.meta, tables.partial, tables.group_sums, hparams, loss, found_inf) + outputs
        yield _alig_finalize_kernel, (1,), args, dict(finalize, MODE=_GROUP_SUMS)
        sums, loss = reduce_sums(tables.group_sums, loss)
        sums = sums.to(device=tables.group_sums.device, dtype=torch.float64).contiguous()
        if sums.shape != tables.group_sums.shape:
            raise ValueError(
                f"reduce_sums returned sums of shape {tuple(sums.shape)}, expected {tuple(tables.group_sums.shape)}"
            )
        loss = _as_scalar(loss, torch.float64, "the loss from reduce_sums", tables.group_sums.device)
        args = (tables.meta, tables.partial, sums, hparams, loss, found_inf) + outputs
        yield _alig_finalize_kernel, (1,), args, dict(finalize, MODE=_FROM_SUMS)
    if tables.n_chunks:
        yield _alig_pass2_kernel, (tables.n_chunks,), (tables.meta, tables.coefs, tables.skip, grad_scale), chunked


def _finalize_tile(n_groups: int) -> int:
    """Groups per finalize tile: a power of two (few compiled variants), at most FINALIZE_TILE."""
    return min(FINALIZE_TILE, 1 << max(n_groups - 1, 0).bit_length())  # (triton.next_power_of_2: ~5 us)


def _check_outputs(step_size_out: Tensor, skipped_steps: Tensor, n_groups: int, device: torch.device) -> None:
    if step_size_out.dtype != torch.float32 or step_size_out.shape != (n_groups,) or step_size_out.device != device \
            or not step_size_out.is_contiguous():
        raise ValueError(f"triton backend: step_size_out must be a contiguous [{n_groups}] float32 tensor on {device}")
    if skipped_steps.dtype != torch.int64 or skipped_steps.numel() != 1 or skipped_steps.device != device:
        raise ValueError(f"triton backend: skipped_steps must be a 0-dim int64 tensor on {device}")


def _as_scalar(t: Tensor, dtype: torch.dtype, name: str, device: torch.device) -> Tensor:
    """A one-element input as ``dtype`` on ``device`` (a no-op for what the optimizer passes)."""
    if t.numel() != 1:
        raise ValueError(f"triton backend: {name} must have one element, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"triton backend: {name} is on {t.device}, the step runs on {device}")
    return t if t.dtype == dtype else t.to(dtype)


def _constant(cache: dict, value: float, device: torch.device) -> Tensor:
    key = ("constant", value, device)
    if key not in cache:
        cache[key] = torch.full((), value, dtype=torch.float32, device=device)
    return cache[key]


def _tables(params, grads, buffers, group_index, n_groups, device, cache, grad_addresses=None) -> _Tables:
    """The device tables for these tensors, rebuilt only when the tensors change.

    Checked every step, in C-level passes (no per-tensor Python code: the per-tensor
    8-field key and three ``is_contiguous`` calls it replaces cost ~1 us per tensor): the
    parameters' and gradients' addresses (``data_ptr``; a parameter whose ``.data`` is
    replaced gets a new address while the old one is alive; the gradients' are
    ``grad_addresses`` when the caller read them), the buffers as objects (``is``: the cache
    holds the last ones), the group of each tensor. Sizes, dtypes and layouts are checked
    when the table is built: a gradient autograd puts at the same address has its
    parameter's size, dtype and strides.
    """
    if not (len(params) == len(grads) == len(buffers) == len(group_index)):
        raise ValueError("triton backend: params, grads, momentum_buffers and group_index differ in length")
    if grad_addresses is None:  # const_data_ptr: no copy-on-write check (the table has data_ptr's)
        grad_addresses = list(map(Tensor.const_data_ptr, grads))
    elif len(grad_addresses) != len(grads):
        raise ValueError("triton backend: grad_addresses and grads differ in length")
    return triton_tables.cached_tables(
        cache, ((CHUNK, n_groups, device), list(map(Tensor.const_data_ptr, params)), grad_addresses, group_index), buffers,
        device, lambda: _build_tables(params, grads, buffers, group_index, n_groups, device, CHUNK), "triton backend",
    )


def _build_tables(params, grads, buffers, group_index, n_groups, device, chunk) -> _Tables:
    if chunk % BLOCK or BLOCK < 16 or BLOCK & (BLOCK - 1):
        raise ValueError(f"CHUNK ({chunk}) must be a multiple of BLOCK ({BLOCK}), a power of two >= 16")
    tensors = []  # per tensor: w, g, b addresses, numel, group, dtype code, has_buffer, aligned, element size
    for i, (w, g, b, k) in enumerate(zip(params, grads, buffers, group_index)):
        if w.dtype not in triton_tables.DTYPE_CODES:
            raise ValueError(
                f"triton backend: tensor {i} is {w.dtype}; the Triton kernels take float32, bfloat16 and float16 "
                "parameters (use backend='torch' for others)"
            )
        if g.dtype != w.dtype or g.shape != w.shape:
            raise ValueError(f"triton backend: the gradient of tensor {i} ({g.dtype}, {tuple(g.shape)}) does not match "
                             f"its parameter ({w.dtype}, {tuple(w.shape)})")
        has_buffer = b.numel() > 0
        if has_buffer and (b.dtype != w.dtype or b.shape != w.shape):
            raise ValueError(f"triton backend: the momentum buffer of tensor {i} ({b.dtype}, {tuple(b.shape)}) does "
                             f"not match its parameter ({w.dtype}, {tuple(w.shape)})")
        triton_tables.check_layout(i, w, g, b if has_buffer else None, "triton backend", ("gradient", "momentum buffer"))
        if not 0 <= k < n_groups:
            raise ValueError(f"triton backend: group_index[{i}] = {k}, but there are {n_groups} groups")
        for t in (w, g, b) if has_buffer else (w, g):
            if t.device != device:
                raise ValueError(f"triton backend: tensor {i} is on {t.device}, the loss on {device}")
        addrs = (w.data_ptr(), g.data_ptr(), b.data_ptr() if has_buffer else g.data_ptr())
        aligned = all(addr % 16 == 0 for addr in addrs)
        tensors.append([*addrs, w.numel(), k, triton_tables.DTYPE_CODES[w.dtype], int(has_buffer), int(aligned), w.element_size()])

    host, n_chunks = triton_tables.chunk_table(tensors, n_groups, chunk)
    meta = triton_tables.to_device(host, device)
    return _Tables(
        meta=meta,
        partial=torch.empty((max(n_chunks, 1), Sum.COUNT), dtype=torch.float32, device=device),
        group_sums=torch.empty((n_groups, Sum.COUNT), dtype=torch.float64, device=device),
        coefs=torch.empty((max(n_groups, 1), Coef.COUNT), dtype=torch.float32, device=device),
        skip=torch.empty((1,), dtype=torch.int32, device=device),
        n_chunks=n_chunks,
        n_groups=n_groups,
        chunk=chunk,
    )

