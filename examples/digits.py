"""What ALI-G does, shown on a real (small) data set: ``alig-fused demo`` (or, from a clone,
``python -m examples.digits``).

The same small CNN is trained three times on scikit-learn's bundled handwritten digits
(1,797 8x8 images, shipped with scikit-learn, no download), from the same initial weights
and with the same mini-batches, by

- ``FusedALIG`` with momentum 0.9 and the parameters kept in an l2 ball of radius
  ``max_norm``, as the ALI-G paper trains: one hyper-parameter for the step (``max_lr``)
  and no schedule;
- SGD with Nesterov momentum 0.9, a tuned learning rate and a cosine schedule;
- Adam with a tuned learning rate.

ALI-G's step is ``gamma = min(max_lr, loss / ||g||^2)``, set afresh every step from the
mini-batch loss and gradient, in place of a schedule. The demo records it every step
without a host sync (the 0-dim device tensors ``group["step_size"]`` are cloned into a
list and stacked once at the end) and plots it next to the uncapped Polyak step
``loss / ||g||^2``, SGD's cosine schedule and the mini-batch loss; and the parameter
norm against ``max_norm``. What it shows on this problem: the step sits at ``max_lr``
whenever the Polyak step is larger (most of training, since with cross-entropy ``||g||^2``
falls faster than the loss) and drops below it where the gradient is large for its loss,
mostly in the first epochs; the l2 ball, not a decaying step, keeps the late phase stable.

Written to ``out``: ``loss_accuracy.png``, ``alig_step_size.png``, ``param_norm.png``,
``summary.md`` and ``results.json``. ``run_demo`` returns the results as a dict.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alig_fused import FusedALIG, backends
from alig_fused.backends import BackendUnavailableError

from .outputs import curves_to_lists, markdown_table, write_outputs

__all__ = ["DemoConfig", "run_demo", "format_summary_table", "main"]

PLOT_FILES = ("loss_accuracy.png", "alig_step_size.png", "param_norm.png")


@dataclass
class DemoConfig:
    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    out: str = "demo_out"
    quiet: bool = False
    # CPU threads for the run (0 = leave torch's setting). The model is tiny (batches of 64
    # 8x8 images): measured on 2 shared cores, 5 epochs took 1.8-2.2 s with 1 thread whether
    # or not other processes were running, and with 2 threads 1.5-1.7 s alone but 7-13 s
    # beside other work (threads spinning for a core).
    threads: int = 1
    # How these were picked: 30 epochs on a validation split carved out of the training
    # set (test set untouched), seeds 0-5. ALI-G: max_lr in {0.1, 0.3, 0.5, 1, 3, 10} x
    # max_norm in {none, 8, 10, 15, 20, 40}; max_lr >= 3 (or max_norm 8, below the initial
    # norm of 8.9) kills the network, max_lr 0.5 with max_norm 10 was best on average
    # (99.2% validation accuracy) and keeps the ball constraint active. SGD: lr in
    # {0.01, 0.03, 0.05, 0.1, 0.3}, 0.3 diverges, 0.1 best. Adam: lr in {3e-4, 1e-3, 3e-3}.
    alig_max_lr: float = 0.5
    alig_max_norm: float = 10.0
    sgd_lr: float = 0.1
    adam_lr: float = 3e-3


# -- data and model ------------------------------------------------------------------------


class Digits(NamedTuple):
    train_images: Tensor  # [n, 1, 8, 8] float32 in [0, 1]
    train_labels: Tensor  # [n] int64
    test_images: Tensor
    test_labels: Tensor


def load_digits_split(device: torch.device) -> Digits:
    """scikit-learn's digits, a fixed stratified 75/25 train/test split, on ``device``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )

    def as_images(x):  # pixel values are 0..16
        return torch.tensor(x / 16.0, dtype=torch.float32, device=device).reshape(-1, 1, 8, 8)

    def as_labels(y):
        return torch.tensor(y, dtype=torch.int64, device=device)

    return Digits(as_images(train_x), as_labels(train_y), as_images(test_x), as_labels(test_y))


