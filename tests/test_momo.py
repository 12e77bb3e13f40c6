"""FusedMoMo against a plain float64 per-parameter MoMo loop (the reference's momo/momo.py,
fabian-sp/MoMo, bias_correction=False, restated below one parameter at a time)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from alig_fused import FusedMoMo


class ReferenceMomo:
    """The reference's step, as written there (per parameter, host floats), in float64."""

    def __init__(self, groups, beta=0.9, lb=0.0, use_fstar=False):
        self.groups = [dict(g, params=list(g["params"])) for g in groups]
        for g in self.groups:
            g.setdefault("weight_decay", 0.0)
        self.beta, self.lb, self.initial_lb, self.use_fstar = beta, lb, lb, use_fstar
        self.steps = 0
        self.state = {}
        self.taus = []

    @torch.no_grad()
    def step(self, loss: float):
        self.steps += 1
        beta = self.beta
        if self.steps == 1:
            self.loss_avg = loss
        self.loss_avg = beta * self.loss_avg + (1 - beta) * loss
        dot = gamma = norm = 0.0
        for group in self.groups:
            for p in group["params"]:
                grad = p.grad
                state = self.state.setdefault(p, {})
                if self.steps == 1:
                    state["grad_avg"] = grad.clone()
                    state["grad_dot_w"] = float(torch.sum(p * grad))
                state["grad_avg"].mul_(beta).add_(grad, alpha=1 - beta)
                state["grad_dot_w"] = beta * state["grad_dot_w"] + (1 - beta) * float(torch.sum(p * grad))
                dot += float(torch.sum(p * state["grad_avg"]))
                gamma += state["grad_dot_w"]
                norm += float(torch.sum(state["grad_avg"] * state["grad_avg"]))
        taus = []
        for group in self.groups:
            lr, lmbda = group["lr"], group["weight_decay"]
            if self.use_fstar:
                cap = (1 + lr * lmbda) * self.loss_avg + dot - (1 + lr * lmbda) * gamma
                if cap < (1 + lr * lmbda) * self.lb:
                    self.lb = max(cap / (2 * (1 + lr * lmbda)), self.initial_lb)
            nom = (1 + lr * lmbda) * (self.loss_avg - self.lb) + dot - (1 + lr * lmbda) * gamma
            tau = min(lr, max(nom, 0.0) / norm)
            if self.use_fstar:
                h = self.loss_avg + dot - gamma
                self.lb = max(h - 0.5 * tau * norm, self.initial_lb)
            for p in group["params"]:
                p.add_(self.state[p]["grad_avg"], alpha=-tau)
                if lmbda > 0:
                    p.div_(1 + lr * lmbda)
            taus.append(tau)
        self.taus.append(taus)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y) + 0.05  # a floor above lb = 0


def _train(model, opt, x, y, steps):
    """``steps`` plain steps on the same batch."""
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step(loss=loss)


def _groups(model, weight_decay):
    first, second = model[0], model[2]
    return [
        {"params": [first.weight, first.bias], "lr": 0.5, "weight_decay": weight_decay},
        {"params": [second.weight], "lr": 2.0, "weight_decay": 2 * weight_decay},
        {"params": [second.bias], "lr": 0.05},
    ]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("use_fstar", [False, True])
def test_follows_the_reference_loop(backend, weight_decay, use_fstar):
    model = _model()
    ref_model = copy.deepcopy(model).double()
    opt = FusedMoMo(_groups(model, weight_decay), beta=0.9, use_fstar=use_fstar, backend=backend)
    ref = ReferenceMomo(_groups(ref_model, weight_decay), beta=0.9, use_fstar=use_fstar)
    torch.manual_seed(1)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for _ in range(20):
        ref_x = x.double()
        for m in (model, ref_model):
            m.zero_grad()
        ref_loss = _loss(ref_model, ref_x, y.double())
        ref_loss.backward()
        ref.step(float(ref_loss.detach()))
        loss = _loss(model, x, y)
        loss.backward()
        opt.step(loss=loss)
        x = torch.randn(32, 6)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-6)
        taus = torch.tensor(ref.taus[-1], dtype=torch.float64)
        torch.testing.assert_close(opt.diagnostics()["step_size"], taus, rtol=1e-4, atol=1e-8)  # fp32 kernels vs fp64: nom cancels
        assert abs(float(opt.lb) - ref.lb) <= 1e-4 * max(1.0, abs(ref.lb))
    assert opt.last_backend == backend
    assert int(opt.skipped_steps) == 0
    if use_fstar:
        assert float(opt.lb) > 0  # the estimate moved: the test exercises it


def test_weight_decay_and_groups_matter():
    """The reference loop above is not trivially equal to itself: different settings, different trajectories."""
    outs = []
    for wd in (0.0, 0.1):
        model = _model()
        opt = FusedMoMo(_groups(model, wd), backend="torch")
        _train(model, opt, torch.randn(16, 6), torch.randn(16, 3), 3)
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(outs[0], outs[1])


