"""FusedALIG against the plain per-parameter reference loop, on every backend that runs here."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from alig_fused import BackendUnavailableError, FusedALIG, backends
from reference import ReferenceALIG

STEPS = 50
# Tolerance. Every run is compared with the float64 reference loop. Rounding the parameters
# to the storage dtype at each step perturbs the trajectory, and uncapped Polyak steps near
# the solution amplify such perturbations, so the bound is calibrated on the plain loop
# itself run with the same storage dtype: the fused step may be at most 3x further from the
# exact trajectory than the plain loop in that dtype, plus a floor of a few storage ulps.
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-13}


def problem_loss(params, targets, active):
    """A smooth non-convex loss over any list of tensors: sum_i mean((0.2 tanh(p_i) + p_i - t_i)^2).

    ``active[i]`` False leaves p_i out of the loss this step (its grad stays None).
    Computed in float64 whatever the storage dtype, so that near the end of training
    (loss ~1e-8) the fp32 run's loss is not rounding noise that the step size would amplify.
    """
    total = 0.0
    for p, t, on in zip(params, targets, active):
        if on:
            x = p.to(torch.float64)
            total = total + 0.5 * ((0.2 * torch.tanh(x) + x - t) ** 2).sum()
    return total


def make_groups(spec, seed=0):
    """spec: list of (shapes, hparams). Returns float64 master tensors and targets per group."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for shapes, hparams in spec:
        tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        # Reachable targets (t = 0.2 tanh(s) + s): the loss can go to 0, the interpolation
        # setting ALI-G is made for, so the trajectory is stable enough to compare.
        solutions = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.5 for s in shapes]
        targets = [0.2 * torch.tanh(x) + x for x in solutions]
        groups.append((tensors, targets, dict(hparams)))
    return groups


def run_pair(
    spec, backend, dtype=torch.float32, steps=STEPS, inactive=None, use_closure=False, seed=0, loss_as_float=False,
    perturb=None, **opt_kwargs,
):
    """Run FusedALIG (dtype) and the float64 reference from the same start for ``steps``.

    dtype: one dtype, or a list of one per tensor (over all groups, in order).
    inactive(step, flat_index) -> True leaves that tensor without a gradient at that step.
    loss_as_float: FusedALIG gets the loss as a Python float (else as the loss tensor);
    use_closure: through a closure returning it.
    perturb(step, params, loss) -> loss, applied to each of the three runs alike after the
    backward pass, may edit the gradients or the loss (e.g. to make a step that is skipped).
    Returns a namespace: fused (params), opt, exact (float64 reference params), reference,
    plain (the plain loop's params in ``dtype``), expected_step_sizes (the reference formula
    applied to the fused run's own last loss and gradients).
    """
    groups = make_groups(spec, seed)
    fused_groups, ref_groups, lowp_groups, fused_flat, ref_flat, lowp_flat, targets = [], [], [], [], [], [], []
    dtypes = iter(dtype) if isinstance(dtype, (list, tuple)) else None
    for tensors, tgts, hparams in groups:
        storage = [next(dtypes) if dtypes else dtype for _ in tensors]
        fused = [t.to(d, copy=True).requires_grad_() for t, d in zip(tensors, storage)]
        ref = [t.clone().requires_grad_() for t in tensors]
        lowp = [t.to(d, copy=True).requires_grad_() for t, d in zip(tensors, storage)]
        fused_groups.append({"params": fused, **hparams})
        ref_groups.append({"params": ref, **hparams})
        lowp_groups.append({"params": lowp, **hparams})
        fused_flat += fused
        ref_flat += ref
        lowp_flat += lowp
        targets += tgts
    opt = FusedALIG(fused_groups, backend=backend, **opt_kwargs)
    ref_kwargs = {"eps_default": opt_kwargs["eps"]} if "eps" in opt_kwargs else {}
    ref = ReferenceALIG(ref_groups, **ref_kwargs)
    lowp_ref = ReferenceALIG(lowp_groups, **ref_kwargs)
    for step in range(steps):
        active = [not (inactive and inactive(step, i)) for i in range(len(fused_flat))]
        for flat, reference in ((fused_flat, None), (ref_flat, ref), (lowp_flat, lowp_ref)):
            for p in flat:
                p.grad = None
            loss = problem_loss(flat, targets, active)
            loss.backward()
            if perturb is not None:
                loss = perturb(step, flat, loss)
            if reference is None:
                expected = expected_step_sizes(fused_groups, float(loss.detach()), opt_kwargs.get("eps", 1e-5))
                given = float(loss.detach()) if loss_as_float else loss
                returned = opt.step(lambda: given) if use_closure else opt.step(loss=given)
                assert returned is given
            else:
                reference.step(float(loss.detach()))
    return SimpleNamespace(
        fused=fused_flat, opt=opt, exact=ref_flat, reference=ref, plain=lowp_flat, expected_step_sizes=expected
    )


