"""The multi-tensor layer of the Triton kernels: the chunk table, its checks, its device memory.

Used by the ALI-G step (``triton_kernels``) and Lookahead's update (``triton_lookahead``,
with w = fast, g = b = slow, one group). Imports no triton.

Layout (apex's multi-tensor-apply chunk list, in one int64 device tensor ``meta``, built
on the host and cached by the launchers while the tensors do not change)::

    meta[0:8]                 header: n_chunks, n_groups, offset of the group rows; words 3-7
                              are padding, so that every 8-word chunk row is 64-byte aligned
    meta[8 + 8*i : 16 + 8*i]  chunk i: address of its first element in w, in g, in b;
                              element count (<= CHUNK); group; dtype code (0 fp32, 1 bf16,
                              2 fp16); has_buffer; full (count == CHUNK and the three
                              addresses 16-byte aligned: the unmasked, vectorized path)
    group rows, 2 each        group k owns chunks [first, end): chunks are ordered by group,
                              so the finalize adds each group's partial sums in a fixed order
"""

from __future__ import annotations

import operator
from typing import Callable, NamedTuple, TypeVar

import torch
from torch import Tensor

from .backends import is_dense  # the one density rule (backends.layout_problem's too)

__all__ = ["HEADER", "ROW", "DTYPE_CODES", "chunk_table", "check_layout", "to_device", "capturing",
           "current_stream", "cached_tables", "keep_alive"]

HEADER = 8
ROW = 8
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def capturing(device: torch.device) -> bool:
    """Is the current stream of ``device`` capturing a CUDA graph? (The tests replace it on CPU.)"""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def current_stream(device: torch.device):
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


Tables = TypeVar("Tables", bound=tuple)


def cached_tables(cache: dict, key: tuple, objects: list, device: torch.device, build: Callable[[], Tables],
                  who: str) -> Tables:
    """``cache["tables"]``, made by ``build()`` again only when ``key`` or ``objects`` changed;
    kept alive.

    ``key`` is compared with the last one in one tuple compare (its lists: C-level ``==``),
    ``objects`` (tensors recognised as objects: the momentum buffers, the slow weights) with
    the last ones by identity (``is``, a C-level pass; the cache holds them); the launchers
    make ``key`` of C-level passes too (``data_ptr``s), so a cache hit costs no per-tensor
    Python code. A rebuild during a CUDA graph capture is an error (the graph would bake in
    tables made inside it); then ``keep_alive``.
    """
    held = cache.get("tables_objects")
    if (cache.get("tables_key") != key or len(held) != len(objects)
            or not all(map(operator.is_, objects, held))):
        if capturing(device):
            raise RuntimeError(
                f"{who}: the tensors or groups changed while a CUDA graph is being captured, so the step would "
                "build new device tables inside the capture; run one eager step with these tensors before "
                "capturing (the warm-up torch.cuda.graphs asks for)"
            )
        cache["tables"] = build()
        cache["tables_key"] = tuple(list(part) if isinstance(part, list) else part for part in key)  # copies
        cache["tables_objects"] = list(objects)
        rebuilt = True
    else:
        rebuilt = False
    tables = cache["tables"]
    keep_alive(tables, device, cache, rebuilt)
    return tables


def keep_alive(tables: NamedTuple, device: torch.device, cache: dict, rebuilt: bool) -> None:
    """Keep ``tables``' device memory valid for every launch that uses it.

    - A CUDA graph holds the tables' raw addresses for as long as it lives: tables used
      during a capture are pinned in ``cache["captured"]`` (owned by the optimizer), so a
      later rebuild (new gradient tensors, a new parameter) does not hand their memory
      back to the caching allocator while the graph may still replay. They are never
      rewritten either: a replay keeps updating the tensors it was captured with.
    - A launch on another stream than the one the tables were allocated on: each tensor
      is recorded on that stream (``record_stream``), so its block is not reused before
      that stream's work is done.
    """
    if capturing(device):
        _pin(tables, cache)
    if device.type != "cuda":
        return
    stream = current_stream(device)
    if rebuilt:
        cache["table_streams"] = {stream}  # allocated on this one
    elif stream not in cache["table_streams"]:
        for t in tables:
            if isinstance(t, Tensor):
                t.record_stream(stream)
        cache["table_streams"].add(stream)


def _pin(tables: NamedTuple, cache: dict) -> None:
    pinned = cache.setdefault("captured", [])
    if not any(t is tables for t in pinned):
        pinned.append(tables)


def _strides(t: Tensor) -> tuple:
    return tuple(st for st, sz in zip(t.stride(), t.shape) if sz != 1)  # a size-1 dim's stride is arbitrary


def check_layout(i: int, w: Tensor, g: Tensor, b: Tensor | None, who: str, names: tuple[str, str]) -> None:
    """The kernels address each tensor as the flat span of its memory, element k of w with
    element k of g and b: w must be dense, g and b laid out as w (same strides)."""
    if w.numel() == 0:
        return
    if not is_dense(w):
        raise ValueError(
            f"{who}: the parameter of tensor {i} (shape {tuple(w.shape)}, strides {w.stride()}) is not contiguous "
            "nor dense (a view with gaps); the Triton kernels address tensors as flat spans of memory (make it "
            "contiguous, or use backend='torch')"
        )
    for name, t in zip(names, (g, b)):
        if t is not None and _strides(t) != _strides(w):
            raise ValueError(
                f"{who}: the {name} of tensor {i} has strides {t.stride()}, its parameter {w.stride()}; the Triton "
                "kernels need them laid out alike (contiguous, or the same dense layout such as channels_last), "
                "or use backend='torch'"
            )


def chunk_table(tensors: list[list[int]], n_groups: int, chunk: int) -> tuple[Tensor, int]:
    """The host int64 table of the module docstring, and its number of chunks.

    ``tensors``: one row per tensor, [w, g, b addresses, numel, group, dtype code,
    has_buffer, aligned (the three addresses 16-byte aligned), element size]. Also the
    table of ``triton_lookahead`` (w = fast, g = b = slow, one group).
    """
    # Chunk rows, tensors ordered by group (stable), so each group owns one range of chunks.
    info = torch.tensor(tensors, dtype=torch.int64).reshape(len(tensors), 9)
    info = info[torch.sort(info[:, 4], stable=True).indices]
    numel, group, aligned, elsize = info[:, 3], info[:, 4], info[:, 7], info[:, 8]
    counts = (numel + chunk - 1) // chunk
    n_chunks = int(counts.sum())
    tensor_of = torch.repeat_interleave(torch.arange(len(tensors)), counts)
    start = (torch.arange(n_chunks) - (torch.cumsum(counts, 0) - counts)[tensor_of]) * chunk
    rows = info[tensor_of, :8].clone()
    rows[:, 0:3] += (start * elsize[tensor_of])[:, None]
    rows[:, 3] = torch.clamp(numel[tensor_of] - start, max=chunk)
    rows[:, 7] = ((rows[:, 3] == chunk) & (aligned[tensor_of] != 0)).to(torch.int64)
    chunks_per_group = torch.zeros(n_groups, dtype=torch.int64).index_add_(0, group, counts)
    group_end = torch.cumsum(chunks_per_group, 0)
    group_rows = torch.stack([group_end - chunks_per_group, group_end], dim=1)
    group_offset = HEADER + ROW * n_chunks
    header = torch.tensor([n_chunks, n_groups, group_offset, 0, 0, 0, 0, 0], dtype=torch.int64)
    return torch.cat([header, rows.reshape(-1), group_rows.reshape(-1)]), n_chunks


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host table on ``device``, without a host sync on CUDA (pinned, non-blocking)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
