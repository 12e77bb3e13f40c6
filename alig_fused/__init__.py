"""alig_fused: the ALI-G optimizer for PyTorch with a fused multi-tensor step.

``import alig_fused`` works without triton and without the compiled extension; those
backends load on first use and ``available_backends()`` says what runs here and why not.
"""

from .backends import BackendUnavailableError, available_backends
from .compat import AliG, l2_projection
from .fused_momo import FusedMoMo
from .lookahead import Lookahead
from .optim import FusedALIG

__all__ = ["FusedALIG", "FusedMoMo", "AliG", "Lookahead", "l2_projection", "BackendUnavailableError", "available_backends"]
__version__ = "0.1.0"
