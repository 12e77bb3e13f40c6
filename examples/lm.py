"""A small GPT trained on real text with FusedALIG, against AdamW and SGD: ``alig-fused demo lm``.

From a clone of the repository: ``python -m examples.lm`` (or ``alig-fused demo lm``, which
loads this file when it sits beside the installed package). The library does not import it.

- Data: byte-level tokens (256 symbols, one token = one byte) of text no one here wrote and
  every Python ships: the English prose of Python's reference manual (``pydoc_data.topics``,
  the help() topics, ~0.5 MB on Python 3.11), or with ``--data stdlib`` those plus the
  standard library's own ``.py`` files (~30 MB, for the GPU size). The text is split in
  order: the first 90% trains, the next 5% is the validation split (curves, and the choice
  within each sweep), the last 5% the test split (reported once per run at the end, never
  used to choose). The topics are concatenated in sorted order, so the held-out splits are
  topics the model never saw (alphabetically the last ones; one topic is cut at each
  boundary); with ``--data stdlib`` they are the last source files in path order.
- Model: a decoder-only transformer written out below: pre-LayerNorm blocks, causal
  self-attention (``F.scaled_dot_product_attention``), a GELU MLP, learned positions, the
  output layer tied to the token embedding.
- Optimizers, each for the same fixed number of steps on the same batches from the same
  initial weights, each with its own sweep of 3 values of its one step hyper-parameter:
  FusedALIG (Nesterov momentum 0.9, the weight matrices kept in an l2 ball, no schedule:
  sweep of the cap ``max_lr``), AdamW (warm-up then cosine decay, weight decay on the
  matrices: sweep of the peak lr), SGD with Nesterov momentum (the same warm-up and cosine
  decay: sweep of the peak lr), and FusedMoMo (beta 0.9, lb 0, no schedule: sweep of lr). The best
  of each sweep is picked by the final validation loss; every run is reported.
- Output (``--out``): ``val_loss.png`` (validation bits per byte against steps and against
  training wall time), ``alig_step_size.png`` (ALI-G's step size and the uncapped Polyak
  step, every step), ``param_norm.png`` (the norm of the projected parameters against the
  ball), ``summary.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import alig_fused
from alig_fused import FusedALIG

from .outputs import curves_to_lists, markdown_table, write_outputs

__all__ = ["SIZES", "LMConfig", "run_lm_demo", "main"]

PLOT_FILES = ("val_loss.png", "alig_step_size.png", "param_norm.png")
BITS_PER_NAT = 1 / math.log(2)


@dataclass(frozen=True)
class Size:
    """A model shape and its training budget."""

    n_layer: int
    n_head: int
    d_model: int
    context: int  # tokens (= bytes) per sequence
    batch: int  # sequences per step
    steps: int  # the default budget, the same for every run
    eval_every: int  # steps between validation evaluations
    eval_tokens: int  # validation tokens per evaluation during training (the final one uses the whole split)
    data: str  # "topics" or "stdlib"
    final_eval_tokens: int | None  # tokens of each of the validation and test splits in the final numbers (None: all)
    # The sweeps: 3 values each, the same budget for every optimizer.
    alig_max_lr: tuple[float, ...]
    adamw_lr: tuple[float, ...]
    sgd_lr: tuple[float, ...]
    momo_lr: tuple[float, ...]
    ball_ratio: float = 1.5  # ALI-G's max_norm = ball_ratio x the initial norm of the weight matrices


SIZES = {
    # For the CI smoke test: seconds.
    "toy": Size(n_layer=1, n_head=2, d_model=32, context=32, batch=8, steps=12, eval_every=6, eval_tokens=2048,
                data="topics", final_eval_tokens=4096, alig_max_lr=(0.03, 0.1, 0.3), adamw_lr=(3e-3, 1e-2, 3e-2),
                sgd_lr=(0.03, 0.1, 0.3), momo_lr=(0.3, 1.0, 3.0)),
    # The CPU default: 12 runs of 160 steps, ~12 s of one core each (109 s of CPU time in all on the shared 2-core
    # machine). The sweeps are centred on the best of a wider look at this size (160-200 steps):
    # ALI-G max_lr 0.03 (0.1 worse, 1 diverges), AdamW lr 3e-3 (1e-2 and 3e-2 worse), SGD lr
    # 0.03 (0.3 worse, 1 diverges). ALI-G's ball: radius 1x / 1.25x / 1.5x the initial norm of the
    # matrices gave 3.70 / 3.68 / 3.66 bpb at max_lr 0.03 (1.5x is not reached there in 160
    # steps; at max_lr 0.1 it binds from step ~30 and helps: 4.07 against 4.28 without a ball).
    # MoMo: lr 0.3 / 1 / 3 gave 3.663 / 4.284 / 4.055, the best at the sweep's edge, so its
    # sweep is moved down one step to bracket it.
    "tiny": Size(n_layer=2, n_head=4, d_model=64, context=64, batch=16, steps=160, eval_every=20, eval_tokens=8192,
                 data="topics", final_eval_tokens=None, alig_max_lr=(0.01, 0.03, 0.1), adamw_lr=(1e-3, 3e-3, 1e-2),
                 sgd_lr=(0.01, 0.03, 0.1), momo_lr=(0.1, 0.3, 1.0)),
    # GPT-2 small's shape (12 layers, 12 heads, 768 wide, 1,024 context; 86M parameters with the
    # 256-byte vocabulary) for a GPU: bf16 autocast, fused backends, 16 x 1,024 tokens a step.
    # Its sweeps are starting points, not yet run on a GPU.
    "gpt2": Size(n_layer=12, n_head=12, d_model=768, context=1024, batch=16, steps=2000, eval_every=100,
                 eval_tokens=131072, data="stdlib", final_eval_tokens=1 << 21, alig_max_lr=(0.01, 0.03, 0.1),
                 adamw_lr=(3e-4, 6e-4, 1.2e-3), sgd_lr=(0.01, 0.03, 0.1), momo_lr=(0.3, 1.0, 3.0)),
}


@dataclass
class LMConfig:
    size: str = "tiny"
    steps: int | None = None  # None: the size's budget
    data: str | None = None  # None: the size's data
    device: str = "cpu"
    backend: str = "auto"  # FusedALIG's backend
    seed: int = 0
    out: str = "lm_out"
    threads: int = 1  # CPU threads (0: torch's default); 1 is steadiest on shared cores
    optimizers: tuple[str, ...] = ("alig", "adamw", "sgd", "momo")
    quiet: bool = False
    bf16: bool | None = None  # bfloat16 autocast for the forward pass; None: on CUDA only
    warmup_fraction: float = 0.1  # AdamW's and SGD's linear warm-up, then cosine to 0


# -- data ------------------------------------------------------------------------------------


def load_text(source: str) -> bytes:
    """The training text as bytes: the reference manual's topics, optionally plus the stdlib sources."""
    from pydoc_data.topics import topics

    parts = [topics[name].encode() for name in sorted(topics)]
    if source == "stdlib":
        stdlib = sysconfig.get_paths()["stdlib"]
        for root, dirs, files in os.walk(stdlib):
            dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(root, name), "rb") as f:
                        parts.append(f.read())
    elif source != "topics":
        raise ValueError(f"unknown data {source!r}: 'topics' or 'stdlib'")
    return b"\n\n".join(parts)


