"""What is specific to the C++ extension backend (backend="cpp") on CPU: the op itself
(torch.library.opcheck, argument checks, what it writes), its float64 kernels, the two
halves for sharded parameters, a large tensor through the threaded path and thread-count
independence. The trajectory, skip, AMP and state tests every backend shares run on
"cpp" and "cpp-1thread" in tests/test_alig.py (the harness's instances).
"""

from __future__ import annotations

import math

import pytest
import torch

from alig_fused import FusedALIG, backends
from conftest import require_backend
from harness import FLOOR, SPECS, assert_follows_reference, bit_identical, run_pair, snapshot, trajectory_error

CPU = torch.device("cpu")
require_backend("cpp", CPU)  # skips this module where cpp cannot run (fails it where CI requires cpp)

from alig_fused import cpp_ops  # noqa: E402 (only once the extension is known to load)


def test_odd_sizes_with_a_large_tensor():
    """1000003 elements: many chunks, a short last chunk, and the threaded path."""
    run = run_pair([([(1,), (7,), (1000003,)], {"momentum": 0.9, "max_norm": 400.0})], "cpp", steps=12)
    assert_follows_reference(run.fused, run.exact, run.plain, torch.float32)


def test_bit_identical_with_1_and_2_threads():
    spec = [
        ([(1000003,), (7,), (1,)] + [(50 + i,) for i in range(40)], {"momentum": 0.9, "max_norm": 500.0}),
        ([(300, 200), (33,)], {"momentum": 0.9, "adjusted_momentum": True, "lr": 0.2}),
    ]
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run = run_pair(spec, "cpp", steps=8)
            results[threads] = snapshot(run.opt, run.fused) + [g["step_size"].clone() for g in run.opt.param_groups]
    finally:
        torch.set_num_threads(before)
    assert bit_identical(results[1], results[2])


def test_float64_matches_reference():
    """float64 storage, math in fp32: fp32's tolerance."""
    run = run_pair(SPECS["several_groups"], "cpp", dtype=torch.float64)
    assert run.opt.last_backend == "cpp" and all(p.dtype == torch.float64 for p in run.fused)
    assert all(s["momentum_buffer"].dtype == torch.float64 for s in run.opt.state.values())
    assert trajectory_error(run.fused, run.exact) <= FLOOR[torch.float32]


def test_auto_keeps_float64_on_torch():
    assert backends.pick("auto", CPU, frozenset({torch.float64, torch.float32})) == "torch"
    assert backends.pick("cpp", CPU, frozenset({torch.float64, torch.float32})) == "cpp"


def test_float64_tensors_through_the_function():
    # The op on float64 storage agrees with torch_alig (float64 math) to fp32 precision.
    from alig_fused.functional import GroupHParams, StepInputs, torch_alig

    outs = {}
    for name, fn in (("cpp", cpp_ops.cpp_alig), ("torch", torch_alig)):
        args = op_args(max_norm=3.0, dtype=torch.float64)
        params, grads, buffers, group_index, _, loss, step_size, skipped, _, _ = args
        hparams = [GroupHParams(0.5, 0.9, False, 3.0, 1e-5, 0.0, 1.0), GroupHParams(math.inf, 0.9, True, math.inf, 1e-5, 0.1, 1.0)]
        fn(StepInputs(params=params, grads=grads, momentum_buffers=buffers, group_index=group_index,
                      group_hparams=hparams, loss=loss, step_size_out=step_size, skipped_steps=skipped), {})
        outs[name] = params + buffers
    for p, q in zip(outs["cpp"], outs["torch"]):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


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
    """A layout the kernels can walk steps as contiguous copies would; any other argument
    raises ValueError and writes nothing."""
    args = list(op_args())
    args[0], args[1], args[2], args[3] = list(args[0]), list(args[1]), list(args[2]), list(args[3])
    break_args(args)
    if message is None:
        copies = [[t.clone() for t in ts] for ts in args[:3]] + [list(args[3])] + [a.clone() for a in args[4:8]]
        copies += [a.clone() if a is not None else None for a in args[8:]]
        torch.ops.alig_fused.alig_step_(*args)
        torch.ops.alig_fused.alig_step_(*copies)
        assert bit_identical(args[0] + args[2] + [args[6]], copies[0] + copies[2] + [copies[6]])
        assert int(args[7]) == 0 and bool((args[6] > 0).all())
    else:
        before = [t.clone() for t in args[0] + args[2]] + [args[6].clone(), args[7].clone()]
        with pytest.raises(ValueError, match=message):
            torch.ops.alig_fused.alig_step_(*args)
        assert bit_identical(before, list(args[0] + args[2]) + [args[6], args[7]])


def test_non_contiguous_param_through_optimizer_raises():
    w = torch.randn(6, 4).t().requires_grad_()  # a transposed leaf: not contiguous
    opt = FusedALIG([w], backend="cpp", momentum=0.9)
    w.grad = torch.randn(6, 4).t().contiguous()
    with pytest.raises(ValueError, match="contiguous"):
        opt.step(loss=1.0)


# ---------------------------------------------------------------------------------------
# the two halves for sharded parameters: alig_sums, reduce_sums, alig_update_
# ---------------------------------------------------------------------------------------

def _group_hparams():
    from alig_fused.functional import GroupHParams

    return [GroupHParams(0.5, 0.9, False, 3.0, 1e-5, 0.0, 1.0), GroupHParams(math.inf, 0.9, True, math.inf, 1e-5, 0.1, 1.0)]


def _inputs(params, grads, buffers, group_index, loss, step_size, skipped, grad_scale=None, found_inf=None,
            reduce_sums=None):
    from alig_fused.functional import StepInputs

    return StepInputs(params=params, grads=grads, momentum_buffers=buffers, group_index=group_index,
                      group_hparams=_group_hparams(), loss=loss, step_size_out=step_size, skipped_steps=skipped,
                      grad_scale=grad_scale, found_inf=found_inf, reduce_sums=reduce_sums)


def test_identity_reduce_sums_is_the_fused_step():
    # The halves project with ||w'|| from the pass-1 sums, the fused CPU op measures it in
    # pass 2: the same scale up to rounding, so the parameters agree to fp32 precision
    # and everything else bit for bit.
    results = []
    for reduce_sums in (None, lambda sums, loss: (sums, loss)):
        params, grads, buffers, group_index, _, loss, step_size, skipped, grad_scale, found_inf = op_args(max_norm=3.0, scaled=True)
        cpp_ops.cpp_alig(_inputs(params, grads, buffers, group_index, loss, step_size, skipped, grad_scale, found_inf,
                                 reduce_sums), {})
        after = math.sqrt(sum(float(p.double().norm()) ** 2 for p, k in zip(params, group_index) if k == 0))
        assert after == pytest.approx(3.0, rel=1e-6), "the ball must bind (group 0 ends on it) for this test to mean anything"
        results.append((params, buffers + [step_size]))
    for p, q in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert bit_identical(results[0][1], results[1][1])


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
        cpp_ops.cpp_alig(_inputs(w, g, b, group_index, loss, rank_step_sizes[rank], torch.zeros((), dtype=torch.int64),
                                 reduce_sums=lambda sums, loss, other=other: (sums + other, loss)), {})
    cpp_ops.cpp_alig(_inputs(params, grads, buffers, group_index, loss, step_size, skipped), {})
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
