"""pytest-benchmark plumbing for the suites: options, one parametrized case per test, the
time budget, and the per-case records ``python -m bench`` turns into the report.

    pytest bench --bench-sets resnet50 --bench-dtypes fp32 --benchmark-group-by=group
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from . import core
from .contenders import CONTENDERS, VARIANTS, Unsupported

def pytest_addoption(parser):
    group = parser.getgroup("alig_fused bench")
    group.addoption("--bench-device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    group.addoption("--bench-sets", default=None, help=f"comma-separated, from {','.join(core.ALL_SETS)}")
    group.addoption("--bench-dtypes", default=None, help="comma-separated: fp32,bf16,fp16 (default: all three)")
    group.addoption("--bench-variants", default=None, help=f"ALI-G variants, comma-separated, from {','.join(VARIANTS)}")
    group.addoption("--bench-contenders", default=None, help=f"comma-separated, from {','.join(CONTENDERS)}")
    group.addoption("--bench-quick", action="store_true", help="tiny shapes, 1-2 rounds (smoke)")
    group.addoption("--bench-budget-s", type=float, default=None, help="wall-clock seconds to spread over the cases")
    group.addoption("--bench-record", default=None, help="write the per-case records (JSON) to this file")
    group.addoption("--bench-cache", default=None, choices=core.CACHE_MODES, help="cold (CPU default): caches evicted before every step; warm (GPU default)")


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


class BenchSession:
    def __init__(self, config):
        opt = config.getoption
        self.device = torch.device(opt("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.quick = opt("--bench-quick")
        self.sets = _csv(opt("--bench-sets")) or core.default_sets(self.device)
        self.cases = core.make_cases(
            self.device,
            self.sets,
            _csv(opt("--bench-dtypes")),
            _csv(opt("--bench-variants")),
            _csv(opt("--bench-contenders")),
            self.quick,
        )
        total = opt("--bench-budget-s")
        if total is None:
            total = core.default_budget_s(self.device, self.quick)
        self.budget = core.Budget(total, len(self.cases), self.quick, self.device.type)
        self.record_path = opt("--bench-record")
        self.cache = opt("--bench-cache") or core.default_cache_mode(self.device)
        self.records: list[dict] = []

    def run(self, benchmark, case: core.Case) -> None:
        try:
            reason = core.why_skip(case, self.device)
            if reason:
                self.records.append(core.skipped_record(case, self.device, reason))
                pytest.skip(reason)
            benchmark.group = case.group
            try:
                record = core.run_case(
                    case, self.device, self.budget, lambda step, plan, prepare: self._pedantic(benchmark, step, plan, prepare), self.cache
                )
            except Unsupported as exc:
                self.records.append(core.skipped_record(case, self.device, str(exc)))
                pytest.skip(str(exc))
            except Exception as exc:
                self.records.append(core.failed_record(case, self.device, exc))
                raise
        finally:
            self.budget.done_one()
        if not record["times_s"]:
            record["status"] = "not timed"  # --benchmark-disable
        benchmark.extra_info.update({k: v for k, v in record.items() if k != "times_s"})
        self.records.append(record)

    def _pedantic(self, benchmark, step, plan: core.Plan, prepare=None) -> list[float]:
        target = step
        if self.device.type == "cuda":
            if hasattr(benchmark, "_timer"):
                # pytest-benchmark reads its timer before and after `iterations` steps; a
                # synchronizing timer makes that window cover the GPU work exactly.
                benchmark._timer = core.timer_for(self.device)
            else:
                def target():
                    step()
                    torch.cuda.synchronize(self.device)
        # pedantic's setup runs untimed before each round (and needs iterations == 1, which a
        # cold-cache plan has).
        benchmark.pedantic(target, setup=prepare, rounds=plan.rounds, iterations=plan.iterations, warmup_rounds=0)
        stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
        return list(stats.stats.data) if stats is not None else []


_session: BenchSession | None = None


def _bench_session(config) -> BenchSession:
    global _session
    if _session is None:
        _session = BenchSession(config)
    return _session


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    wanted = getattr(metafunc.module, "BENCH_SETS", core.ALL_SETS)
    cases = [c for c in _bench_session(metafunc.config).cases if c.set_name in wanted]
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def pytest_collection_modifyitems(config, items):
    session = _bench_session(config)
    session.budget.cases_left = sum(1 for item in items if "case" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def bench_session(request) -> BenchSession:
    return _bench_session(request.config)


def pytest_sessionfinish(session, exitstatus):
    global _session
    bench, _session = _session, None  # a second pytest.main in this process starts afresh
    if bench is not None and bench.record_path:
        Path(bench.record_path).write_text(json.dumps({"records": bench.records}, indent=1))
    core.release_workspace()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["alig_fused_environment"] = core.environment(_bench_session(config).device)


if importlib.util.find_spec("pytest_benchmark") is None:

    class _BuiltinBenchmark:
        """The part of pytest-benchmark's fixture the suites use, on the built-in loop."""

        def __init__(self, device):
            self.group, self.extra_info, self.stats, self._timer = None, {}, None, core.timer_for(device)

        def pedantic(self, target, setup=None, rounds=1, iterations=1, warmup_rounds=0):
            plan = core.Plan(0, 0.0, rounds, iterations)
            for _ in range(warmup_rounds):
                target()
            data = core.builtin_measure(target, plan, self._timer, setup)
            self.stats = type("Metadata", (), {"stats": type("Stats", (), {"data": data})()})()

    @pytest.fixture
    def benchmark(bench_session):
        return _BuiltinBenchmark(bench_session.device)