@dataclass
class Splits:
    train: Tensor  # uint8 byte values, on the device
    val: Tensor
    test: Tensor


def split_text(text: bytes, device: torch.device) -> Splits:
    """In order: 90% train, 5% validation, 5% test."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    n_train, n_val = int(0.9 * len(data)), int(0.05 * len(data))
    return Splits(data[:n_train].to(device), data[n_train:n_train + n_val].to(device),
                  data[n_train + n_val:].to(device))


def batch_starts(n_tokens: int, size: Size, steps: int, seed: int, device: torch.device) -> Tensor:
    """[steps, batch] random window starts, drawn once: every run sees the same batches."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - size.context - 1, (steps, size.batch), generator=generator).to(device)


def windows(data: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-byte targets, [len(starts), context] int64 each."""
    index = starts[:, None] + torch.arange(context + 1, device=data.device)
    tokens = data[index].long()
    return tokens[:, :-1], tokens[:, 1:]


def eval_starts(n_tokens: int, context: int, max_tokens: int | None, device: torch.device) -> Tensor:
    """Non-overlapping windows of a split: all of them, or ``max_tokens`` worth spread evenly over it."""
    n_windows = (n_tokens - 1) // context
    index = torch.arange(n_windows)
    if max_tokens is not None and max_tokens // context < n_windows:
        index = torch.linspace(0, n_windows - 1, max(1, max_tokens // context)).long()
    return (index * context).to(device)


# -- the model -------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.attn_out = nn.Linear(d_model, d_model, bias=False)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp_in = nn.Linear(d_model, 4 * d_model, bias=False)
        self.mlp_out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x))))


class GPT(nn.Module):
    """A decoder-only transformer over bytes; the output layer is the token embedding (tied)."""

    def __init__(self, size: Size, vocab: int = 256):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, size.d_model)
        self.position_embedding = nn.Embedding(size.context, size.d_model)
        self.blocks = nn.ModuleList(Block(size.d_model, size.n_head) for _ in range(size.n_layer))
        self.ln_final = nn.LayerNorm(size.d_model)
        # GPT-2's initialisation: N(0, 0.02), the residual outputs scaled by 1/sqrt(2 n_layer).
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * size.n_layer) if name.endswith(("attn_out.weight", "mlp_out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-byte cross-entropy in nats."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.ln_final(x) @ self.token_embedding.weight.T
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def param_groups(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(weight matrices and embeddings, LayerNorm parameters): the usual weight-decay split."""
    params = list(model.parameters())
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


# -- the optimizers compared -----------------------------------------------------------------


@dataclass
class Contender:
    key: str  # "alig", "adamw", "sgd", "momo"
    label: str
    swept: str  # the hyper-parameter swept, as the table names it
    values: tuple[float, ...]
    settings: str  # everything else, fixed
    # (matrices, others, swept value, total steps, initial matrix norm) -> (optimizer, scheduler or None)
    make: Callable[..., tuple[torch.optim.Optimizer, Any]]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    """Linear warm-up over the first ``warmup_fraction`` of the steps, then cosine to 0."""
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def contenders(cfg: LMConfig, size: Size, device: torch.device) -> list[Contender]:
    fused = device.type == "cuda"  # torch's fused AdamW and SGD kernels; the foreach ones on CPU
    warm = f"{cfg.warmup_fraction:.0%} linear warm-up, cosine to 0"

    def make_alig(matrices, others, max_lr, total_steps, matrix_norm):
        groups = [dict(params=matrices, max_norm=size.ball_ratio * matrix_norm), dict(params=others)]
        return FusedALIG(groups, lr=max_lr, momentum=0.9, backend=cfg.backend), None

    def make_adamw(matrices, others, lr, total_steps, matrix_norm):
        groups = [dict(params=matrices, weight_decay=0.1), dict(params=others, weight_decay=0.0)]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused or None)
        return opt, warmup_cosine(opt, total_steps, cfg.warmup_fraction)

    def make_sgd(matrices, others, lr, total_steps, matrix_norm):
        opt = torch.optim.SGD(matrices + others, lr=lr, momentum=0.9, nesterov=True, fused=fused or None)
        return opt, warmup_cosine(opt, total_steps, cfg.warmup_fraction)

    found = [
        Contender("alig", "ALI-G (FusedALIG)", "max_lr", size.alig_max_lr,
                  f"momentum=0.9, matrices in an l2 ball of {size.ball_ratio:g}x their initial norm, no schedule",
                  make_alig),
        Contender("adamw", "AdamW", "lr", size.adamw_lr,
                  f"betas=(0.9, 0.95), weight_decay=0.1 on the matrices, {warm}", make_adamw),
        Contender("sgd", "SGD (Nesterov)", "lr", size.sgd_lr, f"momentum=0.9, {warm}", make_sgd),
    ]
    # --- FusedMoMo slot ------------------------------------------------------------------
    # FusedMoMo (MoMo of Schaipp et al., ICML 2024), with MoMo's own arguments (lr, beta, lb,
    # weight_decay) and ``step(loss=...)`` as FusedALIG's (the hasattr guard keeps the script
    # running on an older alig_fused).
    if hasattr(alig_fused, "FusedMoMo"):
        def make_momo(matrices, others, lr, total_steps, matrix_norm):
            opt = alig_fused.FusedMoMo([dict(params=matrices), dict(params=others)], lr=lr, beta=0.9, lb=0.0,
                                       weight_decay=0.0, backend=cfg.backend)
            return opt, None

        found.append(Contender("momo", "MoMo (FusedMoMo)", "lr", size.momo_lr,
                               "beta=0.9, lb=0, weight_decay=0, no schedule", make_momo))
    # ---------------------------------------------------------------------------------------
    return [c for c in found if c.key in cfg.optimizers]


