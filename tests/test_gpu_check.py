"""The checks scripts/gpu_check.sh runs on a first GPU machine, beyond the other GPU tests:
64-bit addressing on one tensor past 2^31 elements, a CUDA graph replayed after an ``lr``
change (the tables it captured must still be the ones it reads), and bitwise
repeatability. Each runs the Triton and the C++ backends. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from alig_fused import FusedALIG, backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = ["triton", "cpp"]


def _require(name):
    ok, reason = backends.supports(name, torch.device("cuda"))
    if not ok:
        pytest.skip(f"backend {name!r} unavailable on cuda: {reason}")


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_one_tensor_past_2_31_elements(name):
    """2^31 + 4,099 bf16 elements (a whole number of chunks is not: the tail is masked): the
    elements past 2^31 are updated as the torch backend updates them."""
    _require(name)
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * n * 2 + (2 << 30):  # w, g, b for two runs, plus slack
        pytest.skip(f"needs ~{8 * n * 2 >> 30} GiB free on the GPU, {free >> 30} GiB are")
    gen = torch.Generator(device="cuda").manual_seed(0)
    w0 = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    results = []
    for backend in (name, "torch"):
        w = torch.nn.Parameter(w0.clone())
        w.grad = g
        opt = FusedALIG([w], lr=0.5, momentum=0.9, max_norm=float(w0.float().norm()) * 0.9, backend=backend)
        opt.step(loss=torch.tensor(1.0, device="cuda"))
        results.append(w.detach()[2**31 - 4096:].float())
        del w, opt
    torch.testing.assert_close(results[0], results[1], rtol=2e-2, atol=1e-2)  # bf16 storage
    assert not torch.equal(results[0], w0[2**31 - 4096:].float())  # it did move, past 2^31 too
    assert not torch.equal(results[0][-4099:], w0[-4099:].float())


def _model(seed):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in ((256, 128), (128,), (1000, 3), (7,))]


def _fill_grads(params, gen):
    for p in params:
        p.grad.copy_(torch.randn(p.shape, device="cuda", generator=gen))


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_graph_replayed_after_lr_change(name):
    """Capture, change lr and take eager steps with new gradient tensors (rebuilding tables
    the graph must not lose), then replay: the replay computes a step with the old or the
    new lr (whichever the backend bakes in), bit for bit, never garbage from freed tables."""
    _require(name)
    params = _model(0)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = FusedALIG(params, lr=0.05, momentum=0.9, backend=name)
    loss = torch.zeros((), dtype=torch.float64, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _fill_grads(params, gen)
        loss.fill_(1.0)
        opt.step(loss=loss)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(loss=loss)
    static_grads = [p.grad for p in params]
    for group in opt.param_groups:
        group["lr"] = 0.01
    for _ in range(3):  # eager steps with new gradient tensors and the new lr: new tables
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step(loss=torch.tensor(2.0, device="cuda"))
        torch.cuda.empty_cache()
        _ = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(8)]  # reuse freed blocks
    for p, g in zip(params, static_grads):
        p.grad = g
    _fill_grads(params, gen)
    loss.fill_(1.5)
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in ((i, opt.state[p]["momentum_buffer"]) for i, p in enumerate(params))}
    graph.replay()
    torch.cuda.synchronize()
    replayed = [p.detach().clone() for p in params]
    matches = []
    for lr in (0.05, 0.01):
        ref_params = [torch.nn.Parameter(b.clone()) for b in before]
        for rp, p in zip(ref_params, params):
            rp.grad = p.grad.clone()
        ref = FusedALIG(ref_params, lr=lr, momentum=0.9, backend=name)
        for i, rp in enumerate(ref_params):
            ref.state[rp]["momentum_buffer"] = state[i].clone()
        ref.step(loss=torch.tensor(1.5, dtype=torch.float64, device="cuda"))
        matches.append(all(torch.equal(a, b.detach()) for a, b in zip(replayed, ref_params)))
    assert any(matches), "the replay after an lr change matches a step with neither the old nor the new lr"


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_repeatable(name, dtype):
    """Two runs from the same start, with the same gradients: bit-identical (no atomics in
    the reductions, a fixed order)."""
    _require(name)
    runs = []
    for _ in range(2):
        params = [torch.nn.Parameter(p.detach().to(dtype)) for p in _model(3)]
        opt = FusedALIG(params, lr=0.1, momentum=0.9, max_norm=20.0, backend=name)
        gen = torch.Generator(device="cuda").manual_seed(5)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(dtype)
            opt.step(loss=torch.tensor(3.0, device="cuda"))
        runs.append([p.detach().clone() for p in params] + [opt.param_groups[0]["step_size"].clone()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