def expected_step_sizes(groups, loss, eps_default):
    """gamma_k = min(lr_k, max(loss - f_star_k, 0) / (c_k ||g||^2 + eps_k)), plainly."""
    grad_sq_norm = sum(float(p.grad.double().norm()) ** 2 for g in groups for p in g["params"] if p.grad is not None)
    sizes = []
    for g in groups:
        step = max(loss - g.get("f_star", 0.0), 0.0) / (g.get("scaling", 1.0) * grad_sq_norm + g.get("eps", eps_default))
        sizes.append(step if g.get("lr") is None else min(step, g["lr"]))
    return sizes


def trajectory_error(params, exact):
    """Relative l2 distance between two lists of tensors (float64)."""
    diff = math.sqrt(sum(float((p.detach().double() - e.detach().double()).norm()) ** 2 for p, e in zip(params, exact)))
    scale = math.sqrt(sum(float(e.detach().double().norm()) ** 2 for e in exact))
    return diff / max(scale, 1e-12)


def assert_follows_reference(fused, exact, plain_lowp, dtype):
    fused_error = trajectory_error(fused, exact)
    plain_error = trajectory_error(plain_lowp, exact)
    bound = 3 * plain_error + FLOOR[dtype]
    assert fused_error <= bound, (
        f"FusedALIG is {fused_error:.3g} (relative) from the float64 reference; the plain loop in "
        f"{dtype} is {plain_error:.3g}; allowed {bound:.3g}"
    )


SHAPES = [(3, 4), (4,), (7,), (1,), (2, 3, 5)]

