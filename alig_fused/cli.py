"""The ``alig-fused`` command: ``alig-fused demo``, ``alig-fused demo lm`` and ``alig-fused backends``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from types import ModuleType
from typing import Sequence

from . import backends
from .backends import BackendUnavailableError
from .demo import DemoConfig

__all__ = ["main", "build_parser", "load_lm_example"]

# The language-model demo is an example, not part of the package: examples/lm.py of a clone.
LM_EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "lm.py")


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(prog="alig-fused", description="The ALI-G optimizer with a fused step.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits with ALI-G, SGD and Adam; write plots",
        description=(
            "Train the same small CNN on scikit-learn's bundled digits with FusedALIG "
            "(momentum 0.9, l2-ball max_norm), SGD with a cosine schedule and Adam; print a "
            "summary and write PNG plots, summary.md and results.json to --out. "
            "Needs the demo extra: pip install 'alig_fused[demo]'. "
            "'alig-fused demo lm [options]' trains a small GPT on text instead (from a clone of the "
            "repository: examples/lm.py; 'alig-fused demo lm --help' lists its options)."
        ),
    )
    demo.add_argument("--backend", choices=("auto", *backends.BACKENDS), default="auto",
                      help="FusedALIG backend (default: auto, the fastest that runs on the device)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    demo.add_argument("--epochs", type=_positive_int, default=defaults.epochs,
                      help=f"epochs per optimizer (default: {defaults.epochs})")
    demo.add_argument("--out", default=defaults.out, help=f"output folder (default: {defaults.out})")
    demo.add_argument("--seed", type=int, default=defaults.seed,
                      help=f"seed of the initial weights and the batches (default: {defaults.seed})")
    demo.add_argument("--max-lr", type=float, default=defaults.alig_max_lr, dest="alig_max_lr", metavar="MAX_LR",
                      help=f"ALI-G's max_lr (default: {defaults.alig_max_lr:g})")
    demo.add_argument("--max-norm", type=float, default=defaults.alig_max_norm, dest="alig_max_norm",
                      metavar="MAX_NORM", help=f"radius of ALI-G's l2 ball (default: {defaults.alig_max_norm:g})")
    demo.add_argument("--threads", type=int, default=defaults.threads,
                      help=f"CPU threads for torch (default: {defaults.threads}, steadiest for this tiny model; "
                      "0: torch's default)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    demo.set_defaults(run=_run_demo)

    show = commands.add_parser("backends", help="say which FusedALIG backends can run on a device")
    show.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    show.set_defaults(run=_run_backends)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alig-fused`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["demo", "lm"]:  # the example has its own options
        return _run_lm_demo(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BackendUnavailableError as exc:
        print(f"alig-fused {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import format_summary_table, require_demo_packages, run_demo

    try:
        require_demo_packages()
    except ImportError as exc:
        print(f"alig-fused demo: error: {exc}", file=sys.stderr)
        return 2
    problem = _device_problem(args.device)
    if problem:
        print(f"alig-fused demo: error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = run_demo(
        epochs=args.epochs, seed=args.seed, device=args.device, backend=args.backend, out=args.out,
        quiet=args.quiet, threads=args.threads, alig_max_lr=args.alig_max_lr, alig_max_norm=args.alig_max_norm,
    )
    total = time.perf_counter() - start
    print(f"device: {results['device']}, FusedALIG backend: {results['alig_backend']} "
          f"(asked: {args.backend}), total {total:.1f} s")
    print(format_summary_table(results))
    print("wrote " + ", ".join(results["files"].values()))
    return 0


def load_lm_example() -> ModuleType | None:
    """examples/lm.py beside the package (an editable install or a checkout), or None."""
    if not os.path.isfile(LM_EXAMPLE):
        return None
    name = "alig_fused_examples_lm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, LM_EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _run_lm_demo(argv: list[str]) -> int:
    missing = [name for name in ("matplotlib", "tqdm") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"alig-fused demo lm: error: needs {', '.join(missing)}: pip install 'alig_fused[demo]'", file=sys.stderr)
        return 2
    example = load_lm_example()
    if example is None:
        print("alig-fused demo lm: error: the language-model demo is an example, not part of the installed "
              "package; from a clone of the repository run: python -m examples.lm [options]", file=sys.stderr)
        return 2
    return example.main(argv)


def _run_backends(args: argparse.Namespace) -> int:
    import torch


    device = torch.device(args.device)
    for name, state in backends.available_backends(device).items():
        print(f"{name:<7} {state}")
    if backends.load("cpp") is not None:
        from . import _cpp_loader

        print(f"the cpp extension: {_cpp_loader.EXTENSION_ORIGIN}")
    print(f"auto -> {backends.pick('auto', device)} on {device}")
    return 0


def _device_problem(name: str) -> str:
    """Why ``name`` cannot be used as the demo's device ("" when it can)."""
    import torch

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
