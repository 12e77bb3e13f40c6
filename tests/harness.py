"""The test harness: one problem, one reference runner, one error measure, one table of
optimizer settings, and the list of (device, backend) instances every shared test runs on.

torch's ``optim_db`` + ``instantiate_device_type_tests`` is the model: a test that takes the
``case`` fixture (tests/conftest.py) runs once per instance in ``INSTANCES``; the instances
are read from ``alig_fused.backends``, so a backend added there inherits every shared test.
Backend-specific tests (the C++ op, Triton's tables and launches, CUDA-only checks) live in
their backend's file and import what they need from here.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from alig_fused import FusedALIG, backends
from reference import ReferenceALIG

# ----- the instances ----------------------------------------------------------------------

DEVICES = ("cpu", "cuda")
# Variants run as an extra instance on CPU: "cpp-1thread" runs the C++ backend with one
# thread (its reductions must not depend on the thread count).
CPU_VARIANTS = {"cpp": ("cpp-1thread",)}


def instances() -> list[tuple[str, str]]:
    """(device type, backend variant) for every backend registered in alig_fused.backends, on
    every device its record lists (all of DEVICES when it lists none)."""
    registry = getattr(backends, "REGISTRY", {})
    out = []
    for device in DEVICES:
        for name in backends.BACKENDS:
            record = registry.get(name)
            if record is not None and record.dtypes is not None and device not in record.dtypes:
                continue
            out.append((device, name))
            if device == "cpu":
                out += [(device, variant) for variant in CPU_VARIANTS.get(name, ())]
    return out


INSTANCES = instances()
CPU_BACKENDS = [name for device, name in INSTANCES if device == "cpu"]

# ----- the problem -----------------------------------------------------------------------

STEPS = 50
# Steps of a shared trajectory test on the Triton interpreter: it runs each program in Python
# (~0.1-0.3 s a launch here), so 50 steps of every shared test cost it ~20 minutes. 12
# steps walk the same kernel paths (the start, the projection binding, momentum built up);
# the long-run behaviour of the algorithm is the torch and C++ instances' to check.
INTERPRETER_STEPS = 12
# Tolerance. Every run is compared with the float64 reference loop. Rounding the parameters
# to the storage dtype at each step perturbs the trajectory, and uncapped Polyak steps near
# the solution amplify such perturbations, so the bound is calibrated on the plain loop
# itself run with the same storage dtype: the fused step may be at most 3x further from the
# exact trajectory than the plain loop in that dtype, plus a floor of a few storage ulps
# (relative l2 distance, trajectory_error).
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-13}

SHAPES = [(3, 4), (4,), (7,), (1,), (2, 3, 5)]

# One group's optimizer settings.
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
    "f_star_scaling_eps": {"momentum": 0.9, "f_star": 0.01, "scaling": 2.0, "eps": 1e-3},
}

# Whole problems: lists of (shapes, settings) groups.
SPECS = {
    "several_groups": [
        ([(7,), (33, 5)], {"momentum": 0.9, "max_norm": 3.0}),
        ([(20,)], {"lr": 0.05}),
        ([(9,), (2, 2)], {"momentum": 0.5, "adjusted_momentum": True}),
        ([(4,)], {"momentum": 0.9, "max_norm": 1e6}),  # ball never reached: scale 1
    ],
    "empty_groups": [([], {"momentum": 0.9}), (SHAPES, {"momentum": 0.9}), ([], {"max_norm": 1.0})],
    "many_tiny_tensors": [
        ([(1 + i % 13,) for i in range(150)], {"momentum": 0.9, "max_norm": 8.0}),
        ([(2 + i % 5, 3) for i in range(100)], {}),
    ],
    # A tensor of 20,001 elements: two Triton/CPU chunks (16,384) and three CUDA ones (8,192).
    "multi_chunk": [([(20001,), (7,), (1,)], {"lr": 0.5, "momentum": 0.9}), ([(33, 5)], {"momentum": 0.9, "max_norm": 3.0})],
}


def problem_loss(params, targets, active=None):
    """A smooth non-convex loss over any list of tensors: sum_i 1/2 sum((0.2 tanh(p_i) + p_i - t_i)^2).

    ``active[i]`` False leaves p_i out of the loss this step (its grad stays None).
    Computed in float64 whatever the storage dtype (on the parameters' device), so that near
    the end of training (loss ~1e-8) the fp32 run's loss is not rounding noise that the step
    size would amplify.
    """
    total = 0.0
    for i, (p, t) in enumerate(zip(params, targets)):
        if active is None or active[i]:
            x = p.to(torch.float64)
            total = total + 0.5 * ((0.2 * torch.tanh(x) + x - t.to(x.device)) ** 2).sum()
    return total


def make_groups(spec, seed=0):
    """spec: list of (shapes, hparams). Returns float64 CPU start tensors and targets per group."""
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


def backward(params, targets, active=None):
    """Fresh gradients of problem_loss; returns the (float64) loss tensor."""
    for p in params:
        p.grad = None
    loss = problem_loss(params, targets, active)
    loss.backward()
    return loss


def many_tensor_model(device, n_tensors=200):
    """fp32, bf16 and fp16 tensors of odd sizes, static grads, two groups."""
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    params = [torch.randn(1 + (37 * i) % 5000, generator=gen).to(device=device, dtype=dtypes[i % 3]).requires_grad_()
              for i in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype) * 1e-2
    half = n_tensors // 2
    return params, [{"params": params[:half], "momentum": 0.9, "max_norm": 20.0}, {"params": params[half:], "lr": 0.1}]


def replica(spec, dtype=torch.float32, device="cpu", seed=0):
    """(flat params, param groups) of make_groups(spec) in ``dtype`` on ``device``, and the targets."""
    flat, groups, targets = [], [], []
    for tensors, tgts, hparams in make_groups(spec, seed):
        params = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in tensors]
        flat += params
        targets += [t.to(device) for t in tgts]
        groups.append({"params": params, **hparams})
    return flat, groups, targets


def train(opt, params, targets, steps):
    for _ in range(steps):
        opt.step(loss=backward(params, targets))


# ----- the reference runner --------------------------------------------------------------


def run_pair(
    spec, backend, dtype=torch.float32, steps=STEPS, inactive=None, use_closure=False, seed=0, loss_as_float=False,
    perturb=None, device="cpu", **opt_kwargs,
):
    """Run FusedALIG (dtype, on ``device``) and the float64 reference from the same start for ``steps``.

    dtype: one dtype, or a list of one per tensor (over all groups, in order).
    inactive(step, flat_index) -> True leaves that tensor without a gradient at that step.
    loss_as_float: FusedALIG gets the loss as a Python float (else as the loss tensor);
    use_closure: through a closure returning it.
    perturb(step, params, loss) -> loss, applied to each of the three runs alike after the
    backward pass, may edit the gradients or the loss (e.g. to make a step that is skipped).
    Returns a namespace: fused (params), opt, exact (float64 reference params, CPU), reference,
    plain (the plain loop's params in ``dtype``, CPU), expected_step_sizes (the reference
    formula applied to the fused run's own last loss and gradients), step_sizes (the fused
    run's per-group step sizes after each step).
    """
    groups = make_groups(spec, seed)
    fused_groups, ref_groups, lowp_groups, fused_flat, ref_flat, lowp_flat, targets = [], [], [], [], [], [], []
    dtypes = iter(dtype) if isinstance(dtype, (list, tuple)) else None
    for tensors, tgts, hparams in groups:
        storage = [next(dtypes) if dtypes else dtype for _ in tensors]
        fused = [t.to(device=device, dtype=d, copy=True).requires_grad_() for t, d in zip(tensors, storage)]
        ref = [t.clone().requires_grad_() for t in tensors]
        lowp = [t.to(d, copy=True).requires_grad_() for t, d in zip(tensors, storage)]
        fused_groups.append({"params": fused, **hparams})
        ref_groups.append({"params": ref, **hparams})
        lowp_groups.append({"params": lowp, **hparams})
        fused_flat += fused
        ref_flat += ref
        lowp_flat += lowp
        targets += tgts
    fused_targets = [t.to(device) for t in targets]
    opt = FusedALIG(fused_groups, backend=backend, **opt_kwargs)
    ref_kwargs = {"eps_default": opt_kwargs["eps"]} if "eps" in opt_kwargs else {}
    ref = ReferenceALIG(ref_groups, **ref_kwargs)
    lowp_ref = ReferenceALIG(lowp_groups, **ref_kwargs)
    expected, step_sizes = None, []
    for step in range(steps):
        active = [not (inactive and inactive(step, i)) for i in range(len(fused_flat))]
        for flat, reference, tgts in ((fused_flat, None, fused_targets), (ref_flat, ref, targets), (lowp_flat, lowp_ref, targets)):
            loss = backward(flat, tgts, active)
            if perturb is not None:
                loss = perturb(step, flat, loss)
            if reference is None:
                expected = expected_step_sizes(fused_groups, float(loss.detach()), opt_kwargs.get("eps", 1e-5))
                given = float(loss.detach()) if loss_as_float else loss
                returned = opt.step(lambda: given) if use_closure else opt.step(loss=given)
                assert returned is given
                step_sizes.append([float(g["step_size"]) for g in opt.param_groups])
            else:
                reference.step(float(loss.detach()))
    return SimpleNamespace(
        fused=fused_flat, opt=opt, exact=ref_flat, reference=ref, plain=lowp_flat, expected_step_sizes=expected,
        targets=fused_targets, step_sizes=step_sizes,
    )


def expected_step_sizes(groups, loss, eps_default):
    """gamma_k = min(lr_k, max(loss - f_star_k, 0) / (c_k ||g||^2 + eps_k)), plainly."""
    grad_sq_norm = sum(float(p.grad.double().norm()) ** 2 for g in groups for p in g["params"] if p.grad is not None)
    sizes = []
    for g in groups:
        step = max(loss - g.get("f_star", 0.0), 0.0) / (g.get("scaling", 1.0) * grad_sq_norm + g.get("eps", eps_default))
        sizes.append(step if g.get("lr") is None else min(step, g["lr"]))
    return sizes


# ----- the error measure -----------------------------------------------------------------


def trajectory_error(params, exact):
    """Relative l2 distance between two lists of tensors (float64, on the CPU)."""
    def f64(t):
        return t.detach().double().cpu()

    diff = math.sqrt(sum(float((f64(p) - f64(e)).norm()) ** 2 for p, e in zip(params, exact)))
    scale = math.sqrt(sum(float(f64(e).norm()) ** 2 for e in exact))
    return diff / max(scale, 1e-12)


def assert_follows_reference(fused, exact, plain_lowp, dtype):
    fused_error = trajectory_error(fused, exact)
    plain_error = trajectory_error(plain_lowp, exact)
    bound = 3 * plain_error + FLOOR[dtype]
    assert fused_error <= bound, (
        f"FusedALIG is {fused_error:.3g} (relative) from the float64 reference; the plain loop in "
        f"{dtype} is {plain_error:.3g}; allowed {bound:.3g}"
    )


def bit_identical(a, b):
    """Same dtypes and the same bits, tensor for tensor (None matches None)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is None or y is None:
            if not (x is None and y is None):
                return False
        elif x.dtype != y.dtype or not torch.equal(x.detach().contiguous().view(-1).view(torch.uint8),
                                                    y.detach().contiguous().view(-1).view(torch.uint8)):
            return False
    return True


def snapshot(opt, params):
    """Bit-exact copies of the parameters and their momentum buffers (None when none)."""
    buffers = [opt.state[p].get("momentum_buffer") if p in opt.state else None for p in params]
    return [p.detach().clone() for p in params] + [None if b is None else b.clone() for b in buffers]


# ----- the instances, resolved -----------------------------------------------------------


def interpreter_marks(kernel, what: str) -> list:
    """The marks of a test module that runs ``kernel`` on CPU through Triton's interpreter:
    skipped when the interpreter is not active in this process (TRITON_INTERPRET unset when
    triton was imported), and fp32 -> bf16 stores rounded as the GPU rounds them."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        InterpretedFunction = ()
    return [
        pytest.mark.skipif(
            not isinstance(kernel, InterpretedFunction),
            reason="the Triton interpreter is not active in this process (TRITON_INTERPRET unset when triton was "
            f"imported); tests/test_gpu_triton.py runs {what} on the GPU",
        ),
        pytest.mark.usefixtures("bf16_round_to_nearest_even"),  # tests/conftest.py: the GPU's fp32 -> bf16 rounding
    ]


def require_backend(name: str, device: torch.device, required=frozenset()) -> None:
    """Skip (with the reason) when backend ``name`` cannot run on ``device``; fail if it is required.
    Also at a test module's top level (the module is then skipped, or fails to collect)."""
    ok, reason = backends.supports(name, device)
    if ok:
        return
    if name in required:
        pytest.fail(f"backend {name!r} is required here but unavailable: {reason}")
    pytest.skip(f"backend {name!r} unavailable on {device.type}: {reason}", allow_module_level=True)


@contextlib.contextmanager
def instance(device_type: str, variant: str, required=frozenset()):
    """Enter one (device, backend variant) instance: skip when it cannot run here; the
    variant's settings (one thread) for its duration. Yields the namespace the tests see."""
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device(device_type)
    name, _, threads = variant.partition("-")
    require_backend(name, device, required)
    steps = INTERPRETER_STEPS if name == "triton" and device.type == "cpu" else STEPS
    case = SimpleNamespace(device=device, backend=name, variant=variant, steps=steps)
    if not threads:
        yield case
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield case
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def interpreter_rounds_bf16_like_the_gpu():
    """The interpreter of triton 3.6 converts fp32 to bf16 by truncating the mantissa
    (``_convert_float`` with no rounding mode); the GPU rounds to nearest even
    (``cvt.rn.bf16.f32``), as torch does. Make the interpreter do what the GPU does, or
    bf16 trajectories drift toward zero here and nowhere else. (A no-op without triton.)"""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        yield
        return

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def rtne_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(data.view(np.uint16), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter.InterpreterBuilder, "cast_impl", rtne_cast_impl)
        yield