def takes_loss(optimizer: torch.optim.Optimizer) -> bool:
    """The Polyak-type optimizers get the loss in their step."""
    return isinstance(optimizer, FusedALIG) or type(optimizer).__name__ == "FusedMoMo"


# -- training --------------------------------------------------------------------------------


@dataclass
class Curves:
    """One run's record; device tensors while training (no host sync), lists at the end."""

    train_loss: list = field(default_factory=list)  # mini-batch loss per step (nats)
    matrix_norm: list = field(default_factory=list)  # ||W|| of the matrices (ALI-G's ball) after each step
    step_size: list = field(default_factory=list)  # ALI-G: group["step_size"] of each step
    polyak_step: list = field(default_factory=list)  # ALI-G: max(loss - f_star, 0) / (||g||^2 + eps), uncapped
    lr: list = field(default_factory=list)  # the scheduled lr in force (host numbers)
    eval_step: list = field(default_factory=list)
    eval_time_s: list = field(default_factory=list)  # training wall time at each evaluation (excluding evaluations)
    val_loss: list = field(default_factory=list)  # nats


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def mean_loss(model: nn.Module, data: Tensor, starts: Tensor, size: Size, autocast: bool) -> Tensor:
    """Mean next-byte loss (nats) over the windows at ``starts``, as a device tensor."""
    model.eval()
    total = torch.zeros((), device=data.device)
    for chunk in starts.split(size.batch * 4):
        inputs, targets = windows(data, chunk, size.context)
        with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=autocast):
            total += model(inputs, targets).float() * len(chunk)
    model.train()
    return total / len(starts)


