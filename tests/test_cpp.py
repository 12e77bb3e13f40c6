"""The C++ extension backend (backend="cpp") on CPU: against the float64 reference loop,
the torch backend, itself under 1 and 2 threads, and torch.library.opcheck.

The test problem is well conditioned (loss = 1/2 sum (0.2 tanh(w) + w - t)^2 over every
tensor, t reachable, so the Polyak step contracts): over 50 steps the plain fp32 loop
stays within ~3e-7 of the float64 one. Errors are max |p - e| / (1 + |e|) against the
float64 reference, and the tolerances a few storage ulps: fp32 2e-6 (measured <= 3e-7),
bf16 4e-2 (2^-7 = 7.8e-3 per ulp, measured <= 1e-2), fp16 4e-3 (2^-10 = 9.8e-4, measured
<= 1e-3).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from alig_fused import FusedALIG, backends
from reference import ReferenceALIG

CPU = torch.device("cpu")
_ok, _reason = backends.supports("cpp", CPU)
if not _ok:
    if "cpp" in os.environ.get("ALIG_FUSED_REQUIRE_BACKENDS", "").split(","):
        raise RuntimeError(f"backend 'cpp' is required here but unavailable: {_reason}")
    pytest.skip(f"backend 'cpp' unavailable: {_reason}", allow_module_level=True)

from alig_fused import cpp_ops  # noqa: E402 (only once the extension is known to load)

STEPS = 50
ATOL = {torch.float32: 2e-6, torch.bfloat16: 4e-2, torch.float16: 4e-3, torch.float64: 2e-6}
SHAPES = [(7,), (33, 5), (1,)]

CONFIGS = {
    "no_momentum": [dict(shapes=SHAPES)],
    "momentum": [dict(shapes=SHAPES, momentum=0.9)],
    "adjusted_momentum_max_lr": [dict(shapes=SHAPES, momentum=0.9, adjusted_momentum=True, lr=0.1)],
    "max_lr_binding": [dict(shapes=SHAPES, momentum=0.5, lr=0.05)],
    "max_norm_active": [dict(shapes=SHAPES, momentum=0.9, max_norm=3.0)],
    "max_norm_no_momentum": [dict(shapes=SHAPES, max_norm=3.0, lr=0.3)],
    "f_star_scaling_eps": [dict(shapes=SHAPES, momentum=0.9, f_star=0.01, scaling=2.0, eps=1e-3)],
    "several_groups": [
        dict(shapes=[(7,), (33, 5)], momentum=0.9, max_norm=3.0),
        dict(shapes=[(20,)], lr=0.05),
        dict(shapes=[(9,), (2, 2)], momentum=0.5, adjusted_momentum=True),
        dict(shapes=[(4,)], momentum=0.9, max_norm=1e6),  # ball never reached: scale 1
    ],
    "empty_groups": [dict(shapes=[], momentum=0.9), dict(shapes=SHAPES, momentum=0.9), dict(shapes=[], max_norm=1.0)],
    "many_tiny_tensors": [
        dict(shapes=[(1 + i % 13,) for i in range(150)], momentum=0.9, max_norm=8.0),
        dict(shapes=[(2 + i % 5, 3) for i in range(100)]),
    ],
}


# ---------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------


def make_problem(spec, seed=0):
    """[(start tensors float64, targets, hparams)] per group."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for group in spec:
        hparams = {k: v for k, v in group.items() if k != "shapes"}
        start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in group["shapes"]]
        solution = [0.5 * torch.randn(s, generator=gen, dtype=torch.float64) for s in group["shapes"]]
        groups.append((start, [0.2 * torch.tanh(x) + x for x in solution], hparams))
    return groups


def loss_of(params, targets, active):
    total = torch.zeros((), dtype=torch.float64)
    for p, t, on in zip(params, targets, active):
        if on:
            x = p.double()
            total = total + 0.5 * ((0.2 * torch.tanh(x) + x - t) ** 2).sum()
    return total


