"""FusedALIG inside training frameworks: each feeds the step the loss that was backwarded.

- ``alig_fused.integrations.transformers.ALIGTrainer``: a ``transformers.Trainer``.
- ``alig_fused.integrations.lightning.ALIGCallback``: a Lightning callback.
- ``alig_fused.integrations.accelerate.backward``: ``accelerator.backward`` that also hands
  the loss to FusedALIG.

Each module imports its framework; this package imports none.
"""

from __future__ import annotations

from typing import Any

from ..optim import FusedALIG


def find_alig(optimizer: Any) -> FusedALIG | None:
    """The FusedALIG inside ``optimizer`` (itself, or under framework wrappers and Lookahead)."""
    seen = 0
    while optimizer is not None and seen < 8:  # wrappers keep the inner one as .optimizer / ._optimizer
        if isinstance(optimizer, FusedALIG):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        seen += 1
    return None
