"""What is timed: each contender turns a workspace (params with grads in place) into ``step()``.

Traffic model (element transfers per step, N = number of parameter elements, all state in
the parameters' dtype), used for the effective bandwidth of the report:

    ALI-G, momentum, no projection      6N  pass 1 reads g; pass 2 reads w, g, b, writes w, b
    ALI-G, momentum + projection        8N  pass 1 also reads w, b
    ALI-G, no momentum                  4N  (5N with projection): no buffer to read or write
    MoMo (FusedMoMo)                    8N  pass 1 reads w, g, d (MoMo needs <w,d>, ||d||^2,
                                            <d,g>, <w,g>); pass 2 reads w, g, d, writes w, d
    SGD with Nesterov momentum          5N  reads w, g, b; writes w, b
    Adam                                7N  reads w, g, m, v; writes w, m, v
    in-place add (w += g)               3N  reads w, g; writes w: the plain streaming kernel
    copy                                2N  reads src, writes dst

The same count is used for every ALI-G contender, so a slower implementation shows as a
lower *effective* bandwidth (it moves more bytes than the algorithm needs, or moves them
slowly).

Every contender runs on its own copy of the parameters and gradients (``Workspace.clone``):
torch's ``SGD(foreach=True, nesterov=True)`` adds the momentum into ``p.grad`` in place, and
a shared set of gradients grew ~2.4x per such step until the next contender saw inf and
timed FusedALIG's skip path.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .reference_loop import NO_SCALAR_FIRST_ADD, SCALAR_FIRST_ADD, ModernLoopALIG, ReferenceLoopALIG, l2_projection

class Unsupported(RuntimeError):
    """The contender cannot run on this device or dtype (a skip, not a failure)."""


MAX_LR = 0.1
MOMENTUM = 0.9
BASELINE_LR = 1e-3
# Tiny on purpose: |w'| > max_norm after every step, so every projection really scales
# (the reference loop's `if total_norm > max_norm` branch is always taken).
MAX_NORM = 1e-4


@dataclass(frozen=True)
class Variant:
    momentum: float
    project: bool

    @property
    def max_norm(self) -> float | None:
        return MAX_NORM if self.project else None

    @property
    def transfers(self) -> int:
        buffer = self.momentum > 0
        pass2 = 3 + (2 if buffer else 0)  # read w, g (, b); write w (, b)
        pass1 = 1 + ((2 if buffer else 1) if self.project else 0)  # read g (, w (, b))
        return pass1 + pass2


VARIANTS = {
    "plain": Variant(0.0, False),
    "momentum": Variant(MOMENTUM, False),
    "proj": Variant(0.0, True),
    "momentum+proj": Variant(MOMENTUM, True),
}
BASELINE_VARIANT = "-"


@dataclass
class Workspace:
    """Parameters with their gradients in place, and the loss as a 0-dim device tensor."""

    params: list[torch.Tensor]
    loss: torch.Tensor
    device: torch.device
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def clone(self) -> "Workspace":
        """A contender's own parameters and gradients (same values, new storage)."""
        params = []
        for p in self.params:
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad.clone()
            params.append(q)
        return Workspace(params, self.loss.clone(), self.device, self.dtype)

    def grads_differ_from(self, other: "Workspace") -> bool:
        return any(not torch.equal(p.grad, q.grad) for p, q in zip(self.params, other.params))

    def restore_grads_from(self, other: "Workspace") -> None:
        torch._foreach_copy_([p.grad for p in self.params], [q.grad for q in other.params])


Step = Callable[[], None]


class SkippedSteps(RuntimeError):
    """FusedALIG skipped steps while being timed: the time would be its skip path's."""


class FusedStep:
    """``opt.step(loss=loss)``, and ``verify()``: refuses (raises) when any step was skipped."""

    def __init__(self, opt, loss: torch.Tensor):
        self.opt, self.loss = opt, loss

    def __call__(self) -> None:
        self.opt.step(loss=self.loss)

    def verify(self) -> None:
        skipped = int(self.opt.skipped_steps)  # one sync, after the timed rounds
        if skipped:
            raise SkippedSteps(
                f"FusedALIG skipped {skipped} step(s) (a non-finite loss or gradient): no time is reported, "
                "it would be the time of the skip path"
            )


@dataclass(frozen=True)
class Contender:
    key: str
    name: str
    family: str  # "alig", "momo" (FusedMoMo: not in the roofline), "baseline" (SGD, Adam), "stream" or "copy"
    build: Callable[[Workspace, Variant | None], Step]
    available: Callable[[torch.device], str]  # "ok" or why not
    fixed_transfers: int = 0  # baselines: per element; ALI-G: from the variant

    def transfers(self, variant: Variant | None) -> int:
        return variant.transfers if self.family == "alig" else self.fixed_transfers


# -- ALI-G ---------------------------------------------------------------------------------