def make_model() -> nn.Module:
    """A small CNN (151k parameters): two 3x3 convolutions, a max-pool, two linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def batch_orders(n_samples: int, epochs: int, batch_size: int, seed: int, device: torch.device) -> Tensor:
    """[epochs, steps_per_epoch, batch_size] sample indices, drawn once on the host.

    Every optimizer sees the same mini-batches, and the loop makes no host-to-device copy
    (from pageable memory that would wait for the device). The incomplete last batch of
    each shuffle is dropped (1347 = 21 x 64 + 3: a 3-image batch makes a noisy step).
    """
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = n_samples // batch_size
    orders = torch.stack([torch.randperm(n_samples, generator=generator) for _ in range(epochs)])
    return orders[:, : steps_per_epoch * batch_size].reshape(epochs, steps_per_epoch, batch_size).to(device)


# -- the optimizers compared ---------------------------------------------------------------


@dataclass
class Contender:
    key: str  # "alig", "sgd", "adam"
    label: str  # for tables and legends
    settings: str  # the hyper-parameters, for the table
    make: Callable[[list[nn.Parameter], int], tuple[torch.optim.Optimizer, Any]]  # -> (opt, scheduler or None)


def contenders(cfg: DemoConfig) -> list[Contender]:
    def make_alig(params, total_steps):
        opt = FusedALIG(params, lr=cfg.alig_max_lr, momentum=0.9, max_norm=cfg.alig_max_norm, backend=cfg.backend)
        return opt, None

    def make_sgd(params, total_steps):
        opt = torch.optim.SGD(params, lr=cfg.sgd_lr, momentum=0.9, nesterov=True)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)

    def make_adam(params, total_steps):
        return torch.optim.Adam(params, lr=cfg.adam_lr), None

    return [
        Contender(
            "alig", "ALI-G (FusedALIG)",
            f"max_lr={cfg.alig_max_lr:g}, momentum=0.9, max_norm={cfg.alig_max_norm:g}",
            make_alig,
        ),
        Contender(
            "sgd", "SGD + cosine",
            f"lr={cfg.sgd_lr:g} cosine to 0, Nesterov momentum=0.9",
            make_sgd,
        ),
        Contender("adam", "Adam", f"lr={cfg.adam_lr:g}", make_adam),
    ]


# -- training ------------------------------------------------------------------------------


@dataclass
class Curves:
    """What one run records. Device tensors while training; turned into lists at the end."""

    epoch_train_loss: list = field(default_factory=list)  # full training set, epoch 0 = before training
    epoch_test_accuracy: list = field(default_factory=list)
    step_loss: list = field(default_factory=list)  # the mini-batch loss of each step
    step_param_norm: list = field(default_factory=list)  # ||w|| after each step
    step_size: list = field(default_factory=list)  # ALI-G's gamma of each step
    polyak_step: list = field(default_factory=list)  # loss / (||g||^2 + eps), before the max_lr cap
    step_lr: list = field(default_factory=list)  # the lr in force (host numbers: no sync)


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy, accuracy) as 0-dim device tensors: no host sync."""
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, accuracy


def step_and_record(optimizer: torch.optim.Optimizer, loss: Tensor, params: list[Tensor], curves: Curves) -> None:
    """One optimizer step; its diagnostics are kept as device tensors (no .item(), no sync).

    Every run pays for the parameter norm; ALI-G's also for the gradient norm (a 151k-element
    reduction, small next to the CNN's forward and backward), which the wall times include.
    """
    group = optimizer.param_groups[0]
    curves.step_lr.append(group["lr"])
    curves.step_loss.append(loss.detach())
    if isinstance(optimizer, FusedALIG):
        grad_sq_norm = torch.nn.utils.get_total_norm([p.grad for p in params]).square()
        curves.polyak_step.append(loss.detach() / (grad_sq_norm + group["eps"]))
        optimizer.step(loss=loss)
        # clone: group["step_size"] is overwritten in place by the next step
        curves.step_size.append(group["step_size"].clone())
    else:
        optimizer.step()
    curves.step_param_norm.append(torch.nn.utils.get_total_norm(params))


