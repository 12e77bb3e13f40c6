"""The loss rule: a step's loss is the sum of every tensor backward() was called on since the
last step; accumulate_loss feeds it, and loss= / the accumulated sum / the closure's value are
chosen in that order. Checked against the float64 reference loop on the whole batch."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from alig_fused import FusedALIG
from reference import ReferenceALIG

HPARAMS = dict(lr=10.0, momentum=0.9, max_norm=5.0)  # lr large: the Polyak step is what is taken


def make_problem(seed=0, n=8):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(n, 5, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model, x, y


def batch_loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def reference_run(model, x, y, steps):
    """Full-batch steps of the float64 reference loop: (step sizes, final params)."""
    model = model.to(torch.float64)
    params = list(model.parameters())
    ref = ReferenceALIG([dict(params=params, **HPARAMS)])
    sizes = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = batch_loss(model, x.double(), y)
        loss.backward()
        ref.step(float(loss.detach()))
        sizes.append(ref.step_sizes[0])
    return sizes, [p.detach().clone() for p in params]


def check_against_reference(sizes, model, ref):
    ref_sizes, ref_params = ref
    torch.testing.assert_close(torch.tensor(sizes, dtype=torch.float64), torch.tensor(ref_sizes, dtype=torch.float64), rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), ref_params):
        torch.testing.assert_close(p.detach().double(), q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("how", ["step()", "loss=", "closure", "closure+loss="])
def test_accumulated_micro_batches_equal_one_full_batch_step(backend, how):
    model, x, y = make_problem()
    ref = reference_run(make_problem()[0], x, y, steps=3)
    opt = FusedALIG(model.parameters(), backend=backend, **HPARAMS)
    k, sizes = 4, []
    for _ in range(3):
        opt.zero_grad()
        last = None
        for xb, yb in zip(x.chunk(k), y.chunk(k)):
            loss = batch_loss(model, xb, yb) / k  # what is backwarded, divided by the steps
            loss.backward()
            if how != "loss=":
                opt.accumulate_loss(loss)
            last = loss
        if how == "step()":
            returned = opt.step()
        elif how == "loss=":
            returned = opt.step(loss=batch_loss(model, x, y))  # the whole batch's loss
        elif how == "closure":
            returned = opt.step(lambda: last)  # the sum wins over the closure's value
            assert returned is last
        else:
            returned = opt.step(lambda: None, loss=batch_loss(model, x, y))  # Lightning's form
        assert returned is not None
        sizes.append(float(opt.param_groups[0]["step_size"]))
    check_against_reference(sizes, model, ref)
    assert opt.last_backend == backend


def test_precedence_and_reset():
    model, x, y = make_problem()
    opt = FusedALIG(model.parameters(), backend="torch", **HPARAMS)

    def expected_size(loss):
        g2 = sum(float(p.grad.double().norm()) ** 2 for p in model.parameters())
        return min(HPARAMS["lr"], loss / (g2 + 1e-5))

    batch_loss(model, x, y).backward()
    opt.accumulate_loss(100.0)  # loss= wins over the sum
    want = expected_size(0.25)
    opt.step(loss=0.25)
    assert float(opt.param_groups[0]["step_size"]) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="accumulate_loss"):  # the sum was reset by the step
        opt.step()
    opt.accumulate_loss(torch.tensor(0.125))
    want = expected_size(0.125)
    opt.step(lambda: 3.0)  # the sum wins over the closure's value
    assert float(opt.param_groups[0]["step_size"]) == pytest.approx(want, rel=1e-6)
    want = expected_size(0.5)
    opt.step(lambda: 0.5)  # nothing accumulated: the closure's value
    assert float(opt.param_groups[0]["step_size"]) == pytest.approx(want, rel=1e-6)
    opt.accumulate_loss(1.0)
    opt.zero_grad()  # the gradients go, and the loss they belonged to
    batch_loss(model, x, y).backward()
    with pytest.raises(ValueError, match="needs the current loss"):
        opt.step()


def test_skipped_step_resets_and_bad_input_keeps_the_sum():
    model, x, y = make_problem()
    opt = FusedALIG(model.parameters(), backend="torch", **HPARAMS)
    batch_loss(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.accumulate_loss(float("nan"))
    opt.step()  # a non-finite loss: skipped on the device, counted, and the sum is reset
    assert int(opt.skipped_steps) == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="needs the current loss"):
        opt.step()

    opt.accumulate_loss(torch.tensor(0.5))
    opt.param_groups[0]["momentum"] = 1.5  # bad input: a clear error, nothing changes
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
    opt.param_groups[0]["momentum"] = HPARAMS["momentum"]
    g2 = sum(float(p.grad.double().norm()) ** 2 for p in model.parameters())
    opt.step()  # the sum survived the failed step
    assert float(opt.param_groups[0]["step_size"]) == pytest.approx(0.5 / (g2 + 1e-5), rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) is False


def test_accumulate_loss_copies_and_detaches():
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedALIG([p], lr=1.0, backend="torch")
    mine = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    opt.accumulate_loss(mine)
    opt.accumulate_loss(mine)
    opt.accumulate_loss(np.float32(0.25))
    total = opt._loss_sum
    assert mine.item() == 0.5 and total.item() == 1.25 and not total.requires_grad
    assert total.dtype == torch.float64 and total.device == p.device
    with pytest.raises(ValueError, match="scalar"):
        opt.accumulate_loss(torch.ones(2))
    assert total.item() == 1.25  # a rejected loss adds nothing
    p.grad = torch.ones(3)
    returned = opt.step()
    opt.accumulate_loss(0.75)  # the next sum starts afresh, in the same tensor
    assert opt._loss_sum is total and total.item() == 0.75 and returned.item() == 1.25
    state = opt.state_dict()  # the pending sum is not state: it belongs to the current gradients
    assert not any(isinstance(v, torch.Tensor) and v.item() == 1.25 for v in state.values())


@pytest.mark.parametrize("loss", [np.float32(0.5), np.float64(0.5), np.array(0.5), np.array([0.5], dtype=np.float16)])
def test_numpy_losses(loss):
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedALIG([p], lr=1.0, backend="torch")
    p.grad = torch.ones(3)
    opt.step(loss=loss)
    assert float(opt.param_groups[0]["step_size"]) == pytest.approx(0.5 / (3 + 1e-5), rel=1e-6)


def test_bad_numpy_losses():
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedALIG([p], lr=1.0, backend="torch")
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(loss=np.ones(2))
    with pytest.raises(TypeError, match="real"):
        opt.step(loss=np.array(1 + 1j))
    with pytest.raises(TypeError, match="real"):
        opt.step(loss=np.bool_(True))
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize("loss", [torch.tensor(0.5), 0.5, np.float32(0.5)])
def test_positional_loss_says_use_the_keyword(loss):
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedALIG([p], lr=1.0, backend="torch")
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match=re.escape("optimizer.step(loss=loss)")):
        opt.step(loss)
    assert torch.equal(p.detach(), torch.ones(3))


def test_torch_optimizer_arguments_point_to_alig_ones():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="weight_decay.*max_norm="):
        FusedALIG([p], lr=0.1, weight_decay=1e-4)
    with pytest.raises(TypeError, match="nesterov.*Nesterov-style.*momentum="):
        FusedALIG([p], lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(TypeError, match="'betas'"):
        FusedALIG([p], lr=0.1, betas=(0.9, 0.99))


def test_last_backend_before_the_first_step_and_no_gradient_warns_once():
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedALIG([p], lr=1.0, backend="torch")
    assert opt.last_backend is None
    opt.accumulate_loss(1.0)
    with pytest.warns(UserWarning, match="no parameter has a gradient"):
        assert opt.step().item() == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss=1.0)  # once
    assert opt.last_backend is None and torch.equal(p.detach(), torch.ones(3))
    with pytest.raises(ValueError, match="needs the current loss"):  # the step reset the sum
        p.grad = torch.ones(3)
        opt.step()


def test_grad_scaler_accumulates_the_unscaled_loss():
    """Accumulate before scaler.scale; scaler.step(opt) with no loss uses the sum."""
    model, x, y = make_problem()
    ref = reference_run(make_problem()[0], x, y, steps=3)
    opt = FusedALIG(model.parameters(), backend="torch", **HPARAMS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sizes = []
    for _ in range(3):
        opt.zero_grad()
        for xb, yb in zip(x.chunk(2), y.chunk(2)):
            loss = batch_loss(model, xb, yb) / 2
            opt.accumulate_loss(loss)
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sizes.append(float(opt.param_groups[0]["step_size"]))
    assert scaler.get_scale() == 2.0**10 and int(opt.skipped_steps) == 0
    check_against_reference(sizes, model, ref)


def readme_amp_snippet():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (snippet,) = [b for b in blocks if "GradScaler(" in b]
    return snippet


@pytest.mark.parametrize("variant", ["as written", "cpu fp16", "cpu bf16"])
def test_readme_amp_snippet_runs(variant):
    """The README's AMP snippet, with model, criterion, x, y and opt defined around it. As
    written it asks for CUDA: on a CPU-only machine torch disables autocast and the scaler
    with a warning and the step is a plain fp32 one; "cpu" runs the real CPU GradScaler."""
    snippet = readme_amp_snippet()
    if variant != "as written" or torch.cuda.is_available():
        snippet = snippet.replace('"cuda"', '"cpu"')
    if variant == "cpu bf16":
        snippet = snippet.replace("torch.float16", "torch.bfloat16")
    model, x, y = make_problem()
    opt = FusedALIG(model.parameters(), backend="torch", **HPARAMS)
    scope = dict(torch=torch, model=model, x=x, y=y, opt=opt, criterion=torch.nn.functional.cross_entropy)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        exec(compile(snippet, "README.md", "exec"), scope)
    scaler, loss = scope["scaler"], scope["loss"]
    assert int(opt.skipped_steps) == 0 and loss.dtype == torch.float32
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    if variant != "as written" or torch.cuda.is_available():
        assert scale > 1.0  # the scaler really ran
    g2 = sum(float((p.grad.double() / scale).norm()) ** 2 for p in model.parameters())
    want = min(HPARAMS["lr"], float(loss.detach()) / (g2 + 1e-5))
    assert float(opt.param_groups[0]["step_size"]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("bad", ["abc", torch.ones(2), None], ids=["str", "vector", "none"])
def test_a_bad_loss_is_an_error_even_when_no_parameter_has_a_gradient(bad):
    """The loss is checked before the no-gradient early return (it used to return silently)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedALIG([p], lr=1.0, backend="torch")
    with pytest.raises((TypeError, ValueError), match="loss"):
        opt.step(loss=bad)
    assert opt.last_backend is None and torch.equal(p.detach(), torch.ones(3))