CONFIGS = {
    "plain": {},
    "max_lr": {"lr": 0.05},
    "momentum": {"lr": 0.05, "momentum": 0.9},
    "momentum_no_cap": {"momentum": 0.5},
    "adjusted": {"lr": 0.05, "momentum": 0.9, "adjusted_momentum": True},
    "adjusted_no_cap": {"momentum": 0.5, "adjusted_momentum": True},
    "projection": {"lr": 0.1, "momentum": 0.9, "max_norm": 2.0},
    "projection_no_momentum": {"lr": 0.1, "max_norm": 1.5},
    "projection_adjusted": {"momentum": 0.8, "adjusted_momentum": True, "max_norm": 2.0},
    "projection_inactive": {"lr": 0.05, "momentum": 0.9, "max_norm": 1e3},
    "f_star_scaling": {"lr": 0.2, "momentum": 0.5, "f_star": 0.1, "scaling": 2.0},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(backend, config):
    run = run_pair([(SHAPES, CONFIGS[config])], backend)
    assert_follows_reference(run.fused, run.exact, run.plain, torch.float32)
    assert float(run.opt.param_groups[0]["step_size"]) == pytest.approx(run.expected_step_sizes[0], rel=1e-5, abs=1e-9)
    assert int(run.opt.skipped_steps) == 0


def test_projection_is_active_and_holds(backend):
    """With a small ball the projection binds: the group ends exactly on the sphere."""
    run = run_pair([(SHAPES, CONFIGS["projection"])], backend)
    fused = run.fused
    norm = math.sqrt(sum(float(p.detach().double().norm()) ** 2 for p in fused))
    start_norm = math.sqrt(sum(float(t.norm()) ** 2 for t in make_groups([(SHAPES, {})])[0][0]))
    assert start_norm > 2.0, "the test needs a start outside the ball"
    assert norm == pytest.approx(2.0, rel=1e-5)
    assert_follows_reference(run.fused, run.exact, run.plain, torch.float32)


def test_several_groups_and_missing_grads(backend):
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
    run = run_pair(spec, backend, inactive=inactive)
    assert_follows_reference(run.fused, run.exact, run.plain, torch.float32)
    assert torch.equal(run.fused[2].detach().double(), frozen_before.to(torch.float32).double())
    for k in (0, 1, 2, 4):
        step_size = float(run.opt.param_groups[k]["step_size"])
        assert step_size == pytest.approx(run.expected_step_sizes[k], rel=1e-5, abs=1e-9)


def test_closure(backend):
    run = run_pair([(SHAPES, CONFIGS["momentum"])], backend, use_closure=True, steps=20)
    assert_follows_reference(run.fused, run.exact, run.plain, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision(backend, dtype):
    run = run_pair([(SHAPES, CONFIGS["projection"])], backend, dtype=dtype)
    assert all(p.dtype == dtype for p in run.fused)
    for p in run.fused:
        assert run.opt.state[p]["momentum_buffer"].dtype == dtype
    assert_follows_reference(run.fused, run.exact, run.plain, dtype)


def test_low_precision_backends_agree(backend):
    """bf16 storage, fp32 math: every backend follows the torch path to a few bf16 ulps."""
    spec = [(SHAPES, CONFIGS["projection"])]
    fused = run_pair(spec, backend, dtype=torch.bfloat16, steps=20).fused
    torch_path = run_pair(spec, "torch", dtype=torch.bfloat16, steps=20).fused
    for f, t in zip(fused, torch_path):
        torch.testing.assert_close(f.float(), t.float(), rtol=2e-2, atol=2e-2)


def test_scheduler_changes_the_cap(backend):
    spec = [(SHAPES, {"lr": 0.1, "momentum": 0.9})]
    groups = make_groups(spec)
    fused = [t.float().requires_grad_() for t in groups[0][0]]
    ref = [t.clone().requires_grad_() for t in groups[0][0]]
    targets = groups[0][1]
    opt = FusedALIG(fused, lr=0.1, momentum=0.9, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.3)
    reference = ReferenceALIG([{"params": ref, "lr": 0.1, "momentum": 0.9}])
    caps = []
    for step in range(20):
        for flat, stepper in ((fused, lambda l: opt.step(loss=l)), (ref, lambda l: reference.step(float(l.detach())))):
            for p in flat:
                p.grad = None
            loss = problem_loss(flat, targets, [True] * len(flat))
            loss.backward()
            stepper(loss)
        caps.append(opt.param_groups[0]["lr"])
        sched.step()
        reference.groups[0]["lr"] = opt.param_groups[0]["lr"]
        assert float(opt.param_groups[0]["step_size"]) <= caps[-1] * (1 + 1e-6)
    assert caps[0] == pytest.approx(0.1) and caps[-1] == pytest.approx(0.1 * 0.3**3)
    # capped steps: the trajectory is not sensitive, fp32 rounding alone separates the two
    assert trajectory_error(fused, ref) < 1e-5


def _train(opt, params, targets, steps):
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = problem_loss(params, targets, [True] * len(params))
        loss.backward()
        opt.step(loss=loss)


@pytest.mark.parametrize("target_backend", ["same", "torch"])
def test_state_dict_round_trip(backend, target_backend):
    spec = [(SHAPES[:3], {"lr": 0.05, "momentum": 0.9, "max_norm": 2.0}), (SHAPES[3:], {"lr": 0.02, "momentum": 0.5})]
    groups = make_groups(spec)
    targets = groups[0][1] + groups[1][1]
    a = [t.float().requires_grad_() for g in groups for t in g[0]]
    opt_a = FusedALIG([{"params": a[:3], **spec[0][1]}, {"params": a[3:], **spec[1][1]}], backend=backend)
    _train(opt_a, a, targets, 5)

    b = [p.detach().clone().requires_grad_() for p in a]
    other = backend if target_backend == "same" else target_backend
    opt_b = FusedALIG([{"params": b[:3], **spec[0][1]}, {"params": b[3:], **spec[1][1]}], backend=other)
    saved = copy.deepcopy(opt_a.state_dict())  # as torch.save/torch.load would give it
    opt_b.load_state_dict(saved)
    for p, q in zip(a, b):
        assert torch.equal(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"])
    _train(opt_a, a, targets, 1)
    _train(opt_b, b, targets, 1)
    for p, q in zip(a, b):
        if other == backend:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_loads_a_reference_state_dict(backend):
    """The reference keeps 'max_lr' in its groups and a buffer for every parameter."""
    params = [torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    buffers = [torch.randn_like(p) for p in params]
    reference_state = {
        "state": {0: {"momentum_buffer": buffers[0]}, 1: {"momentum_buffer": buffers[1]}},
        "param_groups": [{"max_lr": 0.3, "momentum": 0.9, "step_size": 0.01, "params": [0, 1]}],
    }
    opt = FusedALIG(params, lr=1.0, momentum=0.9, backend=backend)
    opt.load_state_dict(reference_state)
    assert opt.param_groups[0]["lr"] == 0.3
    assert opt.param_groups[0]["eps"] == 1e-5 and opt.param_groups[0]["max_norm"] is None
    torch.testing.assert_close(opt.state[params[1]]["momentum_buffer"], buffers[1])
    ref_params = [p.detach().double().requires_grad_() for p in params]
    reference = ReferenceALIG([{"params": ref_params, "lr": 0.3, "momentum": 0.9}])
    reference.buffers = {q: b.double().clone() for q, b in zip(ref_params, buffers)}
    targets = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for flat in (params, ref_params):
        loss = problem_loss(flat, targets, [True, True])
        loss.backward()
        opt.step(loss=loss) if flat is params else reference.step(float(loss.detach()))
    assert trajectory_error(params, ref_params) < 1e-6


def _snapshot(opt, params):
    return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]


@pytest.mark.parametrize("bad", ["nan_loss", "inf_loss", "inf_grad", "nan_grad", "huge_grad", "found_inf"])
def test_non_finite_step_is_skipped_bit_identical(backend, bad):
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    targets = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    opt = FusedALIG(params, lr=0.1, momentum=0.9, max_norm=3.0, backend=backend)
    _train(opt, params, targets, 3)
    before = _snapshot(opt, params)
    last_step_size = opt.param_groups[0]["step_size"].clone()
    assert last_step_size > 0
    loss = problem_loss(params, targets, [True, True])
    loss.backward()
    if bad == "nan_loss":
        loss = torch.tensor(float("nan"))
    elif bad == "inf_loss":
        loss = float("inf")
    elif bad == "inf_grad":
        params[1].grad[3] = float("inf")
    elif bad == "nan_grad":
        params[0].grad[1, 2] = float("nan")
    elif bad == "huge_grad":  # finite, but ||g||^2 = 1e40 > float32 max: skipped on every backend
        params[0].grad[1, 2] = 1e20
    else:
        opt.grad_scale = torch.tensor(1.0)
        opt.found_inf = torch.tensor(1.0)
    opt.step(loss=loss)
    for x, y in zip(before, _snapshot(opt, params)):
        assert torch.equal(x, y), "a skipped step changed parameters or buffers"
    assert int(opt.skipped_steps) == 1
    assert float(opt.param_groups[0]["step_size"]) == 0.0
    # and the optimizer carries on normally afterwards
    for attr in ("grad_scale", "found_inf"):
        if hasattr(opt, attr):
            delattr(opt, attr)
    _train(opt, params, targets, 1)
    assert int(opt.skipped_steps) == 1
    assert not torch.equal(before[0], params[0].detach())


FLT_MAX = torch.finfo(torch.float32).max


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
def test_gradient_norm_at_the_float32_limit(backend, big, skipped):
    """One rule on every backend: skip when G = ||g||^2 is not below float32's max, however
    the backend sums (fp32 partial sums overflow only where G is that large; float64 ones do not)."""
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = FusedALIG(params, momentum=0.9, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step(loss=1.0)  # buffers exist and are not zero
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for (tensor, index), value in big.items():
        params[tensor].grad.view(-1)[index] = value
    grad_sq_norm = sum(float(p.grad.double().norm()) ** 2 for p in params)
    assert (grad_sq_norm >= FLT_MAX) == skipped
    before = [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]
    loss = 1e30  # gamma ~5e-9: the elements of 1e19 move by ~1e11, visibly
    opt.step(loss=loss)
    if skipped:
        assert int(opt.skipped_steps) == 1 and float(opt.param_groups[0]["step_size"]) == 0.0
        after = [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
        assert all(torch.equal(b, a) for b, a in zip(before, after))
    else:
        assert int(opt.skipped_steps) == 0
        assert float(opt.param_groups[0]["step_size"]) == pytest.approx(loss / grad_sq_norm, rel=1e-5)
        assert all(torch.isfinite(p).all() and not torch.equal(b, p.detach()) for b, p in zip(before, params))
    reference = ReferenceALIG([{"params": [b.double() for b in before[:2]], "momentum": 0.9}])
    for b, p in zip(reference.groups[0]["params"], params):
        b.grad = p.grad.double()
    reference.step(loss)
    assert reference.skipped == int(skipped)


def test_grad_scale_is_unscaled_inside(backend):
    """Gradients scaled by S with grad_scale=S give the step of the unscaled gradients."""
    spec = [(SHAPES, CONFIGS["projection"])]
    groups = make_groups(spec)
    targets = groups[0][1]
    a = [t.float().requires_grad_() for t in groups[0][0]]
    b = [t.float().requires_grad_() for t in groups[0][0]]
    opt_a = FusedALIG(a, backend=backend, **CONFIGS["projection"])
    opt_b = FusedALIG(b, backend=backend, **CONFIGS["projection"])
    for _ in range(10):
        for flat in (a, b):
            for p in flat:
                p.grad = None
        loss_a = problem_loss(a, targets, [True] * len(a))
        loss_a.backward()
        opt_a.step(loss=loss_a)
        loss_b = problem_loss(b, targets, [True] * len(b))
        (loss_b * 1024.0).backward()
        opt_b.grad_scale = torch.tensor(1024.0)
        opt_b.found_inf = torch.tensor(0.0)
        opt_b.step(loss=loss_b)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_grad_scaler_end_to_end_cpu(backend):
    """torch.amp.GradScaler drives the fused AMP protocol: scaler.step(opt, loss=loss)."""
    spec = [(SHAPES, CONFIGS["momentum"])]
    groups = make_groups(spec)
    targets = groups[0][1]
    a = [t.float().requires_grad_() for t in groups[0][0]]
    b = [t.float().requires_grad_() for t in groups[0][0]]
    opt_a = FusedALIG(a, backend=backend, **CONFIGS["momentum"])
    opt_b = FusedALIG(b, backend=backend, **CONFIGS["momentum"])
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for _ in range(10):
        for p in a + b:
            p.grad = None
        loss_a = problem_loss(a, targets, [True] * len(a))
        loss_a.backward()
        opt_a.step(loss=loss_a)
        loss_b = problem_loss(b, targets, [True] * len(b))
        scaler.scale(loss_b).backward()
        scaler.step(opt_b, loss=loss_b)
        scaler.update()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not hasattr(opt_b, "grad_scale")


def test_projection_fn_is_called_after_each_step(backend):
    params = [torch.randn(4, requires_grad=True)]
    calls = []
    opt = FusedALIG(params, lr=0.1, backend=backend, projection_fn=lambda: calls.append(params[0].detach().clone()))
    assert len(calls) == 1  # once at construction, as the reference does
    params[0].grad = torch.ones(4)
    opt.step(loss=1.0)
    assert len(calls) == 2 and torch.equal(calls[-1], params[0].detach())


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
    assert opt.last_backend == "torch" and p.dtype == torch.float64
    for name in ("cpp", "triton"):
        if backends.supports(name, torch.device("cpu"))[0]:
            with pytest.raises(TypeError, match="float64"):
                FusedALIG([p], backend=name)


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


def test_sparse_gradient_is_rejected_and_nothing_changes(backend):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Parameter(torch.randn(3))
    opt = FusedALIG([dense, emb.weight], lr=0.1, momentum=0.9, backend=backend)
    before = [dense.detach().clone(), emb.weight.detach().clone()]
    (emb(torch.tensor([1, 2])).sum() + dense.sum()).backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(loss=1.0)
    assert torch.equal(before[0], dense.detach()) and torch.equal(before[1], emb.weight.detach())
    assert len(opt.state) == 0


def test_sparse_gradient_after_steps_is_rejected_and_nothing_changes(backend):
    """The same once the optimizer has stepped (its cached step plan must not skip the check)."""
    emb = torch.nn.Embedding(10, 3, sparse=False)
    dense = torch.nn.Parameter(torch.randn(3))
    opt = FusedALIG([dense, emb.weight], lr=0.1, momentum=0.9, backend=backend)
    for _ in range(2):
        opt.zero_grad()
        (emb(torch.tensor([1, 2])).pow(2).sum() + dense.pow(2).sum()).backward()
        opt.step(loss=1.0)
    before = [t.detach().clone() for t in (dense, emb.weight)]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in (dense, emb.weight)]
    emb.weight.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 3), (10, 3))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(loss=1.0)
    assert torch.equal(before[0], dense.detach()) and torch.equal(before[1], emb.weight.detach())
    for p, buffer in zip((dense, emb.weight), buffers):
        assert torch.equal(opt.state[p]["momentum_buffer"], buffer)


def test_step_plan_follows_state_and_group_changes(backend):
    """FusedALIG reuses its flat tensor lists between steps; changes to the state and groups
    made between steps (state cleared, momentum switched on, a state_dict loaded, a
    parameter frozen) must still reach the step, as they reach the reference loop."""
    spec = [(SHAPES[:3], {"lr": 0.05, "momentum": 0.9, "max_norm": 3.0}), (SHAPES[3:], {"lr": 0.05})]
    groups = make_groups(spec)
    targets = groups[0][1] + groups[1][1]
    fused = [t.float().requires_grad_() for g in groups for t in g[0]]
    exact = [t.clone().requires_grad_() for g in groups for t in g[0]]
    unchanged = [t.clone().requires_grad_() for g in groups for t in g[0]]
    opt = FusedALIG([{"params": fused[:3], **spec[0][1]}, {"params": fused[3:], **spec[1][1]}], backend=backend)
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
        for flat, reference in ((fused, None), (exact, ref), (unchanged, ref_unchanged)):
            for p in flat:
                p.grad = None
            loss = problem_loss(flat, targets, active)
            loss.backward()
            if reference is None:
                opt.step(loss=loss)
            else:
                reference.step(float(loss.detach()))
    assert trajectory_error(fused, exact) < 1e-5
    assert trajectory_error(unchanged, exact) > 1e-3, "the changes must alter the trajectory for this test to mean anything"


def test_complex_and_integer_parameters_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        FusedALIG([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating-point"):
        FusedALIG([torch.ones(2, dtype=torch.int64)])


def test_missing_or_bad_loss(backend):
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedALIG([p], lr=0.1, backend=backend)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="needs the current loss"):
        opt.step()
    with pytest.raises(TypeError, match="loss=loss"):
        opt.step(torch.tensor(1.0))  # positional: step's first argument is the closure
    with pytest.raises(ValueError, match="scalar"):
        opt.step(loss=torch.ones(2))
    with pytest.raises(TypeError, match="loss"):
        opt.step(loss="1.0")
    assert torch.equal(p.detach(), torch.ones(3)) and int(opt.skipped_steps) == 0


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["torch", "cpp", "triton"])
def test_no_sync_on_cuda(name):
    from conftest import require_backend

    device = torch.device("cuda")
    require_backend(name, device)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(device)
    opt = FusedALIG(model.parameters(), lr=0.1, momentum=0.9, max_norm=10.0, backend=name)
    x = torch.randn(16, 32, device=device)
    for _ in range(3):  # warm-up builds tables and caches
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
    opt.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(loss=loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.last_backend == name


def test_grad_scaler_with_bf16_autocast_on_cpu(backend):
    """bf16 autocast on CPU with GradScaler: the scaled run follows the unscaled one."""
    runs = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        opt = FusedALIG(model.parameters(), lr=0.1, momentum=0.9, max_norm=5.0, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=scaled)
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 2, generator=gen)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt, loss=loss)
            scaler.update()
        assert int(opt.skipped_steps) == 0
        runs[scaled] = [p.detach().clone() for p in model.parameters()]
    for p, q in zip(runs[True], runs[False]):
        # a power-of-two scale is exact in bf16: only the unscaling's rounding differs
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.fixture
def tiny_torch_batches(monkeypatch):
    """The torch path's pieces and batches at a few elements, so that the test shapes are
    split into flat views and spread over several batches."""
    from alig_fused import functional

    monkeypatch.setattr(functional, "PIECE_ELEMENTS", 5)
    monkeypatch.setattr(functional, "BATCH_ELEMENTS", 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["momentum", "projection", "projection_no_momentum"])
def test_torch_path_in_pieces_follows_reference(tiny_torch_batches, config, dtype):
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
            functional.torch_alig(
                params, [x * 4 for x in g], buffers, group_index, hparams, torch.tensor(2.0, dtype=torch.float64),
                step_size, skipped, scale, None, {}, (lambda s, l: (s, l)) if sharded else None,
            )
        runs[piece] = params + buffers, step_size.clone()
        assert int(skipped) == 0
    (whole, whole_sizes), (pieces, piece_sizes) = runs.values()
    assert not torch.equal(whole[0], start[0])
    for x, y in zip(whole, pieces):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole_sizes, piece_sizes, rtol=1e-5, atol=0)
    norm = math.sqrt(sum(float(p.double().norm()) ** 2 for i, p in enumerate(pieces[:4]) if group_index[i] == 0))
    assert norm == pytest.approx(3.0, rel=1e-5)  # the ball binds and holds
