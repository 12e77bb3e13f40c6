"""The Triton backend on CPU tensors, through the Triton interpreter, against the float64
per-parameter reference loop (tests/reference.py) and the torch backend.

The interpreter costs ~10 ms per program, so the models are small and most tests cut
chunks of 64 elements in blocks of 16 (the ``small_chunks`` fixture): tensors of a few
hundred elements then span several chunks, and both kernel paths (whole aligned chunks
in a constant-trip loop; masked tails) and loops of several iterations run.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

# tests/conftest.py selects the interpreter (TRITON_INTERPRET=1) before triton is imported
# when there is no CUDA; with CUDA the kernels are compiled and tests/test_gpu_triton.py
# covers them. The trajectory, skip, AMP and state tests every backend shares run on
# "triton" in tests/test_alig.py; this file holds what is specific to the Triton kernels:
# chunking, tables, launches, the interpreter's rounding, capture bookkeeping.

pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from alig_fused import triton_kernels as tk  # noqa: E402
from alig_fused import triton_tables  # noqa: E402
from alig_fused.functional import GroupHParams, StepInputs, torch_alig  # noqa: E402
from harness import (  # noqa: E402
    FLOOR, assert_follows_reference, bit_identical, interpreter_marks, make_groups, run_pair, trajectory_error,
)
from reference import ReferenceALIG  # noqa: E402

pytestmark = interpreter_marks(tk._alig_pass1_kernel, "the kernels")

STEPS = 50


def run(spec, steps, dtype=torch.float32, inactive=None, with_torch=True, **opt_kwargs):
    """The Triton run against the float64 reference and the plain loop in ``dtype``
    (harness.run_pair), and the torch backend from the same start (or None)."""
    tri = run_pair(spec, "triton", dtype=dtype, steps=steps, inactive=inactive, **opt_kwargs)
    other = run_pair(spec, "torch", dtype=dtype, steps=steps, inactive=inactive, **opt_kwargs) if with_torch else None
    return tri, other


def assert_matches_torch_backend(tri, other, dtype=torch.float32):
    """Same storage dtype, same math: the two backends agree to the calibrated bound, and
    their step sizes step for step."""
    assert_follows_reference(tri.fused, tri.exact, tri.plain, dtype)
    plain_error = trajectory_error(tri.plain, tri.exact)
    gap = trajectory_error(tri.fused, other.fused)
    assert gap <= 3 * plain_error + FLOOR[dtype], f"triton and torch backends differ by {gap:.3g} (relative)"
    for tri_sizes, ref_sizes in zip(tri.step_sizes, other.step_sizes):
        assert tri_sizes == pytest.approx(ref_sizes, rel=1e-4, abs=1e-9)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 elements in blocks of 16: multi-chunk tensors and multi-block loops."""
    monkeypatch.setattr(tk, "CHUNK", 64)
    monkeypatch.setattr(tk, "BLOCK", 16)


@pytest.fixture
def launch_log(monkeypatch):
    """Records the kernel of every launch (and still launches it)."""
    log = []
    launch = tk._launch

    def counting_launch(kernel, grid, *args, **meta):
        log.append(kernel)
        launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(tk, "_launch", counting_launch)
    return log


# ---------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------

GROUPS_SPEC = [
    ([(10, 13), (7,)], {"lr": 0.05, "momentum": 0.9, "max_norm": 2.0}),  # standard momentum, projection
    ([(1,), (64,)], {"lr": None, "momentum": 0.5, "adjusted_momentum": True}),  # adjusted, no cap
    ([(3, 4)], {"lr": 0.1, "max_norm": 1.5}),  # no momentum, projection
    ([], {"lr": 0.1}),  # an empty group
    ([(5,), (2, 2)], {"lr": None, "eps": 1e-3, "f_star": 0.01, "scaling": 2.0}),  # no momentum, no cap
]


