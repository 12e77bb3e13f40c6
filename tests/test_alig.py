"""FusedALIG against the plain per-parameter reference loop: the shared tests, instantiated
for every (device, backend) of harness.INSTANCES through the ``case`` fixture (CPU: torch,
cpp, cpp-1thread, triton in the interpreter; CUDA: the same backends, skipped without a
GPU), then the tests of the optimizer's front end and of the torch path.

Backend-specific tests: tests/test_cpp.py, tests/test_triton.py, tests/test_gpu_*.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import harness
from alig_fused import BackendUnavailableError, FusedALIG, backends
from harness import (
    CONFIGS,
    SHAPES,
    SPECS,
    FLOOR,
    assert_follows_reference,
    backward,
    bit_identical,
    make_groups,
    many_tensor_model,
    problem_loss,
    run_pair,
    snapshot,
    train,
    trajectory_error,
)
from reference import ReferenceALIG

FLT_MAX = torch.finfo(torch.float32).max


def on(case, *tensors):
    """Copies of CPU tensors on the case's device (leaves that require grad stay leaves)."""
    out = [t.detach().to(case.device).requires_grad_(t.requires_grad) for t in tensors]
    return out


# ----- trajectories ------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(case, config):
    run = run_pair([(SHAPES, CONFIGS[config])], case.backend, steps=case.steps, device=case.device)
    assert run.opt.last_backend == case.backend
    assert_follows_reference(run.fused, run.exact, run.plain, torch.float32)
    assert float(run.opt.param_groups[0]["step_size"]) == pytest.approx(run.expected_step_sizes[0], rel=1e-5, abs=1e-9)
    assert int(run.opt.skipped_steps) == 0


# Steps per problem (at most case.steps): the interpreter runs one program per chunk and per
# tiny tensor, 250 of them a launch in "many_tiny_tensors".
SPEC_STEPS = {"several_groups": 50, "empty_groups": 50, "many_tiny_tensors": 3, "multi_chunk": 12}


@pytest.mark.parametrize("spec", list(SPECS))
def test_problem_matches_reference(case, spec):
    run = run_pair(SPECS[spec], case.backend, steps=min(SPEC_STEPS[spec], case.steps), device=case.device)
    assert_follows_reference(run.fused, run.exact, run.plain, torch.float32)
    for group, expected in zip(run.opt.param_groups, run.expected_step_sizes):
        assert float(group["step_size"]) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert int(run.opt.skipped_steps) == 0


def test_projection_is_active_and_holds(case):
    """With a small ball the projection binds: the group ends exactly on the sphere."""
    run = run_pair([(SHAPES, CONFIGS["projection"])], case.backend, steps=case.steps, device=case.device)
    norm = math.sqrt(sum(float(p.detach().double().norm()) ** 2 for p in run.fused))
    start_norm = math.sqrt(sum(float(t.norm()) ** 2 for t in make_groups([(SHAPES, {})])[0][0]))
    assert start_norm > 2.0, "the test needs a start outside the ball"
    assert norm == pytest.approx(2.0, rel=1e-5)
    assert_follows_reference(run.fused, run.exact, run.plain, torch.float32)


def test_several_groups_and_missing_grads(case):
    spec = [
        ([(5, 3), (3,)], {"lr": 0.05, "momentum": 0.9, "max_norm": 2.0}),
        ([(4, 4), (1,), (6,)], {"lr": 0.02, "momentum": 0.5, "adjusted_momentum": True}),
        ([(9,)], {"lr": None, "momentum": 0.0, "eps": 1e-3}),
        ([], {"lr": 0.1}),  # an empty group
        ([(2, 2)], {"lr": 0.3, "max_norm": 0.5}),
    ]

    def inactive(step, i):
        # tensor 2 never has a gradient, tensor 4 only on even steps, the whole last group on step 3
        return i == 2 or (i == 4 and step % 2 == 1) or (i == 6 and step == 3)

    frozen_before = make_groups(spec)[1][0][0].clone()
    run = run_pair(spec, case.backend, steps=case.steps, inactive=inactive, device=case.device)
    assert_follows_reference(run.fused, run.exact, run.plain, torch.float32)
    assert torch.equal(run.fused[2].detach().double().cpu(), frozen_before.to(torch.float32).double())
    assert run.fused[2] not in run.opt.state
    for k in (0, 1, 2, 4):
        step_size = float(run.opt.param_groups[k]["step_size"])
        assert step_size == pytest.approx(run.expected_step_sizes[k], rel=1e-5, abs=1e-9)


def test_group_without_grads_still_reports_step_size(case):
    """A group none of whose tensors has a gradient still gets gamma = min(lr, polyak step)."""
    run = run_pair([([(5,)], {"momentum": 0.9}), ([(3,)], {"lr": 0.1})], case.backend, steps=1,
                   inactive=lambda step, i: i == 1, device=case.device)
    sizes = [float(g["step_size"]) for g in run.opt.param_groups]
    assert sizes[0] > 0.1 and sizes[1] == pytest.approx(0.1, rel=1e-6)
    assert sizes == pytest.approx(run.expected_step_sizes, rel=1e-5)


