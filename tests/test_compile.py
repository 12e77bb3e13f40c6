"""torch.compile of a training step that calls opt.step(loss=loss)."""

from __future__ import annotations

import pytest
import torch

from alig_fused import FusedALIG


def make(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = FusedALIG(model.parameters(), lr=0.1, momentum=0.9, max_norm=5.0, backend=backend)
    return model, opt


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_compiled_step_matches_eager(name):
    from conftest import require_backend

    require_backend(name, torch.device("cpu"))
    torch._dynamo.reset()
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    eager_model, eager_opt = make(name)
    model, opt = make(name)

    # fullgraph=True: the optimizer step itself traces without a graph break
    @torch.compile(fullgraph=True)
    def compiled_opt_step(loss):
        opt.step(loss=loss)

    for _ in range(3):
        for m, o, step in ((eager_model, eager_opt, None), (model, opt, compiled_opt_step)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            if step is None:
                o.step(loss=loss)
            else:
                step(loss.detach())
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert float(opt.param_groups[0]["step_size"]) > 0


# -- a scheduler under torch.compile: a tensor lr is read on the device, never recompiled ----
#
# torch's documented way ("compiling the optimizer with an LR scheduler") is a tensor lr that
# the scheduler updates in place. Two notes on the harness: dynamo never traces into
# torch/optim/lr_scheduler.py, which wraps ``opt.step``, so a fullgraph step calls the
# class's ``FusedALIG.step`` directly (torch's own optimizers cannot compile with
# fullgraph=True at all: their step breaks the graph on purpose, around no_grad); and the
# CompileCounter backend counts the graphs dynamo hands to a backend (no inductor: fast).

STEPS = 12


def capped_problem(backend, lr, lr2=None):
    """A cap small enough to bind every step: group k's step size is then its scheduled lr."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    if lr2 is not None:
        groups[1]["lr"] = lr2
    opt = FusedALIG(groups, lr=lr, momentum=0.9, max_norm=5.0, backend=backend)
    lambdas = [lambda e: 1.0 / (1 + e), lambda e: 0.9**e]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    return model, opt, sched, lambda: torch.nn.functional.mse_loss(model(x), y)


def run_scheduled(backend, lr, lr2=None, compiled=False, warm_up=True):
    """STEPS steps with a LambdaLR changing lr each step; returns the params, the step sizes
    taken, the scheduled lrs they should equal, and the number of graphs compiled."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, opt, sched, loss_fn = capped_problem(backend, lr, lr2)
    counter = CompileCounter()
    compiled_step = torch.compile(lambda loss: FusedALIG.step(opt, loss=loss), backend=counter, fullgraph=True)
    step_sizes, scheduled = [], []
    for i in range(STEPS):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        scheduled.append([float(g["lr"]) for g in opt.param_groups])
        if compiled and not (warm_up and i == 0):
            compiled_step(loss.detach())
        else:
            opt.step(loss=loss)
        step_sizes.append([float(g["step_size"]) for g in opt.param_groups])
        sched.step()
    return [p.detach().clone() for p in model.parameters()], step_sizes, scheduled, counter.frame_count


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_tensor_lr_scheduler_compiles_once_and_each_step_takes_its_lr(name):
    from conftest import require_backend

    require_backend(name, torch.device("cpu"))
    lr = torch.tensor(0.01, dtype=torch.float64)
    params, step_sizes, scheduled, graphs = run_scheduled(name, lr, compiled=True)
    # One graph for STEPS - 1 compiled steps, each with a new lr: no recompile.
    assert graphs == 1
    # The new lr reached every compiled step (the cap binds: the step size is the lr).
    assert scheduled[1][0] != scheduled[2][0]
    for taken, lrs in zip(step_sizes, scheduled):
        assert taken == pytest.approx(lrs, rel=1e-6)
    # The same run in eager mode with a float lr (the host path): the same trajectory.
    eager_params, eager_sizes, _, _ = run_scheduled(name, 0.01)
    for taken, eager in zip(step_sizes, eager_sizes):
        assert taken == pytest.approx(eager, rel=1e-6)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_per_group_tensor_lr_compiled_from_the_first_step(name):
    """A tensor lr in one group beside a float lr in the other, compiled from step 0 (the
    state is created inside the first compiled call: one recompile, as torch's SGD has)."""
    from conftest import require_backend

    require_backend(name, torch.device("cpu"))
    _, step_sizes, scheduled, graphs = run_scheduled(name, 0.01, lr2=torch.tensor(0.02), compiled=True, warm_up=False)
    assert graphs <= 2
    for taken, lrs in zip(step_sizes, scheduled):
        assert taken == pytest.approx(lrs, rel=1e-6)


def compile_count_with_scheduler(make_opt, steps=20):
    """Graphs compiled for torch's documented pattern: opt.step() and sched.step() in one
    compiled function (fullgraph=False: the scheduler's step-counting wrapper breaks it)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    counter = CompileCounter()
    alig = isinstance(opt, FusedALIG)

    @torch.compile(backend=counter)
    def train_step(loss):
        if alig:
            opt.step(loss=loss)
        else:
            opt.step()
        sched.step()

    x = torch.randn(16, 4)
    lrs = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        train_step(loss.detach())
        lrs.append(float(opt.param_groups[0]["lr"]))
    assert lrs[-1] == pytest.approx(0.1 * 0.9**steps, rel=1e-5)  # the schedule ran
    return counter.frame_count


def test_compiles_no_more_often_than_torch_sgd_with_a_scheduler():
    sgd_tensor = compile_count_with_scheduler(lambda p: torch.optim.SGD(p, lr=torch.tensor(0.1), momentum=0.9))
    alig_tensor = compile_count_with_scheduler(
        lambda p: FusedALIG(p, lr=torch.tensor(0.1), momentum=0.9, max_norm=5.0, backend="torch")
    )
    assert alig_tensor <= sgd_tensor
    # A float lr: dynamo recompiles when it first changes, then traces it as a symbolic
    # float (torch's default specialize_float=False), as it does for SGD with a float lr.
    sgd_float = compile_count_with_scheduler(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    alig_float = compile_count_with_scheduler(lambda p: FusedALIG(p, lr=0.1, momentum=0.9, max_norm=5.0, backend="torch"))
    assert alig_float <= sgd_float
