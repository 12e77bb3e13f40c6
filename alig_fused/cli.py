"""The ``alig-fused`` command: ``alig-fused backends``, and ``alig-fused demo`` / ``alig-fused demo lm``.

The demos are examples, not part of the package: examples/digits.py and examples/lm.py of a
clone (or an editable install), loaded only when a demo is asked for.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from types import ModuleType
from typing import Sequence

from . import backends

__all__ = ["main", "build_parser", "load_example"]

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
# example name -> the packages it needs beyond torch (import names; all from the demo extra)
DEMOS = {"digits": ("sklearn", "matplotlib", "tqdm"), "lm": ("matplotlib", "tqdm")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alig-fused", description="The ALI-G optimizer with a fused step.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Listed for --help only: main() hands "demo ..." to the example, which parses its own options.
    commands.add_parser(
        "demo", add_help=False,
        help="train a small CNN on scikit-learn's digits with ALI-G, SGD and Adam, write plots "
             "('demo lm': a small GPT on text; 'demo --help' lists the options)",
    )
    show = commands.add_parser("backends", help="say which FusedALIG backends can run on a device")
    show.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    show.set_defaults(run=_run_backends)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alig-fused`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        if argv[1:2] == ["lm"]:
            return _run_example("lm", "alig-fused demo lm", argv[2:])
        return _run_example("digits", "alig-fused demo", argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except backends.BackendUnavailableError as exc:
        print(f"alig-fused {args.command}: error: {exc}", file=sys.stderr)
        return 2


def load_example(name: str) -> ModuleType | None:
    """examples/<name>.py beside the package (an editable install or a checkout), or None."""
    path = os.path.join(EXAMPLES_DIR, f"{name}.py")
    if not os.path.isfile(path):
        return None
    # A module of the package alig_fused_examples (examples/ under another name than
    # "examples", which may be taken), so that the demos' relative imports (examples/outputs.py)
    # work as under python -m examples.<name>.
    if EXAMPLES_PACKAGE not in sys.modules or sys.modules[EXAMPLES_PACKAGE].__path__ != [EXAMPLES_DIR]:
        init = os.path.join(EXAMPLES_DIR, "__init__.py")
        spec = importlib.util.spec_from_file_location(EXAMPLES_PACKAGE, init, submodule_search_locations=[EXAMPLES_DIR])
        package = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(package)
        sys.modules[EXAMPLES_PACKAGE] = package
    return importlib.import_module(f"{EXAMPLES_PACKAGE}.{name}")


EXAMPLES_PACKAGE = "alig_fused_examples"


def _run_example(name: str, command: str, argv: list[str]) -> int:
    missing = [package for package in DEMOS[name] if importlib.util.find_spec(package) is None]
    if missing:
        print(f"{command}: error: needs {', '.join(missing)}: pip install 'alig_fused[demo]'", file=sys.stderr)
        return 2
    example = load_example(name)
    if example is None:
        print(f"{command}: error: the demo is an example, not part of the installed package; from a clone "
              f"of the repository run: python -m examples.{name} [options]", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
