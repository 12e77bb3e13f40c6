"""bf16 storage in the C++ CPU kernels, bit for bit: the values pass 2 writes are the fp32
results of update_element rounded to bf16 by c10's rule (round to nearest, ties to even;
a nan becomes 0x7FC0), whichever conversion the CPU runs (AVX-512 or AVX2 intrinsics where it
has them, the portable code elsewhere; tests/test_cpu_isa.py runs every one on this CPU). The reference rounding below is written on the integer
bits, independently of both, and agrees with torch's own ``.to(torch.bfloat16)`` on every
value that is not a nan.
"""

from __future__ import annotations


import pytest
import torch

from conftest import require_backend

CPU = torch.device("cpu")
require_backend("cpp", CPU)  # skips this module where cpp cannot run (fails it where CI requires cpp)

from alig_fused import cpp_ops  # noqa: E402,F401 (registers the ops)


def bf16_bits_reference(x: torch.Tensor) -> torch.Tensor:
    """c10::BFloat16(float) on the bits of fp32 x, as int64 in [0, 2^16)."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(torch.isnan(x), torch.full_like(rounded, 0x7FC0), rounded)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int64) & 0xFFFF


def hard_inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w, g, b in bf16: all bit patterns (nan with payloads, inf, denormals, +-0) in the first
    third, b - g exactly halfway between two bf16 values (ties, both parities) and just off it
    in the second, ordinary values in the rest."""
    gen = torch.Generator().manual_seed(seed)
    random_bits = torch.randint(0, 1 << 16, (3, n), generator=gen, dtype=torch.int32).to(torch.int16)
    w, g, b = (row.clone().view(torch.bfloat16) for row in random_bits)
    third = n // 3
    x = (torch.randn(third, generator=gen) * 2.0 ** torch.randint(-120, 120, (third,), generator=gen)).to(torch.bfloat16)
    half_ulp = torch.ldexp(torch.ones(third), torch.frexp(x.float()).exponent - 9)  # bf16: 8 significant bits
    offset = half_ulp * torch.tensor([1.0, 1.5, 0.5, 1.0 - 2.0**-8])[torch.arange(third) % 4]
    b[third : 2 * third] = x
    g[third : 2 * third] = (-offset).to(torch.bfloat16)
    w[third : 2 * third] = 0.0
    normal = torch.randn(3, n - 2 * third, generator=gen).to(torch.bfloat16)
    w[2 * third :], g[2 * third :], b[2 * third :] = normal
    return w, g, b


# n: 16-element iterations, an 8-element one and a scalar tail; several chunks (16,384).
@pytest.mark.parametrize("n", [13, 4096 + 8 + 5, 40_000])
@pytest.mark.parametrize("grad_scale", [None, 4.0])
@pytest.mark.parametrize("momentum", [True, False])
def test_pass2_rounds_bf16_like_c10(n, grad_scale, momentum):
    w, g, b = hard_inputs(n, seed=n)
    w0, g0, b0 = w.clone(), g.clone(), b.clone()
    # w' = ((w - c*g) + a*b) * scale, b' = b*mu - d*g; with a = c = d = mu = 1, scale = 1 the
    # ties of the second third reach the rounding unchanged (b - g); scale != 1 mixes the bits.
    for a, c, d, mu, scale in [(1.0, 1.0, 1.0, 1.0, 1.0), (0.81, 0.37, 1.0, 0.9, 0.999)]:
        w, g, b = w0.clone(), g0.clone(), b0.clone()
        buffers = [b] if momentum else [torch.empty(0, dtype=torch.bfloat16)]
        coefs = torch.tensor([[a, c, d, mu, scale]], dtype=torch.float32)
        scale_t = None if grad_scale is None else torch.tensor(grad_scale)
        torch.ops.alig_fused.alig_apply_([w], [g], buffers, [0], coefs, torch.tensor(False), scale_t)

        # The fp32 values in update_element's order, one rounding per operation.
        k = {name: torch.tensor(v, dtype=torch.float32) for name, v in zip("acdms", (a, c, d, mu, scale))}
        gf = g0.float() if grad_scale is None else g0.float() * (1.0 / torch.tensor(grad_scale))
        w_new = w0.float() - k["c"] * gf
        if momentum:
            w_new = w_new + k["a"] * b0.float()
            b_new = b0.float() * k["m"] - k["d"] * gf
            assert torch.equal(bits_of(b), bf16_bits_reference(b_new))
            finite = ~torch.isnan(b_new)
            assert torch.equal(bits_of(b)[finite], bits_of(b_new.to(torch.bfloat16))[finite])
        w_new = w_new * k["s"]
        assert torch.equal(bits_of(w), bf16_bits_reference(w_new))
        finite = ~torch.isnan(w_new)
        assert torch.equal(bits_of(w)[finite], bits_of(w_new.to(torch.bfloat16))[finite])
        assert torch.equal(bits_of(g), bits_of(g0))  # g is read only


@pytest.mark.parametrize("n", [13, 4096 + 8 + 5, 40_000])
def test_projection_pass_rounds_bf16_like_c10(n):
    """The ball binds: the op writes w' as without a ball, then scales it by s = R/||w'||
    (||w'|| from its fp32 lane sums) in fp32 and rounds again: an fp32 s within a few ulps of
    R/||w'|| gives every bit."""
    gen = torch.Generator().manual_seed(n)
    w0 = torch.randn(n, generator=gen).to(torch.bfloat16)
    g = (torch.randn(n, generator=gen) * 0.01).to(torch.bfloat16)
    b0 = torch.randn(n, generator=gen).to(torch.bfloat16)
    lr, momentum = 0.01, 0.9  # the Polyak step (>= 0.5 here) is capped: gamma = lr
    out = {}
    for max_norm in (float("inf"), 1.0):
        w, b = w0.clone(), b0.clone()
        hparams = torch.tensor([[lr, momentum, 0.0, max_norm, 1e-5, 0.0, 1.0]], dtype=torch.float64)
        torch.ops.alig_fused.alig_step_([w], [g], [b], [0], hparams, torch.tensor(2.0, dtype=torch.float64),
                                        torch.zeros(1), torch.zeros((), dtype=torch.int64), None, None)
        out[max_norm] = (w, b)
    (w_free, b_free), (w_ball, b_ball) = out[float("inf")], out[1.0]
    assert torch.equal(bits_of(b_ball), bits_of(b_free))  # the ball scales w only
    # ||w'|| of the unrounded fp32 w' (finalize's coefficients, in fp32 as pass 2 gets them).
    a, c = (torch.tensor(v, dtype=torch.float32) for v in (momentum * momentum, lr * (1 + momentum)))
    w_fp32 = (w0.float() - c * g.float()) + a * b0.float()
    assert torch.equal(bits_of(w_free), bf16_bits_reference(w_fp32))
    norm = w_fp32.double().norm().item()
    assert norm > 2.0  # the ball binds
    s = torch.tensor(1.0 / norm, dtype=torch.float32)
    candidates, down, up = [s], s, s
    for _ in range(8):  # 8 ulps either side
        down, up = torch.nextafter(down, torch.tensor(0.0)), torch.nextafter(up, torch.tensor(1.0))
        candidates += [down, up]
    matches = [c for c in candidates
               if torch.equal(bits_of(w_ball), bf16_bits_reference(w_free.float() * c))]
    assert matches, "no fp32 scale near R/||w'|| reproduces the projected bf16 bits"
