"""Lookahead's Triton update on CPU tensors, through the Triton interpreter: trajectories
against the plain per-parameter Lookahead loop (tests/test_extras.py) around the plain
ALI-G reference, the update bit for bit, one launch per update, state_dict, backend choice.

Chunks of 64 elements in blocks of 16 and 3 programs (the ``small_chunks`` fixture): a
tensor of 130 elements spans whole aligned chunks and a masked tail, and each program of
the persistent grid loops over several chunks. tests/test_gpu_triton.py runs the kernel
on a GPU; tests/test_triton_compile.py compiles it for sm_80/sm_90.
"""

from __future__ import annotations

import copy

import pytest
import torch

# tests/conftest.py selects the interpreter (TRITON_INTERPRET=1) before triton is imported.

pytest.importorskip("triton")

from alig_fused import BackendUnavailableError, FusedALIG, Lookahead  # noqa: E402
from alig_fused import triton_lookahead as tla  # noqa: E402
from harness import SHAPES, assert_follows_reference, interpreter_marks, make_groups, problem_loss  # noqa: E402
from test_extras import lookahead_reference  # noqa: E402


pytestmark = interpreter_marks(tla._lookahead_kernel, "the kernel")

STEPS = 30
K = 3
ALPHA = 0.5
# SHAPES of tests/test_alig.py plus tensors of several chunks (130: two whole chunks and a tail).
LOOKAHEAD_SHAPES = SHAPES + [(10, 13), (64,)]
HPARAMS = {"lr": 0.1, "momentum": 0.9, "max_norm": 3.0}


@pytest.fixture
def small_chunks(monkeypatch):
    """The Lookahead table in chunks of 64 elements, blocks of 16; 3 programs. (The ALI-G
    kernels keep their chunks: one program per tensor here, the interpreter's cost.)"""
    monkeypatch.setattr(tla, "CHUNK", 64)
    monkeypatch.setattr(tla, "BLOCK", 16)
    monkeypatch.setattr(tla, "INTERPRETER_PROGRAMS", 3)


@pytest.fixture
def launch_log(monkeypatch):
    """Records every launch of the Lookahead launcher (and still launches it)."""
    log = []
    launch = tla._launch

    def recording_launch(kernel, grid, *args, **meta):
        log.append((kernel, grid))
        launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(tla, "_launch", recording_launch)
    return log


def bits(t):
    return t.detach().reshape(-1).view(torch.uint8)


def bit_identical(a, b):
    return len(a) == len(b) and all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------
# Trajectories: Lookahead(FusedALIG) on the triton backends against the plain loops
# ---------------------------------------------------------------------------------------


def run_triton(tensors, targets, dtypes, steps=STEPS):
    params = [t.to(d).requires_grad_() for t, d in zip(tensors, dtypes)]
    opt = Lookahead(FusedALIG(params, backend="triton", **HPARAMS), k=K, alpha=ALPHA, backend="triton")
    for _ in range(steps):
        opt.zero_grad()
        loss = problem_loss(params, targets, [True] * len(params))
        loss.backward()
        opt.step(loss=loss)
    assert opt.last_backend == "triton" and opt.optimizer.last_backend == "triton"
    assert int(opt.lookahead_step) == steps
    return params, opt


