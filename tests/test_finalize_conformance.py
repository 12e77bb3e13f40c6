"""Every backend's finalize, alone, against the spec ``alig_fused.functional.finalize``.

The finalize is the between-passes arithmetic: from the per-group pass-1 sums, the loss
and the hyper-parameters, the skip flag, the step sizes and the pass-2 coefficients. The
torch backend calls ``functional.finalize`` itself; the C++ one has ``csrc/alig_math.h``
(reached here through the ``alig_fused::alig_finalize`` op, the functions its CPU and CUDA
kernels call), the Triton one ``_alig_finalize_kernel`` (launched here alone, in its
from-sums mode, through the interpreter on CPU).

Exactly, not to a tolerance: all three do the same IEEE float64 operations in the same
order with no fused multiply-add (C++ built with -ffp-contract=off, Triton with
enable_fp_fusion=False, its interpreter in numpy), and sqrt and division are correctly
rounded everywhere. The one operation whose order differs is G, the sum over groups of
||g||^2 (torch sums pairwise, C++ in a loop, Triton per tile); the ||g||^2 column is made
of dyadic numbers (k * 2^-14, k < 2^20) so that every order gives the same G. With
arbitrary sums (test_arbitrary_sums_to_the_last_ulp) G may differ in its last bit, and
the outputs then by at most one ulp.
"""

from __future__ import annotations

import math

import pytest
import torch

from alig_fused import backends
from alig_fused.functional import Coef, HParam, Sum, finalize
from harness import require_backend

CPU = torch.device("cpu")
FLT_MAX = float(torch.finfo(torch.float32).max)


# ----- the inputs ----------------------------------------------------------------------------


