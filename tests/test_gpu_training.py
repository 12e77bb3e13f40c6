"""Whole training steps on a GPU: CUDA-graph capture, and GradScaler with fp16 autocast."""

from __future__ import annotations

import pytest
import torch

from alig_fused import FusedALIG

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BACKENDS = ["torch", "cpp", "triton"]


def make(backend, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
    opt = FusedALIG(model.parameters(), lr=0.1, momentum=0.9, max_norm=20.0, backend=backend)
    return model, opt


def batches(n):
    gen = torch.Generator(device="cuda").manual_seed(1)
    return [(torch.randn(16, 32, device="cuda", generator=gen), torch.randn(16, 8, device="cuda", generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("name", BACKENDS)
def test_cuda_graph_of_a_full_training_step(name):
    from conftest import require_backend

    require_backend(name, torch.device("cuda"))
    data = batches(12)
    eager_model, eager_opt = make(name)
    for x, y in data:
        eager_opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(eager_model(x), y)
        loss.backward()
        eager_opt.step(loss=loss)

    model, opt = make(name)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    warmup = 3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's docs do
        for x, y in data[:warmup]:
            static_x.copy_(x)
            static_y.copy_(y)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(static_x), static_y)
            loss.backward()
            opt.step(loss=loss)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    # keep the warm-up's .grad tensors: backward accumulates into them in place, so the
    # fused backends' cached tensor tables stay valid inside the graph
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = torch.nn.functional.mse_loss(model(static_x), static_y)
        static_loss.backward()
        opt.step(loss=static_loss)
    for x, y in data[warmup:]:
        static_x.copy_(x)
        static_y.copy_(y)
        opt.zero_grad(set_to_none=False)  # zeroes the static grads in place (outside the graph)
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_grad_scaler_fp16_autocast_matches_unscaled(name):
    from conftest import require_backend

    require_backend(name, torch.device("cuda"))
    data = batches(10)
    runs = {}
    for scaled in (False, True):
        model, opt = make(name)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=scaled)
        for x, y in data:
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt, loss=loss)
            scaler.update()
        assert int(opt.skipped_steps) == 0
        runs[scaled] = [p.detach().clone() for p in model.parameters()]
    for p, q in zip(runs[True], runs[False]):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_grad_scaler_overflow_skips_the_step(name):
    from conftest import require_backend

    require_backend(name, torch.device("cuda"))
    model, opt = make(name)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x, y = batches(1)[0]
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt, loss=loss)
    scaler.update()
    assert int(opt.skipped_steps) == 1
    assert scaler.get_scale() < 2.0**10
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
