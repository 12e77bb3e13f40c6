"""Bad input raises a clear error and changes nothing, in every public method.

"Nothing" is checked as a whole: the param groups (hyper-parameters and parameters), the
state, the skipped-step counter, the parameters' values, the cached step plan; and the
optimizer must go on stepping exactly as a twin that never saw the bad input.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from alig_fused import FusedALIG, Lookahead, backends
from conftest import require_backend
from reference import ReferenceALIG
from harness import make_groups, problem_loss, trajectory_error

CPU = torch.device("cpu")


def snapshot(value):
    """A deep copy of groups/state/tensors to compare later (tensors cloned, lists kept in order)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    return value


def assert_same(before, after, where="optimizer"):
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor) and before.dtype == after.dtype, where
        assert torch.equal(before, after), f"{where} changed"
    elif isinstance(before, dict):
        assert isinstance(after, dict) and before.keys() == after.keys(), f"{where}: keys {before.keys()} -> {after.keys()}"
        for k in before:
            assert_same(before[k], after[k], f"{where}[{k!r}]")
    elif isinstance(before, list):
        assert isinstance(after, list) and len(before) == len(after), f"{where}: length {len(before)} -> {len(after)}"
        for i, (b, a) in enumerate(zip(before, after)):
            assert_same(b, a, f"{where}[{i}]")
    else:
        assert before == after, f"{where}: {before!r} -> {after!r}"


