"""What is specific to the Triton backend on a CUDA device: one profiler-counted launch per
pass, and the Lookahead update's kernel (bit for bit, one launch, capture). Skipped, with the
reason, without CUDA (CI has none: tests/test_triton.py runs the same kernels in the Triton
interpreter there, tests/test_triton_compile.py compiles them for sm_80/sm_90).

The trajectory, skip, AMP, no-sync and CUDA-graph tests every backend shares run on
"cuda-triton" in tests/test_alig.py (the harness's CUDA instances).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") == "1",
        reason="TRITON_INTERPRET=1: the kernels would run in the interpreter, not on the GPU",
    ),
]

pytest.importorskip("triton")

from alig_fused import FusedALIG  # noqa: E402
from harness import FLOOR, backward, many_tensor_model, replica, trajectory_error  # noqa: E402
from reference import ReferenceALIG  # noqa: E402

CUDA = torch.device("cuda")
# The big tensor is in the group without a ball: the optimizer's start projection of a
# 1M-element tensor is not this backend's business. Every group has a max_lr: uncapped
# Polyak steps near a zero loss amplify rounding differences of 1e-8 in the step size into
# 1e-3 trajectory differences.
SPEC = [
    ([(1000003,), (7,), (1,)], {"lr": 0.5, "momentum": 0.9}),
    ([(64, 33), (5,)], {"lr": 0.1, "momentum": 0.9, "max_norm": 2.0}),
    ([(3, 4)], {"lr": 0.2, "momentum": 0.5, "adjusted_momentum": True, "max_norm": 1.5}),
]


def cuda_kernels(prof):
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e.name for e in events if not e.name.startswith(("Memcpy", "Memset"))]


def test_three_launches_per_step():
    from torch.profiler import ProfilerActivity, profile

    params, groups = many_tensor_model(CUDA)
    opt = FusedALIG(groups, backend="triton")
    loss = torch.tensor(1.5, dtype=torch.float64, device=CUDA)
    for _ in range(2):  # compile, momentum buffers, device tables
        opt.step(loss=loss)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step(loss=loss)
        torch.cuda.synchronize()
    kernels = cuda_kernels(prof)
    assert len(kernels) <= 3, kernels
    assert any("_alig_pass2_kernel" in name for name in kernels), kernels




# ---------------------------------------------------------------------------------------
# Lookahead: the one-launch Triton update (alig_fused/triton_lookahead.py)
# ---------------------------------------------------------------------------------------


def lookahead_plain(spec, dtype, steps, k, alpha):
    """Plain per-parameter Lookahead around the plain ALI-G loop, on the CPU in ``dtype``."""
    flat, groups, targets = replica(spec, dtype)
    reference = ReferenceALIG(groups)
    slow = [p.detach().clone() for p in flat]
    for step in range(1, steps + 1):
        reference.step(float(backward(flat, targets).detach()))
        if step % k == 0:
            with torch.no_grad():
                for p, s in zip(flat, slow):
                    s.add_(p - s, alpha=alpha)
                    p.copy_(s)
    return flat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lookahead_matches_torch_path(dtype):
    """Lookahead(FusedALIG) with the Triton update and with the torch (masked lerp) update:
    both follow the float64 loop to the calibrated bound, and each other. alpha = 0.5 is
    exact in every dtype (the torch path rounds alpha to the storage dtype)."""
    from alig_fused import Lookahead

    steps, k, alpha = 30, 3, 0.5
    runs = {}
    for backend in ("triton", "torch"):
        flat, groups, targets = replica(SPEC, dtype, CUDA)
        opt = Lookahead(FusedALIG(groups, backend="triton"), k=k, alpha=alpha, backend=backend)
        for _ in range(steps):
            opt.step(loss=backward(flat, targets))
        assert opt.last_backend == backend and int(opt.lookahead_step) == steps
        runs[backend] = flat
    exact = lookahead_plain(SPEC, torch.float64, steps, k, alpha)
    plain = lookahead_plain(SPEC, dtype, steps, k, alpha)
    bound = 3 * trajectory_error(plain, exact) + FLOOR[dtype]
    for backend, flat in runs.items():
        error = trajectory_error(flat, exact)
        assert error <= bound, f"{backend} update: {error:.3g} from the reference, allowed {bound:.3g}"
    gap = trajectory_error(runs["triton"], [p.detach().cpu() for p in runs["torch"]])
    assert gap <= bound, f"triton and torch updates differ by {gap:.3g}"
    flat, groups, targets = replica(SPEC, dtype, CUDA)
    auto = Lookahead(FusedALIG(groups, backend="triton"), k=k, alpha=alpha)
    auto.step(loss=backward(flat, targets))
    assert auto.last_backend == "triton"  # "auto" on CUDA tensors


def test_lookahead_update_bit_for_bit():
    """On the GPU as in the interpreter: slow' = fp32 slow + fp32(alpha) * (fast - slow),
    two roundings (no fma), rounded to the dtype; fast' == slow'; nothing moves otherwise."""
    from alig_fused.triton_lookahead import triton_lookahead

    params, _ = many_tensor_model(CUDA, 60)  # fp32, bf16, fp16 tensors shorter than a chunk: the masked path
    whole_chunks = [torch.randn(3 * 16384 + 5, device=CUDA), torch.randn(2 * 16384, device=CUDA).bfloat16()]
    fast = [p.detach() for p in params] + whole_chunks  # and the aligned whole-chunk path
    slow = [(f.float() + 0.3 * torch.randn_like(f, dtype=torch.float32)).to(f.dtype) for f in fast]
    step = torch.zeros((), dtype=torch.int64, device=CUDA)
    alpha, alpha32 = 0.3, torch.tensor(0.3, dtype=torch.float32, device=CUDA)
    cache = {}
    for n in range(1, 5):
        fast_before, slow_before = [f.clone() for f in fast], [s.clone() for s in slow]
        triton_lookahead(fast, slow, step, alpha, 2, cache)
        if n % 2:
            assert all(torch.equal(a, b) for a, b in zip(fast + slow, fast_before + slow_before)), f"step {n}"
        else:
            for f, s, f0, s0 in zip(fast, slow, fast_before, slow_before):
                expected = (s0.float() + alpha32 * (f0.float() - s0.float())).to(s0.dtype)
                assert torch.equal(s.view(torch.uint8), expected.view(torch.uint8)), f"step {n}"
                assert torch.equal(f.view(torch.uint8), s.view(torch.uint8)), f"step {n}"
            for f in fast:
                f.add_(1)  # the next sync step starts from fast != slow
        assert int(step) == n
    assert int(cache["tables"].tickets) == 0


def test_lookahead_one_launch_per_step():
    """The Lookahead update of a steady-state step is one kernel (counter included), on a
    sync step and on another step; a whole step is the three ALI-G launches and that one."""
    from torch.profiler import ProfilerActivity, profile

    from alig_fused import Lookahead

    params, groups = many_tensor_model(CUDA)
    opt = Lookahead(FusedALIG(groups, backend="triton"), k=2, backend="triton")
    loss = torch.tensor(1.5, dtype=torch.float64, device=CUDA)
    for _ in range(2):  # compile, momentum buffers, device tables
        opt.step(loss=loss)
    torch.cuda.synchronize()
    for _ in range(2):  # steps 3 (not a sync step) and 4 (a sync step)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt._sync_slow_weights()
            torch.cuda.synchronize()
        kernels = cuda_kernels(prof)
        assert len(kernels) == 1 and "_lookahead_kernel" in kernels[0], kernels
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step(loss=loss)
        torch.cuda.synchronize()
    kernels = cuda_kernels(prof)
    assert len(kernels) <= 4 and sum("_lookahead_kernel" in name for name in kernels) == 1, kernels
    assert int(opt.lookahead_step) == 5


def test_lookahead_no_host_sync_and_cuda_graph():
    """Lookahead(FusedALIG) captured once and replayed == the same steps run eagerly, bit
    for bit (the kernel reads and increments the counter on device); no host sync."""
    from alig_fused import Lookahead

    runs = {}
    for name in ("graph", "eager"):
        params, groups = many_tensor_model(CUDA, 40)
        runs[name] = (params, Lookahead(FusedALIG(groups, backend="triton"), k=3, alpha=0.5, backend="triton"))
    static_loss = torch.zeros((), dtype=torch.float64, device=CUDA)
    eager_loss = torch.zeros((), dtype=torch.float64, device=CUDA)

    def set_inputs(params, loss_t, step):
        for i, p in enumerate(params):
            p.grad.copy_((torch.sin(p.detach().float() * (step + 1) + i) * 1e-2).to(p.dtype))
        loss_t.fill_(1.0 + 0.1 * step)

    graph_params, graph_opt = runs["graph"]
    eager_params, eager_opt = runs["eager"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, buffers, tables
        for step in range(2):
            set_inputs(graph_params, static_loss, step)
            graph_opt.step(loss=static_loss)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2):
            set_inputs(eager_params, eager_loss, step)
            eager_opt.step(loss=eager_loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step(loss=static_loss)

    for step in range(2, 10):  # sync steps 3, 6, 9
        set_inputs(graph_params, static_loss, step)
        graph.replay()
        set_inputs(eager_params, eager_loss, step)
        eager_opt.step(loss=eager_loss)
        assert int(graph_opt.lookahead_step) == int(eager_opt.lookahead_step) == step + 1
        for g, e in zip(graph_params, eager_params):
            assert torch.equal(g.detach(), e.detach()), f"step {step}"
            assert torch.equal(graph_opt.state[g]["slow_param"], eager_opt.state[e]["slow_param"]), f"step {step}"