def test_closure(case):
    run = run_pair([(SHAPES, CONFIGS["momentum"])], case.backend, use_closure=True, steps=min(20, case.steps), device=case.device)
    assert_follows_reference(run.fused, run.exact, run.plain, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", ["adjusted", "projection"])
def test_low_precision(case, dtype, config):
    run = run_pair([(SHAPES, CONFIGS[config])], case.backend, dtype=dtype, steps=case.steps, device=case.device)
    assert all(p.dtype == dtype for p in run.fused)
    for p in run.fused:
        assert run.opt.state[p]["momentum_buffer"].dtype == dtype
    assert_follows_reference(run.fused, run.exact, run.plain, dtype)


def test_mixed_dtypes_in_one_model(case):
    """fp32, bf16 and fp16 tensors in one step: each follows the reference to its dtype's bound."""
    spec = [([(10, 13), (7,)], {"lr": 0.1, "momentum": 0.9, "max_norm": 3.0}),
            ([(9, 9), (1,)], {"lr": 0.1, "momentum": 0.9, "max_norm": 3.0}), ([(33,)], {"lr": 0.05})]
    dtypes = [torch.float32] * 2 + [torch.bfloat16] * 2 + [torch.float16]
    run = run_pair(spec, case.backend, dtype=dtypes, steps=min(30, case.steps), device=case.device)
    assert [p.dtype for p in run.fused] == dtypes
    for dtype, idx in ((torch.float32, [0, 1]), (torch.bfloat16, [2, 3]), (torch.float16, [4])):
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        assert_follows_reference(pick(run.fused), pick(run.exact), pick(run.plain), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_agrees_with_torch_backend_on_cpu(case, dtype):
    """Same inputs, same pass-2 arithmetic: only G's summation order differs (a last-bit
    change in gamma), so a few steps agree to a few fp32 ulps (in bf16 the gamma
    differences vanish in the storage rounding but for a few ulps)."""
    if case.backend == "torch" and case.device.type == "cpu":
        pytest.skip("the torch backend on CPU is the comparison itself")
    spec = SPECS["several_groups"]
    fused = run_pair(spec, case.backend, dtype=dtype, steps=4, device=case.device)
    torch_path = run_pair(spec, "torch", dtype=dtype, steps=4)
    rtol, atol = (1e-5, 2e-6) if dtype == torch.float32 else (2e-2, 2e-2)
    for p, q in zip(fused.fused, torch_path.fused):
        torch.testing.assert_close(p.detach().cpu().float(), q.detach().float(), rtol=rtol, atol=atol)
    for g, h in zip(fused.opt.param_groups, torch_path.opt.param_groups):
        # bf16: the parameters agree to a storage ulp, not bit for bit, and gamma follows
        # them (triton against torch: 1.3e-4 measured after 4 steps)
        torch.testing.assert_close(g["step_size"].cpu(), h["step_size"], rtol=1e-3 if dtype != torch.float32 else 1e-5, atol=0)


def test_repeatable(case):
    """The same run twice gives the same bits (no atomics, fixed reduction order)."""
    a, b = (run_pair(SPECS["several_groups"], case.backend, steps=10, device=case.device) for _ in range(2))
    assert bit_identical(snapshot(a.opt, a.fused), snapshot(b.opt, b.fused))


def test_channels_last_and_transposed_follow_reference(case):
    """A channels_last conv weight (dense, not contiguous; autograd gives its gradient the
    same strides, the buffer is made with preserve_format) and a transposed matrix: stepped
    as flat spans of memory, as the float64 reference loop steps them."""
    gen = torch.Generator().manual_seed(3)
    masters = [torch.randn(8, 5, 3, 3, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last),
               torch.randn(7, 6, generator=gen, dtype=torch.float64).t(),
               torch.randn(8, generator=gen, dtype=torch.float64)]
    targets = [torch.randn(m.shape, generator=gen, dtype=torch.float64) * 0.5 for m in masters]
    hp = {"lr": 0.1, "momentum": 0.9, "max_norm": 6.0}
    runs = {}
    for name, dtype, device in (("fused", torch.float32, case.device), ("exact", torch.float64, "cpu"),
                                ("plain", torch.float32, "cpu")):
        params = [m.to(device=device, dtype=dtype, copy=True).requires_grad_() for m in masters]  # keeps the strides
        opt = (FusedALIG([{"params": params, **hp}], backend=case.backend) if name == "fused"
               else ReferenceALIG([{"params": params, **hp}]))
        runs[name] = (params, opt)
    conv = runs["fused"][0][0]
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    for _ in range(12):
        for name, (params, opt) in runs.items():
            loss = backward(params, targets)
            if name == "fused":
                assert conv.grad.stride() == conv.stride()
                opt.step(loss=loss)
            else:
                opt.step(float(loss.detach()))
    assert runs["fused"][1].state[conv]["momentum_buffer"].stride() == conv.stride()
    assert_follows_reference(runs["fused"][0], runs["exact"][0], runs["plain"][0], torch.float32)


def test_scheduler_changes_the_cap(case):
    spec = [(SHAPES, {"lr": 0.1, "momentum": 0.9})]
    groups = make_groups(spec)
    fused = [t.to(case.device, torch.float32).requires_grad_() for t in groups[0][0]]
    ref = [t.clone().requires_grad_() for t in groups[0][0]]
    targets = groups[0][1]
    opt = FusedALIG(fused, lr=0.1, momentum=0.9, backend=case.backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.3)
    reference = ReferenceALIG([{"params": ref, "lr": 0.1, "momentum": 0.9}])
    caps = []
    for step in range(20):
        opt.step(loss=backward(fused, targets))
        reference.step(float(backward(ref, targets).detach()))
        caps.append(opt.param_groups[0]["lr"])
        sched.step()
        reference.groups[0]["lr"] = opt.param_groups[0]["lr"]
        assert float(opt.param_groups[0]["step_size"]) <= caps[-1] * (1 + 1e-6)
    assert caps[0] == pytest.approx(0.1) and caps[-1] == pytest.approx(0.1 * 0.3**3)
    # capped steps: the trajectory is not sensitive, fp32 rounding alone separates the two
    assert trajectory_error(fused, ref) < 1e-5


# ----- state -------------------------------------------------------------------------------


@pytest.mark.parametrize("target_backend", ["same", "torch"])
def test_state_dict_round_trip(case, target_backend):
    spec = [(SHAPES[:3], {"lr": 0.05, "momentum": 0.9, "max_norm": 2.0}), (SHAPES[3:], {"lr": 0.02, "momentum": 0.5})]
    groups = make_groups(spec)
    targets = [t.to(case.device) for t in groups[0][1] + groups[1][1]]
    a = [t.to(case.device, torch.float32).requires_grad_() for g in groups for t in g[0]]
    opt_a = FusedALIG([{"params": a[:3], **spec[0][1]}, {"params": a[3:], **spec[1][1]}], backend=case.backend)
    train(opt_a, a, targets, 5)

    b = [p.detach().clone().requires_grad_() for p in a]
    other = case.backend if target_backend == "same" else target_backend
    opt_b = FusedALIG([{"params": b[:3], **spec[0][1]}, {"params": b[3:], **spec[1][1]}], backend=other)
    saved = copy.deepcopy(opt_a.state_dict())  # as torch.save/torch.load would give it
    opt_b.load_state_dict(saved)
    for p, q in zip(a, b):
        assert torch.equal(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"])
    train(opt_a, a, targets, 1)
    train(opt_b, b, targets, 1)
    for p, q in zip(a, b):
        if other == case.backend:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_loads_a_reference_state_dict(case):
    """The reference keeps 'max_lr' in its groups and a buffer for every parameter."""
    params = on(case, torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True))
    buffers = [torch.randn_like(p) for p in params]
    reference_state = {
        "state": {0: {"momentum_buffer": buffers[0]}, 1: {"momentum_buffer": buffers[1]}},
        "param_groups": [{"max_lr": 0.3, "momentum": 0.9, "step_size": 0.01, "params": [0, 1]}],
    }
    opt = FusedALIG(params, lr=1.0, momentum=0.9, backend=case.backend)
    opt.load_state_dict(reference_state)
    assert opt.param_groups[0]["lr"] == 0.3
    assert opt.param_groups[0]["eps"] == 1e-5 and opt.param_groups[0]["max_norm"] is None
    torch.testing.assert_close(opt.state[params[1]]["momentum_buffer"], buffers[1])
    ref_params = [p.detach().cpu().double().requires_grad_() for p in params]
    reference = ReferenceALIG([{"params": ref_params, "lr": 0.3, "momentum": 0.9}])
    reference.buffers = {q: b.cpu().double().clone() for q, b in zip(ref_params, buffers)}
    targets = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    opt.step(loss=backward(params, targets))
    reference.step(float(backward(ref_params, targets).detach()))
    assert trajectory_error(params, ref_params) < 1e-6


def test_step_plan_follows_state_and_group_changes(case):
    """FusedALIG reuses its flat tensor lists between steps; changes to the state and groups
    made between steps (state cleared, momentum switched on, a state_dict loaded, a
    parameter frozen) must still reach the step, as they reach the reference loop."""
    spec = [(SHAPES[:3], {"lr": 0.05, "momentum": 0.9, "max_norm": 3.0}), (SHAPES[3:], {"lr": 0.05})]
    groups = make_groups(spec)
    targets = groups[0][1] + groups[1][1]
    fused = [t.to(case.device, torch.float32).requires_grad_() for g in groups for t in g[0]]
    exact = [t.clone().requires_grad_() for g in groups for t in g[0]]
    unchanged = [t.clone().requires_grad_() for g in groups for t in g[0]]
    opt = FusedALIG([{"params": fused[:3], **spec[0][1]}, {"params": fused[3:], **spec[1][1]}], backend=case.backend)
    ref = ReferenceALIG([{"params": exact[:3], **spec[0][1]}, {"params": exact[3:], **spec[1][1]}])
    ref_unchanged = ReferenceALIG([{"params": unchanged[:3], **spec[0][1]}, {"params": unchanged[3:], **spec[1][1]}])
    frozen = 4  # from step 8 on, this parameter gets no gradient
    for step in range(12):
        if step == 3:  # reset the momentum by clearing the state
            opt.state.clear()
            ref.buffers.clear()
        if step == 5:  # switch momentum on in the second group
            opt.param_groups[1]["momentum"] = 0.5
            ref.groups[1]["momentum"] = 0.5
        if step == 7:  # load a state_dict with halved buffers into the running optimizer
            saved = copy.deepcopy(opt.state_dict())
            for entry in saved["state"].values():
                entry["momentum_buffer"].mul_(0.5)
            opt.load_state_dict(saved)
            for buffer in ref.buffers.values():
                buffer.mul_(0.5)
        active = [not (step >= 8 and i == frozen) for i in range(len(fused))]
        opt.step(loss=backward(fused, targets, active))
        ref.step(float(backward(exact, targets, active).detach()))
        ref_unchanged.step(float(backward(unchanged, targets, active).detach()))
    assert trajectory_error(fused, exact) < 1e-5
    assert trajectory_error(unchanged, exact) > 1e-3, "the changes must alter the trajectory for this test to mean anything"


# ----- skipped steps -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", ["nan_loss", "inf_loss", "neg_inf_loss", "inf_grad", "nan_grad", "huge_grad", "found_inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the Triton interpreter
def test_non_finite_step_is_skipped_bit_identical(case, bad, dtype):
    check_skipped_bit_identical(case, bad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad", "nan_grad", "found_inf"])
def test_torch_path_with_device_numbers_skips_bit_identical(monkeypatch, bad, dtype):
    """On a CPU the torch path reads pass 2's numbers on the host and returns before pass 2 on
    a skipped step; this runs, on the CPU, what it runs on a GPU: the numbers stay tensors and
    the gradient copy is zeroed (functional.pass2_coefficients)."""
    from alig_fused import functional

    monkeypatch.setattr(functional, "HOST_NUMBERS_ON_CPU", False)
    with harness.instance("cpu", "torch") as case:
        check_skipped_bit_identical(case, bad, dtype)


def check_skipped_bit_identical(case, bad, dtype):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen).to(case.device, dtype).requires_grad_(),
              torch.randn(7, generator=gen).to(case.device, dtype).requires_grad_()]
    targets = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    opt = FusedALIG(params, lr=0.1, momentum=0.9, max_norm=3.0, backend=case.backend)
    train(opt, params, targets, 3)
    before = snapshot(opt, params)
    assert opt.param_groups[0]["step_size"] > 0
    loss = backward(params, targets)
    if bad == "nan_loss":
        loss = torch.tensor(float("nan"))
    elif bad == "inf_loss":
        loss = float("inf")
    elif bad == "neg_inf_loss":
        loss = torch.tensor(-math.inf, dtype=torch.float64, device=case.device)
    elif bad == "inf_grad":
        params[1].grad[3] = float("inf")
    elif bad == "nan_grad":
        params[0].grad[1, 2] = float("nan")
    elif bad == "huge_grad":  # finite, but ||g||^2 = 1e40 > float32 max: skipped on every backend
        if dtype == torch.float16:
            pytest.skip("1e20 is not a float16")
        params[0].grad[1, 2] = 1e20
    else:
        opt.grad_scale = torch.tensor(1.0, device=case.device)
        opt.found_inf = torch.tensor(1.0, device=case.device)
    opt.step(loss=loss)
    assert bit_identical(before, snapshot(opt, params)), "a skipped step changed parameters or buffers"
    assert int(opt.skipped_steps) == 1
    assert float(opt.param_groups[0]["step_size"]) == 0.0
    # and the optimizer carries on normally afterwards
    for attr in ("grad_scale", "found_inf"):
        if hasattr(opt, attr):
            delattr(opt, attr)
    train(opt, params, targets, 1)
    assert int(opt.skipped_steps) == 1
    assert not torch.equal(before[0], params[0].detach())


@pytest.mark.parametrize(
    "big, skipped",
    [
        ({(0, 0): 1e20}, True),  # one square overflows float32
        ({(0, 0): 1.5e19, (0, 1): 1.5e19}, True),  # each square fits, their sum does not
        ({(0, 0): 1.5e19, (1, 3): 1.5e19}, True),  # two tensors, each ||g||^2 < FLT_MAX, G > FLT_MAX
        ({(0, 0): 1e19, (1, 3): 1e19}, False),  # G = 2e38 < FLT_MAX: a step
    ],
    ids=["one_huge_element", "two_in_one_tensor", "two_tensors", "below_the_limit"],
)
def test_gradient_norm_at_the_float32_limit(case, big, skipped):
    """One rule on every backend: skip when G = ||g||^2 is not below float32's max, however
    the backend sums (fp32 partial sums overflow only where G is that large; float64 ones do not)."""
    params = on(case, torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True))
    opt = FusedALIG(params, momentum=0.9, backend=case.backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step(loss=1.0)  # buffers exist and are not zero
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for (tensor, index), value in big.items():
        params[tensor].grad.view(-1)[index] = value
    grad_sq_norm = sum(float(p.grad.double().norm()) ** 2 for p in params)
    assert (grad_sq_norm >= FLT_MAX) == skipped
    before = snapshot(opt, params)
    loss = 1e30  # gamma ~5e-9: the elements of 1e19 move by ~1e11, visibly
    opt.step(loss=loss)
    if skipped:
        assert int(opt.skipped_steps) == 1 and float(opt.param_groups[0]["step_size"]) == 0.0
        assert bit_identical(before, snapshot(opt, params))
    else:
        assert int(opt.skipped_steps) == 0
        assert float(opt.param_groups[0]["step_size"]) == pytest.approx(loss / grad_sq_norm, rel=1e-5)
        assert all(torch.isfinite(p).all() and not torch.equal(b, p.detach()) for b, p in zip(before, params))
    reference = ReferenceALIG([{"params": [b.cpu().double() for b in before[:2]], "momentum": 0.9}])
    for b, p in zip(reference.groups[0]["params"], params):
        b.grad = p.grad.cpu().double()
    reference.step(loss)
    assert reference.skipped == int(skipped)


# ----- AMP -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1024.0, 1000.0], ids=["power_of_two", "other"])
def test_grad_scale_is_unscaled_inside(case, scale):
    """Gradients scaled by S with grad_scale=S give the step of the unscaled gradients: the
    same bits when S is a power of two (the unscaling is exact), to fp32 rounding otherwise."""
    spec = [(SHAPES, CONFIGS["projection"]), ([(9,), (1,)], CONFIGS["adjusted"])]
    groups = make_groups(spec)
    targets = [t for g in groups for t in g[1]]
    a, b = ([t.to(case.device, torch.float32).requires_grad_() for g in groups for t in g[0]] for _ in range(2))
    def optimizer(flat):
        return FusedALIG([{"params": flat[:5], **spec[0][1]}, {"params": flat[5:], **spec[1][1]}], backend=case.backend)

    opt_a, opt_b = optimizer(a), optimizer(b)
    for _ in range(10):
        opt_a.step(loss=backward(a, targets))
        loss_b = backward(b, targets)
        for p in b:
            p.grad.mul_(scale)
        opt_b.grad_scale = torch.tensor(scale, device=case.device)
        opt_b.found_inf = torch.tensor(0.0, device=case.device)
        opt_b.step(loss=loss_b)
    if scale == 1024.0:
        assert bit_identical(snapshot(opt_a, a), snapshot(opt_b, b))
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert int(opt_b.skipped_steps) == 0


def test_grad_scaler_end_to_end(case):
    """torch.amp.GradScaler drives the fused AMP protocol: scaler.step(opt, loss=loss) steps
    as the unscaled run; an overflow skips the step (nothing changes) and the scaler backs off."""
    spec = [(SHAPES, CONFIGS["momentum"])]
    groups = make_groups(spec)
    targets = groups[0][1]
    a, b = ([t.to(case.device, torch.float32).requires_grad_() for t in groups[0][0]] for _ in range(2))
    opt_a = FusedALIG(a, backend=case.backend, **CONFIGS["momentum"])
    opt_b = FusedALIG(b, backend=case.backend, **CONFIGS["momentum"])
    scaler = torch.amp.GradScaler(case.device.type, init_scale=256.0)
    for _ in range(10):
        opt_a.step(loss=backward(a, targets))
        for p in b:
            p.grad = None
        loss_b = problem_loss(b, targets)
        scaler.scale(loss_b).backward()
        scaler.step(opt_b, loss=loss_b)
        scaler.update()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not hasattr(opt_b, "grad_scale")
    before, scale = snapshot(opt_b, b), scaler.get_scale()
    for p in b:
        p.grad = None
    loss_b = problem_loss(b, targets)
    scaler.scale(loss_b).backward()
    b[0].grad[0, 0] = float("inf")
    scaler.step(opt_b, loss=loss_b)
    scaler.update()
    assert bit_identical(before, snapshot(opt_b, b))
    assert int(opt_b.skipped_steps) == 1 and scaler.get_scale() < scale


def test_grad_scaler_with_bf16_autocast(case):
    """bf16 autocast with GradScaler: the scaled run follows the unscaled one."""
    runs = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(case.device)
        opt = FusedALIG(model.parameters(), lr=0.1, momentum=0.9, max_norm=5.0, backend=case.backend)
        scaler = torch.amp.GradScaler(case.device.type, init_scale=2.0**8, enabled=scaled)
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):
            x, y = (torch.randn(16, n, generator=gen).to(case.device) for n in (8, 2))
            opt.zero_grad()
            with torch.autocast(case.device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt, loss=loss)
            scaler.update()
        assert int(opt.skipped_steps) == 0
        runs[scaled] = [p.detach().clone() for p in model.parameters()]
    for p, q in zip(runs[True], runs[False]):
        # a power-of-two scale is exact in bf16: only the unscaling's rounding differs
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----- the step's other inputs -----------------------------------------------------------------


