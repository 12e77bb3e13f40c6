"""The benchmark harness at tiny size, so it cannot rot: ``python -m bench --quick``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import report, shapes  # noqa: E402


def run_bench(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--threads", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize(
    "name, tensors, params",
    [("resnet50", 161, 25_557_032), ("gpt2", 148, 124_439_808), ("llama1b", 146, 1_235_814_400), ("many_small", 2000, 8_192_000)],
)
def test_shape_sets_are_the_real_models(name, tensors, params):
    shape_set = shapes.MODEL_SETS[name]()
    assert (len(shape_set), shapes.numel(shape_set)) == (tensors, params)
    assert len({n for n, _ in shape_set}) == tensors


def test_quick_run_writes_a_report(tmp_path):
    data = run_bench(tmp_path, "--dtypes", "fp32,fp16")  # bf16: the built-in loop's test below
    records = data["records"]
    assert records and all(r["status"] in ("ok", "skipped") for r in records), [r for r in records if r["status"] != "ok"][:3]
    ran = {r["contender"] for r in records if r["status"] == "ok"}
    assert {"fused_torch", "ref_loop", "modern_loop", "sgd_foreach", "sgd_fused", "adam_foreach", "adam_fused", "inplace_add", "copy"} <= ran
    assert {r["set"] for r in records} == {"resnet50", "gpt2", "many_small", "sweep_tensors", "sweep_params"}
    for r in records:
        if r["status"] == "ok":
            assert r["median_s"] > 0 and r["rounds"] >= 1 and len(r["times_s"]) == r["rounds"]
        else:
            assert r["reason"]
    env = data["environment"]
    text = (tmp_path / "report.md").read_text()
    assert data["cache"] == "cold" and "cold cache" in data["timing"]
    for needle in ("ms/step", "vs ref loop", "% roofline", env["torch"], env["date"], env["device_name"]):
        assert needle in text
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "time_vs_params.png").stat().st_size > 0
        assert (tmp_path / "time_vs_tensor_count.png").stat().st_size > 0


def test_builtin_timing_loop_gives_the_same_records(tmp_path):
    """The fallback used where pytest-benchmark is not installed (e.g. a bare GPU box)."""
    data = run_bench(tmp_path, "--timing", "builtin", "--sets", "resnet50,sweep_tensors", "--dtypes", "bf16")
    ok = [r for r in data["records"] if r["status"] == "ok"]
    assert {r["dtype"] for r in ok} == {"bf16", "fp32"}  # the sweeps are fp32
    assert "built-in loop" in data["timing"]
    assert all(r["median_s"] > 0 for r in ok)


def test_derived_numbers():
    base = dict(status="ok", label="s", dtype="fp32", n_elements=1000, element_size=4)
    records = [
        dict(base, contender="copy", family="copy", variant="-", transfers_per_element=2, bytes_per_step=8000, median_s=1e-6),
        dict(base, contender="sgd_foreach", family="baseline", variant="-", transfers_per_element=5, bytes_per_step=20000, median_s=4e-6),
        dict(base, contender="inplace_add", family="stream", variant="-", transfers_per_element=3, bytes_per_step=12000, median_s=2e-6),
        dict(base, contender="ref_loop", family="alig", variant="momentum", transfers_per_element=6, bytes_per_step=24000, median_s=1e-5),
        dict(base, contender="modern_loop", family="alig", variant="momentum", transfers_per_element=6, bytes_per_step=24000, median_s=7.5e-6),
        dict(base, contender="fused_cpp", family="alig", variant="momentum", transfers_per_element=6, bytes_per_step=24000, median_s=5e-6),
    ]
    copy, sgd, add, ref, _, fused = report.derive(records)
    assert fused["speedup_vs_modern_loop"] == pytest.approx(1.5)
    # roofline: the best in-place stream (w += g at 6 GB/s beats SGD's 5), not copy_'s 8
    assert copy["gbps"] == pytest.approx(8.0) and fused["copy_gbps"] == pytest.approx(8.0)
    assert fused["roofline_gbps"] == pytest.approx(6.0) and fused["roofline_contender"] == "inplace_add"
    assert fused["gbps"] == pytest.approx(4.8) and fused["roofline_fraction"] == pytest.approx(0.8)
    assert sgd["roofline_fraction"] == pytest.approx(5 / 6)
    assert fused["speedup_vs_ref"] == pytest.approx(2.0) and fused["speedup_vs_sgd"] == pytest.approx(0.8)
    assert sgd["speedup_vs_ref"] is None and copy["speedup_vs_sgd"] is None and add["speedup_vs_sgd"] is None


def _measure(step, plan, prepare):
    import time

    from bench import core

    return core.builtin_measure(step, plan, time.perf_counter, prepare)


def test_bench_refuses_a_time_from_skipped_steps(monkeypatch):
    """A FusedALIG case whose steps are skipped (an inf gradient) fails with no time."""
    import torch

    from bench import contenders, core

    device = torch.device("cpu")
    case = core.Case("resnet50", "fp32", "fused_torch", "momentum", quick=True)
    master = core.workspace(case, device)
    master.params[0].grad.view(-1)[0] = float("inf")
    monkeypatch.setattr(core, "workspace", lambda case, device: master)
    try:
        with pytest.raises(contenders.SkippedSteps, match="skipped"):
            core.run_case(case, device, core.Budget(1.0, 1, quick=True), _measure)
        (record,) = core.run_cases_builtin([case], device, core.Budget(1.0, 1, quick=True), log=lambda _: None)
        assert record["status"] == "failed" and "SkippedSteps" in record["reason"]
        assert "median_s" not in record and "times_s" not in record
    finally:
        core.release_workspace()


def test_a_fused_baseline_that_disagrees_is_no_roofline(monkeypatch):
    """A fused baseline is checked against the same optimizer in fp32: one whose momentum
    buffer goes wrong (a stand-in for torch 2.13's CPU fused SGD in bf16, which reads it as
    fp32) is flagged and leaves the roofline to the others; fused Adam in bf16 is not flagged."""
    import dataclasses

    import torch

    from bench import contenders

    device = torch.device("cpu")
    assert contenders.wrong_results("adam_fused", device, torch.bfloat16) == ""
    assert contenders.wrong_results("sgd_fused", device, torch.float32) == ""  # fp32 is not checked

    class BufferDoublingSGD(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            for state in self.state.values():
                state["momentum_buffer"].mul_(2)

    def build(ws, _):
        return BufferDoublingSGD(ws.params, lr=contenders.BASELINE_LR, momentum=contenders.MOMENTUM, nesterov=True, foreach=True).step

    broken = dataclasses.replace(contenders.CONTENDERS["sgd_fused"], build=build)
    monkeypatch.setitem(contenders.CONTENDERS, "sgd_fused", broken)
    monkeypatch.setattr(contenders, "_wrong_cache", {})
    message = contenders.wrong_results("sgd_fused", device, torch.bfloat16)
    assert "off from the same optimizer in fp32" in message

    rows = [
        {"label": "s", "dtype": "bf16", "contender": "sgd_fused", "variant": "-", "family": "baseline", "status": "ok",
         "median_s": 1.0, "bytes_per_step": 4e9, "wrong_results": message},
        {"label": "s", "dtype": "bf16", "contender": "inplace_add", "variant": "-", "family": "stream", "status": "ok",
         "median_s": 1.0, "bytes_per_step": 2e9, "wrong_results": ""},
    ]
    report.derive(rows)
    assert rows[0]["roofline_contender"] == "inplace_add" and rows[0]["roofline_fraction"] == pytest.approx(2.0)


def test_contenders_do_not_share_gradients():
    """SGD foreach Nesterov adds momentum into p.grad: on its own copy, restored before every
    cold step, the master gradients and the next contender's stay untouched."""
    import torch

    from bench import core

    device = torch.device("cpu")
    sgd = core.Case("resnet50", "fp32", "sgd_foreach", "-", quick=True)
    fused = core.Case("resnet50", "fp32", "fused_torch", "momentum", quick=True)
    try:
        master = core.workspace(sgd, device)
        grads = [p.grad.clone() for p in master.params]
        sgd_record = core.run_case(sgd, device, core.Budget(1.0, 2, quick=True), _measure, cache="cold")
        assert sgd_record["mutates_grads"] and sgd_record["cache"] == "cold"
        assert all(torch.equal(p.grad, g) for p, g in zip(master.params, grads))
        fused_record = core.run_case(fused, device, core.Budget(1.0, 1, quick=True), _measure, cache="warm")
        assert fused_record["status"] == "ok" and not fused_record["mutates_grads"]
    finally:
        core.release_workspace()


