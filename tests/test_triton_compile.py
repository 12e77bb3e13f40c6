"""Every Triton kernel of alig_fused compiles to GPU code (sm_80 and sm_90), without a GPU.

The interpreter (tests/test_triton.py, tests/test_triton_lookahead.py) accepts code the
compiler rejects, so this test compiles, for real, each launch the launchers (the ALI-G
step, the Lookahead update) make in a few steps: the same kernels,
signatures, constexprs, pointer-alignment hints and num_warps that the JIT would see. It
runs in a subprocess with TRITON_INTERPRET unset (the choice is made when triton is
imported) and a fresh Triton cache, so nothing is skipped as already compiled.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARCHS = (80, 90)
REPO = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_gpus(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, *map(str, ARCHS)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, f"compilation failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    compiled = {(name, arch) for name, arch, *_ in report["compiled"]}
    for name in report["kernels"]:
        for arch in ARCHS:
            assert (name, arch) in compiled, f"{name} was not compiled for sm_{arch}"
    print(f"\n{len(report['compiled'])} compilations in {elapsed:.1f} s (compile time {report['compile_s']:.1f} s)")


# ---------------------------------------------------------------------------------------
# The subprocess: drive the launcher on CPU tensors, record its launches, compile them.
# ---------------------------------------------------------------------------------------

_TYPES = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}


def _record_launches(tk):
    """The launches of steps covering every configuration the launcher chooses."""
    import torch

    from alig_fused.functional import GroupHParams, StepInputs

    launched = []
    tk._launch = lambda kernel, grid, *args, **meta: launched.append((kernel, args, meta))

    def step(n_groups, grad_scale, found_inf, reduce_sums, numel=40000):
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
        params = [torch.randn(numel + 7 * i).to(dtypes[i % 3]) for i in range(2 * n_groups)]
        grads = [p.clone() for p in params]
        buffers = [torch.zeros_like(p) if i % 2 else torch.empty(0, dtype=p.dtype) for i, p in enumerate(params)]
        group_hparams = [
            GroupHParams(0.1, 0.9 * (k % 2), bool(k % 4 == 1), 10.0 if k % 2 else math.inf, 1e-5, 0.0, 1.0)
            for k in range(n_groups)
        ]
        tk.triton_alig(StepInputs(
            params=params, grads=grads, momentum_buffers=buffers, group_index=[i // 2 for i in range(len(params))],
            group_hparams=group_hparams, loss=torch.tensor(1.0, dtype=torch.float64),
            step_size_out=torch.zeros(n_groups), skipped_steps=torch.zeros((), dtype=torch.int64),
            grad_scale=grad_scale, found_inf=found_inf, reduce_sums=reduce_sums,
        ), {})

    step(2, None, None, None)
    step(3, torch.tensor(8.0), torch.tensor(0.0), None)
    step(9, None, None, lambda sums, loss: (sums, loss))  # 16 group slots, the sharded path's two finalizes
    step(640, None, None, None, numel=10)  # many groups: the finalize's widest tile
    return launched


def _record_lookahead_launches(tla):
    """The launches of Lookahead updates: fp32, bf16 and fp16 tensors, whole chunks and tails."""
    import torch

    launched = []
    tla._launch = lambda kernel, grid, *args, **meta: launched.append((kernel, args, meta))
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    fast = [torch.randn(40000 + 7 * i).to(dtypes[i % 3]) for i in range(6)]
    slow = [f.clone() for f in fast]
    tla.triton_lookahead(fast, slow, torch.zeros((), dtype=torch.int64), 0.5, 5, {})
    return launched


def _signature(kernel, args, meta):
    """(signature, constexprs, attrs, options) as the JIT derives them from the arguments."""
    from triton.runtime.jit import mangle_type

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if i < len(args) and isinstance(args[i], (bool, int, float)):
            # scalars: ints are specialized (1 -> constexpr, multiples of 16 -> divisibility)
            # unless listed in do_not_specialize; floats never are
            arg = args[i]
            specialize = isinstance(arg, int) and not isinstance(arg, bool) and not kernel.params[i].do_not_specialize
            if specialize and arg == 1:
                signature[name] = "constexpr"
                constexprs[name] = arg
                continue
            signature[name] = mangle_type(arg)
            if specialize and arg % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif i < len(args):
            arg = args[i]
            signature[name] = "*" + _TYPES[str(arg.dtype).removeprefix("torch.")]
            if arg.data_ptr() % 16 == 0:  # what the JIT's specialization adds
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = meta[name]
    options = {k: v for k, v in meta.items() if k not in constexprs}
    return signature, constexprs, attrs, options


def _sass(cubin: bytes, tmp: Path) -> str:
    """The SASS of a cubin, by the nvdisasm that ships with triton (or the one on PATH)."""
    import shutil

    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    tool = str(bundled) if bundled.exists() else shutil.which("nvdisasm")
    assert tool, "nvdisasm not found (neither in triton's backends/nvidia/bin nor on PATH)"
    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    return subprocess.run([tool, "-c", str(path)], capture_output=True, text=True, check=True).stdout


def _fused_multiply_adds(sass: str) -> list[str]:
    """FFMA/DFMA instructions that contract a product: ``FFMA d, a, b, c`` with neither a nor
    b the zero register (``FFMA R0, RZ, R13, R17`` is 0*x + c, the compiler's way of passing
    a NaN through, not a contraction of the source's a*b + c)."""
    fused = []
    for line in sass.splitlines():
        instruction = line.split("*/", 1)[-1].strip().rstrip(" ;")
        for op in ("FFMA", "DFMA"):
            if f" {op}" in f" {instruction}":
                operands = [o.strip() for o in instruction.split(op, 1)[1].split(",")]
                if len(operands) >= 3 and "RZ" not in operands[1:3]:
                    fused.append(instruction)
    return fused


def _main(archs):
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from alig_fused import triton_kernels as tk
    from alig_fused import triton_lookahead as tla

    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    kernels, launched = set(), []
    for module, record in ((tk, _record_launches), (tla, _record_lookahead_launches)):
        jit_functions = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
        module_kernels = {k.fn.__name__ for k in module.KERNELS}
        assert all(isinstance(k, JITFunction) for k in module.KERNELS), "the kernels are not compiled JIT functions"
        # Every @triton.jit function of the module is a kernel or a helper some kernel
        # (transitively) calls, so compiling the kernels compiles them all.
        reached, frontier = set(module_kernels), list(module_kernels)
        while frontier:
            source = jit_functions[frontier.pop()].src
            for name in jit_functions:
                if name not in reached and f"{name}(" in source:
                    reached.add(name)
                    frontier.append(name)
        assert reached == set(jit_functions), f"@triton.jit functions no kernel calls: {set(jit_functions) - reached}"
        kernels |= module_kernels
        launched += record(module)

    tmp = Path(tempfile.mkdtemp())
    seen, compiled, compile_s = set(), [], 0.0
    for kernel, args, meta in launched:
        signature, constexprs, attrs, options = _signature(kernel, args, meta)
        key = (kernel.fn.__name__, json.dumps(signature), json.dumps(constexprs), str(attrs), json.dumps(options))
        if key in seen:
            continue
        seen.add(key)
        for arch in archs:
            started = time.perf_counter()
            binary = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", arch, 32),
                options=options,
            )
            seconds = time.perf_counter() - started
            compile_s += seconds
            assert binary.asm["cubin"], f"{kernel.fn.__name__}: empty cubin"
            ptx = binary.asm["ptx"]
            if kernel in (tk._alig_pass1_kernel, tk._alig_pass2_kernel, tla._lookahead_kernel):
                # the aligned whole-chunk path must keep its 16-byte vector accesses
                assert "ld.global.v4.b32" in ptx, f"{kernel.fn.__name__}: no vectorized loads on sm_{arch}"
            if kernel in (tk._alig_pass2_kernel, tla._lookahead_kernel):
                assert "st.global.v4.b32" in ptx, f"{kernel.fn.__name__}: no vectorized stores on sm_{arch}"
            if kernel in (tk._alig_pass2_kernel, tk._alig_finalize_kernel):
                # no fp contraction (launches(): enable_fp_fusion=False), as the interpreter
                # and the CUDA extension (--fmad=false) compute
                assert "fma.rn" not in ptx, f"{kernel.fn.__name__}: an fma in the PTX for sm_{arch}"
            if kernel is tk._alig_pass1_kernel and arch == 90:
                # loads in flight (triton_kernels.PASS1_UNROLL): every whole-chunk load 16 bytes
                # for fp32, bf16 and fp16 (3 paths x 3 arrays), unrolled, and no spills
                sass = _sass(binary.asm["cubin"], tmp)
                words = [w.rstrip(";") for line in sass.splitlines() for w in line.split()]
                wide = words.count("LDG.E.128")
                assert wide >= 9 * tk.PASS1_UNROLL, f"pass 1: {wide} LDG.E.128, expected 9 x {tk.PASS1_UNROLL}"
                assert not [w for w in words if w.startswith(("LDL", "STL"))], "pass 1 spills to local memory"
            if kernel is tk._alig_finalize_kernel and arch == 90:
                # registers bounded whatever the number of groups (tiles): no spills
                words = [w for line in _sass(binary.asm["cubin"], tmp).splitlines() for w in line.split()]
                assert not [w for w in words if w.startswith(("LDL", "STL"))], \
                    f"the finalize spills to local memory ({constexprs})"
            if kernel is tk._alig_pass2_kernel and arch == 90:
                # and in the machine code: the update's fp32 math has no FFMA (the DFMAs left
                # are the Newton steps of the fp64 1/grad_scale, a correctly rounded division)
                fused = [i for i in _fused_multiply_adds(_sass(binary.asm["cubin"], tmp)) if "FFMA" in i]
                assert not fused, f"{kernel.fn.__name__}: FFMA on sm_{arch}: {fused[:3]}"
            if kernel is tla._lookahead_kernel:
                # slow + alpha * (fast - slow) with two roundings: no contraction into an fma
                assert "fma.rn.f32" not in ptx, f"lookahead: an fp32 fma on sm_{arch}"
                # the counter protocol needs each scalar atomic made once per program (one thread)
                atomics = [line.strip() for line in ptx.splitlines() if "atom." in line]
                assert len(atomics) == 2 and all(line.startswith("@%p") for line in atomics), atomics
            compiled.append((kernel.fn.__name__, arch, round(seconds, 2), constexprs))
    print(json.dumps({"kernels": sorted(kernels), "compiled": compiled, "compile_s": compile_s}))


if __name__ == "__main__":
    _main([int(a) for a in sys.argv[1:]] or list(ARCHS))
