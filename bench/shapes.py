"""Parameter shape sets that look like real models, written out from the architectures.

Every set is a list of ``(name, shape)`` in the order ``model.named_parameters()`` gives
them. The counts are checked in ``tests/test_bench_smoke.py``:

    resnet50     161 tensors   25,557,032 params  (torchvision resnet50, 1000 classes)
    gpt2         148 tensors  124,439,808 params  (GPT-2 small, HF layout, tied lm_head)
    llama1b      146 tensors 1,235,814,400 params (Llama-3.2-1B layout, tied embeddings; GPU only)
    many_small  2000 tensors    8,192,000 params  (2,000 x 4,096: launch/loop overhead)
"""

from __future__ import annotations

import math

Shape = tuple[int, ...]
ShapeSet = list[tuple[str, Shape]]

# Sweeps for the two plots (time vs tensor count at a fixed tensor size, time vs params).
TENSOR_SIZE = 4096
TENSOR_COUNTS = (10, 30, 100, 300, 1000, 3000)
SWEEP_TENSORS = 32  # tensors per point of the parameter-count sweep
PARAM_COUNTS_CPU = (2**16, 2**18, 2**20, 2**22, 2**24, 2**26)
PARAM_COUNTS_GPU = PARAM_COUNTS_CPU + (2**28, 2**30)


def resnet50(num_classes: int = 1000) -> ShapeSet:
    """torchvision's resnet50: stem, 4 stages of bottlenecks [3, 4, 6, 3], fc."""
    shapes: ShapeSet = []

    def conv_bn(prefix: str, bn: str, c_in: int, c_out: int, k: int) -> None:
        shapes.append((f"{prefix}.weight", (c_out, c_in, k, k)))
        shapes.append((f"{bn}.weight", (c_out,)))
        shapes.append((f"{bn}.bias", (c_out,)))

    conv_bn("conv1", "bn1", 3, 64, 7)
    c_in = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            conv_bn(f"{p}.conv1", f"{p}.bn1", c_in, width, 1)
            conv_bn(f"{p}.conv2", f"{p}.bn2", width, width, 3)
            conv_bn(f"{p}.conv3", f"{p}.bn3", width, width * 4, 1)
            if block == 0:  # projection shortcut: channel count (and stride) change
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", c_in, width * 4, 1)
            c_in = width * 4
    shapes.append(("fc.weight", (num_classes, c_in)))
    shapes.append(("fc.bias", (num_classes,)))
    return shapes


def gpt2(n_layer: int = 12, d_model: int = 768, vocab: int = 50257, n_ctx: int = 1024) -> ShapeSet:
    """GPT-2 small as in HF transformers (Conv1D weights are [in, out]); lm_head is tied to wte."""
    shapes: ShapeSet = [("wte.weight", (vocab, d_model)), ("wpe.weight", (n_ctx, d_model))]
    for i in range(n_layer):
        p = f"h.{i}"
        shapes += [
            (f"{p}.ln_1.weight", (d_model,)),
            (f"{p}.ln_1.bias", (d_model,)),
            (f"{p}.attn.c_attn.weight", (d_model, 3 * d_model)),
            (f"{p}.attn.c_attn.bias", (3 * d_model,)),
            (f"{p}.attn.c_proj.weight", (d_model, d_model)),
            (f"{p}.attn.c_proj.bias", (d_model,)),
            (f"{p}.ln_2.weight", (d_model,)),
            (f"{p}.ln_2.bias", (d_model,)),
            (f"{p}.mlp.c_fc.weight", (d_model, 4 * d_model)),
            (f"{p}.mlp.c_fc.bias", (4 * d_model,)),
            (f"{p}.mlp.c_proj.weight", (4 * d_model, d_model)),
            (f"{p}.mlp.c_proj.bias", (d_model,)),
        ]
    shapes += [("ln_f.weight", (d_model,)), ("ln_f.bias", (d_model,))]
    return shapes


def llama1b(
    n_layer: int = 16,
    d_model: int = 2048,
    d_ff: int = 8192,
    n_heads: int = 32,
    n_kv_heads: int = 8,
    vocab: int = 128256,
) -> ShapeSet:
    """Llama-3.2-1B: grouped-query attention, SwiGLU MLP, RMSNorm, tied embeddings."""
    head_dim = d_model // n_heads
    kv_dim = n_kv_heads * head_dim
    shapes: ShapeSet = [("embed_tokens.weight", (vocab, d_model))]
    for i in range(n_layer):
        p = f"layers.{i}"
        shapes += [
            (f"{p}.self_attn.q_proj.weight", (d_model, d_model)),
            (f"{p}.self_attn.k_proj.weight", (kv_dim, d_model)),
            (f"{p}.self_attn.v_proj.weight", (kv_dim, d_model)),
            (f"{p}.self_attn.o_proj.weight", (d_model, d_model)),
            (f"{p}.mlp.gate_proj.weight", (d_ff, d_model)),
            (f"{p}.mlp.up_proj.weight", (d_ff, d_model)),
            (f"{p}.mlp.down_proj.weight", (d_model, d_ff)),
            (f"{p}.input_layernorm.weight", (d_model,)),
            (f"{p}.post_attention_layernorm.weight", (d_model,)),
        ]
    shapes.append(("norm.weight", (d_model,)))
    return shapes


def many_small(count: int = 2000, size: int = TENSOR_SIZE) -> ShapeSet:
    return [(f"t{i}", (size,)) for i in range(count)]


def equal_split(total: int, count: int = SWEEP_TENSORS) -> ShapeSet:
    """``count`` tensors of (about) equal size adding up to ``total`` elements."""
    base, extra = divmod(total, count)
    return [(f"t{i}", (base + (1 if i < extra else 0),)) for i in range(count) if base or i < extra]


MODEL_SETS = {"resnet50": resnet50, "gpt2": gpt2, "llama1b": llama1b, "many_small": many_small}
GPU_ONLY = frozenset({"llama1b"})


def quick(shapes: ShapeSet, max_tensors: int = 24, max_numel: int = 512) -> ShapeSet:
    """A tiny stand-in with the same kinds of tensors (for --quick and the CI smoke test)."""
    step = max(1, math.ceil(len(shapes) / max_tensors))
    tiny: ShapeSet = []
    for name, shape in shapes[::step]:
        dims = list(shape)
        while math.prod(dims) > max_numel:  # halve the largest dimension until it fits
            j = dims.index(max(dims))
            dims[j] = max(1, dims[j] // 2)
        tiny.append((name, tuple(dims)))
    return tiny


def numel(shapes: ShapeSet) -> int:
    return sum(math.prod(s) for _, s in shapes)
