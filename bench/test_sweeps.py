"""Time per step against the tensor count (4,096 elements each) and against the parameter
count (32 equal tensors): the data of the two plots. fp32, ALI-G with momentum.

    pytest bench/test_sweeps.py --bench-sets sweep_tensors --benchmark-group-by=group
"""

from bench import core

BENCH_SETS = core.SWEEP_SETS


def test_step(benchmark, case, bench_session):
    bench_session.run(benchmark, case)
