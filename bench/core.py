"""Cases, workspaces, timing and the environment record, shared by the pytest suites and
the built-in timing loop of ``python -m bench``."""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import shapes as S
from .contenders import BASELINE_VARIANT, CONTENDERS, VARIANTS, Unsupported, Workspace, wrong_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_SETS = tuple(S.MODEL_SETS)
SWEEP_SETS = ("sweep_tensors", "sweep_params")
ALL_SETS = MODEL_SETS + SWEEP_SETS
SWEEP_VARIANT = "momentum"  # the sweeps time ALI-G with momentum, fp32
REPO = Path(__file__).resolve().parent.parent


# -- what runs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    set_name: str
    dtype: str
    contender: str
    variant: str
    point: int = 0  # sweeps: the tensor count (sweep_tensors) or the parameter count (sweep_params)
    quick: bool = False

    @property
    def label(self) -> str:
        """The shape set, as a person reads it: 'gpt2', 'tensors=300x4096', 'params=2^20'."""
        if self.set_name == "sweep_tensors":
            return f"tensors={self.point}x{self.tensor_size}"
        if self.set_name == "sweep_params":
            return f"params=2^{int(math.log2(self.point))}"
        return self.set_name + ("-quick" if self.quick else "")

    @property
    def tensor_size(self) -> int:
        return 64 if self.quick else S.TENSOR_SIZE

    @property
    def id(self) -> str:
        variant = "" if self.variant == BASELINE_VARIANT else f"-{self.variant}"
        return f"{self.label}-{self.dtype}-{self.contender}{variant}"

    @property
    def group(self) -> str:
        return f"{self.label} {self.dtype}"

    def shapes(self) -> S.ShapeSet:
        if self.set_name == "sweep_tensors":
            return S.many_small(self.point, self.tensor_size)
        if self.set_name == "sweep_params":
            return S.equal_split(self.point)
        full = S.MODEL_SETS[self.set_name]()
        return S.quick(full) if self.quick else full


def default_sets(device: torch.device) -> tuple[str, ...]:
    return ALL_SETS if device.type == "cuda" else tuple(s for s in ALL_SETS if s not in S.GPU_ONLY)


LARGE_ON_CPU = 50_000_000


def default_variants(set_name: str, device: torch.device, quick: bool) -> tuple[str, ...]:
    if device.type != "cuda" and not quick and S.numel(S.MODEL_SETS[set_name]()) > LARGE_ON_CPU:
        return ("momentum", "momentum+proj")
    return tuple(VARIANTS)


def make_cases(
    device: torch.device,
    sets: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
    variants: Iterable[str] | None = None,
    contenders: Iterable[str] | None = None,
    quick: bool = False,
) -> list[Case]:
    """All cases in run order: one shape set and dtype at a time (workspaces are reused).

    None means the default: every dtype and contender; every ALI-G variant, except that on
    CPU the sets over 50M parameters (GPT-2) run only the two momentum variants, which keeps a
    full CPU run within ~10 minutes (name the variants to run them all).
    """
    sets = tuple(sets or default_sets(device))
    dtypes = tuple(dtypes or DTYPES)
    contenders = tuple(contenders or CONTENDERS)
    for kind, given, known in (("shape sets", sets, ALL_SETS), ("dtypes", dtypes, DTYPES), ("contenders", contenders, CONTENDERS), ("variants", variants or (), VARIANTS)):
        unknown = [x for x in given if x not in known]
        if unknown:
            raise ValueError(f"unknown {kind} {unknown}; choose from {', '.join(known)}")
    cases = []
    for set_name in sets:
        if set_name == "sweep_tensors":
            points, set_dtypes, set_variants = ((2, 8) if quick else S.TENSOR_COUNTS), ("fp32",), (SWEEP_VARIANT,)
        elif set_name == "sweep_params":
            counts = S.PARAM_COUNTS_GPU if device.type == "cuda" else S.PARAM_COUNTS_CPU
            points, set_dtypes, set_variants = ((2**10, 2**12) if quick else counts), ("fp32",), (SWEEP_VARIANT,)
        else:
            points, set_dtypes, set_variants = (0,), dtypes, tuple(variants or default_variants(set_name, device, quick))
        for point in points:
            for dtype in set_dtypes:
                for key in contenders:
                    if CONTENDERS[key].family == "alig":
                        for variant in set_variants:
                            cases.append(Case(set_name, dtype, key, variant, point, quick))
                    else:
                        cases.append(Case(set_name, dtype, key, BASELINE_VARIANT, point, quick))
    return cases


