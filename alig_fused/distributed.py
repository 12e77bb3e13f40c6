"""torch.distributed support: one small collective per step, issued without a host sync.

- Replicated parameters (DDP): every rank sees its own loss, so each would compute its own
  step size and the replicas would drift apart. The loss is averaged across the group.
  This all-reduce is a collective: every rank of the group must step together. An
  optimizer stepped on some ranks only (a probe, a per-rank model) waits for the others
  until the process group's timeout; it needs ``average_loss=False``. Where the backend
  reports the timeout as an error (gloo on CPU), the error says so; NCCL's watchdog aborts
  the process instead. Nothing cheaper can tell beforehand whether the other ranks will
  step (that would take another collective).
- Sharded parameters (FSDP2 ``fully_shard``, DTensor ``Shard`` placements): no rank sees the
  whole gradient, so ||g||^2 and the projection sums are wrong unless reduced. The kernels
  run on the local shards and the pass-1 sums vector, with the loss appended, is all-reduced
  in one collective before the finalize.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    import torch.distributed as dist
except ImportError:  # a build of torch without distributed
    dist = None  # type: ignore[assignment]

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without DTensor
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_initialized() -> bool:
    return dist is not None and dist.is_available() and dist.is_initialized()


def is_sharded(params: list[Tensor]) -> bool:
    """True when the parameters are DTensors; each must be sharded over a 1-D mesh."""
    if DTensor is None or not any(isinstance(p, DTensor) for p in params):
        return False
    for p in params:
        if not isinstance(p, DTensor):
            raise TypeError("FusedALIG cannot mix DTensor (sharded) and plain parameters in one optimizer")
        if p.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
            raise NotImplementedError(
                f"FusedALIG supports parameters sharded over a 1-D device mesh (FSDP2 fully_shard); "
                f"got placements {p.placements} on a {p.device_mesh.ndim}-D mesh"
            )
    return True


def mesh_group(params: list[Tensor]) -> Any:
    return params[0].device_mesh.get_group()


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """The local shards (views sharing storage, so in-place updates reach the DTensor)."""
    return [t._local_tensor if DTensor is not None and isinstance(t, DTensor) else t for t in tensors]


def average_loss(loss: Tensor, process_group: Any = None) -> Tensor:
    """Mean of the ranks' losses (one all-reduce of a scalar, no host sync)."""
    total = loss.clone()
    _all_reduce(total, process_group)
    return total / dist.get_world_size(process_group)


def _all_reduce(tensor: Tensor, process_group: Any) -> None:
    if torch.compiler.is_compiling():  # traced as a functional collective; no Python error to rephrase
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
        return
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    except RuntimeError as exc:  # DistBackendError and the timeouts derive from it
        raise RuntimeError(
            f"FusedALIG's step all-reduces the loss across the ranks of its process group, and that "
            f"failed: {exc}\nEvery rank of the group must call step() together (a timeout usually means "
            f"that some did not). An optimizer stepped on some ranks only (a probe, a per-rank model) "
            f"needs FusedALIG(..., average_loss=False); sharded (FSDP2) parameters always reduce."
        ) from exc


class SumReducer:
    """``reduce_sums(sums, loss) -> (sums, loss)`` for the backends: one all-reduce in all."""

    def __init__(self, process_group: Any, average_loss: bool):
        self.process_group = process_group
        self.average_loss = average_loss

    def __call__(self, sums: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
        packed = torch.cat([sums.reshape(-1).to(torch.float64), loss.reshape(1).to(torch.float64)])
        _all_reduce(packed, self.process_group)
        reduced_sums = packed[:-1].reshape(sums.shape)
        if self.average_loss:
            loss = packed[-1] / dist.get_world_size(self.process_group)
        return reduced_sums, loss
