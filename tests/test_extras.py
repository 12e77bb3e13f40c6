"""Lookahead, the drop-in AliG / l2_projection, and the Polyak-step options."""

from __future__ import annotations

import copy

import pytest
import torch

from alig_fused import AliG, FusedALIG, Lookahead, l2_projection
from reference import ReferenceALIG
from harness import SHAPES, make_groups, problem_loss, trajectory_error


def lookahead_reference(groups_spec, steps, k, alpha, targets, params):
    """Plain per-parameter Lookahead around the plain ALI-G loop (float64)."""
    reference = ReferenceALIG(groups_spec)
    slow = [p.detach().clone() for p in params]
    for step in range(1, steps + 1):
        for p in params:
            p.grad = None
        loss = problem_loss(params, targets, [True] * len(params))
        loss.backward()
        reference.step(float(loss.detach()))
        if step % k == 0:
            with torch.no_grad():
                for p, s in zip(params, slow):
                    s.add_(p - s, alpha=alpha)
                    p.copy_(s)
    return params


def test_lookahead_matches_plain_reference(backend):
    hp = {"lr": 0.1, "momentum": 0.9, "max_norm": 3.0}
    tensors, targets, _ = make_groups([(SHAPES, hp)])[0]
    ref_params = [t.clone().requires_grad_() for t in tensors]
    lookahead_reference([{"params": ref_params, **hp}], 30, 3, 0.5, targets, ref_params)

    params = [t.float().requires_grad_() for t in tensors]
    opt = Lookahead(FusedALIG(params, backend=backend, **hp), k=3, alpha=0.5)
    for _ in range(30):
        opt.zero_grad()
        loss = problem_loss(params, targets, [True] * len(params))
        loss.backward()
        opt.step(loss=loss)
    assert int(opt.lookahead_step) == 30
    assert trajectory_error(params, ref_params) < 2e-6


def test_lookahead_state_dict_round_trip_and_scheduler():
    tensors, targets, _ = make_groups([(SHAPES, {})])[0]
    a = [t.float().requires_grad_() for t in tensors]
    opt_a = Lookahead(FusedALIG(a, lr=0.1, momentum=0.9, backend="torch"), k=3)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    for _ in range(4):
        opt_a.zero_grad()
        loss = problem_loss(a, targets, [True] * len(a))
        loss.backward()
        opt_a.step(loss=loss)
        sched.step()
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt_a.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)

    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = Lookahead(FusedALIG(b, lr=1.0, momentum=0.9, backend="torch"), k=7, alpha=0.1)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.k == 3 and opt_b.alpha == 0.5 and int(opt_b.lookahead_step) == 4
    for opt, params in ((opt_a, a), (opt_b, b)):
        for _ in range(3):  # crosses a synchronisation step (6)
            opt.zero_grad()
            loss = problem_loss(params, targets, [True] * len(params))
            loss.backward()
            opt.step(loss=loss)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_lookahead_passes_grad_scaler_protocol_through():
    p = torch.nn.Parameter(torch.randn(4))
    opt = Lookahead(FusedALIG([p], lr=0.1, backend="torch"), k=2)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    loss = (p**2).sum()
    scaler.scale(loss).backward()
    before = p.detach().clone()
    scaler.step(opt, loss=loss)
    scaler.update()
    expected_step = float(loss.detach()) / (float((2 * before).norm()) ** 2 + 1e-5)
    torch.testing.assert_close(p.detach(), before - min(expected_step, 0.1) * 2 * before)


def test_lookahead_is_an_optimizer_with_hooks_and_the_inner_groups():
    p = torch.nn.Parameter(torch.randn(4))
    inner = FusedALIG([p], lr=0.1, backend="torch")
    opt = Lookahead(inner, k=2)
    assert opt.param_groups is inner.param_groups and opt.defaults is inner.defaults
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt, int(o.lookahead_step))))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt, int(o.lookahead_step))))
    p.grad = torch.ones(4)
    opt.step(loss=1.0)
    assert calls == [("pre", True, 0), ("post", True, 1)]
    q = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [q], "lr": 0.5})
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["params"] == [q]
    assert torch.equal(opt.state[q]["slow_param"], q.detach())


def test_lookahead_rejects_bad_arguments():
    opt = FusedALIG([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="k"):
        Lookahead(opt, k=0)
    with pytest.raises(ValueError, match="alpha"):
        Lookahead(opt, alpha=1.5)


def test_drop_in_alig_with_the_reference_call_pattern(backend):
    """The reference's signature, positional order and step(lambda: float(loss))."""
    max_norm = 2.0
    tensors, targets, _ = make_groups([(SHAPES, {})])[0]
    params = [t.float().requires_grad_() for t in tensors]
    opt = AliG(params, 0.1, 0.9, lambda: l2_projection(params, max_norm), 1e-5, False)
    ref_params = [t.clone().requires_grad_() for t in tensors]
    reference = ReferenceALIG([{"params": ref_params, "lr": 0.1, "momentum": 0.9, "max_norm": max_norm}])
    for _ in range(30):
        for flat in (params, ref_params):
            for p in flat:
                p.grad = None
            loss = problem_loss(flat, targets, [True] * len(flat))
            loss.backward()
            if flat is params:
                opt.step(lambda: float(loss))
            else:
                reference.step(float(loss.detach()))
    assert trajectory_error(params, ref_params) < 2e-6
    assert float(opt.step_size) == pytest.approx(reference.step_sizes[0], rel=1e-4)


def test_l2_projection_matches_reference_rule():
    params = [torch.randn(3, 4) * 3, torch.randn(5) * 3]
    before = [p.clone() for p in params]
    norm = torch.sqrt(sum(p.norm() ** 2 for p in before))
    l2_projection(params, 1.0)
    for p, b in zip(params, before):
        torch.testing.assert_close(p, b / norm)
    inside = [p.clone() for p in params]
    l2_projection(params, 10.0)  # inside the ball: untouched
    for p, q in zip(params, inside):
        assert torch.equal(p, q)
    l2_projection(params, None)


def test_polyak_positive_part_and_scaling(backend):
    """SPS+: a loss below f_star gives step 0; scaling c divides the Polyak step."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = FusedALIG([p], lr=None, f_star=5.0, backend=backend)
    p.grad = torch.tensor([0.5, 0.5, 0.5])
    opt.step(loss=1.0)
    assert float(opt.param_groups[0]["step_size"]) == 0.0
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0, 0.5]))

    opt = FusedALIG([p], lr=None, f_star=0.25, scaling=2.0, eps=1e-5, backend=backend)
    opt.step(loss=1.0)
    expected = (1.0 - 0.25) / (2.0 * 0.75 + 1e-5)
    assert float(opt.param_groups[0]["step_size"]) == pytest.approx(expected, rel=1e-6)