def test_projection_fn_is_called_after_each_step(case):
    params = on(case, torch.randn(4, requires_grad=True))
    calls = []
    opt = FusedALIG(params, lr=0.1, backend=case.backend, projection_fn=lambda: calls.append(params[0].detach().clone()))
    assert len(calls) == 1  # once at construction, as the reference does
    params[0].grad = torch.ones(4, device=case.device)
    opt.step(loss=1.0)
    assert len(calls) == 2 and torch.equal(calls[-1], params[0].detach())
    assert not torch.equal(calls[0], calls[1])


def test_sparse_gradient_is_rejected_and_nothing_changes(case):
    emb = torch.nn.Embedding(10, 3, sparse=True).to(case.device)
    dense = torch.nn.Parameter(torch.randn(3, device=case.device))
    opt = FusedALIG([dense, emb.weight], lr=0.1, momentum=0.9, backend=case.backend)
    before = [dense.detach().clone(), emb.weight.detach().clone()]
    (emb(torch.tensor([1, 2], device=case.device)).sum() + dense.sum()).backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(loss=1.0)
    assert torch.equal(before[0], dense.detach()) and torch.equal(before[1], emb.weight.detach())
    assert len(opt.state) == 0


def test_sparse_gradient_after_steps_is_rejected_and_nothing_changes(case):
    """The same once the optimizer has stepped (its cached step plan must not skip the check)."""
    emb = torch.nn.Embedding(10, 3, sparse=False).to(case.device)
    dense = torch.nn.Parameter(torch.randn(3, device=case.device))
    opt = FusedALIG([dense, emb.weight], lr=0.1, momentum=0.9, backend=case.backend)
    index = torch.tensor([1, 2], device=case.device)
    for _ in range(2):
        opt.zero_grad()
        (emb(index).pow(2).sum() + dense.pow(2).sum()).backward()
        opt.step(loss=1.0)
    before = snapshot(opt, [dense, emb.weight])
    emb.weight.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 3), (10, 3)).to(case.device)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(loss=1.0)
    assert bit_identical(before, snapshot(opt, [dense, emb.weight]))


