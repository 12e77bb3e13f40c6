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
    names = kernels_of_second_step(FusedALIG(groups, backend="cpp"), params, targets)
    ours = [n for n in names if "pass1_kernel" in n or "finalize_kernel" in n or "pass2_kernel" in n]
    assert len(ours) == 3, ours


def kernels_of_second_step(opt, params, targets):
    """The CUDA kernels one profiled step launches, after a first step has built the tables."""
    opt.step(loss=backward(params, targets))
    loss = backward(params, targets)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step(loss=loss)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


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


def apply_args(device, skip, seed=1):
    """alig_apply_'s arguments: mixed dtypes, a group without momentum, a multi-chunk tensor."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5,), (3, 4), (17000,), (9,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float64]
    params, grads = ([torch.randn(s, generator=gen).to(device, d) for s, d in zip(shapes, dtypes)] for _ in range(2))
    buffers = [torch.randn(s, generator=gen).to(device, d) for s, d in zip(shapes, dtypes)]
    buffers[1] = torch.empty(0, device=device, dtype=dtypes[1])  # group 1: no momentum
    coefs = torch.tensor([[0.2, 0.05, 0.5, 0.9, 0.97], [0.0, 0.1, 0.0, 0.0, 1.0]], device=device)
    return params, grads, buffers, [0, 1, 0, 0], coefs, torch.tensor(skip, device=device), torch.tensor(2.0, device=device)


@pytest.mark.parametrize("skip", [False, True])
def test_apply_matches_the_cpu_kernel(skip):
    """alig_apply_ on CUDA (pass2_kernel with the caller's coefs) writes the CPU kernel's bits:
    same fp32 operations in the same order, no FMA; a set skip flag writes nothing."""
    apply_ = torch.ops.alig_fused.alig_apply_.default
    cpu, gpu = apply_args("cpu", skip), apply_args(CUDA, skip)
    before = [t.clone() for t in cpu[0] + cpu[2]]
    apply_(*cpu)
    apply_(*gpu)
    assert bit_identical([t.cpu() for t in gpu[0] + gpu[2]], cpu[0] + cpu[2])
    assert bit_identical(cpu[0] + cpu[2], before) == skip


def test_apply_opcheck():
    torch.library.opcheck(torch.ops.alig_fused.alig_apply_.default, apply_args(CUDA, False))


def test_momo_pass2_is_one_launch():
    """FusedMoMo's cpp backend on CUDA runs pass 2 as alig_apply_'s one pass2_kernel launch."""
    from alig_fused import FusedMoMo

    params = [torch.randn(s, device=CUDA, requires_grad=True) for s in [(300,), (20, 30), (9,)] * 20]
    targets = [torch.randn_like(p) for p in params]
    names = kernels_of_second_step(FusedMoMo(params, lr=0.1, backend="cpp"), params, targets)
    assert sum("pass2_kernel" in n for n in names) == 1, names  # 0 with the torch-ops pass 2


# ----- the tensor tables' lifetime under CUDA graphs (csrc/cuda/alig_cuda.cu, TableCache) -----


def small_args(i):
    """op_args' kind of arguments, with a first tensor of 1 + i elements: a tensor list (a
    table-cache key) of its own for each i, with tables of one size."""
    args = list(op_args(seed=i))
    gen = torch.Generator().manual_seed(i)
    for k in range(3):  # params, grads, buffers
        args[k] = [torch.randn(1 + i, generator=gen).to(CUDA)] + args[k][1:]
    return args


def capture_step(args):
    step_ = torch.ops.alig_fused.alig_step_.default
    step_(*args)  # warm-up: the table is built outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step_(*args)
    return graph


def test_replay_after_the_cache_dropped_the_table():
    """The graph holds its own reference to the table: replays stay right after 12 other
    lists pushed the entry out of the cache (8 entries) and their memory was reused."""
    step_ = torch.ops.alig_fused.alig_step_.default
    captured, eager = op_args(0), op_args(0)
    graph = capture_step(captured)
    step_(*eager)  # the warm-up's twin
    for i in range(12):
        step_(*small_args(20 + i))
    junk = [torch.full((64,), -1, dtype=torch.int64, device=CUDA) for _ in range(200)]  # reuses freed blocks
    for _ in range(3):
        graph.replay()
        step_(*eager)
    torch.cuda.synchronize()
    assert bit_identical(captured[0] + captured[2] + [captured[6]], eager[0] + eager[2] + [eager[6]])
    del junk


def test_destroyed_graphs_release_their_tables():
    """32 graphs captured on 32 lists and destroyed leave no table behind (before, every
    captured table was pinned for the life of the process)."""
    import time

    step_ = torch.ops.alig_fused.alig_step_.default
    drain = op_args(0)

    def settle():
        # CUDA runs a destroyed graph's user-object destructors on its own thread, soon after;
        # the extension frees the queued tables at its next call outside a capture.
        torch.cuda.synchronize()
        time.sleep(0.05)
        step_(*drain)
        torch.cuda.synchronize()

    for i in range(8):  # fill the cache: 8 entries either way
        args = small_args(i)
        graph = capture_step(args)
        del graph, args
    settle()
    settle()
    base = torch.cuda.memory_allocated()
    for i in range(8, 40):
        args = small_args(i)
        graph = capture_step(args)
        graph.replay()
        del graph, args
    grown = None
    for _ in range(40):
        settle()
        grown = torch.cuda.memory_allocated() - base
        if grown <= 0:
            break
    assert grown <= 0, f"{grown} bytes still allocated after the graphs were destroyed"