def train(contender: Contender, value: float, splits: Splits, starts: Tensor, cfg: LMConfig, size: Size,
          device: torch.device) -> dict:
    """Train a fresh model (same seed, same batches for every run); return its record."""
    from tqdm import tqdm

    steps = starts.shape[0]
    autocast = device.type == "cuda" if cfg.bf16 is None else cfg.bf16
    torch.manual_seed(cfg.seed)
    model = GPT(size).to(device)
    matrices, others = param_groups(model)
    initial_matrix_norm = float(torch.nn.utils.get_total_norm(matrices))
    optimizer, scheduler = contender.make(matrices, others, value, steps, initial_matrix_norm)
    all_params = matrices + others
    val_starts = eval_starts(len(splits.val), size.context, size.eval_tokens, device)
    curves = Curves()

    bar = tqdm(total=steps, desc=f"{contender.label} {contender.swept}={value:g}", unit="step", leave=True,
               disable=True if cfg.quiet else None)
    train_time = 0.0  # the training steps' wall time; the evaluations are not counted
    diverged = False

    def evaluate(step: int) -> bool:
        val = mean_loss(model, splits.val, val_starts, size, autocast)
        curves.eval_step.append(step)
        curves.eval_time_s.append(train_time)
        curves.val_loss.append(val)
        bits = val.item() * BITS_PER_NAT  # the only host sync, off the timed steps
        bar.set_postfix(val_bpb=f"{bits:.3f}", refresh=False)
        return math.isfinite(bits)

    evaluate(0)
    segment_start = time.perf_counter()
    for step in range(steps):
        inputs, targets = windows(splits.train, starts[step], size.context)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        group = optimizer.param_groups[0]
        curves.lr.append(group["lr"])
        curves.train_loss.append(loss.detach())
        if takes_loss(optimizer):
            if isinstance(optimizer, FusedALIG) and "f_star" in group:  # ALI-G (FusedMoMo's groups have lb)
                # The uncapped Polyak step, from the same loss and gradients the step sees.
                grad_sq_norm = torch.nn.utils.get_total_norm([p.grad for p in all_params]).square()
                gap = (loss.detach().float() - group["f_star"]).clamp(min=0)
                curves.polyak_step.append(gap / (grad_sq_norm + group["eps"]))
            optimizer.step(loss=loss)
            if group.get("step_size") is not None:
                curves.step_size.append(group["step_size"].clone())  # overwritten in place by the next step
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        curves.matrix_norm.append(torch.nn.utils.get_total_norm(matrices))
        bar.update(1)
        if (step + 1) % size.eval_every == 0 or step + 1 == steps:
            synchronize(device)  # the device catches up only here, not every step
            train_time += time.perf_counter() - segment_start
            if not evaluate(step + 1):
                diverged = True  # a non-finite validation loss: the rest of the budget is not spent
                break
            segment_start = time.perf_counter()
    bar.close()

    trained_steps = len(curves.train_loss)
    final_val = curves.val_loss[-1].item()
    result = {
        "optimizer": contender.key,
        "label": contender.label,
        "swept": contender.swept,
        "value": value,
        "settings": contender.settings,
        "steps": trained_steps,
        "diverged": diverged,
        "train_time_s": train_time,
        "tokens_per_s": trained_steps * size.batch * size.context / train_time,
        "skipped_steps": int(optimizer.skipped_steps) if hasattr(optimizer, "skipped_steps") else None,
        "backend": getattr(optimizer, "last_backend", None),
        "initial_matrix_norm": initial_matrix_norm,
        "max_norm": optimizer.param_groups[0].get("max_norm") if isinstance(optimizer, FusedALIG) else None,
    }
    result.update(curves_to_lists(curves))
    result["val_bpb"] = [x * BITS_PER_NAT for x in result.pop("val_loss")]
    result["train_bpb"] = [x * BITS_PER_NAT for x in result.pop("train_loss")]
    result["initial_val_bpb"] = result["val_bpb"][0]
    # The final numbers over the validation and test splits (the curves use a part of validation).
    def full(data: Tensor) -> float:
        starts = eval_starts(len(data), size.context, size.final_eval_tokens, device)
        return mean_loss(model, data, starts, size, autocast).item() * BITS_PER_NAT

    result["final_val_bpb"] = full(splits.val) if math.isfinite(final_val) else math.inf
    result["test_bpb"] = full(splits.test) if math.isfinite(final_val) else math.inf
    return result