def test_missing_or_bad_loss(case):
    p = torch.nn.Parameter(torch.ones(3, device=case.device))
    opt = FusedALIG([p], lr=0.1, backend=case.backend)
    p.grad = torch.ones(3, device=case.device)
    with pytest.raises(ValueError, match="needs the current loss"):
        opt.step()
    with pytest.raises(TypeError, match="loss=loss"):
        opt.step(torch.tensor(1.0))  # positional: step's first argument is the closure
    with pytest.raises(ValueError, match="scalar"):
        opt.step(loss=torch.ones(2))
    with pytest.raises(TypeError, match="loss"):
        opt.step(loss="1.0")
    assert torch.equal(p.detach(), torch.ones(3, device=case.device)) and int(opt.skipped_steps) == 0


# ----- CUDA only: no host sync, CUDA graphs ------------------------------------------------------


def test_no_host_sync(cuda_case):
    """set_sync_debug_mode("error") over steady steps, a new hparams table, new gradient
    tensors (a new chunk table), a skipped step and a first step (buffers, tables)."""
    device = cuda_case.device
    params, groups = many_tensor_model(device)
    opt = FusedALIG(groups, backend=cuda_case.backend)
    loss = torch.tensor(1.5, dtype=torch.float64, device=device)
    opt.step(loss=loss)  # compiles the kernels
    _, fresh_groups = many_tensor_model(device, 30)
    fresh_opt = FusedALIG(fresh_groups, backend=cuda_case.backend)
    # made before the checked region: torch.tensor(nan, device=cuda) is a pageable host copy,
    # which sync_debug_mode("error") rejects (the test, not the step, would trip it)
    nan_loss = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(loss=loss)
        opt.param_groups[1]["lr"] = 0.05  # a new hparams table (pinned, non-blocking copy)
        for p in params:
            p.grad = p.grad.clone()  # new gradient tensors: a new chunk table
        opt.step(loss=loss)
        opt.step(loss=nan_loss)  # a skipped step
        fresh_opt.step(loss=loss)  # a first step: momentum buffers and device tables
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(opt.skipped_steps) == 1 and opt.last_backend == cuda_case.backend