class Run:
    """One optimizer (FusedALIG with ``backend``, or the reference) on a copy of the problem."""

    def __init__(self, problem, backend, dtype=torch.float32, memory_format=None):
        self.groups = []
        for start, _, hparams in problem:
            params = [t.detach().to(dtype).clone().requires_grad_() for t in start]
            if memory_format is not None:
                params = [p.detach().to(memory_format=memory_format).requires_grad_() if p.dim() == 4 else p for p in params]
            self.groups.append({"params": params, **hparams})
        self.params = [p for g in self.groups for p in g["params"]]
        self.targets = [t for _, targets, _ in problem for t in targets]
        self.reference = backend == "reference"
        self.opt = ReferenceALIG(self.groups) if self.reference else FusedALIG(self.groups, backend=backend)

    def backward(self, active=None):
        active = active or [True] * len(self.params)
        for p in self.params:
            p.grad = None
        loss = loss_of(self.params, self.targets, active)
        loss.backward()
        return loss.detach()

    def step(self, active=None, loss=None):
        computed = self.backward(active)
        loss = computed if loss is None else loss
        if self.reference:
            self.opt.step(float(loss))
        else:
            self.opt.step(loss=loss)
        return loss

    def state(self):
        """Bit-exact copy of parameters and momentum buffers."""
        buffers = [self.opt.state[p].get("momentum_buffer") for p in self.params] if not self.reference else []
        return [p.detach().clone() for p in self.params], [None if b is None else b.clone() for b in buffers]


def run(spec, backend, dtype=torch.float32, steps=STEPS, inactive=None, seed=0):
    """``steps`` steps; ``.step_sizes`` holds each step's per-group step sizes."""
    run_ = Run(make_problem(spec, seed), backend, dtype)
    run_.step_sizes = []
    for step in range(steps):
        active = [not (inactive and inactive(step, i)) for i in range(len(run_.params))]
        run_.step(active)
        if run_.reference:
            run_.step_sizes.append(list(run_.opt.step_sizes))
        else:
            run_.step_sizes.append([float(g["step_size"]) for g in run_.opt.param_groups])
    return run_


def max_error(params, exact):
    """max |p - e| / (1 + |e|): storage ulps grow with |e|."""
    errors = []
    for p, e in zip(params, exact):
        p, e = p.detach().double().cpu(), e.detach().double().cpu()
        errors.append(float(((p - e).abs() / (1 + e.abs())).max()))
    return max(errors, default=0.0)


def assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))


# ---------------------------------------------------------------------------------------
# trajectories
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fp32_matches_reference(config):
    fused = run(CONFIGS[config], "cpp")
    exact = run(CONFIGS[config], "reference", dtype=torch.float64)
    assert fused.opt.last_backend == "cpp"
    assert max_error(fused.params, exact.params) <= ATOL[torch.float32]
    # Early steps: gamma agrees to fp32 precision. Near the end (loss ~1e-7) it is a ratio
    # of two tiny fp32-sensitive numbers: 1% only.
    for fused_sizes, exact_sizes in zip(fused.step_sizes[:5], exact.step_sizes[:5]):
        assert fused_sizes == pytest.approx(exact_sizes, rel=1e-5, abs=1e-12)
    assert fused.step_sizes[-1] == pytest.approx(exact.step_sizes[-1], rel=1e-2, abs=1e-12)
    assert int(fused.opt.skipped_steps) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", ["no_momentum", "momentum", "adjusted_momentum_max_lr", "max_norm_active", "several_groups"])
def test_low_precision_matches_reference(config, dtype):
    fused = run(CONFIGS[config], "cpp", dtype=dtype)
    exact = run(CONFIGS[config], "reference", dtype=torch.float64)
    assert all(p.dtype == dtype for p in fused.params)
    assert all(s["momentum_buffer"].dtype == dtype for s in fused.opt.state.values())
    assert max_error(fused.params, exact.params) <= ATOL[dtype]


def test_float64_tensors_through_the_function():
    # FusedALIG sends float64 models to backend="torch"; the op still takes them (storage
    # float64, math in fp32, as torch_alig does it).
    from alig_fused.functional import GroupHParams, torch_alig

    outs = {}
    for name, fn in (("cpp", cpp_ops.cpp_alig), ("torch", torch_alig)):
        args = op_args(max_norm=3.0, dtype=torch.float64)
        params, grads, buffers, group_index, _, loss, step_size, skipped, _, _ = args
        hparams = [GroupHParams(0.5, 0.9, False, 3.0, 1e-5, 0.0, 1.0), GroupHParams(math.inf, 0.9, True, math.inf, 1e-5, 0.1, 1.0)]
        fn(params, grads, buffers, group_index, hparams, loss, step_size, skipped, None, None, {})
        outs[name] = params + buffers
    for p, q in zip(outs["cpp"], outs["torch"]):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_params_without_grads():
    spec = CONFIGS["several_groups"]

    def inactive(step, i):  # tensor 1 never has a grad; others skip some steps
        return i == 1 or (step + i) % 4 == 0

    fused = run(spec, "cpp", inactive=inactive)
    exact = run(spec, "reference", dtype=torch.float64, inactive=inactive)
    assert max_error(fused.params, exact.params) <= ATOL[torch.float32]
    assert fused.params[1] not in fused.opt.state

    # A tensor without a grad is left alone by the step (max_norm projected it once, at
    # construction, with the rest of its group, as the reference does).
    fresh = Run(make_problem(spec), "cpp")
    after_construction = fresh.params[1].detach().clone()
    for step in range(5):
        fresh.step([not inactive(step, i) for i in range(len(fresh.params))])
    assert torch.equal(fresh.params[1].detach(), after_construction)