# -- outputs ---------------------------------------------------------------------------------


def best_runs(results: dict) -> dict[str, dict]:
    return {key: sweep["runs"][sweep["best"]] for key, sweep in results["sweeps"].items()}


def format_table(results: dict) -> str:
    """Markdown: per optimizer, the sweep (final validation bpb of each value), the pick, its numbers."""
    header = ["Optimizer", "Swept (final val bpb)", "Picked", "Val bpb", "Test bpb", "Tokens/s", "Steps skipped"]
    rows = []
    for key, sweep in results["sweeps"].items():
        best = sweep["runs"][sweep["best"]]
        tried = ", ".join(f"{run['value']:g}: " + ("diverged" if run["diverged"] else f"{run['final_val_bpb']:.3f}")
                          for run in sweep["runs"])
        skipped = "-" if best["skipped_steps"] is None else str(best["skipped_steps"])
        rows.append([best["label"], f"{best['swept']} {tried}", f"{best['swept']}={best['value']:g}",
                     f"{best['final_val_bpb']:.3f}", f"{best['test_bpb']:.3f}", f"{best['tokens_per_s']:,.0f}", skipped])
    return markdown_table(header, rows)


def summary_md(results: dict) -> str:
    c, d, m = results["config"], results["data"], results["model"]
    settings = "".join(f"- {run['label']}: {run['settings']}\n" for run in best_runs(results).values())
    return (
        f"# alig-fused demo lm: a {m['n_layer']}-layer GPT on bytes of {d['name']}\n\n"
        f"{d['train_bytes']:,} training / {d['val_bytes']:,} validation / {d['test_bytes']:,} test bytes "
        f"(in order, 90/5/5); model {m['parameters']:,} parameters ({m['n_layer']} layers, {m['n_head']} heads, "
        f"width {m['d_model']}, context {m['context']}); {c['steps']} steps of {m['batch']} x {m['context']} tokens "
        f"for every run; seed {c['seed']}; device `{results['device']}` ({results['cpu_threads']} CPU thread(s)), "
        f"FusedALIG backend `{results['alig_backend']}`, torch {results['torch']}, {results['date']}.\n\n"
        "Each optimizer's one step hyper-parameter was swept over 3 values; the pick is the lowest final "
        "validation loss; test bpb is the held-out test split, reported, never used to pick. Bits per byte = "
        "cross-entropy / ln 2 (a byte is a token). Tokens/s counts training steps only (no evaluation).\n\n"
        + format_table(results) + "\n\n" + settings + "\n"
        + "".join(f"![{name}]({name})\n" for name in PLOT_FILES)
    )