def test_groups_match_reference_and_torch(small_chunks, launch_log):
    """Several groups with different settings, missing grads, odd sizes, 50 steps."""

    def inactive(step, i):
        # tensor 2 (shape (1,)) never has a gradient; tensor 5 only on even steps
        return i == 2 or (i == 5 and step % 2 == 1)

    tri, other = run(GROUPS_SPEC, STEPS, inactive=inactive)
    assert_matches_torch_backend(tri, other)
    opt = tri.opt
    # the projection was active: the first group ends on its sphere of radius 2
    norm = math.sqrt(sum(float(p.detach().double().norm()) ** 2 for p in tri.fused[:2]))
    assert norm == pytest.approx(2.0, rel=1e-5)
    # never stepped: bit-identical to its start, and no momentum buffer
    assert torch.equal(tri.fused[2].detach(), make_groups(GROUPS_SPEC)[1][0][0].float())
    assert tri.fused[2] not in opt.state
    assert int(opt.skipped_steps) == 0
    assert len(launch_log) <= 3 * STEPS
    assert launch_log.count(tk._alig_finalize_kernel) == STEPS


def test_default_chunking_matches_reference():
    """The shipped CHUNK/BLOCK: a tensor of a whole chunk plus a tail, and odd sizes."""
    spec = [([(tk.CHUNK + 1000,), (7,), (1,)], {"lr": 0.1, "momentum": 0.9, "max_norm": 30.0})]
    assert_matches_torch_backend(*run(spec, 4))


def test_large_odd_tensor(monkeypatch):
    """1000003 elements (61 whole chunks and a tail) and a scalar, projection binding, two
    steps through the functional entry point (the optimizer's own start projection is not
    this backend's business). BLOCK = CHUNK keeps the interpreter at one loop iteration
    per chunk; the loops are exercised by the other tests."""
    monkeypatch.setattr(tk, "BLOCK", tk.CHUNK)
    gen = torch.Generator().manual_seed(3)
    shapes = [(1000003,), (1,)]
    start = [torch.randn(s, generator=gen) for s in shapes]  # norm ~1000: outside the ball
    grads = [[torch.randn(s, generator=gen) * 1e-2 for s in shapes] for _ in range(2)]
    group = hparams(lr=0.5, momentum=0.9, max_norm=900.0)
    ref_params = [p.double().requires_grad_() for p in start]
    reference = ReferenceALIG([{"params": ref_params, "lr": 0.5, "momentum": 0.9}])
    reference.groups[0]["max_norm"] = 900.0  # set after construction: no start projection
    runs, caches = {}, {}
    for name, fn in (("triton", tk.triton_alig), ("torch", torch_alig)):
        params = [p.clone() for p in start]
        buffers = [torch.zeros_like(p) for p in start]
        caches[name] = {}
        for step in range(2):
            step_size, _ = call_step(params, grads[step], buffers, [0, 0], [group], 3.0, backend=fn,
                                     cache=caches[name])
        runs[name] = params, step_size
    for step in range(2):
        for p, g in zip(ref_params, grads[step]):
            p.grad = g.double()
        reference.step(3.0)
    assert caches["triton"]["tables"].n_chunks == 62 + 1
    assert trajectory_error(start, ref_params) > 1e-3  # the steps moved the parameters
    params, step_size = runs["triton"]
    assert trajectory_error(params, ref_params) < 1e-6
    assert float(step_size[0]) == pytest.approx(reference.step_sizes[0], rel=1e-6)
    norm = math.sqrt(sum(float(p.double().norm()) ** 2 for p in params))
    assert norm == pytest.approx(900.0, rel=1e-6)
    # The torch path is looser here: fp32 CPU norms of 1M elements are off by ~1e-5 (measured).
    assert trajectory_error(params, runs["torch"][0]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)  # fp16: tests/test_alig.py, one chunk
def test_low_precision(small_chunks, dtype):
    """bf16/fp16 storage, fp32 math, buffers in the storage dtype. Looser tolerance: the
    floor is a few storage ulps (FLOOR), above 3x the plain loop's own error in that dtype."""
    spec = [([(10, 13), (7,), (1,)], {"lr": 0.1, "momentum": 0.9, "max_norm": 2.0})]
    tri, other = run(spec, STEPS, dtype=dtype)
    assert_matches_torch_backend(tri, other, dtype)
    for p in tri.fused:
        assert p.dtype == dtype
        assert tri.opt.state[p]["momentum_buffer"].dtype == dtype