def why_skip(case: Case, device: torch.device) -> str:
    """'' when the case can run on ``device``, else the reason."""
    if case.set_name in S.GPU_ONLY and device.type != "cuda":
        return f"{case.set_name} is GPU only (its fp32 params, grads and Adam state need ~20 GB)"
    status = CONTENDERS[case.contender].available(device)
    return "" if status == "ok" else status


# -- workspaces ----------------------------------------------------------------------------

_workspace: dict = {}


def workspace(case: Case, device: torch.device) -> Workspace:
    """Params (random, seeded) with grads in place, kept while consecutive cases share them.

    This is the master copy: every case times its contender on ``.clone()`` of it."""
    key = (case.set_name, case.point, case.quick, case.dtype, str(device))
    if _workspace.get("key") != key:
        _workspace.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        gen = torch.Generator(device=device).manual_seed(0)
        dtype = DTYPES[case.dtype]
        params = []
        for _, shape in case.shapes():
            p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.02))
            p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.01)
            params.append(p)
        loss = torch.tensor(1.0, device=device)  # a 0-dim device tensor, as after backward()
        _workspace.update(key=key, ws=Workspace(params, loss, device, dtype))
    return _workspace["ws"]


def release_workspace() -> None:
    _workspace.clear()
    _evictor.clear()
    gc.collect()


# -- timing --------------------------------------------------------------------------------


def timer_for(device: torch.device) -> Callable[[], float]:
    """perf_counter, after draining the device queue on CUDA (so a timed block is complete)."""
    if device.type == "cuda":

        def synced_perf_counter() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return synced_perf_counter
    return time.perf_counter


CACHE_MODES = ("cold", "warm")


def default_cache_mode(device: torch.device) -> str:
    """cold on CPU (a step right after backward finds little of w, g, b in cache), warm on GPU."""
    return "cold" if device.type == "cpu" else "warm"


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
    size = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        size = max(size, int(text.rstrip("KMG")) * units.get(text[-1], 1))
    return size


