"""Extra peak memory of one step: what a step allocates on top of the parameters, gradients
and state it was given, as a fraction of the parameters' bytes.

    python -m bench.peak_memory                       # CPU: resnet50, gpt2, many_small; fp32, bf16, fp16
    python -m bench.peak_memory --sets gpt2 --dtypes bf16 --contenders fused_torch,sgd_foreach

Every case runs in its own process (a step after two warm-up steps, momentum and a binding
ball for ALI-G). On a CPU the peak is the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs`` right before the step) minus the resident set before it,
with glibc's mmap threshold fixed at 4 KiB (``MALLOC_MMAP_THRESHOLD_``): every block of
4 KiB or more is then mapped when allocated and unmapped when freed, so a temporary shows
as resident memory while it lives, instead of being served unseen from memory the allocator
kept (at 64 KiB, foreach Adam's temporaries of 2,000 tensors of 16 KiB went unseen). On CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
allocated before the step.

Writes ``peak_memory.md`` and ``peak_memory.json`` into ``--out`` (default
``bench/results/<device-name>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

MMAP_THRESHOLD = 4096
DEFAULT_CONTENDERS = ("fused_torch", "fused_cpp", "sgd_foreach", "adam_foreach")


def _resident_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM"))


def measure_one(set_name: str, dtype: str, contender: str, device_name: str) -> dict:
    """In this process: the extra peak bytes of one step of ``contender``."""
    import torch

    from . import core
    from .contenders import CONTENDERS, VARIANTS

    device = torch.device(device_name)
    family = CONTENDERS[contender].family
    variant = "momentum+proj" if family == "alig" else core.BASELINE_VARIANT
    case = core.Case(set_name, dtype, contender, variant)
    reason = core.why_skip(case, device)
    if reason:
        return {"status": "skipped", "reason": reason}
    master = core.workspace(case, device)
    ws = master.clone()  # as core.run_case: the master's gradients restore the contender's
    step = CONTENDERS[contender].build(ws, VARIANTS.get(variant))
    for _ in range(2):  # the state exists, the allocator has seen a step
        step()
    ws.restore_grads_from(master)  # SGD Nesterov (foreach) adds into p.grad
    param_bytes = sum(p.numel() * p.element_size() for p in ws.params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
        how = "torch.cuda.max_memory_allocated"
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before, _ = _resident_kib()
        step()
        _, peak = _resident_kib()
        extra = (peak - before) * 1024
        how = f"VmHWM - VmRSS, MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}"
    skipped = getattr(getattr(step, "opt", None), "skipped_steps", None)
    return {
        "status": "ok",
        "variant": variant,
        "param_bytes": param_bytes,
        "extra_peak_bytes": extra,
        "fraction": extra / param_bytes,
        "how": how,
        "skipped_steps": None if skipped is None else int(skipped),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peak_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sets", default="resnet50,gpt2,many_small")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=3, metavar=("SET", "DTYPE", "CONTENDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(*args.one, args.device)))
        return 0

    import torch

    from . import core
    from .contenders import CONTENDERS

    device = torch.device(args.device)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    rows = []
    for set_name in args.sets.split(","):
        for dtype in args.dtypes.split(","):
            for contender in args.contenders.split(","):
                cmd = [sys.executable, "-m", "bench.peak_memory", "--device", args.device, "--one", set_name, dtype, contender]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=core.REPO)
                if done.returncode != 0:
                    row = {"status": "failed", "reason": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(set=set_name, dtype=dtype, contender=contender, name=CONTENDERS[contender].name)
                rows.append(row)
                shown = f"{row['extra_peak_bytes'] / 2**20:8.1f} MiB  {100 * row['fraction']:5.1f}%" if row["status"] == "ok" else row["status"] + ": " + row["reason"]
                print(f"{set_name:11s} {dtype:5s} {contender:13s} {shown}", flush=True)

    env_info = core.environment(device)
    out = Path(args.out) if args.out else core.REPO / "bench" / "results" / env_info["device_name"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "peak_memory.json").write_text(json.dumps({"environment": env_info, "rows": rows}, indent=1) + "\n")
    (out / "peak_memory.md").write_text(markdown(rows, env_info))
    print(f"wrote {out / 'peak_memory.md'}")
    return 0


def markdown(rows: list[dict], env: dict) -> str:
    from .core import environment_line

    lines = [
        f"# Extra peak memory of one step: {env['device_name']}",
        "",
        environment_line(env),
        "",
        "One step after two warm-up steps, each case in its own process; ALI-G with momentum and a",
        "binding ball. *extra peak*: the most memory the step held at once on top of the parameters,",
        "gradients and state it was given (see `bench/peak_memory.py` for how it is read);",
        "*% of params*: that against the parameters' bytes.",
        "",
        "| set | dtype | contender | params MiB | extra peak MiB | % of params |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['set']} | {r['dtype']} | {r['name']} | {r['param_bytes'] / 2**20:.1f} | "
                         f"{r['extra_peak_bytes'] / 2**20:.1f} | {100 * r['fraction']:.1f}% |")
        else:
            lines.append(f"| {r['set']} | {r['dtype']} | {r['name']} | - | {r['status']}: {r['reason']} | - |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