def test_cuda_graph_replay_matches_eager(cuda_case):
    """opt.step(loss=static_loss) captured once and replayed == the same steps run eagerly,
    bit for bit, a skipped (nan) step included."""
    device = cuda_case.device
    runs = {name: many_tensor_model(device, 40) for name in ("graph", "eager")}
    runs = {name: (params, FusedALIG(groups, backend=cuda_case.backend)) for name, (params, groups) in runs.items()}
    static_loss = torch.zeros((), dtype=torch.float64, device=device)
    eager_loss = torch.zeros((), dtype=torch.float64, device=device)

    def set_inputs(params, loss_t, step):
        # grads and loss from the current params, written in place into the static tensors
        for i, p in enumerate(params):
            p.grad.copy_((torch.sin(p.detach().float() * (step + 1) + i) * 1e-2).to(p.dtype))
        loss_t.fill_(float("nan") if step == 5 else 1.0 + 0.1 * step)

    graph_params, graph_opt = runs["graph"]
    eager_params, eager_opt = runs["eager"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (torch.cuda.graphs' rule): compile, buffers, tables
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
        assert bit_identical(snapshot(graph_opt, graph_params), snapshot(eager_opt, eager_params)), f"step {step}"
        assert torch.equal(graph_opt._step_sizes, eager_opt._step_sizes)
    assert int(graph_opt.skipped_steps) == int(eager_opt.skipped_steps) == 1


# ----- the optimizer's front end (no backend involved) -------------------------------------------


def test_max_lr_alias_and_none_lr():
    p = torch.nn.Parameter(torch.ones(2))
    assert FusedALIG([p], max_lr=0.3).param_groups[0]["lr"] == 0.3
    assert FusedALIG([p]).param_groups[0]["lr"] is None
    with pytest.raises(ValueError, match="not both"):
        FusedALIG([p], lr=0.1, max_lr=0.2)


# ----- bad input: a clear error, and nothing is lost -----------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lr": -0.1}, ValueError, "lr"),
        ({"eps": -1e-5}, ValueError, "eps"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"max_norm": 0.0}, ValueError, "max_norm"),
        ({"max_norm": -2.0}, ValueError, "max_norm"),
        ({"scaling": 0.0}, ValueError, "scaling"),
        ({"f_star": float("inf")}, ValueError, "f_star"),
        ({"lr": float("nan")}, ValueError, "nan"),
        ({"lr": "0.1"}, TypeError, "lr"),
        ({"backend": "cuda-magic"}, ValueError, "unknown backend"),
        ({"projection_fn": 3}, TypeError, "projection_fn"),
    ],
)
def test_bad_hyper_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedALIG([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_bad_group_hyper_parameter_names_the_group():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="param group 1.*momentum"):
        FusedALIG([{"params": [p]}, {"params": [q], "momentum": 2.0}])


def test_hyper_parameter_changed_to_a_bad_value_is_caught_at_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedALIG([p], lr=0.1, backend="torch")
    opt.param_groups[0]["lr"] = -1.0
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="lr"):
        opt.step(loss=1.0)
    assert torch.equal(p.detach(), torch.ones(3))


