"""The C++ CPU kernels are built for three instruction sets (generic x86-64, AVX2 + F16C,
AVX-512; csrc/alig_cpu.cpp) and run the best the CPU has, capped by ALIG_FUSED_CPU_ISA.
Every path must give the same bits: the same rounding of each element and the same fp32 sums
(16 lanes, each summed in element order, folded into fp64 per block; the fold itself is
exact for most inputs, so what this sees is each lane's rounding). Each path runs in its own process
(the choice is made once per process) on the same inputs: fp32, bf16 and fp16 tensors whose
sizes leave every kind of tail, a binding ball (pass 2 measures ||w'||, pass 3 scales), a
GradScaler scale, the analytic projection of the sharded halves, and FusedMoMo's pass 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import require_backend

require_backend("cpp", torch.device("cpu"))

ISAS = ("generic", "avx2", "avx512")

SCRIPT = r"""
import sys
import torch
from alig_fused import cpp_ops

torch.manual_seed(0)
torch.set_num_threads(2)
ops = torch.ops.alig_fused
sizes = [1, 7, 15, 16, 17, 31, 33, 1000, 1024 + 9, 16384 * 2 + 21, 70_001]
out = {"isa": cpp_ops.cpu_isa()}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    name = str(dtype).split(".")[-1]
    w = [torch.randn(n).to(dtype) for n in sizes]
    g = [(torch.randn(n) * 0.1).to(dtype) for n in sizes]
    b = [torch.randn(n).to(dtype) for n in sizes]
    groups = [i % 2 for i in range(len(sizes))]
    # group 0: momentum, a ball that binds; group 1: momentum, no ball
    hparams = torch.tensor([[0.05, 0.9, 0.0, 3.0, 1e-5, 0.0, 1.0],
                            [0.05, 0.9, 0.0, float("inf"), 1e-5, 0.0, 1.0]], dtype=torch.float64)
    loss = torch.tensor(2.5, dtype=torch.float64)
    step_size, skipped = torch.zeros(2), torch.zeros((), dtype=torch.int64)
    for grad_scale in (None, torch.tensor(8.0)):
        ops.alig_step_(w, g, b, groups, hparams, loss, step_size, skipped, grad_scale, None)
        out[f"{name} step scale={grad_scale is not None}"] = [t.clone() for t in w + b] + [step_size.clone()]
    sums = ops.alig_sums(w, g, b, groups, hparams, None)
    ops.alig_update_(w, g, b, groups, hparams, sums, loss, step_size, skipped, None, None)
    out[f"{name} sums"] = [sums]
    out[f"{name} update"] = [t.clone() for t in w + b] + [step_size.clone()]
    coefs = torch.tensor([[0.81, 0.019, 0.01, 0.9, 0.999], [0.5, 0.1, 0.2, 0.3, 1.0]])
    ops.alig_apply_(w, g, b, groups, coefs, torch.tensor(False), None)
    out[f"{name} apply"] = [t.clone() for t in w + b]
    assert skipped.item() == 0
torch.save(out, sys.argv[1])
"""


def run_with_isa(isa: str, path: Path) -> dict:
    env = dict(os.environ, ALIG_FUSED_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, check=True, timeout=300)
    return torch.load(path)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def test_every_instruction_set_gives_the_same_bits(tmp_path):
    results = {isa: run_with_isa(isa, tmp_path / f"{isa}.pt") for isa in ISAS}
    ran = {isa: r["isa"] for isa, r in results.items()}
    assert ran["generic"] == "generic"
    paths = [isa for isa in ISAS if ran[isa] == isa]  # the ones this CPU has
    reference = results["generic"]
    for isa in paths[1:]:
        for key, tensors in reference.items():
            if key == "isa":
                continue
            for i, (want, got) in enumerate(zip(tensors, results[isa][key])):
                assert torch.equal(bits(got), bits(want)), f"{isa} differs from generic: {key}, tensor {i}"
    if len(paths) < len(ISAS):
        pytest.skip(f"compared {', '.join(paths)}; this CPU lacks {', '.join(i for i in ISAS if i not in paths)}")


def test_an_unknown_instruction_set_is_a_clear_error():
    env = dict(os.environ, ALIG_FUSED_CPU_ISA="sse9")
    code = "from alig_fused import cpp_ops; cpp_ops.cpu_isa()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ALIG_FUSED_CPU_ISA=sse9 is not one of generic, avx2, avx512" in proc.stderr