class CacheEvictor:
    """Rewrites a buffer of 4x the last-level cache (at least 64 MiB) between timed steps, so
    each step starts from a cold cache, as after a backward pass. Without it a small model
    stays in cache across steps and a CPU step looks faster than memory."""

    @staticmethod
    def bytes_for(device: torch.device) -> int:
        return max(4 * last_level_cache_bytes(device), 64 * 2**20)

    def __init__(self, device: torch.device):
        self.nbytes = self.bytes_for(device)
        self.buffer = torch.zeros(self.nbytes // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.add_(1.0)


@dataclass
class Plan:
    warmup_steps: int
    step_estimate_s: float
    rounds: int
    iterations: int  # steps per round; each round's time is divided by it


def default_budget_s(device: torch.device, quick: bool) -> float:
    """Seconds spread over the cases; the slowest ones still get their minimum rounds."""
    if quick:
        return 60.0
    return 300.0 if device.type == "cuda" else 420.0


@dataclass
class Budget:
    """Spreads a wall-clock budget over the cases still to run (rounds follow measured time)."""

    total_s: float
    cases_left: int
    quick: bool = False
    device_type: str = "cpu"
    started: float = field(default_factory=time.perf_counter)

    # Seconds per step from which a case gets the fewest rounds (CPU, GPT-2 size: a slow
    # contender takes seconds per step and 5 rounds of it would eat the whole budget).
    slow_step_s: float = 0.5
    max_case_s: float = 1.0

    @property
    def max_rounds(self) -> int:
        return 2 if self.quick else (50 if self.device_type == "cuda" else 25)

    @property
    def min_round_s(self) -> float:
        # Several steps per round when a step is short: the sync at the end of a round
        # (~10-20 us on CUDA) and timer jitter stay below ~1% of the round.
        return 0.0 if self.quick else (5e-3 if self.device_type == "cuda" else 2e-3)

    def case_budget_s(self) -> float:
        left = self.total_s - (time.perf_counter() - self.started)
        return min(self.max_case_s, max(0.0, left / max(1, self.cases_left)))

    def plan(self, step: Callable[[], None], timer: Callable[[], float], prepare: Callable[[], None] | None = None) -> Plan:
        """Warm up (the first step creates optimizer state), estimate one step, size the rounds.

        With ``prepare`` (cold cache: run before every step, not timed) a round is one step."""

        def timed_step() -> tuple[float, float]:  # (step seconds, wall seconds with prepare)
            begin = timer()
            if prepare is not None:
                prepare()
            start = timer()
            step()
            end = timer()
            return end - start, end - begin

        timed_step()
        warmup = 1
        if not self.quick:
            # A second, steady step (state allocated, kernels compiled).
            second_s, _ = timed_step()
            warmup = 2
            if second_s > self.slow_step_s:
                # Seconds per step (GPT-2 on a small CPU): that step is estimate enough, and
                # the fewest rounds are all the budget allows.
                return Plan(warmup, second_s, 3, 1)
        n, step_total, wall_total = 0, 0.0, 0.0
        while True:
            step_s, wall_s = timed_step()
            n, step_total, wall_total = n + 1, step_total + step_s, wall_total + wall_s
            if self.quick or n >= 3 or wall_total > 0.2:
                break
        step_s, wall_s = max(step_total / n, 1e-7), max(wall_total / n, 1e-7)
        iterations = 1 if prepare is not None else max(1, math.ceil(self.min_round_s / step_s))
        min_rounds = 1 if self.quick else (3 if step_s > self.slow_step_s else 5)
        rounds = int(self.case_budget_s() / (wall_s * iterations))
        rounds = min(self.max_rounds, max(min_rounds, rounds))
        return Plan(warmup + n, step_s, rounds, iterations)

    def done_one(self) -> None:
        self.cases_left = max(0, self.cases_left - 1)


def builtin_measure(
    step: Callable[[], None], plan: Plan, timer: Callable[[], float], prepare: Callable[[], None] | None = None
) -> list[float]:
    """pytest-benchmark's pedantic loop without pytest-benchmark: per-step seconds per round
    (``prepare``, when given, runs untimed before each round, as pedantic's ``setup``)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(plan.rounds):
            if prepare is not None:
                prepare()
            start = timer()
            for _ in range(plan.iterations):
                step()
            times.append((timer() - start) / plan.iterations)
        return times
    finally:
        if gc_was_enabled:
            gc.enable()


def summarize(times: list[float]) -> dict:
    """Median and spread of per-step times (seconds)."""
    if not times:
        return {}
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return dict(
        median_s=statistics.median(ordered),
        q1_s=q1,
        q3_s=q3,
        iqr_s=q3 - q1,
        min_s=ordered[0],
        max_s=ordered[-1],
        mean_s=statistics.fmean(ordered),
    )


def case_record(case: Case, device: torch.device) -> dict:
    """What the report needs to know about a case besides its times."""
    contender = CONTENDERS[case.contender]
    variant = VARIANTS.get(case.variant)
    shape_set = case.shapes()
    n = S.numel(shape_set)
    element_size = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    transfers = contender.transfers(variant)
    return dict(
        id=case.id,
        set=case.set_name,
        label=case.label,
        point=case.point,
        quick=case.quick,
        dtype=case.dtype,
        contender=case.contender,
        contender_name=contender.name,
        family=contender.family,
        variant=case.variant,
        momentum=variant.momentum if variant else None,
        max_norm=variant.max_norm if variant else None,
        n_tensors=len(shape_set),
        n_elements=n,
        element_size=element_size,
        transfers_per_element=transfers,
        bytes_per_step=transfers * n * element_size,
        device=str(device),
    )


_evictor: dict = {}


def cache_evictor(device: torch.device) -> CacheEvictor:
    if _evictor.get("device") != str(device):
        _evictor.update(device=str(device), evictor=CacheEvictor(device))
    return _evictor["evictor"]


def run_case(
    case: Case,
    device: torch.device,
    budget: Budget,
    measure: Callable[[Callable[[], None], Plan, Callable[[], None] | None], list[float]],
    cache: str | None = None,
) -> dict:
    """Build the contender on its own copy of the workspace, warm up, time. Raises on a broken
    step, and (``SkippedSteps``) when FusedALIG skipped any step: no time from a skip path.

    cache "cold" (the CPU default): before every timed step the gradients are restored if the
    contender changed them (SGD foreach Nesterov adds its momentum into p.grad) and the
    caches are evicted; "warm": steps back to back, gradients as the contender leaves them."""
    cache = cache or default_cache_mode(device)
    if cache not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {cache!r}; choose from {', '.join(CACHE_MODES)}")
    record = case_record(case, device)
    master = workspace(case, device)
    ws = master.clone()
    step = CONTENDERS[case.contender].build(ws, VARIANTS.get(case.variant))
    try:
        step()  # creates the state; shows whether the contender writes into p.grad
        mutates_grads = ws.grads_differ_from(master)
        prepare = None
        if cache == "cold":
            evict = cache_evictor(device)

            def prepare() -> None:
                if mutates_grads:
                    ws.restore_grads_from(master)
                evict()

        plan = budget.plan(step, timer_for(device), prepare)
        plan.warmup_steps += 1
        times = measure(step, plan, prepare)
        verify = getattr(step, "verify", None)
        if verify is not None:
            verify()
    finally:
        del step, ws  # drops the optimizer, its state and the copy before the next case
        if master.numel >= 2**20:  # optimizers hold reference cycles; a full collect costs ~0.1 s
            gc.collect()
    record.update(
        status="ok",
        wrong_results=wrong_results(case.contender, device, DTYPES[case.dtype]),
        cache=cache,
        mutates_grads=mutates_grads,
        warmup_steps=plan.warmup_steps,
        rounds=len(times),
        iterations=plan.iterations,
        times_s=times,
        **summarize(times),
    )
    return record


def skipped_record(case: Case, device: torch.device, reason: str) -> dict:
    return dict(case_record(case, device), status="skipped", reason=reason)


def failed_record(case: Case, device: torch.device, exc: BaseException) -> dict:
    return dict(case_record(case, device), status="failed", reason=f"{type(exc).__name__}: {exc}")


def run_cases_builtin(
    cases: list[Case], device: torch.device, budget: Budget, log: Callable[[str], None] = print, cache: str | None = None
) -> list[dict]:
    """The suites' cases through the built-in timing loop (no pytest-benchmark needed)."""
    timer = timer_for(device)
    records = []
    for i, case in enumerate(cases, 1):
        reason = why_skip(case, device)
        if reason:
            record = skipped_record(case, device, reason)
        else:
            try:
                record = run_case(case, device, budget, lambda step, plan, prepare: builtin_measure(step, plan, timer, prepare), cache)
            except Unsupported as exc:
                record = skipped_record(case, device, str(exc))
            except Exception as exc:  # a broken backend must not stop the other cases
                record = failed_record(case, device, exc)
        budget.done_one()
        records.append(record)
        if record["status"] == "ok":
            log(f"[{i}/{len(cases)}] {case.id}: {record['median_s'] * 1e3:.4g} ms/step ({record['rounds']} x {record['iterations']})")
        else:
            log(f"[{i}/{len(cases)}] {case.id}: {record['status']}: {record['reason']}")
    release_workspace()
    return records


# -- the environment -----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: torch.device) -> str:
    """Directory name: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-2threads'."""
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    model = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\b\d+-core\b", " ", cpu_model(), flags=re.I)
    return f"cpu-{slug(model) or 'unknown'}-{torch.get_num_threads()}threads"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    """Device, versions, threads, CPU model, date: written into every result file."""
    try:
        import alig_fused

        backends = alig_fused.available_backends(device)
        alig_version = alig_fused.__version__
    except Exception as exc:
        backends, alig_version = {"error": f"{type(exc).__name__}: {exc}"}, None
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=str(device),
        device_name=device_name(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=_version("triton") or _version("pytorch-triton"),
        pytorch_optimizer=_version("pytorch_optimizer"),
        pytest_benchmark=_version("pytest-benchmark"),
        alig_fused=alig_version,
        git=_git_commit(),
        backends=backends,
    )
    if device.type == "cuda":
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def environment_line(env: dict) -> str:
    return (
        f"{env['gpu'] or 'CPU'} | torch {env['torch']} | triton {env['triton'] or '-'} | CUDA {env['cuda'] or '-'} | "
        f"CPU {env['cpu_model']} x{env['torch_threads']} threads | {env['date']}"
    )
