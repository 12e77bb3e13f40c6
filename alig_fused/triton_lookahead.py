"""Lookahead's slow-weight update in Triton: one launch per step for the whole model.

Every step, one launch (grid = (n_programs,), however many tensors the model has):

    step = counter + 1
    if step % k == 0:   slow' = slow + alpha * (fast - slow)   (fp32, stored in the dtype)
                        fast' = slow'                          (the stored value, bit for bit)
    counter = step                                             (also in this launch)

The kernel reads the step counter (an int64 device tensor) itself, so the host never
reads it: no host sync, and the step can be captured in a CUDA graph. On a step that is
not a synchronisation step every program returns after two scalar atomics: no parameter
is read or written. On a synchronisation step the update moves 4 x N x bytes (read fast
and slow, write both); the torch backend's masked lerp pair moves 6 x N x bytes on every
step, in launches that grow with the number of tensors.

Table: the chunk table of ``triton_tables`` (its module docstring), built by the same
helper as the ALI-G step's, with w = fast, g = b = slow, one group and no buffer. Read here: the header's
n_chunks, and per chunk its fast and slow addresses, element count, dtype code (0 fp32,
1 bf16, 2 fp16; one launch for a model mixing them) and ``full`` flag (a whole chunk, both
addresses 16-byte aligned: the unmasked, vectorized path). Tensors must be dense, a slow
weight laid out as its parameter (``triton_kernels``' docstring).
The table is cached while the tensors do not change and reaches the device through
pinned memory with ``non_blocking=True``.

The counter in the same launch: programs cannot all read the counter before one of them
writes it unless they know that the others have read it. Each program reads the counter
with a scalar atomic (one thread, the value broadcast to the program) and then takes a
ticket (``atomic_add`` on an int32 word, acq_rel: the read is ordered before it). The
program that takes the last ticket, n_programs - 1, knows every program has read the
counter: it writes ``step`` and puts the ticket word back to 0 for the next launch (a
launch that raises has the launcher clear it instead: ``triton_lookahead``). The
grid is persistent (at most ``PROGRAMS_PER_SM`` programs per SM, each looping over chunks)
so a step costs ~2 x (4 x SMs) same-address atomics, not two per chunk.

Exactness: the update is ``slow + alpha * (fast - slow)`` in fp32 with alpha rounded to
fp32, two roundings (``enable_fp_fusion=False``: the GPU code may not contract it into an
fma), then one rounding to the storage dtype (to nearest even), stored into both tensors.

CUDA graphs: as for ``triton_kernels``, run one eager step first (it compiles the kernel
and builds the table); ``k`` and ``alpha`` are baked in at capture (kernel arguments).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from . import triton_kernels as tk
from . import triton_tables

__all__ = ["triton_lookahead", "launches", "KERNELS", "CHUNK", "BLOCK"]

# Elements per chunk and per loop iteration, warps: those of the ALI-G pass 2 (the same
# 16-byte vectors for fp32; reasoned there, not tuned here).
CHUNK = tk.CHUNK
BLOCK = tk.BLOCK
NUM_WARPS = tk.NUM_WARPS
# Persistent grid: at most this many programs per SM, each looping over chunks (8 warps
# x 4 = 32 warps per SM, half an H100 SM's 64; reasoned, not measured). The interpreter
# (no SMs) gets INTERPRETER_PROGRAMS.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 8


# ---------------------------------------------------------------------------------------
# Kernels (the interpreter workarounds of triton_kernels apply: run-time loops are
# ``while`` loops, helpers are few)
# ---------------------------------------------------------------------------------------


@triton.jit
def _lerp_full(fast_addr, slow_addr, alpha, DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """slow = fast = slow + alpha * (fast - slow) over a whole aligned chunk."""
    fast_ptr = tl.multiple_of(fast_addr.to(tl.pointer_type(DTYPE)), 16)
    slow_ptr = tl.multiple_of(slow_addr.to(tl.pointer_type(DTYPE)), 16)
    for i in range(CHUNK // BLOCK):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        fast = tl.load(fast_ptr + offs).to(tl.float32)
        slow = tl.load(slow_ptr + offs).to(tl.float32)
        new = (slow + alpha * (fast - slow)).to(DTYPE)
        tl.store(slow_ptr + offs, new)
        tl.store(fast_ptr + offs, new)


@triton.jit
def _lerp_masked(fast_addr, slow_addr, count, alpha, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """slow = fast = slow + alpha * (fast - slow) over the first ``count`` elements."""
    fast_ptr = fast_addr.to(tl.pointer_type(DTYPE))
    slow_ptr = slow_addr.to(tl.pointer_type(DTYPE))
    start = count * 0
    while start < count:
        offs = start + tl.arange(0, BLOCK)
        start += BLOCK
        mask = offs < count
        fast = tl.load(fast_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        slow = tl.load(slow_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        new = (slow + alpha * (fast - slow)).to(DTYPE)
        tl.store(slow_ptr + offs, new, mask=mask)
        tl.store(fast_ptr + offs, new, mask=mask)


@triton.jit(do_not_specialize=["k"])
def _lookahead_kernel(meta_ptr, step_ptr, tickets_ptr, alpha, k, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # The counter, then a ticket (see the module docstring): the last program writes step.
    step = tl.atomic_add(step_ptr, 0) + 1
    n_programs = tl.num_programs(0)
    ticket = tl.atomic_add(tickets_ptr, 1)
    if ticket == n_programs - 1:
        tl.store(step_ptr, step)
        tl.store(tickets_ptr, 0)
    if step % k == 0:
        n_chunks = tl.load(meta_ptr)
        chunk = tl.program_id(0).to(tl.int64)
        while chunk < n_chunks:
            row = meta_ptr + 8 + 8 * chunk
            chunk += n_programs
            fast_addr = tl.load(row)
            slow_addr = tl.load(row + 1)
            count = tl.load(row + 3).to(tl.int32)
            dtype_code = tl.load(row + 5)
            if tl.load(row + 7) != 0:
                if dtype_code == 0:
                    _lerp_full(fast_addr, slow_addr, alpha, tl.float32, CHUNK, BLOCK)
                elif dtype_code == 1:
                    _lerp_full(fast_addr, slow_addr, alpha, tl.bfloat16, CHUNK, BLOCK)
                else:
                    _lerp_full(fast_addr, slow_addr, alpha, tl.float16, CHUNK, BLOCK)
            else:
                if dtype_code == 0:
                    _lerp_masked(fast_addr, slow_addr, count, alpha, tl.float32, BLOCK)
                elif dtype_code == 1:
                    _lerp_masked(fast_addr, slow_addr, count, alpha, tl.bfloat16, BLOCK)
                else:
                    _lerp_masked(fast_addr, slow_addr, count, alpha, tl.float16, BLOCK)


# The kernels the launcher launches (the compile test compiles each launch).
KERNELS = (_lookahead_kernel,)


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------


class _Tables(NamedTuple):
    meta: Tensor  # int64, triton_kernels' layout (w = fast, g = b = slow)
    tickets: Tensor  # [1] int32, 0 between launches
    n_chunks: int
    n_programs: int
    chunk: int


def _launch(kernel, grid, *args, **meta) -> None:
    """Every launch goes through here (the tests count and record them)."""
    kernel[grid](*args, **meta)


def triton_lookahead(fast: list[Tensor], slow: list[Tensor], step: Tensor, alpha: float, k: int,
                     cache: dict | None = None) -> None:
    """``step += 1``; on ``step % k == 0``: ``slow += alpha * (fast - slow); fast = slow``. One launch.

    Raises ValueError for what the kernel cannot address: non-dense tensors, a slow weight
    laid out unlike its parameter, dtypes
    other than float32/bfloat16/float16, a slow weight whose dtype or shape is not its
    parameter's, tensors on another device than ``step``.
    """
    if cache is None:
        cache = {}
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < 2**31:
        raise ValueError(f"triton lookahead: k must be an int in [1, 2**31), got {k!r}")
    device = step.device
    if step.dtype != torch.int64 or step.numel() != 1:
        raise ValueError("triton lookahead: the step counter must be a one-element int64 tensor")
    tables = _tables(fast, slow, device, cache)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for kernel, grid, args, meta in launches(tables, step, alpha, k):
            try:
                _launch(kernel, grid, *args, **meta)
            except BaseException:
                # A launch that raised (the interpreter running a program that fails, an
                # interrupt) may have left tickets taken, and then in every later launch the
                # program with ticket n_programs - 1 is not the last to read the counter:
                # programs disagree on the step, silently (tests/test_triton_lookahead.py).
                # Clear the word; on a GPU an async fill, ordered before the next launch.
                tables.tickets.zero_()
                raise


def launches(tables: _Tables, step: Tensor, alpha: float, k: int):
    """The launches of one update, in order: (kernel, grid, args, constexprs and options)."""
    options = dict(CHUNK=tables.chunk, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    yield _lookahead_kernel, (tables.n_programs,), (tables.meta, step, tables.tickets, float(alpha), k), options


def _max_programs(device: torch.device, cache: dict) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    key = ("multi_processor_count", str(device))
    if key not in cache:
        cache[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return PROGRAMS_PER_SM * cache[key]


def _tables(fast, slow, device, cache) -> _Tables:
    """The device table for these tensors, rebuilt only when the tensors change.

    As ``triton_kernels._tables``: the parameters recognised by their addresses, the slow
    weights (Lookahead's state) as objects, in C-level passes; checked when built; tables a
    CUDA graph captured stay alive, a rebuild during a capture is an error, a launch on
    another stream records the tables on it.
    """
    if len(fast) != len(slow):
        raise ValueError(f"triton lookahead: {len(fast)} parameters but {len(slow)} slow weights")
    max_programs = _max_programs(device, cache)
    addresses = list(map(Tensor.data_ptr, fast))

    def build() -> _Tables:
        tickets = cache["tables"].tickets if "tables" in cache else None  # 0 after every launch: reusable
        return _build_tables(fast, slow, device, CHUNK, max_programs, tickets)

    return triton_tables.cached_tables(cache, ((CHUNK, max_programs, device), addresses), slow, device, build,
                                       "triton lookahead")


def _build_tables(fast, slow, device, chunk, max_programs, tickets=None) -> _Tables:
    if chunk % BLOCK or BLOCK < 16 or BLOCK & (BLOCK - 1):
        raise ValueError(f"CHUNK ({chunk}) must be a multiple of BLOCK ({BLOCK}), a power of two >= 16")
    tensors = []  # per tensor, triton_kernels' row: w, g, b addresses, numel, group, dtype, has_buffer, aligned, size
    for i, (f, s) in enumerate(zip(fast, slow)):
        if f.dtype not in triton_tables.DTYPE_CODES:
            raise ValueError(
                f"triton lookahead: tensor {i} is {f.dtype}; the Triton kernel takes float32, bfloat16 and float16 "
                "parameters (use backend='torch' for others)"
            )
        if s.dtype != f.dtype or s.shape != f.shape:
            raise ValueError(f"triton lookahead: the slow weight of tensor {i} ({s.dtype}, {tuple(s.shape)}) does "
                             f"not match its parameter ({f.dtype}, {tuple(f.shape)})")
        triton_tables.check_layout(i, f, s, None, "triton lookahead", ("slow weight", ""))
        for t in (f, s):
            if t.device != device:
                raise ValueError(f"triton lookahead: tensor {i} is on {t.device}, the step counter on {device}")
        aligned = f.data_ptr() % 16 == 0 and s.data_ptr() % 16 == 0
        tensors.append([f.data_ptr(), s.data_ptr(), s.data_ptr(), f.numel(), 0, triton_tables.DTYPE_CODES[f.dtype], 0,
                        int(aligned), f.element_size()])
    host, n_chunks = triton_tables.chunk_table(tensors, 1, chunk)
    if tickets is None or tickets.device != device:
        tickets = torch.zeros((1,), dtype=torch.int32, device=device)
    return _Tables(
        meta=triton_tables.to_device(host, device),
        tickets=tickets,
        n_chunks=n_chunks,
        n_programs=max(1, min(n_chunks, max_programs)),
        chunk=chunk,
    )