def _fused(backend: str) -> Contender:
    def build(ws: Workspace, v: Variant) -> Step:
        from alig_fused import FusedALIG

        opt = FusedALIG(ws.params, lr=MAX_LR, momentum=v.momentum, max_norm=v.max_norm, backend=backend)
        return FusedStep(opt, ws.loss)

    def available(device: torch.device) -> str:
        try:
            import alig_fused
        except Exception as exc:  # the package itself failed to import
            return f"alig_fused failed to import: {type(exc).__name__}: {exc}"
        status = alig_fused.available_backends(device).get(backend, f"unknown backend {backend!r}")
        if status == "ok" and backend == "triton" and device.type != "cuda":
            return "the Triton interpreter (TRITON_INTERPRET=1) is a correctness tool, not timed"
        return status

    return Contender(f"fused_{backend}", f"FusedALIG[{backend}]", "alig", build, available)


def _fused_momo(backend: str) -> Contender:
    def build(ws: Workspace, _: Variant | None) -> Step:
        from alig_fused import FusedMoMo

        return FusedStep(FusedMoMo(ws.params, lr=MAX_LR, beta=MOMENTUM, backend=backend), ws.loss)

    def available(device: torch.device) -> str:
        status = _fused(backend).available(device)
        if status != "ok":
            return status
        import alig_fused

        return "ok" if hasattr(alig_fused, "FusedMoMo") else "this alig_fused has no FusedMoMo"

    return Contender(f"momo_{backend}", f"FusedMoMo[{backend}]", "momo", build, available, 8)


def _build_reference(ws: Workspace, v: Variant) -> Step:
    params = ws.params
    projection = None if v.max_norm is None else (lambda: l2_projection(params, v.max_norm))
    opt = ReferenceLoopALIG(params, max_lr=MAX_LR, momentum=v.momentum, projection_fn=projection)
    loss = ws.loss
    return lambda: opt.step(lambda: loss)


def _reference_available(device: torch.device) -> str:
    return "ok" if SCALAR_FIRST_ADD else NO_SCALAR_FIRST_ADD


def _build_modern_loop(ws: Workspace, v: Variant) -> Step:
    opt = ModernLoopALIG(ws.params, max_lr=MAX_LR, momentum=v.momentum, max_norm=v.max_norm)
    loss = ws.loss
    return lambda: opt.step(lambda: loss)


def _build_pytorch_optimizer(ws: Workspace, v: Variant) -> Step:
    from pytorch_optimizer import AliG

    try:
        from pytorch_optimizer.optimizer.alig import l2_projection as project
    except ImportError:  # moved in another release: the reference's function
        project = l2_projection
    params = ws.params
    projection = None if v.max_norm is None else (lambda: project(params, v.max_norm))
    opt = AliG(params, max_lr=MAX_LR, momentum=v.momentum, projection_fn=projection)
    loss = ws.loss
    # Its documented call: step(lambda: float(loss)); the float is a host sync.
    return lambda: opt.step(lambda: loss.item())


def _pytorch_optimizer_available(device: torch.device) -> str:
    if importlib.util.find_spec("pytorch_optimizer") is None:
        return "pytorch_optimizer is not installed (pip install pytorch_optimizer)"
    try:
        from pytorch_optimizer import AliG  # noqa: F401
    except Exception as exc:
        return f"pytorch_optimizer failed to import: {type(exc).__name__}: {exc}"
    return "ok"


# -- baselines -----------------------------------------------------------------------------


def _torch_optim(cls_name: str, impl: str) -> Callable[[Workspace, Variant | None], Step]:
    def build(ws: Workspace, _: Variant | None) -> Step:
        flag = {impl: True}
        try:
            if cls_name == "SGD":
                opt = torch.optim.SGD(ws.params, lr=BASELINE_LR, momentum=MOMENTUM, nesterov=True, **flag)
            else:
                opt = torch.optim.Adam(ws.params, lr=BASELINE_LR, **flag)
        except RuntimeError as exc:  # e.g. fused=True on a device torch has no fused kernel for
            if impl in str(exc).lower():
                raise Unsupported(f"torch.optim.{cls_name}({impl}=True): {exc}") from exc
            raise
        return opt.step

    return build


