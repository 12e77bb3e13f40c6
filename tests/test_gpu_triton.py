"""The Triton backend on a CUDA device: trajectories, launch count, no host sync, CUDA graphs.

Skipped without CUDA (CI has none: tests/test_triton.py runs the same kernels in the
Triton interpreter there, tests/test_triton_compile.py compiles them for sm_80/sm_90).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device: these GPU tests of the Triton backend need one"
    ),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") == "1",
        reason="TRITON_INTERPRET=1: the kernels would run in the interpreter, not on the GPU",
    ),
]

pytest.importorskip("triton")

from alig_fused import FusedALIG  # noqa: E402
from reference import ReferenceALIG  # noqa: E402

CUDA = torch.device("cuda")
# Tolerance as in tests/test_triton.py: at most 3x the plain loop's own distance to the
# float64 reference when run in the storage dtype, plus a floor of a few storage ulps.
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def problem(spec, seed=0):
    """spec: list of (shapes, hparams). float64 CPU start points and reachable targets."""
    gen = torch.Generator().manual_seed(seed)
    masters, targets = [], []
    for shapes, _ in spec:
        for s in shapes:
            masters.append(torch.randn(s, generator=gen, dtype=torch.float64))
            solution = torch.randn(s, generator=gen, dtype=torch.float64) * 0.5
            targets.append(0.2 * torch.tanh(solution) + solution)
    return masters, targets


def replica(spec, masters, dtype, device):
    flat, groups, i = [], [], 0
    for shapes, hparams in spec:
        params = [masters[i + j].to(device=device, dtype=dtype, copy=True).requires_grad_() for j in range(len(shapes))]
        i += len(shapes)
        flat += params
        groups.append({"params": params, **hparams})
    return flat, groups


def problem_loss(flat, targets):
    """sum_i mean((0.2 tanh(p_i) + p_i - t_i)^2) in float64 on the params' device."""
    terms = [((0.2 * torch.tanh(p.double()) + p.double() - t.to(p.device)) ** 2).mean() for p, t in zip(flat, targets)]
    return sum(terms)


def backward(flat, targets):
    for p in flat:
        p.grad = None
    loss = problem_loss(flat, targets)
    loss.backward()
    return loss


def trajectory_error(params, exact):
    diff = math.sqrt(sum(float((p.detach().double().cpu() - e.detach().double()).norm()) ** 2
                         for p, e in zip(params, exact)))
    scale = math.sqrt(sum(float(e.detach().double().norm()) ** 2 for e in exact))
    return diff / max(scale, 1e-12)