def run_plain(tensors, targets, dtypes, steps=STEPS):
    """tests/test_extras.py's per-parameter Lookahead loop around ReferenceALIG, in ``dtypes``."""
    params = [t.to(d, copy=True).requires_grad_() for t, d in zip(tensors, dtypes)]
    return lookahead_reference([{"params": params, **HPARAMS}], steps, K, ALPHA, targets, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_plain_reference(small_chunks, launch_log, dtype):
    """30 steps, k = 3. Tolerance (tests/test_alig.py's): at most 3x the plain loop's own
    distance to the float64 loop when run in the storage dtype, plus a floor of a few
    storage ulps: 2e-6 relative for fp32, 2e-2 for bf16 (looser: 8-bit mantissa)."""
    tensors, targets, _ = make_groups([(LOOKAHEAD_SHAPES, HPARAMS)])[0]
    dtypes = [dtype] * len(tensors)
    params, _ = run_triton(tensors, targets, dtypes)
    exact = run_plain(tensors, targets, [torch.float64] * len(tensors))
    plain = run_plain(tensors, targets, dtypes)
    assert_follows_reference(params, exact, plain, dtype)
    assert all(p.dtype == dtype for p in params)
    assert launch_log and all(kernel is tla._lookahead_kernel for kernel, _ in launch_log)
    assert len(launch_log) == STEPS  # one launch per Lookahead update


def test_mixed_fp32_bf16_one_model(small_chunks, launch_log):
    """fp32 and bf16 tensors in one model: one launch per update; each dtype follows the
    plain loop to its own tolerance."""
    tensors, targets, _ = make_groups([(LOOKAHEAD_SHAPES, HPARAMS)])[0]
    dtypes = [torch.float32 if i % 2 else torch.bfloat16 for i in range(len(tensors))]
    params, _ = run_triton(tensors, targets, dtypes)
    exact = run_plain(tensors, targets, [torch.float64] * len(tensors))
    plain = run_plain(tensors, targets, dtypes)
    for dtype in (torch.float32, torch.bfloat16):
        idx = [i for i, d in enumerate(dtypes) if d == dtype]
        assert_follows_reference(*([xs[i] for i in idx] for xs in (params, exact, plain)), dtype)
    assert len(launch_log) == STEPS


# ---------------------------------------------------------------------------------------
# The update itself, bit for bit, around an inner optimizer whose steps are recorded
# ---------------------------------------------------------------------------------------


class Jitter(torch.optim.Optimizer):
    """An inner optimizer that moves every parameter by a pseudo-random amount and keeps
    a copy of what its step produced (the fast weights before the Lookahead update)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.gen = torch.Generator().manual_seed(7)
        self.after_step = []

    @torch.no_grad()
    def step(self, closure=None):
        self.after_step = []
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn(p.shape, generator=self.gen).to(p.dtype))
                self.after_step.append(p.detach().clone())


def mixed_params():
    """fp32, bf16 and fp16; whole aligned chunks, tails, an unaligned view, a scalar."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(300, generator=gen)
    return [
        torch.randn(10, 13, generator=gen),
        torch.randn(7, generator=gen).bfloat16(),
        torch.randn(129, generator=gen).half(),
        torch.randn(64, generator=gen).bfloat16(),
        base[1:131],  # 4-byte offset: the masked path for whole chunks too
        torch.randn(1, generator=gen),
    ]


@pytest.mark.parametrize("k, alpha", [(3, 0.5), (1, 0.3), (4, 1.0)])
def test_update_bit_for_bit(small_chunks, launch_log, k, alpha):
    """Sync steps: slow' = (slow + fp32(alpha) * (fast - slow)) in fp32, rounded to the
    dtype, and fast' == slow' bit for bit. Other steps: slow and fast untouched, bit for bit."""
    params = mixed_params()
    inner = Jitter(params)
    opt = Lookahead(inner, k=k, alpha=alpha, backend="triton")
    alpha32 = torch.tensor(alpha, dtype=torch.float32)
    for step in range(1, 3 * k + 3):
        slow_before = [opt.state[p]["slow_param"].clone() for p in params]
        opt.step()
        slow = [opt.state[p]["slow_param"] for p in params]
        if step % k == 0:
            expected = [(s.float() + alpha32 * (f.float() - s.float())).to(s.dtype)
                        for s, f in zip(slow_before, inner.after_step)]
            assert bit_identical(slow, expected), f"step {step}"
            assert bit_identical(params, slow), f"step {step}: fast != slow after a sync step"
        else:
            assert bit_identical(slow, slow_before), f"step {step}: slow weights changed"
            assert bit_identical(params, inner.after_step), f"step {step}: fast weights changed"
        assert int(opt.lookahead_step) == step
    assert len(launch_log) == 3 * k + 2
    assert all(grid == (3,) for _, grid in launch_log)  # 8 chunks on a persistent grid of 3
    assert int(opt._cache["tables"].tickets) == 0  # back to 0 after every launch


def test_one_launch_regardless_of_tensor_count(monkeypatch):
    """1 launch per update for 3 and for 3000 tensors (launches recorded, not run)."""
    launched = []
    monkeypatch.setattr(tla, "_launch", lambda kernel, grid, *args, **meta: launched.append((kernel, grid)))
    for n_tensors in (3, 3000):
        launched.clear()
        params = [torch.zeros(5, dtype=torch.bfloat16 if i % 2 else torch.float32) for i in range(n_tensors)]
        opt = Lookahead(Jitter(params), k=2, backend="triton")
        for _ in range(2):
            opt.step()
        assert launched == [(tla._lookahead_kernel, (min(n_tensors, tla.INTERPRETER_PROGRAMS),))] * 2
        assert opt._cache["tables"].n_chunks == n_tensors


def test_counter_in_the_kernel_without_tensors(launch_log):
    """A Lookahead over no parameters still counts, in its one launch."""
    opt = Lookahead(Jitter([torch.zeros(3)]), k=2, backend="triton")
    opt.optimizer.param_groups[0]["params"] = []
    for _ in range(3):
        opt.step()
    assert int(opt.lookahead_step) == 3
    assert launch_log == [(tla._lookahead_kernel, (1,))] * 3


# ---------------------------------------------------------------------------------------
# state_dict, tables, backend choice
# ---------------------------------------------------------------------------------------


def test_state_dict_round_trip(small_chunks):
    """Saved after 4 steps, loaded into a Lookahead with other k/alpha and slow weights:
    the next 3 steps (crossing the sync step 6) are bit-identical to the original's."""
    tensors, targets, _ = make_groups([(LOOKAHEAD_SHAPES, {})])[0]
    a = [t.float().requires_grad_() for t in tensors]
    opt_a = Lookahead(FusedALIG(a, lr=0.1, momentum=0.9, backend="triton"), k=3, backend="triton")

    def train(opt, params, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss = problem_loss(params, targets, [True] * len(params))
            loss.backward()
            opt.step(loss=loss)

    train(opt_a, a, 4)
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = Lookahead(FusedALIG(b, lr=1.0, momentum=0.9, backend="triton"), k=7, alpha=0.1, backend="triton")
    train(opt_b, b, 1)  # builds a table for the slow weights that the load replaces
    for p, q in zip(a, b):
        q.data.copy_(p)
    tables = opt_b._cache["tables"]
    # a deep copy: the inner optimizer's load shares same-device buffers with the saved state (torch's behaviour)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.k == 3 and opt_b.alpha == 0.5 and int(opt_b.lookahead_step) == 4
    train(opt_a, a, 3)
    train(opt_b, b, 3)
    assert opt_b._cache["tables"] is not tables  # new slow tensors: a new table
    assert bit_identical(a, b)
    assert bit_identical([opt_a.state[p]["slow_param"] for p in a], [opt_b.state[p]["slow_param"] for p in b])
    assert int(opt_a.lookahead_step) == int(opt_b.lookahead_step) == 7


def test_auto_is_torch_on_cpu():
    p = torch.zeros(4)
    opt = Lookahead(Jitter([p]), k=2)
    opt.step()
    assert opt.backend == "auto" and opt.last_backend == "torch"


def test_triton_by_name_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        Lookahead(Jitter([torch.zeros(4)]), backend="triton")


def test_triton_import_error_is_the_reason(monkeypatch):
    from alig_fused import backends

    monkeypatch.delitem(backends._lookahead_loaded, "triton", raising=False)
    monkeypatch.setitem(backends._lookahead_errors, "triton", "ImportError: No module named 'triton'")
    with pytest.raises(BackendUnavailableError, match="No module named 'triton'"):
        Lookahead(Jitter([torch.zeros(4)]), backend="triton")
    opt = Lookahead(Jitter([torch.zeros(4)]))
    opt.step()
    assert opt.last_backend == "torch"


def test_unknown_backend_and_unaddressable_tensors():
    with pytest.raises(ValueError, match="unknown Lookahead backend"):
        Lookahead(Jitter([torch.zeros(4)]), backend="cpp")
    opt = Lookahead(Jitter([torch.zeros(3, dtype=torch.float64)]), backend="triton")
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        opt.step()
    opt = Lookahead(Jitter([torch.zeros(4, 12)[:, ::2]]), backend="triton")  # a view with gaps
    with pytest.raises(ValueError, match="not contiguous nor dense"):
        opt.step()
    fast = torch.zeros(6, 4).t()  # dense, transposed: the slow weight must share its strides
    with pytest.raises(ValueError, match="the slow weight of tensor 0 has strides"):
        tla.triton_lookahead([fast], [torch.zeros(4, 6)], torch.zeros((), dtype=torch.int64), 0.5, 2, {})


def test_transposed_parameter_steps_as_contiguous(small_chunks):
    """A dense non-contiguous parameter (and its slow weight, cloned with its strides) is
    updated element for element as a contiguous copy of it."""
    runs = []
    for transposed in (True, False):
        p = torch.arange(24.0).reshape(6, 4).t()
        p = p.clone() if transposed else p.contiguous()  # clone keeps the strides
        assert p.is_contiguous() != transposed
        opt = Lookahead(Jitter([p]), k=2, alpha=0.5, backend="triton")
        for _ in range(4):
            opt.step()
        runs.append((p, opt.state[p]["slow_param"]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], torch.arange(24.0).reshape(6, 4).t())  # it did move


def test_captured_table_stays_alive_and_rebuild_during_capture_fails(monkeypatch):
    import gc
    import weakref

    from alig_fused import triton_tables

    step = torch.zeros((), dtype=torch.int64)
    fast, slow = [torch.randn(10)], [torch.randn(10)]
    cache = {}
    tla.triton_lookahead(fast, slow, step, 0.5, 2, cache)  # the eager warm-up
    monkeypatch.setattr(triton_tables, "capturing", lambda device: True, raising=False)
    tla.triton_lookahead(fast, slow, step, 0.5, 2, cache)  # "captured"
    meta = weakref.ref(cache["tables"].meta)
    with pytest.raises(RuntimeError, match="changed while a CUDA graph is being captured"):
        tla.triton_lookahead(fast, [torch.randn(10)], step, 0.5, 2, cache)
    assert int(step) == 2  # the failed call changed nothing
    monkeypatch.setattr(triton_tables, "capturing", lambda device: False, raising=False)
    tla.triton_lookahead(fast, [torch.randn(10)], step, 0.5, 2, cache)  # rebuilt
    gc.collect()
    assert meta() is not None


@pytest.mark.parametrize("programs", [2, 3])
def test_an_aborted_launch_leaves_the_ticket_word_clear(small_chunks, monkeypatch, programs):
    """A launch that raises after some programs took their ticket (here program 0, in its
    first chunk of a synchronisation step, before any store) must not leave the ticket word
    set: in every later launch the program holding ticket n_programs - 1 would then not be
    the last to read the counter, and the others would run a step ahead (a synchronisation
    on the wrong step for their chunks), silently, for ever."""
    monkeypatch.setattr(tla, "INTERPRETER_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(0)
    fast = [torch.randn(130, generator=gen)]  # chunks of 64: two whole ones and a tail
    slow = [torch.randn(130, generator=gen)]
    counter = torch.ones((), dtype=torch.int64)  # the next step, 2, synchronises (k = 2)
    cache = {}
    start = fast[0].clone(), slow[0].clone()
    lerp_full = tla._lerp_full

    def aborting(*args, **kwargs):
        raise RuntimeError("launch aborted")

    monkeypatch.setattr(tla, "_lerp_full", aborting)
    with pytest.raises(Exception, match="launch aborted"):  # the interpreter's InterpreterError
        tla.triton_lookahead(fast, slow, counter, 0.5, 2, cache)
    monkeypatch.setattr(tla, "_lerp_full", lerp_full)
    assert cache["tables"].n_programs == programs
    assert int(counter) == 1, "the last program, the counter's writer, never ran"
    assert torch.equal(fast[0], start[0]) and torch.equal(slow[0], start[1]), "the aborted launch stored nothing"
    for step in (2, 3, 4, 5):
        fast_before, slow_before = fast[0].clone(), slow[0].clone()
        tla.triton_lookahead(fast, slow, counter, 0.5, 2, cache)
        assert int(counter) == step and int(cache["tables"].tickets) == 0
        if step % 2 == 0:
            expected = slow_before + 0.5 * (fast_before - slow_before)
            assert torch.equal(slow[0], expected) and torch.equal(fast[0], expected), f"step {step}"
        else:
            assert torch.equal(slow[0], slow_before) and torch.equal(fast[0], fast_before), f"step {step}"


def test_a_registered_update_is_picked_by_auto_and_by_name(monkeypatch):
    """Lookahead's updates come from backends.LOOKAHEAD_REGISTRY, as the step's backends do:
    one register_lookahead(...) call adds one, ranked for "auto" and reachable by name."""
    from alig_fused import backends
    from alig_fused.lookahead import torch_lookahead

    calls = []

    def recording_update(fast, slow, counter, alpha, k, cache):
        calls.append(len(fast))
        torch_lookahead(fast, slow, counter, alpha, k, cache)

    monkeypatch.setattr(backends, "LOOKAHEAD_REGISTRY", dict(backends.LOOKAHEAD_REGISTRY))
    backends.register_lookahead(backends.Backend("recording", lambda: recording_update, dtypes=None,
                                                 auto_rank={"cpu": 0}))
    try:
        p = torch.zeros(4)
        auto = Lookahead(Jitter([p]), k=2)
        for _ in range(2):
            auto.step()
        assert auto.last_backend == "recording" and calls == [1, 1]
        reference = torch.zeros(4)
        plain = Lookahead(Jitter([reference]), k=2, backend="torch")
        for _ in range(2):
            plain.step()
        assert torch.equal(p, reference)  # the same update
        named = Lookahead(Jitter([torch.zeros(4)]), k=2, backend="recording")
        named.step()
        assert named.last_backend == "recording" and len(calls) == 3
    finally:
        backends._lookahead_loaded.pop("recording", None)
