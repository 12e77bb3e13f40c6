"""python -m bench: run the suites, write bench/results/<device-name>/ (results.json,
report.md, plots). Uses pytest-benchmark when it is installed, else a built-in loop."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import core, report
from .contenders import CONTENDERS, VARIANTS

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1-2 rounds (CI smoke)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when there is one)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: bench/results/<device-name>[-quick])")
    ap.add_argument("--sets", default=None, help=f"comma-separated from {','.join(core.ALL_SETS)} (default: all the device runs)")
    ap.add_argument("--dtypes", default=None, help="comma-separated: fp32,bf16,fp16 (default: all three)")
    ap.add_argument(
        "--variants",
        default=None,
        help=f"ALI-G variants, comma-separated, from {','.join(VARIANTS)} (default: all; on CPU GPT-2 runs the momentum ones)",
    )
    ap.add_argument("--contenders", default=None, help=f"comma-separated, from {','.join(CONTENDERS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock seconds spread over the cases (CPU 420, CUDA 300)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument(
        "--cache",
        choices=core.CACHE_MODES,
        default=None,
        help="cold (CPU default): restore changed grads and evict the caches before every timed step; warm (GPU default)",
    )
    ap.add_argument(
        "--timing",
        choices=("auto", "pytest", "builtin"),
        default="auto",
        help="pytest-benchmark (auto: when installed) or the built-in loop",
    )
    return ap.parse_args(argv)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def run_pytest(args: argparse.Namespace, device: torch.device, out: Path, sets: list[str]) -> tuple[list[dict], int]:
    import pytest

    record_path = out / "records.tmp.json"
    # Started from a pytest-xdist worker (the test suite runs with -n 2), pytest-benchmark
    # sees PYTEST_XDIST_WORKER and turns itself off: this process is no worker.
    os.environ.pop("PYTEST_XDIST_WORKER", None)
    files = [str(HERE / "test_models.py")] if any(s in core.MODEL_SETS for s in sets) else []
    files += [str(HERE / "test_sweeps.py")] if any(s in core.SWEEP_SETS for s in sets) else []
    pytest_args = files + [
        "-q",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={out / 'pytest-benchmark.json'}",
        "--benchmark-disable-gc",
        "--benchmark-group-by=group",
        "--benchmark-sort=name",
        "--benchmark-columns=median,iqr,min,rounds,iterations",
        f"--bench-device={device}",
        f"--bench-sets={','.join(sets)}",
        f"--bench-record={record_path}",
    ]
    for option in ("dtypes", "variants", "contenders"):
        if getattr(args, option):
            pytest_args.append(f"--bench-{option}={getattr(args, option)}")
    if args.quick:
        pytest_args.append("--bench-quick")
    if args.budget_s is not None:
        pytest_args.append(f"--bench-budget-s={args.budget_s}")
    pytest_args.append(f"--bench-cache={args.cache or core.default_cache_mode(device)}")
    rc = int(pytest.main(pytest_args))
    records = json.loads(record_path.read_text())["records"] if record_path.exists() else []
    record_path.unlink(missing_ok=True)
    return records, rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    sets = _csv(args.sets) or list(core.default_sets(device))
    try:
        cases = core.make_cases(device, sets, _csv(args.dtypes), _csv(args.variants), _csv(args.contenders), args.quick)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    notes = []
    trimmed = [s for s in sets if s in core.MODEL_SETS and not args.variants and len(core.default_variants(s, device, args.quick)) < len(VARIANTS)]
    if trimmed:
        notes.append(
            f"{', '.join(trimmed)} on {device.type}: only the momentum variants by default (time budget); "
            "`--variants plain,momentum,proj,momentum+proj` runs them all"
        )
    env = core.environment(device)
    out = args.out or HERE / "results" / (env["device_name"] + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    use_pytest = args.timing == "pytest" or (args.timing == "auto" and importlib.util.find_spec("pytest_benchmark"))
    if use_pytest:
        timing = f"pytest-benchmark {env['pytest_benchmark']}, pedantic rounds"
        records, rc = run_pytest(args, device, out, sets)
    else:
        why = "" if args.timing == "builtin" else " (pytest-benchmark is not installed)"
        timing = f"built-in loop{why}"
        print(f"python -m bench: {len(cases)} cases, {timing}")
        total = args.budget_s if args.budget_s is not None else core.default_budget_s(device, args.quick)
        records = core.run_cases_builtin(cases, device, core.Budget(total, len(cases), args.quick, device.type), cache=args.cache)
        rc = 0
    timing += "; time.perf_counter" + (" after torch.cuda.synchronize" if device.type == "cuda" else "")
    cache = args.cache or core.default_cache_mode(device)
    if cache == "cold":
        evict_mib = core.CacheEvictor.bytes_for(device) / 2**20
        timing += f"; cold cache: changed grads restored and a {evict_mib:.0f} MiB buffer rewritten before every timed step"
    else:
        timing += "; warm cache: steps back to back"
    timing += f"; gc off; run took {time.perf_counter() - started:.0f} s"

    data = {"environment": env, "command": "python -m bench " + " ".join(argv), "timing": timing, "cache": cache, "records": records}
    report.derive(records)
    pngs, note = report.plots(data, out)
    data["plots"] = [p.name for p in pngs]
    data["notes"] = notes + ([note] if note else [])
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "report.md").write_text(report.markdown(data))

    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed", "not timed")}
    print(f"python -m bench: {counts} -> {out}" + (f" ({note})" if note else ""))
    failed = counts["failed"] > 0 or not records or rc not in (0, 5)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
