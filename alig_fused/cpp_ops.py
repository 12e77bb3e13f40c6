"""The C++/CUDA backend: the compiled ops ``torch.ops.alig_fused.alig_step_`` (and its two
halves for sharded parameters, ``alig_sums`` and ``alig_update_``, and FusedMoMo's pass-2-only
``alig_apply_``; csrc/), their fake kernels, and ``cpp_alig``, the step
function (the backend contract: ``functional.StepInputs``).

Importing this module loads the extension (_cpp_loader.py): the prebuilt one if it was
built for this torch, else a just-in-time build; ExtensionUnavailable (an ImportError)
propagates when neither works, and backends.py reports it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._cpp_loader import ExtensionUnavailable, load_extension
from .functional import Coef, StepInputs, Sum, hparams_table

__all__ = ["cpp_alig", "cpu_isa", "has_device", "ExtensionUnavailable"]

_C = load_extension()


@torch.library.register_fake("alig_fused::alig_step_")
def _alig_step_fake(
    params, grads, momentum_buffers, group_index, hparams, loss, step_size, skipped_steps, grad_scale, found_inf
) -> None:
    """In-place on its inputs, returns nothing: no fake output to make."""
    return None


@torch.library.register_fake("alig_fused::alig_sums")
def _alig_sums_fake(params, grads, momentum_buffers, group_index, hparams, grad_scale) -> Tensor:
    return hparams.new_empty((hparams.shape[0], Sum.COUNT))


@torch.library.register_fake("alig_fused::alig_update_")
def _alig_update_fake(
    params, grads, momentum_buffers, group_index, hparams, sums, loss, step_size, skipped_steps, grad_scale, found_inf
) -> None:
    return None


@torch.library.register_fake("alig_fused::alig_apply_")
def _alig_apply_fake(params, grads, momentum_buffers, group_index, coefs, skip, grad_scale) -> None:
    return None


# The finalize alone (CPU; tests/test_finalize_conformance.py). An extension built before
# the op existed lacks it: nothing to register then.
if hasattr(torch.ops.alig_fused, "alig_finalize"):

    @torch.library.register_fake("alig_fused::alig_finalize")
    def _alig_finalize_fake(sums, loss, hparams, found_inf) -> tuple[Tensor, Tensor, Tensor]:
        n_groups = hparams.shape[0]
        return (
            hparams.new_empty((n_groups,)),
            hparams.new_empty((n_groups, Coef.COUNT), dtype=torch.float32),
            hparams.new_empty((), dtype=torch.bool),
        )


def has_device(device_type: str) -> bool:
    """Whether the compiled extension has kernels for ``device_type`` ("cpu", "cuda")."""
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(_C.has_cuda())
    return False


def cpu_isa() -> str:
    """The instruction set the CPU kernels run: "avx512", "avx2" or "generic" (the best this
    CPU has, capped by the environment variable ALIG_FUSED_CPU_ISA, read once per process).
    Every one gives the same bits; the choice changes only the speed."""
    return _C.cpu_isa()


def cpp_alig(step: StepInputs, cache: dict | None = None) -> None:
    """One ALI-G step with the compiled kernels (a backend: see ``functional.StepInputs``).

    Tensors must be contiguous (or dense with the same strides as their parameter); the
    op raises ValueError otherwise. With ``reduce_sums`` (sharded parameters) the step runs
    as two ops, alig_sums and alig_update_, with ``reduce_sums(sums, loss)`` between them.
    """
    params, grads, buffers, group_index = step.params, step.grads, step.momentum_buffers, step.group_index
    hparams = hparams_table(step.group_hparams, step.loss.device, cache)
    outputs = (step.step_size_out, step.skipped_steps, step.grad_scale, step.found_inf)
    if step.reduce_sums is None:
        _alig_step(params, grads, buffers, group_index, hparams, step.loss, *outputs)
        return
    sums = _alig_sums(params, grads, buffers, group_index, hparams, step.grad_scale)
    sums, loss = step.reduce_sums(sums, step.loss)
    _alig_update(params, grads, buffers, group_index, hparams, sums.to(torch.float64).contiguous(), loss, *outputs)


_alig_step = torch.ops.alig_fused.alig_step_.default
_alig_sums = torch.ops.alig_fused.alig_sums.default
_alig_update = torch.ops.alig_fused.alig_update_.default
