"""Hyper-parameters that change while training: a tensor lr, learning-rate schedulers, and
the per-group device table (functional.hparams_table) that the kernels read."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from alig_fused import FusedALIG
from alig_fused.functional import HParam
from reference import ReferenceALIG
from harness import SHAPES, make_groups, problem_loss, trajectory_error

SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e)),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    "LinearLR": lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=10),
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
}


def hparams_tables(opt):
    """The [n_groups, 7] float64 tables in the backends' caches (found by what they are)."""
    return [
        value
        for cache in opt._cache.values()
        if isinstance(cache, dict)
        for value in cache.values()
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64 and value.shape == (len(opt.param_groups), HParam.COUNT)
    ]


def scheduled_run(backend, lr, steps=10, scheduler="LambdaLR"):
    """FusedALIG (fp32) under a scheduler, and the float64 reference loop given the same lr
    at each step (read from the optimizer's group after the scheduler set it)."""
    hp = {"momentum": 0.9, "max_norm": 3.0}
    tensors, targets, _ = make_groups([(SHAPES, hp)])[0]
    params = [t.float().requires_grad_() for t in tensors]
    exact = [t.clone().requires_grad_() for t in tensors]
    opt = FusedALIG(params, lr=lr, backend=backend, **hp)
    reference = ReferenceALIG([{"params": exact, "lr": 0.0, **hp}])
    sched = SCHEDULERS[scheduler](opt)
    lrs, step_sizes = [], []
    for _ in range(steps):
        lrs.append(float(opt.param_groups[0]["lr"]))
        reference.groups[0]["lr"] = lrs[-1]
        for ps, ref in ((params, None), (exact, reference)):
            for p in ps:
                p.grad = None
            loss = problem_loss(ps, targets, [True] * len(ps))
            loss.backward()
            if ref is None:
                opt.step(loss=loss)
            else:
                ref.step(float(loss.detach()))
        step_sizes.append((float(opt.param_groups[0]["step_size"]), reference.step_sizes[0]))
        sched.step()
    return params, exact, lrs, step_sizes, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_lr_under_a_scheduler_follows_the_reference(backend, dtype):
    """lr=torch.tensor(...) as torch's optimizers take it; the scheduler updates it in place."""
    lr = torch.tensor(0.05, dtype=dtype)
    params, exact, lrs, step_sizes, opt = scheduled_run(backend, lr)
    assert opt.param_groups[0]["lr"] is lr  # updated in place, never replaced
    assert len(set(lrs)) == len(lrs)  # a new lr every step
    assert any(fused == pytest.approx(cap, rel=1e-6) for (fused, _), cap in zip(step_sizes, lrs))  # the cap binds
    for fused, reference in step_sizes:
        assert fused == pytest.approx(reference, rel=1e-4)
    assert trajectory_error(params, exact) < 1e-5


def test_tensor_lr_and_float_lr_give_the_same_trajectory(backend):
    by_tensor = scheduled_run(backend, torch.tensor(0.05, dtype=torch.float64), scheduler="CosineAnnealingLR")
    by_float = scheduled_run(backend, 0.05, scheduler="CosineAnnealingLR")
    assert by_tensor[2] == by_float[2]  # the same lr values (float64 either way)
    for p, q in zip(by_tensor[0], by_float[0]):
        assert torch.equal(p, q)


def test_hparams_table_is_rewritten_in_place(backend):
    """A captured CUDA graph replays the table's address: the table an lr change leaves
    behind must be the same object, alive, carrying the new lr (issue: a one-entry cache
    dropped it). Nothing changed: not rewritten at all (its version counter stays)."""
    p = torch.nn.Parameter(torch.randn(6))
    opt = FusedALIG([p], lr=0.1, momentum=0.9, backend=backend)

    def step():
        p.grad = torch.ones(6)
        opt.step(loss=1.0)

    step()
    (table,) = hparams_tables(opt)
    ref, address, version = weakref.ref(table), table.data_ptr(), table._version
    del table
    step()
    assert ref() is not None and ref()._version == version  # a cache hit writes nothing
    opt.param_groups[0]["lr"] = 0.25
    step()
    assert ref() is not None, "the table a graph may have captured was dropped"
    assert hparams_tables(opt) == [ref()] and ref().data_ptr() == address
    assert float(ref()[0, HParam.LR]) == 0.25
    opt.param_groups[0]["lr"] = torch.tensor(0.5)  # a tensor lr: copied into the same table
    step()
    assert hparams_tables(opt) == [ref()] and float(ref()[0, HParam.LR]) == 0.5
    opt.param_groups[0]["lr"] = None  # no cap
    step()
    assert hparams_tables(opt) == [ref()] and ref()[0, HParam.LR].item() == float("inf")