# The big tensor is in the group without a ball: the optimizer's start projection of a
# 1M-element tensor is not this backend's business. Every group has a max_lr: uncapped
# Polyak steps near a zero loss amplify rounding differences of 1e-8 in the step size into
# 1e-3 trajectory differences (tests/test_triton.py covers uncapped groups, where the
# interpreter's arithmetic is deterministic).
SPEC = [
    ([(1000003,), (7,), (1,)], {"lr": 0.5, "momentum": 0.9}),
    ([(64, 33), (5,)], {"lr": 0.1, "momentum": 0.9, "max_norm": 2.0}),
    ([(3, 4)], {"lr": 0.2, "momentum": 0.5, "adjusted_momentum": True, "max_norm": 1.5}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_trajectory_matches_reference(dtype):
    masters, targets = problem(SPEC)
    gpu, groups = replica(SPEC, masters, dtype, CUDA)
    opt = FusedALIG(groups, backend="triton")
    exact_flat, exact_groups = replica(SPEC, masters, torch.float64, "cpu")
    plain_flat, plain_groups = replica(SPEC, masters, dtype, "cpu")
    exact, plain = ReferenceALIG(exact_groups), ReferenceALIG(plain_groups)
    for _ in range(50):
        opt.step(loss=backward(gpu, targets))
        exact.step(float(backward(exact_flat, targets).detach()))
        plain.step(float(backward(plain_flat, targets).detach()))
    assert opt.last_backend == "triton"
    error, plain_error = trajectory_error(gpu, exact_flat), trajectory_error(plain_flat, exact_flat)
    assert error <= 3 * plain_error + FLOOR[dtype], f"{error:.3g} from the reference; the plain loop {plain_error:.3g}"
    for p in gpu:
        assert p.dtype == dtype and p.is_cuda
    assert int(opt.skipped_steps) == 0


def many_tensor_model(n_tensors=200):
    """fp32, bf16 and fp16 tensors of odd sizes, static grads, two groups."""
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    params = [
        torch.randn(1 + (37 * i) % 5000, generator=gen).to(device=CUDA, dtype=dtypes[i % 3]).requires_grad_()
        for i in range(n_tensors)
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device=CUDA, dtype=p.dtype) * 1e-2
    half = n_tensors // 2
    groups = [
        {"params": params[:half], "momentum": 0.9, "max_norm": 20.0},
        {"params": params[half:], "lr": 0.1},
    ]
    return params, groups


def cuda_kernels(prof):
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e.name for e in events if not e.name.startswith(("Memcpy", "Memset"))]


def test_three_launches_per_step():
    from torch.profiler import ProfilerActivity, profile

    params, groups = many_tensor_model()
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


def test_no_host_sync():
    params, groups = many_tensor_model()
    opt = FusedALIG(groups, backend="triton")
    loss = torch.tensor(1.5, dtype=torch.float64, device=CUDA)
    opt.step(loss=loss)  # compiles the kernels
    _, fresh_groups = many_tensor_model(30)
    fresh_opt = FusedALIG(fresh_groups, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(loss=loss)
        opt.param_groups[1]["lr"] = 0.05  # a new hparams table (pinned, non-blocking copy)
        for p in params:
            p.grad = p.grad.clone()  # new gradient tensors: a new chunk table
        opt.step(loss=loss)
        opt.step(loss=torch.tensor(float("nan"), dtype=torch.float64, device=CUDA))  # a skipped step
        fresh_opt.step(loss=loss)  # a first step: momentum buffers and device tables
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(opt.skipped_steps) == 1


def test_cuda_graph_replay_matches_eager():
    """opt.step(loss=static_loss) captured once and replayed == the same steps run eagerly."""
    runs = {}
    for name in ("graph", "eager"):
        params, groups = many_tensor_model(40)
        runs[name] = (params, FusedALIG(groups, backend="triton"))
    static_loss = torch.zeros((), dtype=torch.float64, device=CUDA)
    eager_loss = torch.zeros((), dtype=torch.float64, device=CUDA)

    def set_inputs(params, loss_t, step):
        # grads and loss from the current params, written in place into the static tensors
        for i, p in enumerate(params):
            p.grad.copy_((torch.sin(p.detach().float() * (step + 1) + i) * 1e-2).to(p.dtype))
        value = float("nan") if step == 5 else 1.0 + 0.1 * step
        loss_t.fill_(value)

    graph_params, graph_opt = runs["graph"]
    eager_params, eager_opt = runs["eager"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, buffers, tables
        for step in range(2):
            set_inputs(graph_params, static_loss, step)
            graph_opt.step(loss=static_loss)
    torch.cuda.current_stream().wait_stream(side)
    for step in range(2):
        set_inputs(eager_params, eager_loss, step)
        eager_opt.step(loss=eager_loss)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step(loss=static_loss)

    for step in range(2, 10):
        set_inputs(graph_params, static_loss, step)
        graph.replay()
        set_inputs(eager_params, eager_loss, step)
        eager_opt.step(loss=eager_loss)
        for g, e in zip(graph_params, eager_params):
            assert torch.equal(g.detach(), e.detach()), f"step {step}"
            if "momentum_buffer" in graph_opt.state[g]:
                assert torch.equal(graph_opt.state[g]["momentum_buffer"], eager_opt.state[e]["momentum_buffer"])
        assert torch.equal(graph_opt._step_sizes, eager_opt._step_sizes)
    assert int(graph_opt.skipped_steps) == int(eager_opt.skipped_steps) == 1


def test_grad_scaler():
    """GradScaler's fused-optimizer protocol: scaled grads step as the unscaled ones; an
    overflow skips the step (params unchanged) and the scaler backs off."""
    masters, targets = problem(SPEC[1:])
    amp_flat, amp_groups = replica(SPEC[1:], masters, torch.float32, CUDA)
    ref_flat, ref_groups = replica(SPEC[1:], masters, torch.float32, CUDA)
    amp_opt, ref_opt = FusedALIG(amp_groups, backend="triton"), FusedALIG(ref_groups, backend="triton")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    for _ in range(5):
        for p in amp_flat:
            p.grad = None
        loss = problem_loss(amp_flat, targets)
        scaler.scale(loss).backward()
        scaler.step(amp_opt, loss=loss.detach())
        scaler.update()
        ref_opt.step(loss=backward(ref_flat, targets))
        for a, r in zip(amp_flat, ref_flat):
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in amp_flat]
    for p in amp_flat:
        p.grad = None
    loss = problem_loss(amp_flat, targets)
    scaler.scale(loss).backward()
    amp_flat[0].grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(amp_opt, loss=loss.detach())
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(amp_flat, before))
    assert int(amp_opt.skipped_steps) == 1
    assert scaler.get_scale() < scale