COLORS = {"alig": "tab:blue", "adamw": "tab:red", "sgd": "tab:orange", "momo": "tab:green"}


def plot_val_loss(plt, results: dict):
    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for key, sweep in results["sweeps"].items():
        for index, run in enumerate(sweep["runs"]):
            best = index == sweep["best"]
            style = dict(color=COLORS.get(key), lw=2 if best else 0.8, alpha=1 if best else 0.35,
                         marker="." if best else None,
                         label=f"{run['label']}, {run['swept']}={run['value']:g}" + (" (picked)" if best else ""))
            ax_step.plot(run["eval_step"], run["val_bpb"], **style)
            if best:
                ax_time.plot(run["eval_time_s"], run["val_bpb"], **style)
    finite = [v for sweep in results["sweeps"].values() for run in sweep["runs"] for v in run["val_bpb"]
              if math.isfinite(v)]
    ax_step.set(xlabel="step", ylabel="validation loss (bits per byte)", title="Against steps (all sweep runs)",
                ylim=(min(finite) - 0.1, max(finite) + 0.1))
    ax_time.set(xlabel="training wall time (s, evaluations excluded)", title="Against wall time (the picked runs)")
    for ax in (ax_step, ax_time):
        ax.grid(True, alpha=0.3)
    ax_step.legend(fontsize=7, ncol=1)
    fig.suptitle(f"Byte-level GPT on {results['data']['name']}, device {results['device']}")
    return fig