def optimizer_state(opt):
    """Everything a bad call must leave alone (state keyed by position, not by tensor)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "params": [id(p) for p in params],
        "values": list(params),
        "state": [opt.state[p] if p in opt.state else None for p in params],
        "n_state": len(opt.state),
        "skipped": opt.skipped_steps,
    }


def two_group_optimizer(backend="torch", seed=0):
    """Two groups (momentum + projection, plain), trained 2 steps; and a function stepping it."""
    spec = [([(3, 4), (5,)], {"lr": 0.1, "momentum": 0.9, "max_norm": 3.0}), ([(2, 3)], {"lr": 0.05})]
    groups = make_groups(spec, seed)
    params = [t.float().requires_grad_() for tensors, _, _ in groups for t in tensors]
    targets = [t for _, tgts, _ in groups for t in tgts]
    opt = FusedALIG([{"params": params[:2], **spec[0][1]}, {"params": params[2:], **spec[1][1]}], backend=backend)

    def train(steps=1):
        for _ in range(steps):
            for p in params:
                p.grad = None
            loss = problem_loss(params, targets, [True] * len(params))
            loss.backward()
            opt.step(loss=loss)

    train(2)
    return opt, params, train


def assert_unchanged_and_usable(opt, params, train, before, backend="torch"):
    """``before`` is optimizer_state(opt) before the bad call; a twin shows the next steps are unaffected."""
    assert_same(before, snapshot(optimizer_state(opt)))
    twin, twin_params, twin_train = two_group_optimizer(backend)
    train(2)
    twin_train(2)
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q), "after the rejected call the optimizer steps differently"


# ----- add_param_group --------------------------------------------------------------------

BAD_GROUPS = {
    "complex": (lambda: {"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))]}, TypeError, "complex"),
    "integer": (lambda: {"params": [torch.ones(3, dtype=torch.int64)]}, TypeError, "floating-point"),
    "momentum_1": (lambda: {"params": [torch.nn.Parameter(torch.randn(3))], "momentum": 1.0}, ValueError,
                   "param group 2: invalid momentum"),
    "lr_nan": (lambda: {"params": [torch.nn.Parameter(torch.randn(3))], "lr": math.nan}, ValueError, "lr is nan"),
    "eps_str": (lambda: {"params": [torch.nn.Parameter(torch.randn(3))], "eps": "1e-5"}, TypeError, "eps"),
    "other_device": (lambda: {"params": [torch.nn.Parameter(torch.randn(3, device="meta"))]}, RuntimeError, "one device"),
    "named_complex": (lambda: {"params": [("w", torch.nn.Parameter(torch.randn(2, dtype=torch.complex64)))]},
                      TypeError, "complex"),
}


@pytest.mark.parametrize("case", list(BAD_GROUPS))
def test_add_param_group_rejects_and_changes_nothing(case):
    opt, params, train = two_group_optimizer()
    plan = opt._plan
    before = snapshot(optimizer_state(opt))
    make, error, match = BAD_GROUPS[case]
    group = make()
    with pytest.raises(error, match=match):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 2
    assert opt._plan is plan, "a rejected group dropped the step plan"
    assert_unchanged_and_usable(opt, params, train, before)


def test_add_param_group_rejects_a_dtype_the_named_backend_cannot_take(backend):
    takes = backends.REGISTRY[backend].takes(torch.device("cpu"))
    if takes is None or torch.float64 in takes:  # torch; cpp's CPU kernels (float64 storage, fp32 math)
        pytest.skip(f"backend {backend!r} takes float64 parameters on CPU")
    opt, params, train = two_group_optimizer(backend)
    before = snapshot(optimizer_state(opt))
    with pytest.raises(TypeError, match="float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]})
    assert_unchanged_and_usable(opt, params, train, before, backend)


def test_add_param_group_after_a_rejected_one_works():
    opt, params, train = two_group_optimizer()
    new = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [new], "momentum": 1.0})
    opt.add_param_group({"params": (p for p in [new]), "momentum": 0.5})  # a generator is fine
    assert len(opt.param_groups) == 3 and opt.param_groups[2]["params"] == [new]
    assert opt.param_groups[2]["lr"] is None and opt.param_groups[2]["step_size"] is None
    new.grad = torch.ones(3)
    train(1)
    assert float(opt.param_groups[2]["step_size"]) > 0


# ----- load_state_dict --------------------------------------------------------------------


def _set(path, value):
    def edit(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _delete(*path):
    def edit(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


def _reference_format(max_lr):
    def edit(sd):
        del sd["param_groups"][0]["lr"]
        sd["param_groups"][0]["max_lr"] = max_lr

    return edit


BAD_STATE_DICTS = {
    "momentum_1": (_set(("param_groups", 1, "momentum"), 1.0), ValueError, "loaded param group 1: invalid momentum"),
    "lr_nan": (_set(("param_groups", 0, "lr"), math.nan), ValueError, "loaded param group 0: lr is nan"),
    "reference_max_lr_negative": (_reference_format(-1.0), ValueError, "loaded param group 0: invalid lr"),
    "eps_zero": (_set(("param_groups", 0, "eps"), 0.0), ValueError, "eps"),
    "skipped_float": (_set(("skipped_steps",), torch.tensor(1.5)), TypeError, "skipped_steps"),
    "skipped_shape": (_set(("skipped_steps",), torch.zeros(2, dtype=torch.int64)), ValueError, "skipped_steps"),
    "skipped_str": (_set(("skipped_steps",), "3"), TypeError, "skipped_steps"),
    "buffer_shape": (_set(("state", 0, "momentum_buffer"), torch.zeros(7)), ValueError, "momentum_buffer"),
    "buffer_complex": (_set(("state", 1, "momentum_buffer"), torch.zeros(5, dtype=torch.complex64)), TypeError,
                       "momentum_buffer"),
    "buffer_not_a_tensor": (_set(("state", 1, "momentum_buffer"), [0.0] * 5), TypeError, "momentum_buffer"),
    "group_count": (lambda sd: sd["param_groups"].pop(), ValueError, "number of parameter groups"),
    "group_size": (lambda sd: sd["param_groups"][0]["params"].pop(), ValueError, "parameters"),
    "no_state": (_delete("state"), ValueError, "'state'"),
    "groups_not_a_list": (_set(("param_groups",), {"params": [0, 1]}), TypeError, "param_groups"),
}


@pytest.mark.parametrize("case", list(BAD_STATE_DICTS))
def test_load_state_dict_rejects_and_changes_nothing(case):
    opt, params, train = two_group_optimizer()
    saved = copy.deepcopy(opt.state_dict())
    train(1)  # the optimizer has moved on since `saved`: a load would visibly change it
    before = snapshot(optimizer_state(opt))
    edit, error, match = BAD_STATE_DICTS[case]
    edit(saved)
    with pytest.raises(error, match=match):
        opt.load_state_dict(saved)
    assert_same(before, snapshot(optimizer_state(opt)))
    # a good state_dict still loads, and the bad call left no trace in the step
    other, other_params, other_train = two_group_optimizer()
    other_train(1)
    opt.load_state_dict(copy.deepcopy(other.state_dict()))  # a state_dict shares its tensors
    train(2)
    other_train(2)
    for p, q in zip(params, other_params):
        assert torch.equal(p, q)


def test_load_state_dict_accepts_a_buffer_of_another_dtype_and_an_int_counter():
    opt, params, train = two_group_optimizer()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["momentum_buffer"] = saved["state"][0]["momentum_buffer"].double()
    saved["skipped_steps"] = 4
    opt.load_state_dict(saved)
    assert opt.state[params[0]]["momentum_buffer"].dtype == torch.float32
    assert int(opt.skipped_steps) == 4


# ----- step: layout checks before any state ------------------------------------------------


def _transposed(rows, cols):
    return torch.nn.Parameter(torch.randn(cols, rows).t())


LAYOUTS = {
    # backend, make (param, grad), what the message must say
    "cpp_transposed_param_contiguous_grad": (
        "cpp", lambda: (lambda p: (p, torch.randn(4, 6)))(_transposed(4, 6)),
        r"param group 0, parameter 1 \(shape \(4, 6\)\): its gradient is contiguous .* the parameter is not",
    ),
    "cpp_strided_param": (
        "cpp", lambda: (lambda p: (p, torch.randn(4, 3)))(torch.nn.Parameter(torch.randn(4, 6)[:, ::2])),
        r"param group 0, parameter 1 .*: the parameter is not dense \(strides \(6, 2\)\)",
    ),
    # triton takes dense tensors in their parameter's layout too (channels_last, transposed):
    # what it cannot take is a gradient in another layout, or a parameter with gaps.
    "triton_transposed_param_contiguous_grad": (
        "triton", lambda: (lambda p: (p, torch.randn(4, 6)))(_transposed(4, 6)),
        r"param group 0, parameter 1 \(shape \(4, 6\)\): its gradient is contiguous .* the parameter is not",
    ),
    "triton_transposed_grad": (
        "triton", lambda: (torch.nn.Parameter(torch.randn(4, 6)), torch.randn(6, 4).t()),
        r"param group 0, parameter 1 \(shape \(4, 6\)\): its gradient is not contiguous \(strides \(1, 4\)\)",
    ),
    "triton_strided_param": (
        "triton", lambda: (lambda p: (p, torch.randn(4, 3)))(torch.nn.Parameter(torch.randn(4, 6)[:, ::2])),
        r"param group 0, parameter 1 .*: the parameter is not dense \(strides \(6, 2\)\)",
    ),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_a_layout_the_backend_cannot_take_is_rejected_before_any_state(case):
    name, make, match = LAYOUTS[case]
    require_backend(name, CPU)
    good = torch.nn.Parameter(torch.randn(3))
    bad, bad_grad = make()
    opt = FusedALIG([good, bad], lr=0.1, momentum=0.9, backend=name)
    values = [good.detach().clone(), bad.detach().clone()]
    good.grad = torch.ones(3)
    bad.grad = bad_grad
    with pytest.raises(ValueError, match=match):
        opt.step(loss=1.0)
    assert len(opt.state) == 0, "a rejected step created state"
    assert opt._plan is None
    assert torch.equal(values[0], good.detach()) and torch.equal(values[1], bad.detach())
    assert int(opt.skipped_steps) == 0
    # the torch path takes any layout: the same tensors step there
    torch_opt = FusedALIG([good, bad], lr=0.1, momentum=0.9, backend="torch")
    torch_opt.step(loss=1.0)
    assert not torch.equal(values[1], bad.detach())


def test_a_loaded_buffer_with_another_layout_is_rejected_before_any_state():
    require_backend("cpp", CPU)
    p, q = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(3))
    opt = FusedALIG([p, q], lr=0.1, momentum=0.9, backend="cpp")
    opt.load_state_dict({"state": {0: {"momentum_buffer": torch.zeros(6, 4).t()}},
                         "param_groups": [dict(opt.state_dict()["param_groups"][0])]})
    p.grad, q.grad = torch.ones(4, 6), torch.ones(3)
    with pytest.raises(ValueError, match=r"parameter 0 .*: its momentum buffer is not contiguous"):
        opt.step(loss=1.0)
    assert len(opt.state) == 1 and q not in opt.state


def test_cpp_op_names_the_layout_at_fault():
    """Called directly, the C++ op says which tensor and which layout (not 'not contiguous'
    for a contiguous gradient)."""
    require_backend("cpp", CPU)
    from alig_fused import cpp_ops  # noqa: F401 (registers the op)
    from alig_fused.functional import GroupHParams, hparams_table

    w = torch.randn(6, 4).t()
    g = torch.randn(4, 6)
    hp = hparams_table([GroupHParams(math.inf, 0.9, False, math.inf, 1e-5, 0.0, 1.0)], CPU, None)
    args = ([w], [g], [torch.zeros_like(w)], [0], hp, torch.tensor(1.0, dtype=torch.float64),
            torch.zeros(1), torch.zeros((), dtype=torch.int64), None, None)
    with pytest.raises(ValueError, match=r"grads\[0\] is contiguous .* params\[0\] is not") as info:
        torch.ops.alig_fused.alig_step_(*args)
    assert "grads[0] is not contiguous" not in str(info.value)


# ----- a skipped step and missing buffers --------------------------------------------------


def test_a_first_gradient_on_a_skipped_step_leaves_the_trajectory_unchanged(backend):
    """A parameter whose first gradient arrives on a skipped step gets its momentum buffer
    created, zero-filled (the skip is known only on the device, after the buffers are
    handed to the kernels). That buffer is what the first real step starts from anyway, so
    the trajectory is the reference's, which creates no buffer on a skipped step."""
    spec = [([(3, 4), (5,)], {"lr": 0.1, "momentum": 0.9, "max_norm": 3.0})]
    (tensors, targets, hp), = make_groups(spec)
    fused = [t.float().requires_grad_() for t in tensors]
    exact = [t.clone().requires_grad_() for t in tensors]
    opt = FusedALIG(fused, backend=backend, **hp)
    ref = ReferenceALIG([{"params": exact, **hp}])
    for step in range(6):
        active = [True, step >= 2]  # tensor 1's first gradient comes on step 2, which is skipped
        for params, stepper in ((fused, opt.step), (exact, None)):
            for p in params:
                p.grad = None
            loss = problem_loss(params, targets, active)
            loss.backward()
            value = math.nan if step == 2 else loss.detach()
            if stepper is None:
                ref.step(float(value))
            else:
                before = fused[1].detach().clone()
                stepper(loss=value)
                if step == 2:
                    assert torch.equal(before, fused[1].detach())
                    assert torch.equal(opt.state[fused[1]]["momentum_buffer"], torch.zeros_like(fused[1]))
    assert int(opt.skipped_steps) == 1 and ref.skipped == 1
    assert trajectory_error(fused, exact) < 1e-5


