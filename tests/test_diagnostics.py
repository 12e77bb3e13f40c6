"""Diagnostics without a sync: FusedALIG/FusedMoMo.diagnostics(), the device ring buffer
(enable_history/history) and the drop-in AliG's step_size / step_size_unclipped, against
tests/reference.py's formulas; and no host read in the step (Tensor.item & co. made to raise)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from alig_fused import AliG, FusedALIG, FusedMoMo, functional
from reference import ReferenceALIG


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _groups(model):
    return [
        {"params": list(model[0].parameters()), "lr": 0.05, "momentum": 0.9},
        {"params": list(model[2].parameters()), "lr": 10.0, "f_star": 0.01, "scaling": 2.0},
    ]


def _reference_step_and_backward(model, ref_model, ref, x, y):
    """One float64 reference step on (x, y), then the model's backward on the same batch.
    Returns the reference loss and ||g||^2 (floats) and the model's loss."""
    for m in (model, ref_model):
        m.zero_grad()
    ref_loss = torch.nn.functional.mse_loss(ref_model(x.double()), y.double())
    ref_loss.backward()
    grad_sq = sum(float(p.grad.double().norm()) ** 2 for p in ref_model.parameters())
    ref.step(float(ref_loss.detach()))
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return float(ref_loss.detach()), grad_sq, loss


def test_alig_diagnostics_follow_the_reference(backend):
    model = _model()
    ref_model = copy.deepcopy(model).double()
    opt = FusedALIG(_groups(model), backend=backend)
    ref = ReferenceALIG(_groups(ref_model))
    opt.enable_history(4)
    torch.manual_seed(1)
    rows = []
    for step in range(6):
        x, y = torch.randn(16, 5), torch.randn(16, 2)
        ref_loss, grad_sq, loss = _reference_step_and_backward(model, ref_model, ref, x, y)
        opt.step(loss=loss)
        d = opt.diagnostics()
        unclipped = [max(ref_loss - g["f_star"], 0) / (g["scaling"] * grad_sq + g["eps"]) for g in ref.groups]
        expected = dict(
            step_size=torch.tensor(ref.step_sizes, dtype=torch.float64),
            step_size_unclipped=torch.tensor(unclipped, dtype=torch.float64),
        )
        torch.testing.assert_close(d["step_size"], expected["step_size"], rtol=2e-5, atol=1e-9)
        torch.testing.assert_close(d["step_size_unclipped"], expected["step_size_unclipped"], rtol=2e-5, atol=1e-9)
        assert d["capped"].tolist() == [u > g["lr"] for u, g in zip(unclipped, ref.groups)]
        assert abs(float(d["grad_sq_norm"]) - grad_sq) <= 1e-4 * grad_sq
        assert abs(float(d["loss"]) - ref_loss) <= 1e-5
        rows.append((step, d["step_size"].clone()))
    assert any(d["capped"].tolist()) and not all(d["capped"].tolist())  # both cases exercised
    history = opt.history()
    assert history["step"].tolist() == [2, 3, 4, 5]  # the last 4 steps, oldest first
    for i, (step, sizes) in enumerate(rows[2:]):
        torch.testing.assert_close(history["step_size"][i], sizes)


def test_history_before_it_is_full():
    model = _model()
    opt = FusedALIG(model.parameters(), lr=0.1, backend="torch")
    opt.enable_history(5)
    for _ in range(2):
        model.zero_grad()
        loss = model(torch.randn(4, 5)).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
    h = opt.history()
    assert h["written"].tolist() == [False, False, False, True, True]
    assert h["step"][-2:].tolist() == [0, 1]
    with pytest.raises(ValueError):
        opt.enable_history(0)


def test_momo_diagnostics(backend):
    model = _model()
    opt = FusedMoMo(model.parameters(), lr=1.0, use_fstar=True, backend=backend)
    opt.enable_history(3)
    for _ in range(4):
        model.zero_grad()
        loss = model(torch.randn(8, 5)).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
    d = opt.diagnostics()
    assert torch.equal(d["step_size"].float(), torch.stack([g["step_size"] for g in opt.param_groups]))
    torch.testing.assert_close(d["step_size"], torch.minimum(d["step_size_unclipped"], torch.tensor(1.0, dtype=torch.float64)))
    assert torch.equal(d["lb"], opt.lb)
    grad_sq = sum(float(p.grad.double().norm()) ** 2 for p in model.parameters())
    assert abs(float(d["grad_sq_norm"]) - grad_sq) <= 1e-5 * grad_sq
    h = opt.history()
    assert h["step"].tolist() == [1, 2, 3] and h["lb"].shape == (3,)
    assert float(h["lb"][-1]) == float(opt.lb)


def test_drop_in_alig_step_size_unclipped():
    """As the reference's experiments/epoch.py reads them after each step."""
    model = _model()
    ref_model = copy.deepcopy(model).double()
    opt = AliG(model.parameters(), max_lr=0.01, momentum=0.9)
    ref = ReferenceALIG([{"params": list(ref_model.parameters()), "lr": 0.01, "momentum": 0.9}])
    assert opt.step_size_unclipped is None
    for _ in range(3):
        x, y = torch.randn(8, 5), torch.randn(8, 2)
        ref_loss, grad_sq, loss = _reference_step_and_backward(model, ref_model, ref, x, y)
        opt.step(lambda: float(loss.detach()))
        unclipped = ref_loss / (grad_sq + 1e-5)
        assert abs(float(opt.step_size_unclipped) - unclipped) <= 2e-5 * unclipped
        assert abs(float(opt.step_size) - ref.step_sizes[0]) <= 2e-5 * ref.step_sizes[0]


@contextlib.contextmanager
def _no_host_reads():
    """Every way a step could read a tensor's value on the host raises (a sync on a GPU)."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a host read of a tensor in the step")

    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("make", ["alig", "momo", "momo-fstar"])
def test_step_with_diagnostics_reads_nothing_on_the_host(backend, make, monkeypatch):
    # the torch path reads its pass-2 numbers on the host on a CPU (a memory read there);
    # this checks the code it runs on a GPU
    monkeypatch.setattr(functional, "HOST_NUMBERS_ON_CPU", False)
    model = _model()
    if make == "alig":
        opt = FusedALIG(_groups(model), backend=backend)
    else:
        opt = FusedMoMo(model.parameters(), lr=1.0, weight_decay=0.01, use_fstar=make == "momo-fstar", backend=backend)
    opt.enable_history(3)
    x = torch.randn(8, 5)
    for step in range(3):
        # the same .grad tensors every step: no table rebuild (which reads host tables)
        model.zero_grad(set_to_none=False)
        loss = model(x).pow(2).mean()
        loss.backward()
        if step == 0:
            opt.step(loss=loss)  # builds the tables and state
            continue
        loss = loss.detach()
        with _no_host_reads():
            opt.step(loss=loss)
            opt.diagnostics()
            opt.history()
    assert int(opt.history()["step"][-1]) == 2
