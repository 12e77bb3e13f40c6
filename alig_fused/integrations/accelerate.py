"""FusedALIG with Hugging Face accelerate, without patching anything.

``accelerator.backward(loss)`` divides the loss by ``gradient_accumulation_steps`` before
backwarding it, and ``AcceleratedOptimizer.step()`` passes FusedALIG no loss (and does not
call it at all on the micro-batches that only accumulate). So hand FusedALIG the loss that
is backwarded, micro-batch by micro-batch, and let the step use the sum::

    from alig_fused.integrations.accelerate import backward

    accelerator = Accelerator(gradient_accumulation_steps=4)
    model, opt, loader = accelerator.prepare(model, FusedALIG(model.parameters(), lr=0.1), loader)
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = criterion(model(x), y)
            backward(accelerator, opt, loss)   # accelerator.backward + opt.accumulate_loss
            opt.step()                         # a no-op until the last micro-batch
            opt.zero_grad()
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import DistributedType

from . import find_alig


def backward(accelerator: Any, optimizer: Any, loss: Any, **kwargs: Any) -> None:
    """``accelerator.backward(loss, **kwargs)``, and the loss it backwards (unscaled) to FusedALIG."""
    alig = find_alig(optimizer)
    if alig is None:
        raise TypeError(f"alig_fused.integrations.accelerate.backward needs a FusedALIG, got {type(optimizer).__name__}")
    accelerator.backward(loss, **kwargs)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:  # as accelerator.backward divides
        loss = loss / accelerator.gradient_accumulation_steps
    alig.accumulate_loss(loss)