def test_mixed_dtypes_one_model(small_chunks, launch_log):
    """fp32, bf16 and fp16 tensors in one model, several chunks each: still three launches
    per step, and each dtype as close to the torch backend as a few of its ulps (the
    reference bound per dtype: tests/test_alig.py test_mixed_dtypes_in_one_model)."""
    spec = [
        ([(10, 13), (7,)], {"lr": 0.1, "momentum": 0.9, "max_norm": 3.0}),
        ([(9, 9), (1,)], {"lr": 0.1, "momentum": 0.9, "max_norm": 3.0}),
        ([(33,)], {"lr": 0.05}),
    ]
    dtypes = [torch.float32] * 2 + [torch.bfloat16] * 2 + [torch.float16]
    steps = 10
    tri, other = run(spec, steps, dtype=dtypes)
    assert len(launch_log) == 3 * steps
    assert [p.dtype for p in tri.fused] == dtypes
    for dtype, idx in ((torch.float32, [0, 1]), (torch.bfloat16, [2, 3]), (torch.float16, [4])):
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        assert_follows_reference(pick(tri.fused), pick(tri.exact), pick(tri.plain), dtype)
        gap = trajectory_error(pick(tri.fused), pick(other.fused))
        assert gap <= 2 * FLOOR[dtype], f"{dtype}: triton and torch differ by {gap:.3g}"


def test_many_tiny_tensors(launch_log):
    """300 tensors of 1-3 elements in 3 groups: one program each, still 3 launches."""
    shapes = [(1 + i % 3,) for i in range(300)]
    spec = [
        (shapes[:100], {"lr": 0.2, "momentum": 0.9}),
        (shapes[100:200], {"lr": 0.1, "max_norm": 5.0}),
        (shapes[200:], {"lr": None, "momentum": 0.5, "adjusted_momentum": True}),
    ]
    tri, _ = run(spec, 1, with_torch=False)
    assert_follows_reference(tri.fused, tri.exact, tri.plain, torch.float32)
    assert len(launch_log) == 3


def test_launch_count_does_not_grow(monkeypatch):
    """<= 3 launches per step for 3 and for 3000 tensors (launches recorded, not run)."""
    launched = []
    monkeypatch.setattr(tk, "_launch", lambda kernel, grid, *args, **meta: launched.append((kernel, grid)))
    for n_tensors in (3, 3000):
        launched.clear()
        params = [torch.zeros(5) for _ in range(n_tensors)]
        grads = [torch.ones(5) for _ in range(n_tensors)]
        buffers = [torch.zeros(5) for _ in range(n_tensors)]
        call_step(params, grads, buffers, [0] * n_tensors, [hparams(momentum=0.9, max_norm=1.0)], loss=1.0)
        assert [k for k, _ in launched] == list(tk.KERNELS)
        assert launched[0][1] == (n_tensors,)  # one program per chunk, one grid


# ---------------------------------------------------------------------------------------
# The functional entry point: reduce_sums, no tensors, validation
# ---------------------------------------------------------------------------------------


def hparams(lr=math.inf, momentum=0.0, adjusted=False, max_norm=math.inf, eps=1e-5, f_star=0.0, scaling=1.0):
    return GroupHParams(lr, momentum, adjusted, max_norm, eps, f_star, scaling)


def call_step(params, grads, buffers, group_index, group_hparams, loss, backend=None, **kwargs):
    step_size = torch.zeros(len(group_hparams))
    skipped = torch.zeros((), dtype=torch.int64)
    cache = kwargs.pop("cache", {})
    (backend or tk.triton_alig)(StepInputs(
        params=params, grads=grads, momentum_buffers=buffers, group_index=group_index, group_hparams=group_hparams,
        loss=torch.tensor(loss, dtype=torch.float64), step_size_out=step_size, skipped_steps=skipped, **kwargs,
    ), cache)
    return step_size, skipped