def train(contender: Contender, data: Digits, orders: Tensor, cfg: DemoConfig, device: torch.device) -> dict:
    """Train a fresh model (same seed, same batches for every contender); return its results."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    model = make_model().to(device)
    params = list(model.parameters())
    optimizer, scheduler = contender.make(params, orders.shape[0] * orders.shape[1])
    curves = Curves()

    def record_epoch():
        train_loss, _ = evaluate(model, data.train_images, data.train_labels)
        _, test_accuracy = evaluate(model, data.test_images, data.test_labels)
        curves.epoch_train_loss.append(train_loss)
        curves.epoch_test_accuracy.append(test_accuracy)

    # tqdm's disable=None: no bar when stderr is not a terminal.
    bar = tqdm(total=cfg.epochs, desc=f"{contender.label:<18}", unit="epoch", disable=True if cfg.quiet else None)
    start = time.perf_counter()
    record_epoch()
    for epoch in range(cfg.epochs):
        for batch in orders[epoch]:
            loss = F.cross_entropy(model(data.train_images[batch]), data.train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step_and_record(optimizer, loss, params, curves)
            if scheduler is not None:
                scheduler.step()
        record_epoch()
        if not bar.disable:  # the only host sync, once per epoch, and only to show the bar
            bar.set_postfix(loss=f"{curves.epoch_train_loss[-1].item():.2e}",
                            test_acc=f"{curves.epoch_test_accuracy[-1].item():.1%}", refresh=False)
        bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_time = time.perf_counter() - start
    bar.close()

    result = {
        "label": contender.label,
        "settings": contender.settings,
        "wall_time_s": wall_time,
        "steps": len(curves.step_loss),
        "skipped_steps": int(optimizer.skipped_steps) if isinstance(optimizer, FusedALIG) else None,
        "backend": getattr(optimizer, "last_backend", None),
    }
    result.update(curves_to_lists(curves))
    result["initial_train_loss"] = result["epoch_train_loss"][0]
    result["final_train_loss"] = result["epoch_train_loss"][-1]
    result["test_accuracy"] = result["epoch_test_accuracy"][-1]
    return result


# -- outputs -------------------------------------------------------------------------------


def format_summary_table(results: dict) -> str:
    """The summary as a markdown table (also readable as plain text)."""
    header = ["Optimizer", "Settings", "Final train loss", "Test accuracy", "Wall time (s)", "Steps skipped"]
    rows = []
    for run in results["runs"].values():
        skipped = "-" if run["skipped_steps"] is None else str(run["skipped_steps"])
        rows.append([
            run["label"],
            run["settings"],
            f"{run['final_train_loss']:.2e}",
            f"{run['test_accuracy']:.2%}",
            f"{run['wall_time_s']:.1f}",
            skipped,
        ])
    return markdown_table(header, rows)


def summary_md(results: dict) -> str:
    alig = results["runs"]["alig"]
    return (
        "# alig-fused demo: digits, small CNN\n\n"
        f"{results['data']['train']} training / {results['data']['test']} test images, "
        f"{results['config']['epochs']} epochs of batch {results['config']['batch_size']} "
        f"({alig['steps']} steps), seed {results['config']['seed']}, device `{results['device']}` "
        f"({results['cpu_threads']} CPU thread(s)), "
        f"FusedALIG backend `{results['alig_backend']}` (asked for `{results['config']['backend']}`), "
        f"torch {results['torch']}.\n\n"
        + format_summary_table(results)
        + "\n\n"
        + "".join(f"![{name}]({name})\n" for name in PLOT_FILES)
    )


def plot_loss_accuracy(plt, results: dict):
    from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in results["runs"].values():
        epochs = range(len(run["epoch_train_loss"]))
        ax_loss.plot(epochs, run["epoch_train_loss"], marker=".", label=run["label"])
        ax_acc.plot(epochs, run["epoch_test_accuracy"], marker=".", label=run["label"])
    ax_loss.set(yscale="log", xlabel="epoch", ylabel="cross-entropy (whole training set)",
                title="Training loss")
    # A logit axis spreads out 90% / 99% / 99.9%, where the optimizers differ; a linear one
    # would squash everything after epoch 2 into the top line.
    ax_acc.set_yscale("logit", nonpositive="clip")
    ax_acc.yaxis.set_major_locator(FixedLocator([0.1, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998]))
    ax_acc.yaxis.set_minor_locator(NullLocator())
    ax_acc.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=1))
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (logit scale)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Digits, small CNN, device {results['device']}")
    return fig


def plot_step_size(plt, results: dict):
    alig, sgd = results["runs"]["alig"], results["runs"].get("sgd")
    steps = range(1, alig["steps"] + 1)
    fig, (ax_step, ax_loss) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, height_ratios=(3, 2))
    ax_step.plot(steps, alig["polyak_step"], lw=0.7, color="0.6",
                 label="Polyak step $\\ell / \\|g\\|^2$ (before the cap)")
    ax_step.plot(steps, alig["step_size"], lw=1.0, color="tab:blue",
                 label="ALI-G step size $\\gamma$ = group['step_size']")
    ax_step.axhline(results["config"]["alig_max_lr"], color="k", ls="--", lw=1,
                    label=f"cap: max_lr = {results['config']['alig_max_lr']:g}")
    if sgd is not None:
        ax_step.plot(steps, sgd["step_lr"], color="tab:orange", lw=1.2, label="SGD learning rate (cosine schedule)")
    ax_step.set(yscale="log", ylabel="step size")
    ax_step.set_title("ALI-G's step $\\gamma = \\min(\\mathrm{max\\_lr},\\ \\ell / \\|g\\|^2)$, set every step from the loss")
    # SGD's cosine falls to 0 at the end: let it leave the frame rather than squash ALI-G's curves.
    ax_step.set_ylim(bottom=min(alig["step_size"] + alig["polyak_step"]) / 3)
    ax_step.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    ax_loss.plot(steps, alig["step_loss"], lw=0.8, color="tab:blue", label="ALI-G mini-batch loss")
    ax_loss.set(yscale="log", xlabel="step", ylabel="mini-batch cross-entropy")
    ax_loss.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    for ax in (ax_step, ax_loss):
        ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_param_norm(plt, results: dict):
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.axhline(results["config"]["alig_max_norm"], color="k", ls="--", lw=1, zorder=1,
               label=f"ALI-G max_norm = {results['config']['alig_max_norm']:g} (l2-ball radius)")
    for run in results["runs"].values():
        alig = run is results["runs"]["alig"]
        ax.plot(range(1, run["steps"] + 1), run["step_param_norm"], lw=2.5 if alig else 1.2,
                zorder=3 if alig else 2, label=run["label"])
    ax.set(xlabel="step", ylabel="$\\|w\\|_2$ (all parameters)", ylim=(0, None),
           title="Parameter norm: ALI-G stays in its l2 ball; SGD and Adam are unconstrained")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return fig


# -- the entry point -----------------------------------------------------------------------


def run_demo(**options) -> dict:
    """Run the comparison and write the plots, ``summary.md`` and ``results.json``.

    Keyword arguments are the fields of ``DemoConfig`` (``epochs``, ``seed``, ``device``,
    ``backend``, ``out``, ``quiet``, ...). Returns the results dict (also ``results.json``).
    Raises ``BackendUnavailableError`` before training when the backend asked for cannot run.
    """
    cfg = DemoConfig(**options)
    require_demo_packages()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    backends.pick(cfg.backend, device)  # a backend asked for by name that cannot run fails now
    with cpu_threads(cfg.threads):
        results = _compare(cfg, device)
    plotters = dict(zip(PLOT_FILES, (plot_loss_accuracy, plot_step_size, plot_param_norm)))
    write_outputs(results, cfg.out, plotters, summary_md)
    return results


def require_demo_packages() -> None:
    """Fail before training, not after it, when a package of the ``demo`` extra is missing."""
    missing = [name for name in ("sklearn", "matplotlib", "tqdm") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"the demo needs {', '.join(missing)}: pip install 'alig_fused[demo]' "
            "(scikit-learn, matplotlib, tqdm)"
        )


@contextmanager
def cpu_threads(threads: int):
    """torch's intra-op thread count set to ``threads`` (0: unchanged), restored on exit."""
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _compare(cfg: DemoConfig, device: torch.device) -> dict:
    """Train every contender on the same data and batches; the results without the files."""
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    data = load_digits_split(device)
    orders = batch_orders(data.train_images.shape[0], cfg.epochs, cfg.batch_size, cfg.seed, device)
    say(f"digits: {len(data.train_labels)} train / {len(data.test_labels)} test images; "
        f"device {device}; FusedALIG backend asked: {cfg.backend}")

    runs = {}
    for contender in contenders(cfg):
        runs[contender.key] = train(contender, data, orders, cfg, device)
        if contender.key == "alig":
            say(f"FusedALIG ran on backend '{runs['alig']['backend']}' (opt.last_backend), device {device}")
    return {
        "config": asdict(cfg),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "alig_backend": runs["alig"]["backend"],
        "data": {"name": "sklearn digits", "train": len(data.train_labels), "test": len(data.test_labels)},
        "runs": runs,
    }


