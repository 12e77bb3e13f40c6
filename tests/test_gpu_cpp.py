"""The CUDA kernels of the C++ extension (backend="cpp" on CUDA tensors): trajectories
against the float64 reference loop, no host sync (set_sync_debug_mode("error")), CUDA
graph capture, three launches per step whatever the number of tensors, determinism,
skipped steps, opcheck. Skipped, with the reason, without a GPU or without CUDA kernels
in the build.

Same well-conditioned problem as test_cpp.py; errors are max |p - e| / (1 + |e|) against
the float64 reference. bf16/fp16 get ~10 ulps: a capped group (lr=0.05, 9000 elements)
rounds w to the storage dtype at each of 50 steps, a random walk of ~sqrt(50) half-ulps
whose max over 9000 elements the CPU kernels measure at 3.2e-2 (bf16) and 3.5e-3 (fp16).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from alig_fused import FusedALIG, backends
from reference import ReferenceALIG

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
CUDA = torch.device("cuda")
_ok, _reason = backends.supports("cpp", CUDA)
if not _ok:
    if "cpp" in os.environ.get("ALIG_FUSED_REQUIRE_BACKENDS", "").split(","):
        raise RuntimeError(f"backend 'cpp' is required here but unavailable on CUDA: {_reason}")
    pytest.skip(f"backend 'cpp' unavailable on CUDA: {_reason}", allow_module_level=True)

from test_cpp import make_problem, max_error  # noqa: E402 (the same problem and error measure)

STEPS = 50
ATOL = {torch.float32: 2e-6, torch.bfloat16: 8e-2, torch.float16: 8e-3}
SHAPES = [(7,), (33, 5), (1,), (20001,)]
CONFIGS = {
    "momentum": [dict(shapes=SHAPES, momentum=0.9)],
    "adjusted_max_lr": [dict(shapes=SHAPES, momentum=0.9, adjusted_momentum=True, lr=0.1)],
    "max_norm": [dict(shapes=SHAPES, momentum=0.9, max_norm=60.0)],
    "groups": [
        dict(shapes=[(7,), (33, 5)], momentum=0.9, max_norm=3.0),
        dict(shapes=[(20,), (9000,)], lr=0.05),
        dict(shapes=[], momentum=0.5),
        dict(shapes=[(9,)], momentum=0.5, adjusted_momentum=True),
    ],
}


class Run:
    def __init__(self, problem, backend, dtype=torch.float32, device=CUDA):
        self.groups = [
            {"params": [t.to(device=device, dtype=dtype).requires_grad_() for t in start], **hp}
            for start, _, hp in problem
        ]
        self.params = [p for g in self.groups for p in g["params"]]
        self.targets = [t.to(device) for _, targets, _ in problem for t in targets]
        self.reference = backend == "reference"
        self.opt = ReferenceALIG(self.groups) if self.reference else FusedALIG(self.groups, backend=backend)

    def backward(self):
        for p in self.params:
            p.grad = None
        loss = torch.zeros((), dtype=torch.float64, device=self.targets[0].device)
        for p, t in zip(self.params, self.targets):
            x = p.double()
            loss = loss + 0.5 * ((0.2 * torch.tanh(x) + x - t) ** 2).sum()
        loss.backward()
        return loss.detach()

    def step(self):
        loss = self.backward()
        if self.reference:
            self.opt.step(float(loss))
        else:
            self.opt.step(loss=loss)

    def state(self):
        buffers = [self.opt.state[p].get("momentum_buffer") for p in self.params]
        return [p.detach().clone() for p in self.params] + [b.clone() for b in buffers if b is not None]


def run(spec, backend, dtype=torch.float32, steps=STEPS, device=CUDA):
    r = Run(make_problem(spec), backend, dtype, device)
    for _ in range(steps):
        r.step()
    return r


def assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(config, dtype):
    fused = run(CONFIGS[config], "cpp", dtype)
    exact = run(CONFIGS[config], "reference", torch.float64, device="cpu")
    assert fused.opt.last_backend == "cpp"
    assert max_error(fused.params, exact.params) <= ATOL[dtype]


def test_close_to_cpu_kernels():
    gpu = run(CONFIGS["groups"], "cpp", steps=10)
    cpu = run(CONFIGS["groups"], "cpp", steps=10, device="cpu")
    assert max_error(gpu.params, cpu.params) <= ATOL[torch.float32]


def test_mixed_dtypes_in_one_step():
    problem = make_problem(CONFIGS["groups"])
    r = Run(problem, "cpp")
    with torch.no_grad():  # group 1 in bf16: one launch covers both dtypes
        r.groups[1]["params"][:] = [p.detach().to(torch.bfloat16).requires_grad_() for p in r.groups[1]["params"]]
    r.params = [p for g in r.groups for p in g["params"]]
    r.opt = FusedALIG(r.groups, backend="cpp")
    for _ in range(20):
        r.step()
    exact = run(CONFIGS["groups"], "reference", torch.float64, steps=20, device="cpu")
    assert max_error(r.params, exact.params) <= ATOL[torch.bfloat16]


def test_deterministic():
    a = run(CONFIGS["max_norm"], "cpp", steps=10)
    b = run(CONFIGS["max_norm"], "cpp", steps=10)
    assert_bitwise_equal(a.state(), b.state())


def test_no_host_sync():
    r = Run(make_problem(CONFIGS["groups"]), "cpp")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # the first step builds and uploads the device table
            r.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert int(r.opt.skipped_steps) == 0


def test_three_launches_whatever_the_number_of_tensors():
    spec = [dict(shapes=[(5 + i % 50,) for i in range(600)], momentum=0.9, max_norm=30.0), dict(shapes=[(70000,)])]
    r = Run(make_problem(spec), "cpp")
    r.step()
    loss = r.backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        r.opt.step(loss=loss)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [n for n in names if "pass1_kernel" in n or "finalize_kernel" in n or "pass2_kernel" in n]
    assert len(ours) == 3, ours


def test_cuda_graph_capture():
    problem = make_problem(CONFIGS["groups"])
    eager, graphed = Run(problem, "cpp"), Run(problem, "cpp")
    # The captured step's inputs: these .grad tensors and this loss, refilled before replays.
    static_loss = graphed.backward().clone()
    static_grads = [p.grad for p in graphed.params]

    def refill():
        loss = graphed.backward()
        for static, p in zip(static_grads, graphed.params):
            static.copy_(p.grad)
            p.grad = static
        static_loss.copy_(loss)

    # Warm-up on a side stream (torch.cuda.graphs' rule): optimizer state and device table.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.opt.step(loss=static_loss)
    torch.cuda.current_stream().wait_stream(side)
    eager.step()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.opt.step(loss=static_loss)
    for _ in range(5):
        refill()
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    assert_bitwise_equal(graphed.state(), eager.state())


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_grad_and_found_inf_skip_bit_identically(bad):
    r = run(CONFIGS["max_norm"], "cpp", steps=3)
    before = r.state()
    loss = r.backward()
    r.params[3].grad.view(-1)[123] = bad
    r.opt.step(loss=loss)
    loss = r.backward()
    r.opt.grad_scale = torch.tensor(8.0, device=CUDA)
    r.opt.found_inf = torch.tensor(1.0, device=CUDA)
    r.opt.step(loss=loss)
    del r.opt.grad_scale, r.opt.found_inf
    assert_bitwise_equal(r.state(), before)
    assert int(r.opt.skipped_steps) == 2


def test_grad_scale_power_of_two_is_exact():
    plain = run(CONFIGS["groups"], "cpp", steps=2)
    scaled = run(CONFIGS["groups"], "cpp", steps=2)
    plain.step()
    loss = scaled.backward()
    for p in scaled.params:
        p.grad.mul_(256.0)
    scaled.opt.grad_scale = torch.tensor(256.0, device=CUDA)
    scaled.opt.found_inf = torch.tensor(0.0, device=CUDA)
    scaled.opt.step(loss=loss)
    assert_bitwise_equal(scaled.state(), plain.state())


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 4), (1,), (17000,)]
    params = [torch.randn(s, generator=gen).to(CUDA) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(CUDA) for s in shapes]
    buffers = [torch.randn(s, generator=gen).to(CUDA) for s in shapes]
    hparams = torch.tensor(
        [[0.5, 0.9, 0.0, 3.0, 1e-5, 0.0, 1.0], [math.inf, 0.9, 1.0, math.inf, 1e-5, 0.1, 1.0]],
        dtype=torch.float64,
        device=CUDA,
    )
    args = (
        params,
        grads,
        buffers,
        [0, 1, 0, 1],
        hparams,
        torch.tensor(2.5, dtype=torch.float64, device=CUDA),
        torch.zeros(2, device=CUDA),
        torch.zeros((), dtype=torch.int64, device=CUDA),
        torch.tensor(4.0, device=CUDA),
        torch.tensor(0.0, device=CUDA),
    )
    torch.library.opcheck(torch.ops.alig_fused.alig_step_.default, args)


def test_reduce_sums_halves():
    # Identity reduce_sums: alig_sums + alig_update_ give the fused op's bits; the halves
    # take four launches (pass 1, reduce | finalize, pass 2) around the caller's all-reduce.
    from alig_fused.cpp_ops import cpp_alig
    from alig_fused.functional import GroupHParams

    hparams = [GroupHParams(0.5, 0.9, False, 3.0, 1e-5, 0.0, 1.0), GroupHParams(math.inf, 0.9, True, math.inf, 1e-5, 0.1, 1.0)]
    results = []
    for reduce_sums in (None, lambda sums, loss: (sums, loss)):
        gen = torch.Generator().manual_seed(0)
        shapes = [(5,), (3, 4), (1,), (17000,)]
        params, grads, buffers = ([torch.randn(s, generator=gen).to(CUDA) for s in shapes] for _ in range(3))
        step_size = torch.zeros(2, device=CUDA)
        extra = {} if reduce_sums is None else {"reduce_sums": reduce_sums}
        cpp_alig(params, grads, buffers, [0, 1, 0, 1], hparams, torch.tensor(2.5, dtype=torch.float64, device=CUDA),
                 step_size, torch.zeros((), dtype=torch.int64, device=CUDA), None, None, {}, **extra)
        results.append(params + buffers + [step_size])
    assert_bitwise_equal(results[0], results[1])