def wrong_results(key: str, device: torch.device, dtype: torch.dtype) -> str:
    """'' when a fused baseline in ``dtype`` on ``device`` is about as close as its foreach twin
    to the same optimizer run in fp32 (three steps on 4,096 elements; parameters and state),
    else what differs.

    Measured: torch 2.13's CPU fused SGD with momentum in bf16/fp16 reads the reduced-precision
    momentum buffer as fp32 after the first step (``fVec::loadu`` on the bf16 pointer in its
    FusedSGDKernel.cpp): against foreach SGD, parameters off by 3.0 after three steps at lr 0.1
    and the buffer by 7.7 (fp16: inf). Such a kernel moves the bytes but not the right ones, so
    it is no roofline."""
    contender = CONTENDERS[key]
    if contender.family != "baseline" or not key.endswith("_fused") or dtype == torch.float32:
        return ""
    cache_key = (key, str(device), dtype)
    if cache_key not in _wrong_cache:
        gen = torch.Generator(device=device).manual_seed(1)
        start = torch.randn(4096, generator=gen, device=device)
        grads = [torch.randn(4096, generator=gen, device=device).mul_(0.1) for _ in range(3)]
        twin = key.replace("_fused", "_foreach")
        exact, fused, foreach = (_final_tensors(k, start, grads, d) for k, d in ((twin, torch.float32), (key, dtype), (twin, dtype)))
        errors = {}
        for name, run in (("fused", fused), ("foreach", foreach)):
            errors[name] = max(((x.float() - y).abs().max() / y.abs().max().clamp(min=1e-30)).item() for x, y in zip(run, exact))
        # A few units of the dtype's rounding, or what foreach itself reaches (it can be nan:
        # foreach Adam in fp16 on a CPU, whose eps of 1e-8 rounds to 0 there).
        bound = 8 * torch.finfo(dtype).eps + (4 * errors["foreach"] if math.isfinite(errors["foreach"]) else 0.0)
        _wrong_cache[cache_key] = "" if errors["fused"] <= bound else (
            f"{contender.name} in {str(dtype).removeprefix('torch.')} on {device.type} is off from the same optimizer "
            f"in fp32 by {errors['fused']:.2g} (relative, worst of its parameters and state after 3 steps on 4,096 "
            f"elements), its foreach twin by {errors['foreach']:.2g}: its time is shown but it is no roofline"
        )
    return _wrong_cache[cache_key]


def _final_tensors(key: str, start: torch.Tensor, grads: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The parameter and the optimizer's state tensors after ``grads`` were stepped in ``dtype``."""
    param = torch.nn.Parameter(start.to(dtype, copy=True))
    step = CONTENDERS[key].build(Workspace([param], torch.tensor(1.0, device=start.device), start.device, dtype), None)
    for g in grads:
        param.grad = g.to(dtype, copy=True)  # foreach Nesterov SGD adds into p.grad
        step()
    state = step.__self__.state[param]  # step is the optimizer's bound ``step``
    return [param.detach()] + [v for v in state.values() if isinstance(v, torch.Tensor) and v.numel() == param.numel()]


_wrong_cache: dict[tuple, str] = {}


def _build_copy(ws: Workspace, _: Variant | None) -> Step:
    # One big tensor with the same number of elements (and bytes) as the parameters.
    src = torch.ones(ws.numel, dtype=ws.dtype, device=ws.device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _build_inplace_add(ws: Workspace, _: Variant | None) -> Step:
    # The simplest in-place multi-tensor stream over the same tensors: w += g (3N). With the
    # fused SGD/Adam steps it gives the report's roofline; copy_ is no ceiling on a CPU (it
    # reached 19-29 GB/s where in-place kernels reached 39-44 on the project's EPYC).
    params, grads = [p.detach() for p in ws.params], [p.grad for p in ws.params]
    return lambda: torch._foreach_add_(params, grads)


def _always(device: torch.device) -> str:
    return "ok"


CONTENDERS: dict[str, Contender] = {
    c.key: c
    for c in [
        _fused("torch"),
        _fused("cpp"),
        _fused("triton"),
        _fused_momo("torch"),
        _fused_momo("cpp"),
        _fused_momo("triton"),
        Contender("ref_loop", "ALI-G reference loop", "alig", _build_reference, _reference_available),
        Contender("modern_loop", "ALI-G loop, today's calls", "alig", _build_modern_loop, _always),
        Contender("po_alig", "pytorch_optimizer.AliG", "alig", _build_pytorch_optimizer, _pytorch_optimizer_available),
        Contender("sgd_foreach", "SGD nesterov (foreach)", "baseline", _torch_optim("SGD", "foreach"), _always, 5),
        Contender("sgd_fused", "SGD nesterov (fused)", "baseline", _torch_optim("SGD", "fused"), _always, 5),
        Contender("adam_foreach", "Adam (foreach)", "baseline", _torch_optim("Adam", "foreach"), _always, 7),
        Contender("adam_fused", "Adam (fused)", "baseline", _torch_optim("Adam", "fused"), _always, 7),
        Contender("inplace_add", "in-place add w += g", "stream", _build_inplace_add, _always, 3),
        Contender("copy", "copy_ (one tensor)", "copy", _build_copy, _always, 2),
    ]
}
REFERENCE = "ref_loop"
MODERN_LOOP = "modern_loop"
SGD_REFERENCE = "sgd_foreach"
# The roofline of a table: the best GB/s among these in-place streams, measured in the run.
ROOFLINE_FAMILIES = ("baseline", "stream")