# -- the command line: ``alig-fused demo [options]`` ---------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="alig-fused demo",
        description=(
            "Train the same small CNN on scikit-learn's bundled digits with FusedALIG "
            "(momentum 0.9, l2-ball max_norm), SGD with a cosine schedule and Adam; print a "
            "summary and write PNG plots, summary.md and results.json to --out. "
            "Needs the demo extra: pip install 'alig_fused[demo]'. "
            "'alig-fused demo lm [options]' trains a small GPT on text instead (examples/lm.py; "
            "'alig-fused demo lm --help' lists its options)."
        ),
    )
    parser.add_argument("--backend", choices=("auto", *backends.BACKENDS), default="auto",
                        help="FusedALIG backend (default: auto, the fastest that runs on the device)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--epochs", type=_positive_int, default=defaults.epochs,
                        help=f"epochs per optimizer (default: {defaults.epochs})")
    parser.add_argument("--out", default=defaults.out, help=f"output folder (default: {defaults.out})")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"seed of the initial weights and the batches (default: {defaults.seed})")
    parser.add_argument("--max-lr", type=float, default=defaults.alig_max_lr, dest="alig_max_lr", metavar="MAX_LR",
                        help=f"ALI-G's max_lr (default: {defaults.alig_max_lr:g})")
    parser.add_argument("--max-norm", type=float, default=defaults.alig_max_norm, dest="alig_max_norm",
                        metavar="MAX_NORM", help=f"radius of ALI-G's l2 ball (default: {defaults.alig_max_norm:g})")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help=f"CPU threads for torch (default: {defaults.threads}, steadiest for this tiny model; "
                        "0: torch's default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``alig-fused demo``: run the comparison, print its summary; returns the exit status."""
    args = build_parser().parse_args(argv)
    problem = _device_problem(args.device)
    if problem:
        print(f"alig-fused demo: error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        results = run_demo(
            epochs=args.epochs, seed=args.seed, device=args.device, backend=args.backend, out=args.out,
            quiet=args.quiet, threads=args.threads, alig_max_lr=args.alig_max_lr, alig_max_norm=args.alig_max_norm,
        )
    except (ImportError, BackendUnavailableError) as exc:  # a missing demo package, a backend that cannot run
        print(f"alig-fused demo: error: {exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - start
    print(f"device: {results['device']}, FusedALIG backend: {results['alig_backend']} "
          f"(asked: {args.backend}), total {total:.1f} s")
    print(format_summary_table(results))
    print("wrote " + ", ".join(results["files"].values()))
    return 0


def _device_problem(name: str) -> str:
    """Why ``name`` cannot be used as the demo's device ("" when it can)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        return f"bad --device {name!r}: {exc}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "--device cuda was asked for, but torch sees no CUDA device"
    return ""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
