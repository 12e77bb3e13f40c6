"""FusedALIG inside the real Trainer, Lightning and accelerate loops (CPU, tiny models).

For each: k micro-batches of gradient accumulation give the step sizes and parameters of one
step on the whole batch, and those equal the float64 reference loop's on the full-batch loss.
CI installs the frameworks and sets ALIG_FUSED_REQUIRE_INTEGRATIONS=1, so a missing one fails
there; elsewhere it is skipped, saying which.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from alig_fused import FusedALIG
from test_accumulate_loss import HPARAMS, batch_loss, check_against_reference, make_problem, reference_run

STEPS, K = 3, 4
REQUIRED = os.environ.get("ALIG_FUSED_REQUIRE_INTEGRATIONS") == "1"


def need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if REQUIRED:
            pytest.fail(f"{module} is required here (ALIG_FUSED_REQUIRE_INTEGRATIONS=1) but does not import: {error}")
        pytest.skip(f"{module} is not installed: {error}")


@pytest.fixture(scope="module")
def problem():
    model, x, y = make_problem()
    return x, y, reference_run(model, x, y, steps=STEPS)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide state; each run here starts from none."""
    state = need("accelerate.state")
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()
    yield
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()


# ----- Hugging Face Trainer ------------------------------------------------------------------


class HFModel(torch.nn.Module):
    """A Trainer-style model: forward(**batch) returns a dict with the loss."""

    def __init__(self, net, normalised_by_items):
        super().__init__()
        self.net = net
        self.normalised_by_items = normalised_by_items
        if normalised_by_items:  # Trainer passes num_items_in_batch and does not divide
            self.forward = self.forward_with_items

    def forward(self, x, labels):
        return {"loss": batch_loss(self.net, x, labels)}

    def forward_with_items(self, x, labels, num_items_in_batch=None, **kwargs):
        loss = torch.nn.functional.cross_entropy(self.net(x), labels, reduction="sum")
        return {"loss": loss / num_items_in_batch}


def run_hf_trainer(tmp_path, x, y, k, normalised_by_items):
    transformers = need("transformers")
    from alig_fused.integrations.transformers import ALIGTrainer

    model = HFModel(make_problem()[0], normalised_by_items)
    data = [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(data) // k, gradient_accumulation_steps=k,
        num_train_epochs=STEPS, learning_rate=HPARAMS["lr"], use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )
    sizes = []

    class Record(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            sizes.append(float(trainer.optimizer.optimizer.param_groups[0]["step_size"]))

    alig_kwargs = dict(momentum=HPARAMS["momentum"], max_norm=HPARAMS["max_norm"], backend="torch")
    with pytest.warns(UserWarning, match="clipping off") as caught:
        trainer = ALIGTrainer(model=model, args=args, train_dataset=data, alig_kwargs=alig_kwargs, callbacks=[Record()])
    assert any("'constant'" in str(w.message) for w in caught)  # the linear decay of the cap went too
    assert args.max_grad_norm == 1.0  # the caller's arguments are left as they were
    trainer.train()
    return sizes, model.net, trainer


@pytest.mark.parametrize("normalised_by_items", [False, True], ids=["divided-by-steps", "num_items_in_batch"])
def test_hf_trainer_accumulation_equals_the_full_batch(tmp_path, problem, fresh_accelerate_state, normalised_by_items):
    x, y, ref = problem
    sizes, net, trainer = run_hf_trainer(tmp_path, x, y, K, normalised_by_items)
    assert trainer.state.global_step == STEPS and len(sizes) == STEPS
    assert isinstance(trainer.optimizer.optimizer, FusedALIG) and trainer.args.max_grad_norm == 0.0
    assert trainer.optimizer.param_groups[0]["lr"] == HPARAMS["lr"]  # a constant cap, not decayed to 0
    check_against_reference(sizes, net, ref)


def test_hf_trainer_rejects_weight_decay_and_other_optimizers(tmp_path, fresh_accelerate_state):
    transformers = need("transformers")
    from alig_fused.integrations.transformers import ALIGTrainer

    model = HFModel(make_problem()[0], False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), weight_decay=0.01, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="max_norm"):
        ALIGTrainer(model=model, args=args)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_grad_norm=0.5)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="FusedALIG"):
        ALIGTrainer(model=model, args=args, optimizers=(sgd, None))
    with pytest.warns(UserWarning, match="clips the gradient"):  # a value the user chose stays, with a warning
        trainer = ALIGTrainer(model=model, args=args)
    assert trainer.args.max_grad_norm == 0.5


# ----- Lightning -----------------------------------------------------------------------------