def test_state_dict_round_trip(backend):
    model = _model()
    opt = FusedMoMo(model.parameters(), lr=1.0, use_fstar=True, backend=backend)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    _train(model, opt, x, y, 3)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert set(saved["momo"]) >= {"step", "f_bar", "gamma_bar", "lb"}
    assert int(saved["momo"]["step"]) == 3
    _train(model, opt, x, y, 2)
    resumed = _model(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = FusedMoMo(resumed.parameters(), lr=1.0, use_fstar=True, backend=backend)
    opt2.load_state_dict(saved)
    _train(resumed, opt2, x, y, 2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(opt.lb, opt2.lb)


def test_non_finite_loss_skips_and_keeps_the_averages(backend):
    model = _model()
    opt = FusedMoMo(model.parameters(), backend=backend)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    loss = _loss(model, x, y)
    loss.backward()
    opt.step(loss=loss)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = [t.clone() for t in opt.momo_state()]
    opt.step(loss=torch.tensor(math.nan))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for t, b in zip(opt.momo_state(), state_before):
        assert torch.equal(t, b)
    assert int(opt.skipped_steps) == 1
    assert opt.diagnostics()["skipped"].item()


def test_zero_direction_gives_zero_step(backend):
    """||d'||^2 = 0 (MoMo divides by it): tau = 0 and the parameters stay put."""
    w = torch.nn.Parameter(torch.ones(5))
    opt = FusedMoMo([w], backend=backend)
    w.grad = torch.zeros(5)
    opt.step(loss=1.0)
    assert torch.equal(w.detach(), torch.ones(5))
    assert float(opt.param_groups[0]["step_size"]) == 0.0
    assert int(opt.skipped_steps) == 0


def test_bad_input_raises_before_anything_changes():
    model = _model()
    with pytest.raises(ValueError, match="beta"):
        FusedMoMo(model.parameters(), beta=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        FusedMoMo(model.parameters(), weight_decay=-1.0)
    with pytest.raises(TypeError, match="bias_correction"):
        FusedMoMo(model.parameters(), bias_correction=True)
    opt = FusedMoMo(model.parameters(), backend="torch")
    loss = _loss(model, torch.randn(4, 6), torch.randn(4, 3))
    loss.backward()
    opt.param_groups[0]["weight_decay"] = -0.5
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="weight_decay"):
        opt.step(loss=loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert len(opt.state) == 0 and int(opt.momo_state().step) == 0


@pytest.mark.parametrize("use_fstar", [False, True])
def test_against_the_reference_package(backend, use_fstar):
    """The reference's own Momo (package momo-opt, installed by scripts/dev.sh) as a client."""
    momo = pytest.importorskip("momo", reason="the reference MoMo (pip install --no-deps momo-opt) is not installed")
    model = _model()
    ref_model = copy.deepcopy(model).double()
    opt = FusedMoMo(model.parameters(), lr=1.0, weight_decay=0.01, beta=0.8, use_fstar=use_fstar, backend=backend)
    ref = momo.Momo(ref_model.parameters(), lr=1.0, weight_decay=0.01, beta=0.8, use_fstar=use_fstar)
    torch.manual_seed(2)
    for _ in range(15):
        x, y = torch.randn(32, 6), torch.randn(32, 3)
        for m, o, dtype in ((model, opt, torch.float32), (ref_model, ref, torch.float64)):
            o.zero_grad()
            loss = _loss(m, x.to(dtype), y.to(dtype))
            loss.backward()
            o.step(loss=loss)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-6)
    if use_fstar:
        assert abs(float(opt.lb) - float(ref.lb)) <= 1e-4 * max(1.0, abs(float(ref.lb)))


def test_grad_scaler_protocol_and_accumulated_loss(backend):
    """grad_scale/found_inf (GradScaler's protocol) and accumulate_loss give the plain step."""
    model_a, model_b = _model(), _model()
    opt_a = FusedMoMo(model_a.parameters(), lr=1.0, weight_decay=0.01, backend=backend)
    opt_b = FusedMoMo(model_b.parameters(), lr=1.0, weight_decay=0.01, backend=backend)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(5):
        _train(model_a, opt_a, x, y, 1)
        opt_b.zero_grad()
        for half in (slice(0, 8), slice(8, 16)):  # two micro-batches, each half the loss
            part = _loss(model_b, x[half], y[half]) / 2
            (part * 512.0).backward()
            opt_b.accumulate_loss(part)
        opt_b.grad_scale, opt_b.found_inf = torch.tensor(512.0), torch.tensor(0.0)
        opt_b.step()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    opt_b.zero_grad()
    _loss(model_b, x, y).backward()
    before = [p.detach().clone() for p in model_b.parameters()]
    opt_b.found_inf = torch.tensor(1.0)
    opt_b.step(loss=1.0)
    assert all(torch.equal(p, b) for p, b in zip(model_b.parameters(), before))
    assert int(opt_b.skipped_steps) == 1


@pytest.mark.parametrize("n_tensors", [2, 24])
def test_triton_launches_do_not_grow_with_tensors(n_tensors, monkeypatch):
    from conftest import require_backend

    require_backend("triton", torch.device("cpu"))
    from alig_fused import triton_kernels as tk

    launched = []
    launch = tk._launch
    monkeypatch.setattr(tk, "_launch", lambda kernel, grid, *a, **m: (launched.append(kernel), launch(kernel, grid, *a, **m)))
    params = [torch.nn.Parameter(torch.randn(3 + i)) for i in range(n_tensors)]
    opt = FusedMoMo([{"params": params[::2]}, {"params": params[1::2], "lr": 0.1}], backend="triton")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        launched.clear()
        opt.step(loss=1.0)
        assert launched == [tk._alig_pass1_kernel, tk._alig_finalize_kernel, tk._alig_pass2_kernel]
