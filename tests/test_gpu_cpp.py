"""What is specific to the CUDA kernels of the C++ extension (backend="cpp" on CUDA
tensors): three launches per step whatever the number of tensors (profiler-counted),
opcheck on CUDA, the sharded halves bit for bit, and closeness to the CPU kernels.
Skipped, with the reason, without a GPU or without CUDA kernels in the build.

The trajectory, skip, AMP, no-sync and CUDA-graph tests every backend shares run on
"cuda-cpp" in tests/test_alig.py (the harness's CUDA instances).
"""

from __future__ import annotations

import math

import pytest
import torch

from alig_fused import FusedALIG
from harness import SPECS, backward, bit_identical, make_groups, require_backend, run_pair, trajectory_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def cpp_on_cuda():
    from conftest import REQUIRED

    require_backend("cpp", CUDA, REQUIRED)


def test_close_to_cpu_kernels():
    """The CUDA kernels (chunks of 8,192) and the CPU ones (16,384) sum in other orders: a
    last-bit change in gamma, fp32 rounding apart after 10 steps."""
    spec = SPECS["several_groups"] + SPECS["multi_chunk"]
    gpu = run_pair(spec, "cpp", steps=10, device=CUDA)
    cpu = run_pair(spec, "cpp", steps=10)
    assert gpu.opt.last_backend == "cpp"
    assert trajectory_error(gpu.fused, cpu.fused) <= 2e-6


def test_three_launches_whatever_the_number_of_tensors():
    spec = [([(5 + i % 50,) for i in range(600)], {"momentum": 0.9, "max_norm": 30.0}), ([(70000,)], {})]
    params, targets = [], []
    groups = []
    for tensors, tgts, hp in make_groups(spec):
        group = [t.to(CUDA, torch.float32).requires_grad_() for t in tensors]
        params += group
        targets += [t.to(CUDA) for t in tgts]
        groups.append({"params": group, **hp})
    opt = FusedALIG(groups, backend="cpp")
    opt.step(loss=backward(params, targets))
    loss = backward(params, targets)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step(loss=loss)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [n for n in names if "pass1_kernel" in n or "finalize_kernel" in n or "pass2_kernel" in n]
    assert len(ours) == 3, ours


def op_args(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5,), (3, 4), (1,), (17000,)]
    params, grads, buffers = ([torch.randn(s, generator=gen).to(CUDA) for s in shapes] for _ in range(3))
    hparams = torch.tensor(
        [[0.5, 0.9, 0.0, 3.0, 1e-5, 0.0, 1.0], [math.inf, 0.9, 1.0, math.inf, 1e-5, 0.1, 1.0]],
        dtype=torch.float64, device=CUDA,
    )
    return (
        params, grads, buffers, [0, 1, 0, 1], hparams, torch.tensor(2.5, dtype=torch.float64, device=CUDA),
        torch.zeros(2, device=CUDA), torch.zeros((), dtype=torch.int64, device=CUDA),
        torch.tensor(4.0, device=CUDA), torch.tensor(0.0, device=CUDA),
    )


def test_opcheck():
    torch.library.opcheck(torch.ops.alig_fused.alig_step_.default, op_args())


def test_reduce_sums_halves():
    # Identity reduce_sums: alig_sums + alig_update_ give the fused op's bits; the halves
    # take four launches (pass 1, reduce | finalize, pass 2) around the caller's all-reduce.
    from alig_fused.cpp_ops import cpp_alig
    from alig_fused.functional import GroupHParams, StepInputs

    hparams = [GroupHParams(0.5, 0.9, False, 3.0, 1e-5, 0.0, 1.0), GroupHParams(math.inf, 0.9, True, math.inf, 1e-5, 0.1, 1.0)]
    results = []
    for reduce_sums in (None, lambda sums, loss: (sums, loss)):
        params, grads, buffers, group_index, _, loss, step_size, skipped, _, _ = op_args()
        cpp_alig(StepInputs(params=params, grads=grads, momentum_buffers=buffers, group_index=group_index,
                            group_hparams=hparams, loss=loss, step_size_out=step_size, skipped_steps=skipped,
                            reduce_sums=reduce_sums), {})
        results.append(params + buffers + [step_size])
    assert bit_identical(results[0], results[1])