def lightning_module(k, manual):
    pl = need("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_problem()[0]
            self.automatic_optimization = not manual
            self.sizes = []

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            loss = batch_loss(self.net, xb, yb)
            if not manual:
                return loss  # Lightning divides it by accumulate_grad_batches
            opt = self.optimizers()
            self.manual_backward(loss / k)
            if (batch_idx + 1) % k == 0:
                opt.step()  # Lightning passes a closure and no loss
                opt.zero_grad()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if (batch_idx + 1) % k == 0:
                self.sizes.append(float(self.optimizers().optimizer.param_groups[0]["step_size"]))

        def configure_optimizers(self):
            return FusedALIG(self.net.parameters(), backend="torch", **HPARAMS)

    return Module()


def run_lightning(tmp_path, x, y, k, manual, precision):
    pl = need("lightning.pytorch")
    from alig_fused.integrations.lightning import ALIGCallback

    module = lightning_module(k, manual)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x) // k)
    kwargs = dict(precision=precision)
    scaler = None
    if precision == "16-mixed":  # on a CPU Lightning turns "16-mixed" into bf16; fp16 + GradScaler by hand
        from lightning.pytorch.plugins.precision import MixedPrecision

        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        kwargs = dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=STEPS, accumulate_grad_batches=1 if manual else k,
        callbacks=[ALIGCallback()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs,
    )
    trainer.fit(module, loader)
    opt = module.optimizers().optimizer
    assert int(opt.skipped_steps) == 0 and len(module.sizes) == STEPS
    if scaler is not None:
        assert scaler.get_scale() == 2.0**8  # the scaler ran (and never overflowed)
    return module.sizes, module.net


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_accumulation_equals_the_full_batch(tmp_path, problem, manual):
    x, y, ref = problem
    sizes, net = run_lightning(tmp_path, x, y, K, manual, "32-true")
    check_against_reference(sizes, net, ref)


@pytest.mark.parametrize(
    "manual, precision", [(False, "16-mixed"), (True, "16-mixed"), (False, "bf16-mixed")],
    ids=["automatic-16-mixed", "manual-16-mixed", "automatic-bf16-mixed"],
)
def test_lightning_mixed_precision_accumulation(tmp_path, problem, manual, precision):
    """Under autocast the loss and gradients are rounded, so k micro-batches are held to the
    same run on the whole batch (and loosely to the fp32 reference)."""
    x, y, (ref_sizes, _) = problem
    sizes, net = run_lightning(tmp_path, x, y, K, manual, precision)
    whole_sizes, whole_net = run_lightning(tmp_path, x, y, 1, manual, precision)
    # Rounding of the autocast gradients: about 2**-11 (fp16) or 2**-8 (bf16) relative; the
    # bug this guards against (the last micro-batch's loss / k) is a factor of about k.
    tolerance = 3e-2 if precision == "bf16-mixed" else 5e-3
    print(precision, "step sizes: k micro-batches", sizes, "whole batch", whole_sizes, "fp64 reference", ref_sizes)
    torch.testing.assert_close(torch.tensor(sizes), torch.tensor(whole_sizes), rtol=tolerance, atol=0)
    for p, q in zip(net.parameters(), whole_net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=tolerance)
    torch.testing.assert_close(torch.tensor(sizes, dtype=torch.float64), torch.tensor(ref_sizes, dtype=torch.float64), rtol=tolerance, atol=0)


# ----- accelerate ----------------------------------------------------------------------------


def run_accelerate(x, y, k, mixed_precision="no"):
    accelerate = need("accelerate")
    from alig_fused.integrations.accelerate import backward

    net = make_problem()[0]
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=k, cpu=True, mixed_precision=mixed_precision)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x) // k)
    net, opt, loader = accelerator.prepare(net, FusedALIG(net.parameters(), backend="torch", **HPARAMS), loader)
    sizes = []
    for _ in range(STEPS):
        for xb, yb in loader:
            with accelerator.accumulate(net):
                with accelerator.autocast():
                    loss = batch_loss(net, xb, yb)
                backward(accelerator, opt, loss)
                opt.step()  # AcceleratedOptimizer: a no-op until the last micro-batch
                opt.zero_grad()
        sizes.append(float(opt.optimizer.param_groups[0]["step_size"]))
    assert int(opt.optimizer.skipped_steps) == 0
    return sizes, accelerator.unwrap_model(net)


def test_accelerate_accumulation_equals_the_full_batch(problem, fresh_accelerate_state):
    x, y, ref = problem
    sizes, net = run_accelerate(x, y, K)
    check_against_reference(sizes, net, ref)


def test_accelerate_bf16(problem, fresh_accelerate_state):
    x, y, (ref_sizes, _) = problem
    sizes, _ = run_accelerate(x, y, K, mixed_precision="bf16")
    torch.testing.assert_close(torch.tensor(sizes, dtype=torch.float64), torch.tensor(ref_sizes, dtype=torch.float64), rtol=2e-2, atol=0)


def test_accelerate_backward_needs_fused_alig(fresh_accelerate_state):
    accelerate = need("accelerate")
    from alig_fused.integrations.accelerate import backward

    net = make_problem()[0]
    accelerator = accelerate.Accelerator(cpu=True)
    net, sgd = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="FusedALIG"):
        backward(accelerator, sgd, net(torch.ones(1, 5)).sum())
    assert all(p.grad is None for p in net.parameters())  # checked before the backward
