"""scripts/gpu_check.sh, the first-run GPU check, smoke-tested on CPU: its --dry-run records
every step without running it; this checks the steps are wired (every GPU test file, the
benchmark sets and dtypes the check promises, arguments the benchmark accepts, the whole
run inside its 7 minutes)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_wires_every_step(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": "python3"})
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "gpu_check_summary.txt").read_text()
    assert summary == proc.stdout
    log = (tmp_path / "gpu_check.log").read_text()
    steps = dict(re.findall(r"^===== (\w+) \(timeout (\d+)s\)", log, flags=re.M))
    assert list(steps) == ["build", "tests", "bench"]
    assert sum(map(int, steps.values())) <= 420 - 15  # inside the script's own deadline, with slack
    assert re.search(r"^TOTAL_S=420$", SCRIPT.read_text(), flags=re.M)

    commands = dict(re.findall(r"^===== (\w+) \(timeout \d+s\): (.*)$", log, flags=re.M))
    assert "setup.py build_ext --inplace" in commands["build"]
    gpu_tests = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tests").glob("test_gpu_*.py"))
    assert "tests/test_gpu_check.py" in gpu_tests
    assert sorted(w for w in commands["tests"].split() if w.startswith("tests/")) == gpu_tests

    from bench import core
    from bench.__main__ import parse_args

    bench_args = commands["bench"].split()
    args = parse_args(bench_args[bench_args.index("bench") + 1:])
    assert args.device == "cuda" and Path(args.out) == tmp_path
    assert set(args.sets.split(",")) == {"gpt2", "llama1b", "many_small"} <= set(core.ALL_SETS)
    assert set(args.dtypes.split(",")) == {"fp32", "bf16"}
    for line in ("build", "tests", "bench"):
        assert re.search(rf"^{line} +dry-run ", summary, flags=re.M)