def test_odd_sizes_with_a_large_tensor():
    # 1000003 elements: many chunks, a short last chunk, and the threaded path.
    spec = [dict(shapes=[(1,), (7,), (1000003,)], momentum=0.9, max_norm=400.0)]
    fused = run(spec, "cpp", steps=12)
    exact = run(spec, "reference", dtype=torch.float64, steps=12)
    assert max_error(fused.params, exact.params) <= ATOL[torch.float32]


def test_channels_last_params():
    # Dense but not contiguous: grads and buffers share the parameter's strides.
    spec = [dict(shapes=[(2, 3, 4, 5), (6,)], momentum=0.9, max_norm=4.0)]
    fused = Run(make_problem(spec), "cpp", memory_format=torch.channels_last)
    assert not fused.params[0].is_contiguous()
    exact = run(spec, "reference", dtype=torch.float64, steps=20)
    for _ in range(20):
        fused.step()
    assert fused.params[0].grad.stride() == fused.params[0].stride()
    assert max_error(fused.params, exact.params) <= ATOL[torch.float32]


# ---------------------------------------------------------------------------------------
# equal to the torch backend
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_equals_torch_backend(config):
    # Same inputs: the pass-2 arithmetic is the foreach path's, operation for operation;
    # only G's summation differs: both add fp32 partial sums in fp64, the C++ op per chunk,
    # the torch path per 2^17-element piece through fp32 norms, so gamma differs by ~1e-7
    # relative. One step agrees to a few ulps of |w| <= 3 (absolute, since w - c g may
    # cancel; measured 6e-7 at most) and a few steps to a few more.
    runs = {b: Run(make_problem(CONFIGS[config]), b) for b in ("cpp", "torch")}
    for steps, rtol, atol in ((1, 1e-6, 1e-6), (4, 1e-5, 2e-6)):
        for _ in range(steps):
            for r in runs.values():
                r.step()
        for p, q in zip(runs["cpp"].params, runs["torch"].params):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        for g, h in zip(runs["cpp"].opt.param_groups, runs["torch"].opt.param_groups):
            torch.testing.assert_close(g["step_size"], h["step_size"], rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_trajectory_equals_torch_backend(dtype):
    # In bf16/fp16 the gamma differences vanish in the storage rounding: same bits.
    cpp = run(CONFIGS["max_norm_active"], "cpp", dtype=dtype, steps=20)
    ref = run(CONFIGS["max_norm_active"], "torch", dtype=dtype, steps=20)
    assert max_error(cpp.params, ref.params) <= ATOL[dtype]


# ---------------------------------------------------------------------------------------
# skipped steps: non-finite loss or gradient, AMP's found_inf
# ---------------------------------------------------------------------------------------


def _stepped_run(spec, dtype=torch.float32, steps=3):
    r = Run(make_problem(spec), "cpp", dtype)
    for _ in range(steps):
        r.step()
    return r


@pytest.mark.parametrize("bad_loss", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_skips_bit_identically(bad_loss):
    r = _stepped_run(CONFIGS["several_groups"])
    before = r.state()
    r.step(loss=torch.tensor(bad_loss, dtype=torch.float64))
    assert_bitwise_equal(r.state()[0], before[0])
    assert_bitwise_equal(r.state()[1], before[1])
    assert int(r.opt.skipped_steps) == 1
    assert all(float(g["step_size"]) == 0.0 for g in r.opt.param_groups)
    r.step()  # and the next finite step goes on
    assert int(r.opt.skipped_steps) == 1 and float(r.opt.param_groups[0]["step_size"]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_grad_skips_bit_identically(bad, dtype):
    r = _stepped_run(CONFIGS["max_norm_active"], dtype)
    before = r.state()
    loss = r.backward()
    r.params[1].grad.view(-1)[3] = bad
    r.opt.step(loss=loss)
    assert_bitwise_equal(r.state()[0], before[0])
    assert_bitwise_equal(r.state()[1], before[1])
    assert int(r.opt.skipped_steps) == 1


def test_grad_scale_unscales_exactly():
    # A power-of-two scale is exact: the scaled run must give the same bits.
    plain = _stepped_run(CONFIGS["several_groups"], steps=2)
    scaled = _stepped_run(CONFIGS["several_groups"], steps=2)
    for _ in range(3):
        plain.step()
        loss = scaled.backward()
        for p in scaled.params:
            p.grad.mul_(1024.0)
        scaled.opt.grad_scale = torch.tensor(1024.0)
        scaled.opt.found_inf = torch.tensor(0.0)
        scaled.opt.step(loss=loss)
        del scaled.opt.grad_scale, scaled.opt.found_inf
    assert_bitwise_equal(scaled.state()[0], plain.state()[0])
    assert_bitwise_equal(scaled.state()[1], plain.state()[1])


def test_grad_scale_not_power_of_two_close():
    plain = _stepped_run(CONFIGS["momentum"], steps=2)
    scaled = _stepped_run(CONFIGS["momentum"], steps=2)
    plain.step()
    loss = scaled.backward()
    for p in scaled.params:
        p.grad.mul_(1000.0)
    scaled.opt.grad_scale = torch.tensor(1000.0)
    scaled.opt.step(loss=loss)
    for p, q in zip(scaled.params, plain.params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_found_inf_skips_bit_identically():
    r = _stepped_run(CONFIGS["several_groups"])
    before = r.state()
    loss = r.backward()
    for p in r.params:
        p.grad.mul_(65536.0)
    r.params[0].grad.view(-1)[0] = math.inf
    r.opt.grad_scale = torch.tensor(65536.0)
    r.opt.found_inf = torch.tensor(1.0)
    r.opt.step(loss=loss)
    assert_bitwise_equal(r.state()[0], before[0])
    assert_bitwise_equal(r.state()[1], before[1])
    assert int(r.opt.skipped_steps) == 1


def test_with_grad_scaler():
    r = _stepped_run(CONFIGS["momentum"], steps=1)
    ref = _stepped_run(CONFIGS["momentum"], steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        for p in r.params:
            p.grad = None
        loss = loss_of(r.params, r.targets, [True] * len(r.params))
        scaler.scale(loss).backward()
        scaler.step(r.opt, loss=loss.detach())
        scaler.update()
        ref.step()
    assert_bitwise_equal(r.state()[0], ref.state()[0])


# ---------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------


def test_bit_identical_with_1_and_2_threads():
    spec = [
        dict(shapes=[(1000003,), (7,), (1,)] + [(50 + i,) for i in range(40)], momentum=0.9, max_norm=500.0),
        dict(shapes=[(300, 200), (33,)], momentum=0.9, adjusted_momentum=True, lr=0.2),
    ]
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            r = run(spec, "cpp", steps=8)
            results[threads] = (r.state(), [g["step_size"].clone() for g in r.opt.param_groups])
    finally:
        torch.set_num_threads(before)
    assert_bitwise_equal(results[1][0][0], results[2][0][0])
    assert_bitwise_equal(results[1][0][1], results[2][0][1])
    assert_bitwise_equal(results[1][1], results[2][1])


def test_repeatable():
    a = run(CONFIGS["many_tiny_tensors"], "cpp", steps=10)
    b = run(CONFIGS["many_tiny_tensors"], "cpp", steps=10)
    assert_bitwise_equal(a.state()[0], b.state()[0])


# ---------------------------------------------------------------------------------------
# the op itself
# ---------------------------------------------------------------------------------------


def op_args(momentum=0.9, max_norm=math.inf, dtype=torch.float32, scaled=False, shared_empty_buffer=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5,), (3, 4), (1,), (17000,)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    if momentum > 0:
        buffers = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    elif shared_empty_buffer:  # the optimizer passes one empty tensor for every such param
        buffers = [torch.empty(0, dtype=dtype)] * len(shapes)
    else:
        buffers = [torch.empty(0, dtype=dtype) for _ in shapes]
    hparams = torch.tensor(
        [[0.5, momentum, 0.0, max_norm, 1e-5, 0.0, 1.0], [math.inf, momentum, 1.0, math.inf, 1e-5, 0.1, 1.0]],
        dtype=torch.float64,
    )
    return (
        params,
        grads,
        buffers,
        [0, 1, 0, 1],
        hparams,
        torch.tensor(2.5, dtype=torch.float64),
        torch.zeros(2),
        torch.zeros((), dtype=torch.int64),
        torch.tensor(4.0) if scaled else None,
        torch.tensor(0.0) if scaled else None,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(max_norm=3.0),
        dict(momentum=0.0),
        dict(momentum=0.0, shared_empty_buffer=True),
        dict(scaled=True, max_norm=3.0),
        dict(dtype=torch.bfloat16, max_norm=3.0),
        dict(dtype=torch.float16),
    ],
    ids=["momentum", "max_norm", "no_momentum", "shared_empty_buffer", "grad_scale", "bf16", "fp16"],
)
def test_opcheck(kwargs):
    torch.library.opcheck(torch.ops.alig_fused.alig_step_.default, op_args(**kwargs))


def test_op_writes_only_its_outputs():
    args = op_args(max_norm=3.0, scaled=True)
    params, grads, buffers, _, hparams, loss, step_size, skipped, grad_scale, found_inf = args
    inputs = [t.clone() for t in grads] + [hparams.clone(), loss.clone(), grad_scale.clone(), found_inf.clone()]
    old_params, old_buffers = [t.clone() for t in params], [t.clone() for t in buffers]
    torch.ops.alig_fused.alig_step_(*args)
    after = list(grads) + [hparams, loss, grad_scale, found_inf]
    assert all(torch.equal(a, b) for a, b in zip(inputs, after))
    assert all(not torch.equal(a, b) for a, b in zip(params, old_params))
    assert all(not torch.equal(a, b) for a, b in zip(buffers, old_buffers))
    assert int(skipped) == 0 and bool((step_size > 0).all())


def test_has_device():
    assert cpp_ops.has_device("cpu")
    assert cpp_ops.has_device("cuda") == bool(cpp_ops._C.has_cuda())
    assert not cpp_ops.has_device("mps")


def test_auto_picks_cpp_on_cpu():
    assert backends.pick("auto", CPU) == "cpp"


@pytest.mark.parametrize(
    "break_args, message",
    [
        (lambda a: a[1].__setitem__(3, torch.randn(2, 17000)[0]), None),  # still contiguous: fine
        (lambda a: a[1].__setitem__(1, torch.randn(4, 3).t()), "not contiguous"),
        (lambda a: a[0].__setitem__(3, torch.randn(34000)[::2]), "not contiguous"),
        (lambda a: a[2].__setitem__(0, torch.randn(5)[None].expand(2, 5)[0]), None),
        (lambda a: a[2].__setitem__(0, torch.empty(0)), "momentum_buffers\\[0\\] is empty"),
        (lambda a: a[1].__setitem__(0, torch.randn(6)), "shape"),
        (lambda a: a[1].__setitem__(0, torch.randn(5, dtype=torch.float64)), "dtype"),
        (lambda a: a[3].__setitem__(2, 5), "group_index"),
        (lambda a: a[3].pop(), "one entry per tensor"),
    ],
)
def test_bad_arguments_raise_value_error(break_args, message):
    args = list(op_args())
    args[0], args[1], args[2], args[3] = list(args[0]), list(args[1]), list(args[2]), list(args[3])
    break_args(args)
    if message is None:
        torch.ops.alig_fused.alig_step_(*args)
    else:
        with pytest.raises(ValueError, match=message):
            torch.ops.alig_fused.alig_step_(*args)


def test_non_contiguous_param_through_optimizer_raises():
    w = torch.randn(6, 4).t().requires_grad_()  # a transposed leaf: not contiguous
    opt = FusedALIG([w], backend="cpp", momentum=0.9)
    w.grad = torch.randn(6, 4).t().contiguous()
    with pytest.raises(ValueError, match="contiguous"):
        opt.step(loss=1.0)


def test_no_params_with_grads_in_a_group_still_reports_step_size():
    spec = [dict(shapes=[(5,)], momentum=0.9), dict(shapes=[(3,)], lr=0.1)]
    r = Run(make_problem(spec), "cpp")
    r.step(active=[True, False])
    sizes = [float(g["step_size"]) for g in r.opt.param_groups]
    assert sizes[0] > 0 and sizes[1] == pytest.approx(min(0.1, sizes[0]), rel=1e-6)


# ---------------------------------------------------------------------------------------
# the two halves for sharded parameters: alig_sums, reduce_sums, alig_update_
# ---------------------------------------------------------------------------------------

def _group_hparams():
    from alig_fused.functional import GroupHParams

    return [GroupHParams(0.5, 0.9, False, 3.0, 1e-5, 0.0, 1.0), GroupHParams(math.inf, 0.9, True, math.inf, 1e-5, 0.1, 1.0)]


def test_identity_reduce_sums_is_the_fused_step():
    # The halves project with ||w'|| from the pass-1 sums, the fused CPU op measures it in
    # pass 2: the same scale up to rounding, so the parameters agree to fp32 precision
    # and everything else bit for bit.
    results = []
    for reduce_sums in (None, lambda sums, loss: (sums, loss)):
        params, grads, buffers, group_index, _, loss, step_size, skipped, grad_scale, found_inf = op_args(max_norm=3.0, scaled=True)
        extra = {} if reduce_sums is None else {"reduce_sums": reduce_sums}
        cpp_ops.cpp_alig(params, grads, buffers, group_index, _group_hparams(), loss, step_size, skipped, grad_scale, found_inf, {}, **extra)
        after = math.sqrt(sum(float(p.double().norm()) ** 2 for p, k in zip(params, group_index) if k == 0))
        assert after == pytest.approx(3.0, rel=1e-6), "the ball must bind (group 0 ends on it) for this test to mean anything"
        results.append((params, buffers + [step_size]))
    for p, q in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert_bitwise_equal(results[0][1], results[1][1])


def test_two_shards_with_reduce_sums_match_the_whole():
    # Every tensor split between two "ranks" (a 1-element one leaves rank 0 an empty shard);
    # reduce_sums adds the other rank's pass-1 sums, computed before either rank steps, as
    # the all-reduce would.
    from alig_fused.cpp_ops import _alig_sums
    from alig_fused.functional import hparams_table

    params, grads, buffers, group_index, _, loss, step_size, skipped, _, _ = op_args(max_norm=3.0)

    def shard(t, rank):
        flat = t.reshape(-1)
        return (flat[: t.numel() // 2] if rank == 0 else flat[t.numel() // 2 :]).clone()

    shards = [[[shard(t, rank) for t in ts] for ts in (params, grads, buffers)] for rank in (0, 1)]
    hparams = hparams_table(_group_hparams(), torch.device("cpu"), None)
    shard_sums = [_alig_sums(w, g, b, group_index, hparams, None) for w, g, b in shards]
    rank_step_sizes = [torch.zeros(2), torch.zeros(2)]
    for rank, (w, g, b) in enumerate(shards):
        other = shard_sums[1 - rank]
        cpp_ops.cpp_alig(w, g, b, group_index, _group_hparams(), loss, rank_step_sizes[rank],
                         torch.zeros((), dtype=torch.int64), None, None, {},
                         reduce_sums=lambda sums, loss, other=other: (sums + other, loss))
    cpp_ops.cpp_alig(params, grads, buffers, group_index, _group_hparams(), loss, step_size, skipped, None, None, {})
    for i, (p, b) in enumerate(zip(params, buffers)):
        torch.testing.assert_close(torch.cat([shards[0][0][i], shards[1][0][i]]), p.reshape(-1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.cat([shards[0][2][i], shards[1][2][i]]), b.reshape(-1), rtol=1e-6, atol=1e-6)
    for rank_step_size in rank_step_sizes:
        torch.testing.assert_close(rank_step_size, step_size, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(max_norm=3.0, scaled=True), dict(momentum=0.0, dtype=torch.bfloat16)])
def test_opcheck_halves(kwargs):
    params, grads, buffers, group_index, hparams, loss, step_size, skipped, grad_scale, found_inf = op_args(**kwargs)
    torch.library.opcheck(torch.ops.alig_fused.alig_sums.default, (params, grads, buffers, group_index, hparams, grad_scale))
    sums = torch.ops.alig_fused.alig_sums(params, grads, buffers, group_index, hparams, grad_scale)
    assert sums.shape == (2, 6) and sums.dtype == torch.float64
    torch.library.opcheck(
        torch.ops.alig_fused.alig_update_.default,
        (params, grads, buffers, group_index, hparams, sums, loss, step_size, skipped, grad_scale, found_inf),
    )


def test_update_rejects_bad_sums():
    params, grads, buffers, group_index, hparams, loss, step_size, skipped, _, _ = op_args()
    with pytest.raises(ValueError, match="sums"):
        torch.ops.alig_fused.alig_update_(params, grads, buffers, group_index, hparams, torch.zeros(2, 5, dtype=torch.float64), loss, step_size, skipped, None, None)
