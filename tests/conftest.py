import os

import pytest
import torch

# The Triton backend runs on CPU tensors through its interpreter; the variable must be set
# before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from alig_fused import backends  # noqa: E402

# CI sets ALIG_FUSED_REQUIRE_BACKENDS=torch,cpp,triton so that a backend that failed to
# build or import fails the run instead of being skipped.
REQUIRED = {b for b in os.environ.get("ALIG_FUSED_REQUIRE_BACKENDS", "").split(",") if b}

# "cpp-1thread" runs the C++ backend with one thread: its reductions must not depend on it.
CPU_BACKENDS = ["torch", "cpp", "cpp-1thread", "triton"]


def require_backend(name: str, device: torch.device) -> None:
    ok, reason = backends.supports(name, device)
    if ok:
        return
    if name in REQUIRED:
        pytest.fail(f"backend {name!r} is required here but unavailable: {reason}")
    pytest.skip(f"backend {name!r} unavailable on {device.type}: {reason}")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """A backend name usable on CPU tensors (skips, with the reason, when unavailable)."""
    name, _, threads = request.param.partition("-")
    require_backend(name, torch.device("cpu"))
    if threads:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield name
        torch.set_num_threads(before)
    else:
        yield name