# ----- Lookahead ---------------------------------------------------------------------------


def lookahead_optimizer(backend="torch"):
    opt, params, train = two_group_optimizer()
    look = Lookahead(opt, k=2, alpha=0.5, backend=backend)
    return look, params


def lookahead_state(look):
    return {"inner": snapshot(optimizer_state(look.optimizer)), "k": look.k, "alpha": look.alpha,
            "step": snapshot(look.lookahead_step),
            "slow": [snapshot(look.state[p].get("slow_param")) for p in look._params()], "n_state": len(look.state)}


BAD_LOOKAHEAD = {
    "k_zero": (_set(("lookahead", "k"), 0), ValueError, "k"),
    "k_float": (_set(("lookahead", "k"), 2.5), ValueError, "k"),
    "alpha_2": (_set(("lookahead", "alpha"), 2.0), ValueError, "alpha"),
    "alpha_nan": (_set(("lookahead", "alpha"), math.nan), ValueError, "alpha"),
    "step_shape": (_set(("lookahead", "step"), torch.zeros(3, dtype=torch.int64)), ValueError, "step"),
    "step_float": (_set(("lookahead", "step"), torch.tensor(1.5)), TypeError, "step"),
    "slow_index": (_set(("lookahead", "slow_params", 7), torch.zeros(3)), ValueError, "slow_params"),
    "slow_shape": (_set(("lookahead", "slow_params", 0), torch.zeros(7)), ValueError, "slow_params"),
    "no_lookahead": (_delete("lookahead"), ValueError, "not a Lookahead state_dict"),
    "inner_momentum_1": (_set(("inner", "param_groups", 0, "momentum"), 1.0), ValueError, "momentum"),
    "inner_skipped": (_set(("inner", "skipped_steps"), "x"), TypeError, "skipped_steps"),
}


