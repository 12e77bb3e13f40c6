import os

import pytest
import torch

# The Triton backend runs on CPU tensors through its interpreter; the variable must be set
# before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import harness  # noqa: E402

# CI sets ALIG_FUSED_REQUIRE_BACKENDS=torch,cpp,triton so that a backend that failed to
# build or import fails the run instead of being skipped.
REQUIRED = frozenset(b for b in os.environ.get("ALIG_FUSED_REQUIRE_BACKENDS", "").split(",") if b)

CPU_BACKENDS = harness.CPU_BACKENDS


def require_backend(name: str, device: torch.device) -> None:
    harness.require_backend(name, device, REQUIRED)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """A backend name usable on CPU tensors (skips, with the reason, when unavailable)."""
    with harness.instance("cpu", request.param, REQUIRED) as case:
        yield case.backend


def _case_id(instance):
    return "-".join(instance)


@pytest.fixture(params=harness.INSTANCES, ids=_case_id)
def case(request):
    """One (device, backend) instance of harness.INSTANCES: ``case.device``, ``case.backend``.

    A CUDA instance skips with "needs a CUDA device" where there is none; Triton on CPU runs
    in the interpreter, with its fp32 -> bf16 stores rounded as the GPU rounds them."""
    device_type, variant = request.param
    with harness.instance(device_type, variant, REQUIRED) as case:
        if case.backend == "triton" and case.device.type == "cpu":
            with harness.interpreter_rounds_bf16_like_the_gpu():
                yield case
        else:
            yield case


@pytest.fixture(params=[i for i in harness.INSTANCES if i[0] == "cuda"], ids=_case_id)
def cuda_case(request):
    """The CUDA instances only (host sync, CUDA graphs): skip here without a GPU."""
    with harness.instance(*request.param, REQUIRED) as case:
        yield case


@pytest.fixture(scope="module")
def bf16_round_to_nearest_even():
    """harness.interpreter_rounds_bf16_like_the_gpu, for a whole module of interpreter tests."""
    with harness.interpreter_rounds_bf16_like_the_gpu():
        yield