def test_named_backend_that_cannot_load_says_why(monkeypatch):
    monkeypatch.setitem(backends._errors, "cpp", "ImportError: the extension was not built (test)")
    monkeypatch.delitem(backends._loaded, "cpp", raising=False)
    with pytest.raises(BackendUnavailableError, match="not built"):
        FusedALIG([torch.nn.Parameter(torch.ones(2))], backend="cpp")
    # "auto" passes over it quietly
    assert backends.pick("auto", torch.device("cpu")) in ("torch", "triton")


def test_float64_parameters_run_on_the_torch_path():
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = FusedALIG([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(5, dtype=torch.float64)
    opt.step(loss=1.0)
    # auto: torch's float64 math (cpp takes float64 storage only by name: fp32 math)
    assert opt.last_backend == "torch" and p.dtype == torch.float64
    if backends.supports("triton", torch.device("cpu"))[0]:
        with pytest.raises(TypeError, match="float64"):
            FusedALIG([p], backend="triton")


@pytest.fixture
def own_registry(monkeypatch):
    """backends' registry and caches restored after the test."""
    monkeypatch.setattr(backends, "REGISTRY", dict(backends.REGISTRY))
    monkeypatch.setattr(backends, "BACKENDS", backends.BACKENDS)
    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded))
    monkeypatch.setattr(backends, "_errors", dict(backends._errors))


