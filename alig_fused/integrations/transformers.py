"""FusedALIG in the Hugging Face Trainer: ``ALIGTrainer`` in place of ``Trainer``.

Trainer calls ``optimizer.step()`` with no loss, and its callbacks never see the loss. The
subclass hands FusedALIG each micro-batch's loss exactly as ``Trainer.training_step``
backwarded it (already divided by the accumulation steps, or normalised by
``num_items_in_batch``; unscaled), so the step uses their sum, the loss of the gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import transformers
from transformers.trainer_utils import SchedulerType

from ..optim import FusedALIG
from . import find_alig

_UPSTREAM = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}


class ALIGTrainer(transformers.Trainer):
    """``transformers.Trainer`` that steps FusedALIG on the loss it backwarded.

    Without ``optimizers=``, the optimizer is ``FusedALIG(trainable params,
    lr=args.learning_rate, **alig_kwargs)`` (``learning_rate`` is ALI-G's cap).
    ``alig_defaults=True`` (default) turns off what Trainer does by default and what
    silently changes ALI-G, with a warning: gradient clipping (``max_grad_norm`` 1.0 -> 0:
    clipping before the step changes ALI-G's ``||g||^2``) and the linear decay of the cap to 0
    (``lr_scheduler_type`` "linear" -> "constant", or "constant_with_warmup" with warmup).
    Any other value you set is kept; a clipping one still warns.
    """

    def __init__(self, *args: Any, alig_kwargs: dict | None = None, alig_defaults: bool = True, **kwargs: Any):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is None:
            training_args = transformers.TrainingArguments(output_dir="tmp_trainer")
        training_args = copy.copy(training_args)  # the caller's object stays as it was
        _adapt_arguments(training_args, alig_defaults)
        if len(args) > 1:
            args = (args[0], training_args, *args[2:])
        else:
            kwargs["args"] = training_args
        optimizer = kwargs.get("optimizers", (None, None))[0]
        if optimizer is not None and find_alig(optimizer) is None:
            raise TypeError(f"ALIGTrainer steps a FusedALIG; optimizers= holds a {type(optimizer).__name__}")
        self.alig_kwargs = dict(alig_kwargs or {})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is None:
            model = self.model if model is None else model
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = FusedALIG(params, lr=self.args.learning_rate, **self.alig_kwargs)
        return self.optimizer

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)  # the backwarded tensor, detached
        alig = find_alig(self.optimizer)
        if alig is None:
            raise TypeError(f"ALIGTrainer steps a FusedALIG; the optimizer is a {type(self.optimizer).__name__}")
        alig.accumulate_loss(loss)
        return loss


def _adapt_arguments(args: Any, alig_defaults: bool) -> None:
    if args.weight_decay:
        raise ValueError(
            "FusedALIG has no weight decay (weight_decay="
            f"{args.weight_decay}); ALI-G projects onto an l2 ball: alig_kwargs=dict(max_norm=...)"
        )
    if alig_defaults and args.max_grad_norm == _UPSTREAM["max_grad_norm"]:
        warnings.warn(
            f"ALIGTrainer: gradient clipping off (max_grad_norm {args.max_grad_norm} -> 0): clipping "
            "changes ALI-G's step; set another value, or alig_defaults=False, to keep it",
            stacklevel=3,
        )
        args.max_grad_norm = 0.0
    elif args.max_grad_norm and args.max_grad_norm > 0:
        warnings.warn(
            f"ALIGTrainer: max_grad_norm={args.max_grad_norm} clips the gradient before the step, "
            "which changes ALI-G's step size (it sees the clipped ||g||^2)",
            stacklevel=3,
        )
    if alig_defaults and SchedulerType(args.lr_scheduler_type) == SchedulerType.LINEAR:
        constant = "constant_with_warmup" if (args.warmup_steps or getattr(args, "warmup_ratio", 0)) else "constant"
        warnings.warn(
            f"ALIGTrainer: lr_scheduler_type 'linear' -> {constant!r}: the default decays ALI-G's cap "
            "to 0; set another schedule, or alig_defaults=False, to keep one",
            stacklevel=3,
        )
        args.lr_scheduler_type = SchedulerType(constant)
    if args.learning_rate == _UPSTREAM["learning_rate"]:
        warnings.warn(
            f"ALIGTrainer: learning_rate is Trainer's default {args.learning_rate}, an Adam value; "
            "for FusedALIG it is the cap on the Polyak step (often 0.01 to 1)",
            stacklevel=3,
        )