def random_inputs(n_groups, seed, loss=2.5, dyadic=True, no_cap=False):
    """(sums [n, 6] float64, loss 0-dim float64, hparams [n, 7] float64), every setting mixed."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n_groups, generator=gen, dtype=torch.float64)

    def some(p):
        return torch.rand(n_groups, generator=gen) < p

    hp = torch.empty(n_groups, HParam.COUNT, dtype=torch.float64)
    hp[:, HParam.LR] = torch.where(some(0.4) | no_cap, math.inf, uniform(1e-3, 2.0))
    hp[:, HParam.MOMENTUM] = torch.where(some(0.3), 0.0, uniform(0.0, 0.99))
    hp[:, HParam.ADJUSTED] = some(0.5).double()
    hp[:, HParam.MAX_NORM] = torch.where(some(0.4), math.inf, uniform(0.1, 6.0))
    hp[:, HParam.EPS] = 10 ** uniform(-8, -2)
    hp[:, HParam.F_STAR] = torch.where(some(0.5), 0.0, uniform(0.0, 1.0))
    hp[:, HParam.SCALING] = uniform(0.5, 3.0)

    sums = torch.empty(n_groups, Sum.COUNT, dtype=torch.float64)
    if dyadic:
        sums[:, Sum.GG] = torch.randint(0, 1 << 20, (n_groups,), generator=gen).double() * 2.0**-14
    else:
        sums[:, Sum.GG] = uniform(0.0, 64.0)
    sums[:, Sum.WW] = uniform(0.0, 50.0)  # ||w|| up to ~7: outside many balls
    sums[:, Sum.BB] = uniform(0.0, 10.0)
    for col in (Sum.WB, Sum.WG, Sum.BG):  # cross terms of both signs
        sums[:, col] = uniform(-5.0, 5.0)
    return sums, torch.tensor(loss, dtype=torch.float64), hp


def case_inputs(name):
    """(sums, loss, hparams, found_inf or None) of a named case."""
    found_inf = None
    if name.startswith("random_"):
        sums, loss, hp = random_inputs(int(name.split("_")[1]), seed=len(name))
    elif name == "no_cap":
        sums, loss, hp = random_inputs(40, seed=1, no_cap=True)
        sums[:, Sum.GG] *= 2.0**-20  # G ~1e-3: Polyak steps of ~1e3, beyond any lr of the other cases
    elif name in ("nan_loss", "inf_loss", "neg_inf_loss"):
        value = {"nan_loss": math.nan, "inf_loss": math.inf, "neg_inf_loss": -math.inf}[name]
        sums, loss, hp = random_inputs(5, seed=2, loss=value)
    elif name == "loss_below_f_star":  # max(loss - f_star, 0) = 0: steps of size 0, not skipped
        sums, loss, hp = random_inputs(5, seed=3, loss=-1.0)
    elif name in ("inf_G", "nan_G"):
        sums, loss, hp = random_inputs(7, seed=4)
        sums[3, Sum.GG] = math.inf if name == "inf_G" else math.nan
    elif name in ("G_is_float32_max", "G_just_below_float32_max"):
        sums, loss, hp = random_inputs(3, seed=5, loss=1e30)
        sums[:, Sum.GG] = 0.0
        sums[1, Sum.GG] = FLT_MAX if name == "G_is_float32_max" else math.nextafter(FLT_MAX, 0.0)
    elif name == "G_zero":  # no gradient anywhere: gamma = min(lr, loss / eps)
        sums, loss, hp = random_inputs(4, seed=6)
        sums[:, Sum.GG] = 0.0
    elif name in ("found_inf", "found_inf_zero"):
        sums, loss, hp = random_inputs(6, seed=7)
        found_inf = torch.tensor(1.0 if name == "found_inf" else 0.0)
    elif name == "binding_ball":  # every group has a small ball
        sums, loss, hp = random_inputs(12, seed=8)
        hp[:, HParam.MAX_NORM] = 0.25
    else:
        raise KeyError(name)
    return sums, loss, hp, found_inf


CASES = ["random_1", "random_3", "random_33", "random_640", "no_cap", "nan_loss", "inf_loss", "neg_inf_loss",
         "loss_below_f_star", "inf_G", "nan_G", "G_is_float32_max", "G_just_below_float32_max", "G_zero",
         "found_inf", "found_inf_zero", "binding_ball"]
SKIPPED = {"nan_loss", "inf_loss", "neg_inf_loss", "inf_G", "nan_G", "G_is_float32_max", "found_inf"}


# ----- every backend's finalize, alone ------------------------------------------------------------


def cpp_finalize(sums, loss, hp, found_inf):
    """(step_size float64, coefs float32, skip bool) from the C++ code (alig_math.h)."""
    require_backend("cpp", CPU)
    from alig_fused import cpp_ops  # noqa: F401 (registers the fake kernels)

    if not hasattr(torch.ops.alig_fused, "alig_finalize"):
        pytest.skip("the compiled extension predates alig_finalize (rebuild it)")
    step_size, coefs, skip = torch.ops.alig_fused.alig_finalize(sums, loss, hp, found_inf)
    return step_size, coefs, skip, None


def triton_finalize(sums, loss, hp, found_inf):
    """(step_size float32, coefs float32, skip, skipped-steps increment) from the Triton
    finalize kernel, launched alone in its from-sums mode (the configuration launches() picks)."""
    require_backend("triton", CPU)
    from alig_fused import triton_kernels as tk

    n_groups = hp.shape[0]
    tables = tk._build_tables([], [], [], [], n_groups, CPU, tk.CHUNK)
    step_size = torch.full((n_groups,), -1.0)
    skipped = torch.full((), 5, dtype=torch.int64)
    found = torch.zeros(()) if found_inf is None else found_inf.float()
    reduce_sums = lambda _sums, _loss: (sums, loss)  # noqa: E731 (the sums under test)
    steps = tk.launches(tables, hp, torch.zeros((), dtype=torch.float64), torch.ones(()), found, step_size, skipped,
                        reduce_sums)
    from_sums = [launch for launch in steps if launch[3].get("MODE") == tk._FROM_SUMS]
    assert len(from_sums) == 1
    kernel, grid, args, meta = from_sums[0]
    assert kernel is tk._alig_finalize_kernel and grid == (1,)
    tk._launch(kernel, grid, *args, **meta)
    return step_size, tables.coefs[:n_groups], tables.skip[0] != 0, int(skipped) - 5


FINALIZES = {"cpp": cpp_finalize, "triton": triton_finalize}


def spec(sums, loss, hp, found_inf):
    return finalize(sums, loss, hp, None, found_inf)


def test_every_kernel_backend_has_a_finalize_here():
    """A backend added to alig_fused.backends needs an entry in FINALIZES (torch uses the spec)."""
    assert set(backends.BACKENDS) - {"torch"} <= set(FINALIZES)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("backend", sorted(FINALIZES))
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_finalize_equals_the_spec(backend, name):
    sums, loss, hp, found_inf = case_inputs(name)
    want_step, want_coefs, want_skip = spec(sums, loss, hp, found_inf)
    assert bool(want_skip) == (name in SKIPPED)
    step_size, coefs, skip, skipped_increment = FINALIZES[backend](sums, loss, hp, found_inf)
    assert bool(skip) == bool(want_skip)
    if skipped_increment is not None:  # the kernel also counts the skipped step
        assert skipped_increment == int(want_skip)
    # step sizes: float64 from the C++ op, float32 (as the step stores them) from Triton
    assert torch.equal(step_size, want_step.to(step_size.dtype)), (step_size, want_step)
    assert coefs.dtype == torch.float32 and torch.equal(coefs, want_coefs.float()), (coefs, want_coefs)
    if name == "binding_ball" or name == "random_640":
        assert (want_coefs[:, Coef.SCALE] < 1).sum() >= 5, "the ball must bind for this case to mean anything"
    if name == "no_cap":
        assert (want_step > 2.0).any(), "no cap: some step sizes beyond any lr of the random cases"


@pytest.mark.parametrize("backend", sorted(FINALIZES))
@pytest.mark.parametrize("n_groups", [3, 640])
def test_arbitrary_sums_to_the_last_ulp(backend, n_groups):
    """Sums of any value: G's summation order may change its last bit, and then the step
    sizes by a few float64 ulps and the float32 outputs by at most one ulp."""
    sums, loss, hp = random_inputs(n_groups, seed=9, dyadic=False)
    want_step, want_coefs, _ = spec(sums, loss, hp, None)
    step_size, coefs, skip, _ = FINALIZES[backend](sums, loss, hp, None)
    assert not bool(skip)
    if step_size.dtype == torch.float64:
        torch.testing.assert_close(step_size, want_step, rtol=1e-14, atol=0)
    else:
        assert float32_ulps(step_size, want_step.float()) <= 1
    assert float32_ulps(coefs, want_coefs.float()) <= 1


def float32_ulps(a, b):
    """The largest distance in float32 ulps between two float32 tensors (-0 and +0 are 0 apart)."""
    assert a.dtype == b.dtype == torch.float32

    def ordered(t):  # float32 bits as integers in the order of the values
        bits = t.view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return int((ordered(a) - ordered(b)).abs().max())


# ----- the C++ op itself ----------------------------------------------------------------------------


def test_cpp_finalize_opcheck():
    sums, loss, hp, _ = case_inputs("random_33")
    cpp_finalize(sums, loss, hp, None)  # skips when the op is missing
    for found_inf in (None, torch.tensor(1.0)):
        torch.library.opcheck(torch.ops.alig_fused.alig_finalize.default, (sums, loss, hp, found_inf))


@pytest.mark.parametrize(
    "break_inputs, match",
    [
        (lambda s, l, h: (s[:, :5], l, h), "sums"),
        (lambda s, l, h: (s[:2], l, h), "sums"),
        (lambda s, l, h: (s.float(), l, h), "sums"),
        (lambda s, l, h: (s, l, h[:, :6]), "hparams"),
        (lambda s, l, h: (s, torch.ones(2), h), "loss"),
    ],
)
def test_cpp_finalize_rejects_bad_inputs(break_inputs, match):
    sums, loss, hp, _ = case_inputs("random_3")
    cpp_finalize(sums, loss, hp, None)
    with pytest.raises(ValueError, match=match):
        torch.ops.alig_fused.alig_finalize(*break_inputs(sums, loss, hp), None)
