"""FusedALIG in Lightning: ``Trainer(callbacks=[ALIGCallback()])``.

Lightning never hands an optimizer the loss: its wrapper always passes a closure (whose value
is the last micro-batch's loss divided by ``accumulate_grad_batches``), and under
``precision="16-mixed"`` it runs the closure itself and then calls ``scaler.step(optimizer)``.
The callback sees every tensor that is about to be backwarded (``on_before_backward``, in
automatic and manual optimization alike) and accumulates it, unscaled, into each FusedALIG
of the trainer; the step then uses the sum, whichever way Lightning calls it.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from . import find_alig


class ALIGCallback(Callback):
    """Hands FusedALIG the loss of every backward (divided as Lightning divides it, unscaled)."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not any(find_alig(opt) is not None for opt in trainer.optimizers):
            raise TypeError("ALIGCallback: none of the trainer's optimizers is a FusedALIG")

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        # Under 16-mixed the precision plugin has already multiplied the loss by the scale
        # (a power of two, so dividing it back is exact); read it without a host sync.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            loss = loss / scaler._get_scale_async().to(loss.device)
        for opt in trainer.optimizers:  # each resets its sum at its own step or zero_grad
            alig = find_alig(opt)
            if alig is not None:
                alig.accumulate_loss(loss)
