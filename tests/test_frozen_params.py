"""Frozen parameters (requires_grad=False) are never touched: not by the projection at
construction, not by a step; the trainable ones follow the float64 reference loop."""

from __future__ import annotations

import pytest
import torch

from alig_fused import FusedALIG
from reference import ReferenceALIG
from harness import SHAPES, assert_follows_reference, make_groups, problem_loss

HPARAMS = {"lr": 0.2, "momentum": 0.9, "max_norm": 1.5}  # the ball binds from the start


def frozen_run(backend, steps):
    """One group of SHAPES whose tensors 1 and 3 are frozen; FusedALIG in fp32, the reference
    in float64 and in fp32 (the plain loop's rounding, for the tolerance)."""
    tensors, targets, _ = make_groups([(SHAPES, HPARAMS)])[0]
    frozen = {1, 3}
    runs = {}
    for name, dtype in (("fused", torch.float32), ("exact", torch.float64), ("plain", torch.float32)):
        params = [t.detach().to(dtype, copy=True).requires_grad_(i not in frozen) for i, t in enumerate(tensors)]
        start = [p.detach().clone() for p in params]
        opt = FusedALIG(params, backend=backend, **HPARAMS) if name == "fused" else ReferenceALIG([{"params": params, **HPARAMS}])
        at_construction = [p.detach().clone() for p in params]
        for _ in range(steps):
            for p in params:
                p.grad = None
            loss = problem_loss(params, targets, [True] * len(params))  # frozen ones get no grad
            loss.backward()
            if name == "fused":
                opt.step(loss=loss)
            else:
                opt.step(float(loss.detach()))
        runs[name] = (params, start, at_construction, opt)
    return runs, frozen


def test_frozen_params_are_not_projected_at_construction(backend):
    runs, frozen = frozen_run(backend, steps=0)
    params, start, at_construction, _ = runs["fused"]
    for i in frozen:
        assert torch.equal(at_construction[i], start[i])
    trainable_norm = sum(float(p.double().norm()) ** 2 for i, p in enumerate(at_construction) if i not in frozen) ** 0.5
    assert trainable_norm == pytest.approx(HPARAMS["max_norm"], rel=1e-6)  # the rest was projected
    exact = runs["exact"][2]
    for p, e in zip(at_construction, exact):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-7)


def test_frozen_params_are_never_touched_by_a_step(backend):
    runs, frozen = frozen_run(backend, steps=20)
    params, start, _, opt = runs["fused"]
    for i in frozen:
        assert torch.equal(params[i].detach(), start[i])
        assert params[i] not in opt.state  # no momentum buffer either
    trainable = [i for i in range(len(params)) if i not in frozen]
    for name in ("fused", "exact", "plain"):  # every run trained (the tolerance compares moves)
        moved, began = runs[name][0], runs[name][2]
        assert all(not torch.equal(moved[i].detach(), began[i]) for i in trainable), name
    assert_follows_reference(
        [params[i] for i in trainable],
        [runs["exact"][0][i] for i in trainable],
        [runs["plain"][0][i] for i in trainable],
        torch.float32,
    )