@pytest.mark.parametrize("case", list(BAD_LOOKAHEAD))
def test_lookahead_load_state_dict_rejects_and_changes_nothing(case):
    look, params = lookahead_optimizer()
    for _ in range(3):
        look.zero_grad()
        problem_loss(params, [torch.zeros_like(p, dtype=torch.float64) for p in params], [True] * 3).backward()
        look.step(loss=1.0)
    saved = copy.deepcopy(look.state_dict())
    edit, error, match = BAD_LOOKAHEAD[case]
    edit(saved)
    look.step(loss=1.0)  # moved on since `saved`
    before = lookahead_state(look)
    with pytest.raises(error, match=match):
        look.load_state_dict(saved)
    assert_same(before, lookahead_state(look))


def test_lookahead_add_param_group_rejects_and_changes_nothing():
    look, params = lookahead_optimizer()
    before = lookahead_state(look)
    with pytest.raises(ValueError, match="momentum"):
        look.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "momentum": 1.0})
    assert_same(before, lookahead_state(look))


@pytest.mark.parametrize("param", ["float64", "strided"])
def test_lookahead_rejects_before_the_inner_step(param):
    """A named Lookahead backend that cannot address the parameters raises before the inner
    optimizer steps (the inner step and the slow-weight update are one step)."""
    require_backend("triton", CPU)
    if not backends.triton_interpreting():
        pytest.skip("Lookahead's triton backend runs on CPU tensors only through the interpreter")
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64) if param == "float64" else torch.randn(4, 12)[:, ::2])
    look = Lookahead(FusedALIG([p], lr=0.1, momentum=0.9, backend="torch"), k=2, backend="triton")
    before = lookahead_state(look)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="float32, bfloat16 and float16" if param == "float64" else "not contiguous nor dense"):
        look.step(loss=1.0)
    assert_same(before, lookahead_state(look))