def test_reduce_sums_matches_torch(small_chunks, launch_log):
    """reduce_sums (the sharded path) runs between the finalize launches; here it stands
    for a 2-rank all-reduce of identical shards: sums and loss doubled, loss averaged."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(10, 13), (7,), (1,)]
    group_hparams = [hparams(lr=0.3, momentum=0.9, max_norm=3.0), hparams(lr=0.2)]
    group_index = [0, 0, 1]
    calls = []

    def reduce_sums(sums, loss):
        calls.append(sums.shape)
        return sums * 2, (loss * 2) / 2

    states = {}
    for name, fn in (("triton", tk.triton_alig), ("torch", torch_alig)):
        params = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
        buffers = [torch.zeros_like(params[0]), torch.zeros_like(params[1]), torch.empty(0)]
        step_sizes = []
        for _ in range(3):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            step_size, _ = call_step(params, grads, buffers, group_index, group_hparams, 2.5, backend=fn,
                                     reduce_sums=reduce_sums)
            step_sizes.append(step_size)
        states[name] = (params, buffers, step_sizes)
        gen.manual_seed(1)
    assert launch_log.count(tk._alig_finalize_kernel) == 6 and len(launch_log) == 12  # 4 launches a step
    assert calls == [(2, 6)] * 6
    for tri, ref in zip(states["triton"][0] + states["triton"][1], states["torch"][0] + states["torch"][1]):
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)
    for tri, ref in zip(states["triton"][2], states["torch"][2]):
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=0)


def test_no_tensors_only_finalize(launch_log):
    """No gradient anywhere: only the finalize runs (step size from G = 0), or it skips."""
    step_size, skipped = call_step([], [], [], [], [hparams(lr=0.5), hparams()], loss=2.0)
    assert launch_log == [tk._alig_finalize_kernel]
    assert step_size.tolist() == [0.5, pytest.approx(2.0 / 1e-5)]
    assert int(skipped) == 0
    step_size, skipped = call_step([], [], [], [], [hparams(lr=0.5)], loss=float("nan"))
    assert step_size.tolist() == [0.0] and int(skipped) == 1


def test_tables_cached_until_tensors_change(small_chunks):
    params = [torch.randn(100), torch.randn(7)]
    buffers = [torch.zeros(100), torch.empty(0)]
    cache = {}
    grads = [torch.randn(100), torch.randn(7)]
    call_step(params, grads, buffers, [0, 1], [hparams(momentum=0.9), hparams()], 1.0, cache=cache)
    tables = cache["tables"]
    assert tables.n_chunks == 3
    call_step(params, grads, buffers, [0, 1], [hparams(momentum=0.9), hparams(lr=0.1)], 1.0, cache=cache)
    assert cache["tables"] is tables  # a new lr: a new hparams table, the same tensor table
    call_step(params, [g.clone() for g in grads], buffers, [0, 1], [hparams(momentum=0.9), hparams()], 1.0, cache=cache)
    assert cache["tables"] is not tables  # new gradient tensors: rebuilt
    tables = cache["tables"]
    for new_buffers in ([torch.zeros(100), torch.empty(0)], [torch.zeros(1), torch.empty(0)]):
        # new buffer tensors with the same values (one element: == would call them equal)
        one = new_buffers[0].numel() == 1
        ps, gs = ([torch.randn(1), grads[1]], [torch.randn(1), grads[1]]) if one else (params, grads)
        if one:
            call_step(ps, gs, [torch.zeros(1), torch.empty(0)], [0, 1], [hparams(momentum=0.9), hparams()], 1.0,
                      cache=cache)
            tables = cache["tables"]
        call_step(ps, gs, new_buffers, [0, 1], [hparams(momentum=0.9), hparams()], 1.0, cache=cache)
        assert cache["tables"] is not tables
        tables = cache["tables"]


@pytest.mark.parametrize("what", ["param", "grad", "buffer"])
def test_layouts_the_kernels_cannot_address_rejected(what):
    """A view with gaps, or a gradient/buffer laid out unlike its (dense) parameter."""
    w, g, b = torch.randn(4, 6), torch.randn(4, 6), torch.zeros(4, 6)
    if what == "param":
        w, match = torch.randn(4, 12)[:, ::2], "not contiguous nor dense"
    elif what == "grad":
        g, match = torch.randn(6, 4).t(), "the gradient of tensor 0 has strides"
    else:
        b, match = torch.zeros(6, 4).t(), "the momentum buffer of tensor 0 has strides"
    before = [t.clone() for t in (w, g, b)]
    with pytest.raises(ValueError, match=match):
        call_step([w], [g], [b], [0], [hparams(momentum=0.9)], 1.0)
    assert all(torch.equal(t, t0) for t, t0 in zip((w, g, b), before))


def test_float64_rejected():
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        call_step([torch.zeros(3, dtype=torch.float64)], [torch.ones(3, dtype=torch.float64)], [torch.empty(0)], [0],
                  [hparams()], 1.0)


def test_unaligned_tensors(small_chunks):
    """Views at odd offsets take the masked path; same result as aligned copies."""
    base_w, base_g, base_b = torch.randn(200), torch.randn(200), torch.randn(200)
    views = [t[1:131] for t in (base_w, base_g, base_b)]  # 4-byte offset: not 16-byte aligned
    copies = [t.clone() for t in views]
    outside = [base_w[0].clone(), base_w[131:].clone(), base_b[0].clone(), base_b[131:].clone()]
    group = [hparams(lr=0.5, momentum=0.9, max_norm=4.0)]
    cache = {}
    call_step([views[0]], [views[1]], [views[2]], [0], group, 3.0, cache=cache)
    assert cache["tables"].meta[8 + 7].item() == 0  # first chunk: full length, but unaligned
    call_step([copies[0]], [copies[1]], [copies[2]], [0], group, 3.0)
    torch.testing.assert_close(views[0], copies[0], rtol=0, atol=0)
    torch.testing.assert_close(views[2], copies[2], rtol=0, atol=0)
    assert bit_identical([base_w[0], base_w[131:], base_b[0], base_b[131:]], outside)  # nothing outside written


def test_bf16_stores_round_to_nearest_even():
    """With the fixture above, an fp32 -> bf16 store rounds as torch (and the GPU) does."""
    import triton

    @triton.jit
    def store_kernel(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs))

    x = torch.randn(1024, generator=torch.Generator().manual_seed(0))
    x[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, float("inf"), -0.0])  # ties to even, inf, -0
    y = torch.empty(1024, dtype=torch.bfloat16)
    store_kernel[(1,)](x, y, N=1024)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


# ---------------------------------------------------------------------------------------
# CUDA graphs and streams, simulated on CPU: ``triton_tables.capturing`` is what the launchers ask
# (torch.cuda.is_current_stream_capturing() on CUDA); the code path is the one a capture takes.
# ---------------------------------------------------------------------------------------


def _table_refs(tables):
    return [weakref.ref(t) for t in tables if isinstance(t, torch.Tensor)]


def _alive(refs):
    gc.collect()
    return [r() is not None for r in refs]


def test_tables_a_capture_used_stay_alive(monkeypatch):
    """A graph replays the raw addresses of the tables it captured: new gradient tensors
    (a new key) must not free them; tables no capture used are freed as before."""
    params, buffers = [torch.randn(100), torch.randn(7)], [torch.zeros(100), torch.empty(0)]
    groups = [hparams(momentum=0.9), hparams()]
    grads = [[torch.randn(100), torch.randn(7)] for _ in range(4)]  # all alive: four sets of addresses
    cache = {}
    call_step(params, grads[0], buffers, [0, 1], groups, 1.0, cache=cache)
    eager_only = _table_refs(cache["tables"])
    call_step(params, grads[1], buffers, [0, 1], groups, 1.0, cache=cache)  # rebuilt
    assert _alive(eager_only) == [False] * 5  # the weakrefs do see a table freed

    call_step(params, grads[2], buffers, [0, 1], groups, 1.0, cache=cache)  # the eager warm-up: builds them
    monkeypatch.setattr(triton_tables, "capturing", lambda device: True, raising=False)
    call_step(params, grads[2], buffers, [0, 1], groups, 1.0, cache=cache)  # "captured"
    monkeypatch.setattr(triton_tables, "capturing", lambda device: False, raising=False)
    captured = _table_refs(cache["tables"])
    call_step(params, grads[3], buffers, [0, 1], groups, 1.0, cache=cache)
    assert _alive(captured) == [True] * 5
    assert len(cache["captured"]) == 1


def test_rebuild_during_capture_is_an_error(monkeypatch):
    params, buffers, grads = [torch.randn(100)], [torch.zeros(100)], [[torch.randn(100)] for _ in range(2)]
    cache = {}
    call_step(params, grads[0], buffers, [0], [hparams(momentum=0.9)], 1.0, cache=cache)
    tables, before = cache["tables"], [t.clone() for t in params + buffers]
    monkeypatch.setattr(triton_tables, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="changed while a CUDA graph is being captured"):
        call_step(params, grads[1], buffers, [0], [hparams(momentum=0.9)], 1.0, cache=cache)
    assert cache["tables"] is tables and bit_identical(params + buffers, before)


def test_tables_recorded_on_another_stream(monkeypatch):
    """Used on a stream other than the one they were made on: record_stream, once per stream."""
    recorded = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: recorded.append((t, stream)), raising=False)
    stream = ["made"]
    monkeypatch.setattr(triton_tables, "current_stream", lambda device: stream[0])
    monkeypatch.setattr(triton_tables, "capturing", lambda device: False)
    cuda = type("FakeCuda", (), {"type": "cuda"})()
    tables = tk._build_tables([torch.randn(10)], [torch.randn(10)], [torch.zeros(10)], [0], 1, torch.device("cpu"),
                              tk.CHUNK)
    cache = {}
    triton_tables.keep_alive(tables, cuda, cache, rebuilt=True)
    triton_tables.keep_alive(tables, cuda, cache, rebuilt=False)
    assert recorded == []
    stream[0] = "side"
    triton_tables.keep_alive(tables, cuda, cache, rebuilt=False)
    triton_tables.keep_alive(tables, cuda, cache, rebuilt=False)
    tensors = [t for t in tables if isinstance(t, torch.Tensor)]
    assert len(recorded) == len(tensors) and all(s == "side" for _, s in recorded)
    assert all(any(t is r for r, _ in recorded) for t in tensors)


def test_cache_hit_has_no_per_tensor_python_work(monkeypatch):
    """The per-step host cost (bench/host_cost.py): on a cache hit the table lookup makes no
    per-tensor Python calls (no is_contiguous, numel, dtype); a miss still checks every tensor."""
    n = 50
    params, grads, buffers = ([torch.randn(8) for _ in range(n)] for _ in range(3))
    cache, calls = {}, []
    monkeypatch.setattr(tk, "_launch", lambda kernel, grid, *args, **meta: None)  # the host side only
    call_step(params, grads, buffers, [0] * n, [hparams(momentum=0.9)], 1.0, cache=cache)
    for name in ("is_contiguous", "numel", "stride"):
        original = getattr(torch.Tensor, name)
        counted = lambda t, *a, _f=original, _n=name, **k: calls.append(_n) or _f(t, *a, **k)  # noqa: E731
        monkeypatch.setattr(torch.Tensor, name, counted)
    call_step(params, grads, buffers, [0] * n, [hparams(momentum=0.9)], 1.0, cache=cache)
    assert len(calls) < n // 5, calls  # the scalar inputs' checks, not one per tensor
    call_step(params, [g.clone() for g in grads], buffers, [0] * n, [hparams(momentum=0.9)], 1.0, cache=cache)
    assert calls.count("stride") >= n  # the rebuild checks every layout


# ---------------------------------------------------------------------------------------
# The finalize with many groups, against the spec (functional.finalize)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_loss", [False, True])
def test_finalize_with_640_groups_matches_spec(small_chunks, bad_loss):
    """640 groups (20 tiles), groups of 0 to 5 chunks and one of 150, different settings
    per group: the finalize launch alone, on random partial sums, against
    functional.finalize on the same sums added in float64."""
    from alig_fused.functional import finalize, hparams_table

    n_groups = 640
    gen = torch.Generator().manual_seed(11)
    params, group_index = [], []
    for k in range(n_groups):
        if k % 50 == 3:
            continue  # a group without tensors
        chunks = 150 if k == 7 else k % 5 + 1
        params.append(torch.zeros(64 * chunks - (k % 3)))
        group_index.append(k)
    group_hparams = [hparams(lr=0.5 if k % 2 else math.inf, momentum=0.9 * (k % 3 != 0), adjusted=k % 4 == 1,
                             max_norm=1.0 + k % 7 if k % 3 == 2 else math.inf, eps=1e-5, f_star=0.01 * (k % 2),
                             scaling=1.0 + (k % 5 == 0)) for k in range(n_groups)]
    tables = tk._build_tables(params, params, params, group_index, n_groups, torch.device("cpu"), tk.CHUNK)
    assert tables.n_chunks > 1000
    partial = torch.rand(tables.n_chunks, 6, generator=gen) * 4
    partial[:, 3:] -= 2  # the cross terms take both signs
    tables.partial.copy_(partial)
    loss = torch.tensor(float("nan") if bad_loss else 2.5, dtype=torch.float64)
    hp = hparams_table(group_hparams, torch.device("cpu"), None)
    step_size = torch.zeros(n_groups)
    skipped = torch.zeros((), dtype=torch.int64)
    grad_scale, found_inf = torch.ones(()), torch.zeros(())
    finalizes = [launch for launch in tk.launches(tables, hp, loss, grad_scale, found_inf, step_size, skipped)
                 if launch[0] is tk._alig_finalize_kernel]
    assert len(finalizes) == 1 and finalizes[0][3]["TILE"] == tk.FINALIZE_TILE
    for kernel, grid, args, meta in finalizes:
        tk._launch(kernel, grid, *args, **meta)

    meta_rows = tables.meta[8: 8 + 8 * tables.n_chunks].reshape(-1, 8)
    sums = torch.zeros(n_groups, 6, dtype=torch.float64).index_add_(0, meta_rows[:, 4], partial.double())
    want_step, want_coefs, want_skip = finalize(sums, loss, hp)
    assert int(skipped) == int(want_skip) == int(bad_loss) and int(tables.skip) == int(bad_loss)
    torch.testing.assert_close(tables.group_sums, sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step_size, want_step.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(tables.coefs[:n_groups], want_coefs.float(), rtol=1e-6, atol=1e-7)
    if not bad_loss:
        assert (tables.coefs[:, 4] < 1).sum() > 10  # the projection binds in many groups


def test_optimizer_passes_the_gradients_addresses_and_the_tables_follow_them(monkeypatch):
    """FusedALIG reads the gradients' addresses in its per-step check (StepInputs.grad_addresses)
    and the Triton tables key on them: a gradient moved to a new address (the old one still
    alive, so the address cannot be reused) rebuilds the tables, and the step reads it there
    (the trajectory is the torch backend's)."""
    from alig_fused import FusedALIG, backends

    passed = []

    def recording_triton(step, cache):
        passed.append(step.grad_addresses)
        tk.triton_alig(step, cache)

    backends.load("triton")
    monkeypatch.setitem(backends._loaded, "triton", recording_triton)
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(7, generator=gen), torch.randn(3, 4, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]
    runs, seen = {}, []
    for backend in ("triton", "torch"):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = FusedALIG(params, lr=0.5, momentum=0.9, backend=backend)
        kept = []
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    kept.append(p.grad)  # alive: the new gradient gets another address
                    p.grad = g.clone()
            opt.step(loss=2.0)
            if backend == "triton":
                tables = opt._cache["triton"]["tables"]
                assert opt._cache["triton"]["tables_key"][2] == [p.grad.data_ptr() for p in params]
                seen.append(tables)
        runs[backend] = [p.detach().clone() for p in params]
    assert len({id(t) for t in seen}) == 3  # rebuilt at every step: new gradient addresses
    # the first step makes the plan (the backend reads the addresses), the others pass them
    assert passed[0] is None and all(isinstance(a, list) and len(a) == 2 for a in passed[1:]) and len(passed) == 3
    for tri, ref in zip(runs["triton"], runs["torch"]):
        torch.testing.assert_close(tri, ref, rtol=1e-6, atol=1e-7)