def test_a_registered_backend_is_reachable_by_name_and_by_auto(own_registry):
    from alig_fused.functional import torch_alig

    calls = []

    def counting_alig(step, cache):
        calls.append(len(step.params))
        torch_alig(step, cache)

    backends.register(backends.Backend(
        "counting", lambda: counting_alig, dtypes={"cpu": frozenset({torch.float32})}, auto_rank={"cpu": -1},
    ))
    assert "counting" in backends.BACKENDS and backends.available_backends()["counting"] == "ok"
    cpu = torch.device("cpu")
    assert backends.pick("auto", cpu, frozenset({torch.float32})) == "counting"
    # a dtype it does not take: auto passes it over, by name it is a TypeError
    assert backends.pick("auto", cpu, frozenset({torch.float64})) != "counting"
    with pytest.raises(TypeError, match="float32 parameters on cpu, got torch.float64"):
        backends.pick("counting", cpu, frozenset({torch.float64}))
    with pytest.raises(BackendUnavailableError, match="no kernels for meta"):
        backends.pick("counting", torch.device("meta"))
    stepped = {}
    for name in ("counting", "torch"):
        p = torch.nn.Parameter(torch.ones(3))
        opt = FusedALIG([p], lr=0.1, momentum=0.9, backend=name)
        p.grad = torch.arange(3.0)
        opt.step(loss=1.0)
        stepped[name] = p.detach()
    assert calls == [1] and torch.equal(stepped["counting"], stepped["torch"])
    assert not torch.equal(stepped["torch"], torch.ones(3))


def test_a_backend_that_fails_to_load_is_passed_over_by_auto(own_registry):
    def broken():
        raise ImportError("no such kernels (test)")

    backends.register(backends.Backend("broken", broken, dtypes=None, auto_rank={"cpu": -1}))
    assert "no such kernels" in backends.available_backends()["broken"]
    assert backends.pick("auto", torch.device("cpu")) != "broken"
    with pytest.raises(BackendUnavailableError, match="no such kernels"):
        backends.pick("broken", torch.device("cpu"))