@pytest.mark.parametrize("loop", ["ReferenceLoopALIG", "ModernLoopALIG"])
@pytest.mark.parametrize("momentum, max_norm", [(0.0, None), (0.9, None), (0.9, 3.0)])
def test_timed_loops_are_alig(loop, momentum, max_norm):
    """What the benchmark times as "the reference loop" computes ALI-G (tests/reference.py)."""
    import torch
    from reference import ReferenceALIG

    from bench import reference_loop

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in [(4, 3), (5,), (2, 2, 2)]]
    timed = [t.clone().requires_grad_() for t in start]
    exact = [t.clone().requires_grad_() for t in start]
    if loop == "ReferenceLoopALIG":
        projection = None if max_norm is None else (lambda: reference_loop.l2_projection(timed, max_norm))
        opt = reference_loop.ReferenceLoopALIG(timed, max_lr=0.1, momentum=momentum, projection_fn=projection)
    else:
        opt = reference_loop.ModernLoopALIG(timed, max_lr=0.1, momentum=momentum, max_norm=max_norm)
    ref = ReferenceALIG([{"params": exact, "lr": 0.1, "momentum": momentum, "max_norm": max_norm}])
    for _ in range(5):
        for params in (timed, exact):
            for p in params:
                p.grad = None
            sum(((p - 0.5) ** 2).sum() for p in params).backward()
        loss = float(sum(((p.detach() - 0.5) ** 2).sum() for p in exact))
        opt.step(lambda: torch.tensor(loss, dtype=torch.float64))
        ref.step(loss)
    for p, q in zip(timed, exact):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
    assert not torch.equal(timed[0].detach(), start[0]), "the loop must have moved the parameters"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the peak resident set through Linux's /proc")
def test_peak_memory_sees_temporaries_and_the_torch_path_stays_small():
    """bench.peak_memory counts foreach Adam's temporaries (about the model's size) and finds
    the torch path's bf16 step within 5% of the parameters (issue: no full-size temporaries)."""
    import os

    from bench import peak_memory

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(peak_memory.MMAP_THRESHOLD))
    fractions = {}
    for contender, dtype in (("adam_foreach", "fp32"), ("fused_torch", "bf16")):
        cmd = [sys.executable, "-m", "bench.peak_memory", "--one", "resnet50", dtype, contender]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        assert row["status"] == "ok" and row["skipped_steps"] in (None, 0)
        fractions[contender, dtype] = row["fraction"]
    assert fractions["adam_foreach", "fp32"] > 0.5
    assert fractions["fused_torch", "bf16"] < 0.05  # its fp32 working copies (fp32 is updated in place)
