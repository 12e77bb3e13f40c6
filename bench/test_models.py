"""One optimizer step on model-like shape sets (ResNet-50, GPT-2 124M, Llama ~1B, 2,000 x 4,096),
fp32 and bf16, ALI-G with and without momentum and projection, against SGD, Adam and a copy.

    pytest bench/test_models.py --bench-sets resnet50 --benchmark-group-by=group
"""

from bench import core

BENCH_SETS = core.MODEL_SETS


def test_step(benchmark, case, bench_session):
    bench_session.run(benchmark, case)