def plot_step_size(plt, results: dict):
    runs = best_runs(results)
    if "alig" not in runs:
        return None
    alig = runs["alig"]
    steps = range(1, len(alig["step_size"]) + 1)
    fig, (ax_step, ax_loss) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, height_ratios=(3, 2))
    ax_step.plot(steps, alig["polyak_step"], lw=0.8, color="0.55",
                 label="uncapped Polyak step $\\max(\\ell - f_\\star, 0) / (\\|g\\|^2 + \\epsilon)$ (computed in the demo)")
    ax_step.plot(steps, alig["step_size"], lw=2, color="tab:blue", zorder=3,
                 label="ALI-G step size $\\gamma$ = group['step_size'] (on the cap wherever the lines meet)")
    ax_step.axhline(alig["value"], color="k", ls="--", lw=1, zorder=4, label=f"cap: max_lr = {alig['value']:g}")
    if "sgd" in runs:
        ax_step.plot(range(1, len(runs["sgd"]["lr"]) + 1), runs["sgd"]["lr"], color="tab:orange", lw=1,
                     label=f"SGD's scheduled lr (its pick, peak {runs['sgd']['value']:g})")
    positive = [v for v in alig["step_size"] + alig["polyak_step"] if v > 0]
    ax_step.set(yscale="log", ylabel="step size", ylim=(min(positive) / 2, max(positive) * 2),
                title=f"ALI-G's step $\\gamma = \\min(\\mathrm{{max\\_lr}}, \\ell / \\|g\\|^2)$ with $f_\\star = 0$ "
                      f"(max_lr = {alig['value']:g}, the pick)")
    ax_step.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax_loss.plot(steps, alig["train_bpb"], lw=0.8, color="tab:blue", label="ALI-G mini-batch loss")
    ax_loss.set(xlabel="step", ylabel="mini-batch loss (bits per byte)")
    ax_loss.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    for ax in (ax_step, ax_loss):
        ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_param_norm(plt, results: dict):
    runs = best_runs(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    if "alig" in runs:
        ax.axhline(runs["alig"]["max_norm"], color="k", ls="--", lw=1,
                   label=f"ALI-G's ball: max_norm = {runs['alig']['max_norm']:.1f}")
    for key, run in runs.items():
        ax.plot(range(1, len(run["matrix_norm"]) + 1), run["matrix_norm"], color=COLORS.get(key),
                lw=2.2 if key == "alig" else 1.2, label=f"{run['label']}, {run['swept']}={run['value']:g}")
    ax.set(xlabel="step", ylabel="$\\|W\\|_2$ (weight matrices and embeddings)", ylim=(0, None),
           title="Norm of the weight matrices (the group ALI-G projects); LayerNorm parameters excluded")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


# -- the entry point -------------------------------------------------------------------------


def run_lm_demo(cfg: LMConfig) -> dict:
    """Run every sweep, pick the best of each, write the plots, summary.md and results.json."""
    size = SIZES[cfg.size]
    size = replace(size, data=cfg.data or size.data)
    cfg = replace(cfg, steps=cfg.steps or size.steps, data=size.data)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    previous_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        splits = split_text(load_text(size.data), device)
        starts = batch_starts(len(splits.train), size, cfg.steps, cfg.seed, device)
        torch.manual_seed(cfg.seed)
        n_params = sum(p.numel() for p in GPT(size).parameters())
        say(f"lm demo: {n_params:,}-parameter GPT, {cfg.steps} steps x {size.batch} x {size.context} tokens, "
            f"{len(splits.train):,} train bytes of {size.data}, device {device}")
        sweeps = {}
        for contender in contenders(cfg, size, device):
            runs = [train(contender, value, splits, starts, cfg, size, device) for value in contender.values]
            best = min(range(len(runs)), key=lambda i: runs[i]["final_val_bpb"])
            sweeps[contender.key] = {"swept": contender.swept, "values": list(contender.values), "best": best,
                                     "runs": runs}
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)

    results = {
        "config": asdict(cfg),
        "size": asdict(size),
        "device": str(device),
        "cpu_threads": threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "alig_backend": sweeps["alig"]["runs"][0]["backend"] if "alig" in sweeps else None,
        "fused_momo_available": hasattr(alig_fused, "FusedMoMo"),
        "data": {"name": "Python's reference manual (pydoc_data.topics)" + (
                     " and the standard library's .py files" if size.data == "stdlib" else ""),
                 "source": size.data, "train_bytes": len(splits.train), "val_bytes": len(splits.val),
                 "test_bytes": len(splits.test), "split": "in order: first 90% train, next 5% validation, last 5% test"},
        "model": {"parameters": n_params, "n_layer": size.n_layer, "n_head": size.n_head, "d_model": size.d_model,
                  "context": size.context, "batch": size.batch},
        "sweeps": sweeps,
    }
    plotters = dict(zip(PLOT_FILES, (plot_val_loss, plot_step_size, plot_param_norm)))
    write_outputs(results, cfg.out, plotters, summary_md)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alig-fused demo lm",
        description="Train a small byte-level GPT on Python's reference manual with FusedALIG, AdamW and SGD "
                    "(a 3-value sweep each); write plots, summary.md and results.json.")
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="model and budget: toy (CI, seconds), tiny (CPU default, ~2 min), gpt2 (GPT-2 small's "
                             "shape, for a GPU)")
    parser.add_argument("--steps", type=positive_int, default=None, help="steps per run (default: the size's)")
    parser.add_argument("--data", choices=("topics", "stdlib"), default=None,
                        help="topics: pydoc_data.topics; stdlib: plus the standard library's .py files "
                             "(default: the size's)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu); cuda uses bf16 autocast")
    parser.add_argument("--backend", choices=("auto", "torch", "cpp", "triton"), default="auto",
                        help="FusedALIG's backend (default: auto)")
    parser.add_argument("--optimizers", default=",".join(LMConfig.optimizers),
                        help="comma-separated subset of alig,adamw,sgd,momo (default: all that exist)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast for the forward pass (default: on CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1; 0: torch's default)")
    parser.add_argument("--out", default="lm_out", help="output folder (default: lm_out)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optimizers = tuple(name.strip() for name in args.optimizers.split(",") if name.strip())
    unknown = set(optimizers) - set(LMConfig.optimizers)
    if unknown:
        print(f"alig-fused demo lm: error: unknown optimizer(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("alig-fused demo lm: error: --device cuda was asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    cfg = LMConfig(size=args.size, steps=args.steps, data=args.data, device=args.device, backend=args.backend,
                   seed=args.seed, out=args.out, threads=args.threads, optimizers=optimizers, quiet=args.quiet,
                   bf16=args.bf16)
    start = time.perf_counter()
    results = run_lm_demo(cfg)
    print(f"device: {results['device']}, FusedALIG backend: {results['alig_backend']}, "
          f"total {time.perf_counter() - start:.1f} s")
    print(format_table(results))
    print("wrote " + ", ".join(results["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