def test_hparams_table_copies_a_tensor_lr_on_the_device():
    """hparams_table copies a tensor lr into the table on the device at every step, never
    reading it on the host (FusedALIG hands it a tensor lr that is on the parameters' device,
    a CUDA one on a GPU; this is the same path on CPU tensors)."""
    from alig_fused.functional import GroupHParams, hparams_table

    cache = {}
    lr = torch.tensor(0.3, dtype=torch.float64)
    hparams = [GroupHParams(lr, 0.9, False, float("inf"), 1e-5, 0.0, 1.0)]
    table = hparams_table(hparams, torch.device("cpu"), cache)
    assert float(table[0, HParam.LR]) == 0.3 and float(table[0, HParam.MOMENTUM]) == 0.9
    lr.fill_(0.125)  # a scheduler's in-place update, no new key
    assert hparams_table(hparams, torch.device("cpu"), cache) is table
    assert float(table[0, HParam.LR]) == 0.125


def test_tensor_lr_validation():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="one floating-point number"):
        FusedALIG([p], lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="one floating-point number"):
        FusedALIG([p], lr=torch.tensor(1))
    with pytest.raises(ValueError, match="lr"):
        FusedALIG([p], lr=torch.tensor(-0.1))
    with pytest.raises(ValueError, match="lr is nan"):
        FusedALIG([p], lr=torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="param group 1"):
        FusedALIG([{"params": [p]}, {"params": [torch.nn.Parameter(torch.ones(2))], "lr": torch.tensor(-1.0)}], lr=0.1)


def test_bad_tensor_lr_at_step_changes_nothing(backend):
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedALIG([p], lr=torch.tensor(0.1), momentum=0.9, backend=backend)
    p.grad = torch.ones(3)
    opt.param_groups[0]["lr"].fill_(float("nan"))  # a CPU tensor: checked in the step for free
    with pytest.raises(ValueError, match="lr is nan"):
        opt.step(loss=1.0)
    # A tensor on another device than the parameters (and not the CPU): named, before any state.
    opt.param_groups[0]["lr"] = torch.tensor(0.1, device="meta")
    with pytest.raises(RuntimeError, match="tensor lr is on meta"):
        opt.step(loss=1.0)
    assert torch.equal(p.detach(), torch.ones(3)) and len(opt.state) == 0
    assert int(opt.skipped_steps) == 0


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_a_scheduler_on_a_group_without_cap_says_so(scheduler):
    """lr=None (the default) means no cap: there is nothing for a scheduler to scale. Instead
    of torch's 'None * float' TypeError from inside the scheduler, a message saying so;
    the optimizer is left as it was (no initial_lr added, step not wrapped)."""
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = FusedALIG([{"params": params[:1], "lr": 0.1}, {"params": params[1:]}])
    with pytest.raises(ValueError, match=r"param group 1 has lr=None .* FusedALIG\(params, lr=0.1\)"):
        SCHEDULERS[scheduler](opt)
    assert all("initial_lr" not in g for g in opt.param_groups[1:])
    assert "step" not in vars(opt)  # torch's step-counting wrapper was not installed
    # With a cap the same scheduler runs and changes it.
    opt.param_groups[1]["lr"] = 0.2
    opt.param_groups[0].pop("initial_lr", None)
    sched = SCHEDULERS[scheduler](opt)
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(3):
        opt.step(loss=1.0)
        sched.step()
    assert opt.param_groups[1]["lr"] != 0.2


def test_tensor_lr_state_dict_round_trip(backend):
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedALIG([p], lr=torch.tensor(0.1), momentum=0.9, backend=backend)
    p.grad = torch.ones(3)
    opt.step(loss=1.0)
    q = torch.nn.Parameter(p.detach().clone())
    other = FusedALIG([q], lr=0.5, momentum=0.9, backend=backend)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint: no shared buffers
    assert float(other.param_groups[0]["lr"]) == pytest.approx(0.1)
    for params, o in ((p, opt), (q, other)):
        params.grad = torch.full((3,), 2.0)
        o.step(loss=1.0)
    assert torch.equal(p.detach(), q.detach())