@pytest.mark.parametrize("config", ["plain", "momentum", "adjusted_no_cap", "projection", "f_star_scaling"])
def test_float64_follows_the_float64_reference(config):
    """float64 parameters step in float64: coefficients included (no float32 rounding)."""
    run = run_pair([(SHAPES, CONFIGS[config])], "torch", dtype=torch.float64, steps=16)
    assert all(p.dtype == torch.float64 for p in run.fused)
    assert trajectory_error(run.fused, run.exact) < 1e-13


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setitem(backends._loaded, "triton", lambda *a: None)
    ok, reason = backends.supports("triton", torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET" in reason



def test_complex_and_integer_parameters_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        FusedALIG([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating-point"):
        FusedALIG([torch.ones(2, dtype=torch.int64)])



def test_mixed_devices_are_rejected():
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3, device="meta"))
    with pytest.raises(RuntimeError, match="one device"):
        FusedALIG([p, q], lr=0.1)


# ----- no host sync ---------------------------------------------------------------------


def test_torch_path_needs_no_data_on_the_host():
    """On the meta device any .item()/float()/data-dependent branch raises: the step has none."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    groups = [
        {"params": model[0].parameters(), "momentum": 0.9, "max_norm": 5.0},
        {"params": model[2].parameters(), "momentum": 0.9, "adjusted_momentum": True},
    ]
    opt = FusedALIG(groups, lr=0.1, backend="torch")
    for _ in range(2):
        x = torch.randn(4, 8, device="meta")
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
    assert opt.param_groups[0]["step_size"].device.type == "meta"
    assert opt.skipped_steps.device.type == "meta"




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shapes", [[(3000, 1000), (7, 7), (1 << 21,), (5,)] * 20, [(4096,)] * 2000], ids=["model", "small"])
def test_torch_path_batches_keep_temporaries_small(dtype, shapes):
    """The torch path's batches hold its temporaries (the kept gradient copy off a CPU, fp32
    copies of bf16 storage) within 5% of the list's bytes, on a CPU and off it (meta tensors
    stand in for a GPU's, where batches grow with the list since each foreach op over a batch
    is one launch); every element is in exactly one piece; fp32 on a CPU (in place, no copy)
    keeps pieces of PIECE_ELEMENTS * IN_PLACE_CPU_FACTOR."""
    from alig_fused import functional

    for device in ("meta", "cpu"):
        tensors = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
        batches = [batch for (batch,) in functional._batches(tensors)]
        sizes = [sum(t.numel() for t in batch) for batch in batches]
        total = sum(t.numel() for t in tensors)
        assert sum(sizes) == total
        low_precision = dtype != torch.float32
        copy_bytes = 3 * 4 if low_precision else (0 if device == "cpu" else 4)  # fp32 bytes per element
        assert copy_bytes * max(sizes) <= 0.05 * total * tensors[0].element_size()
        if device == "meta":
            assert len(batches) <= (2 * 256 if low_precision else 2 * 64) + 5
            assert all(t.numel() <= functional.PIECE_ELEMENTS for b in batches for t in b)
        elif not low_precision:
            assert max(sizes) <= functional.BATCH_ELEMENTS * functional.IN_PLACE_CPU_FACTOR


@pytest.fixture
def tiny_torch_batches(monkeypatch):
    """The torch path's pieces and batches at a few elements, so that the test shapes are
    split into flat views and spread over several batches."""
    from alig_fused import functional

    monkeypatch.setattr(functional, "PIECE_ELEMENTS", 5)
    monkeypatch.setattr(functional, "BATCH_ELEMENTS", 11)


@pytest.mark.parametrize("host_numbers", [True, False], ids=["host numbers", "device numbers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["momentum", "projection", "projection_no_momentum"])
def test_torch_path_in_pieces_follows_reference(tiny_torch_batches, monkeypatch, config, dtype, host_numbers):
    """Also with the numbers of pass 2 on the device, as on a GPU (functional.pass2_coefficients)."""
    from alig_fused import functional

    monkeypatch.setattr(functional, "HOST_NUMBERS_ON_CPU", host_numbers)
    run = run_pair([(SHAPES, CONFIGS[config]), ([(9,), (2, 2)], CONFIGS["momentum"])], "torch", dtype=dtype)
    assert_follows_reference(run.fused, run.exact, run.plain, dtype)
    assert int(run.opt.skipped_steps) == 0


@pytest.mark.parametrize("sharded", [False, True], ids=["measured", "analytic"])
def test_torch_path_in_pieces_equals_whole_tensors(monkeypatch, sharded):
    """Splitting into pieces changes only the rounding of the sums (fp32 norms per piece),
    for the measured projection and for the sharded path's analytic one (reduce_sums)."""
    from alig_fused import functional

    gen = torch.Generator().manual_seed(5)
    shapes = [(40, 13), (7,), (1,), (300,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 0.1 for s in shapes] for _ in range(3)]
    hparams = [functional.GroupHParams(0.5, 0.9, False, 3.0, 1e-5, 0.0, 1.0), functional.GroupHParams(0.2, 0.0, False, math.inf, 1e-5, 0.0, 1.0)]
    group_index = [0, 0, 1, 0]
    runs = {}
    for piece, batch in ((1 << 16, 1 << 17), (16, 50)):
        monkeypatch.setattr(functional, "PIECE_ELEMENTS", piece)
        monkeypatch.setattr(functional, "BATCH_ELEMENTS", batch)
        params = [p.clone() for p in start]
        buffers = [torch.zeros_like(start[0]), torch.zeros_like(start[1]), torch.empty(0), torch.zeros_like(start[3])]
        step_size, skipped = torch.zeros(2), torch.zeros((), dtype=torch.int64)
        scale = torch.tensor(4.0)
        for g in grads:
            functional.torch_alig(functional.StepInputs(
                params=params, grads=[x * 4 for x in g], momentum_buffers=buffers, group_index=group_index,
                group_hparams=hparams, loss=torch.tensor(2.0, dtype=torch.float64), step_size_out=step_size,
                skipped_steps=skipped, grad_scale=scale, reduce_sums=(lambda s, l: (s, l)) if sharded else None,
            ), {})
        runs[piece] = params + buffers, step_size.clone()
        assert int(skipped) == 0
    (whole, whole_sizes), (pieces, piece_sizes) = runs.values()
    assert not torch.equal(whole[0], start[0])
    for x, y in zip(whole, pieces):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole_sizes, piece_sizes, rtol=1e-5, atol=0)
    norm = math.sqrt(sum(float(p.double().norm()) ** 2 for i, p in enumerate(pieces[:4]) if group_index[i] == 0))
    assert norm == pytest.approx(3.0, rel=1e-5)  # the ball binds and holds
