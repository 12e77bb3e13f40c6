"""Two processes on CPU (gloo): DDP keeps the replicas identical, FSDP2 equals unsharded,
an optimizer stepped on one rank only works with average_loss=False and says why without it."""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alig_fused import FusedALIG, FusedMoMo

WORLD = 2
STEPS = 20
TIMEOUT_S = 180
ONE_RANK_TIMEOUT_S = 5  # the process group of the one-rank test: a missed collective fails fast
HPARAMS = dict(lr=0.2, momentum=0.9, max_norm=3.0)
MOMO_HPARAMS = dict(lr=0.5, beta=0.9, weight_decay=0.01, use_fstar=True)


def make_optimizer(kind, params, backend, **kwargs):
    if kind == "momo":
        return FusedMoMo(params, backend=backend, **MOMO_HPARAMS, **kwargs)
    return FusedALIG(params, backend=backend, **HPARAMS, **kwargs)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 6, generator=gen)
    y = torch.randn(8, 3, generator=gen)
    return x, y


def single_process_run(backend: str, kind: str = "alig"):
    """Unsharded, one process, each step on the ranks' batches concatenated."""
    model = make_model()
    opt = make_optimizer(kind, model.parameters(), backend)
    for step in range(STEPS):
        xs, ys = zip(*(batch(r, step) for r in range(WORLD)))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys))
        loss.backward()
        opt.step(loss=loss)
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, port, mode, backend, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        mode, _, kind = mode.partition(":")
        model = make_model()
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            fully_shard(model[0], mesh=mesh)
            fully_shard(model[2], mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = make_optimizer(kind or "alig", model.parameters(), backend)
        for step in range(STEPS):
            x, y = batch(rank, step)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)  # this rank's loss only
            loss.backward()
            opt.step(loss=loss)
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
        torch.save({"params": [p.clone() for p in params], "backend": opt.last_backend}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def local_run(backend: str, rank: int, steps: int, **kwargs):
    """One process, no torch.distributed: the steps of rank ``rank``'s batches alone."""
    model = make_model()
    opt = FusedALIG(model.parameters(), backend=backend, **HPARAMS, **kwargs)
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    return [p.detach().clone() for p in model.parameters()]


def _one_rank_worker(rank, port, mode, backend, out_dir):
    """Rank 0 steps optimizers of its own while rank 1 takes part in no collective."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    done = os.path.join(out_dir, "rank0.done")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        group = dist.new_group(timeout=timedelta(seconds=ONE_RANK_TIMEOUT_S))
        result = {}
        if rank == 0:
            # average_loss=False: no collective, so no waiting for rank 1 (which never steps).
            # A collective on `group` here would time out after ONE_RANK_TIMEOUT_S and raise.
            result["local"] = local_run(backend, 0, 3, average_loss=False, process_group=group)
            # The default on one rank only: the loss all-reduce times out and the error says why.
            model = make_model()
            opt = FusedALIG(model.parameters(), backend=backend, process_group=group, **HPARAMS)
            before = [p.detach().clone() for p in model.parameters()]
            x, y = batch(0, 0)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            try:
                opt.step(loss=loss)
                result["error"] = None
            except RuntimeError as exc:
                result["error"] = str(exc)
            result["unchanged"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
            torch.save(result, os.path.join(out_dir, "rank0.pt"))
            open(done, "w").close()
        else:
            while not os.path.exists(done):
                time.sleep(0.1)
            torch.save(result, os.path.join(out_dir, "rank1.pt"))
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(mode, backend, tmp_path, worker=_worker):
    """Start WORLD processes and wait; fail (never hang) after TIMEOUT_S."""
    ctx = mp.start_processes(
        worker, args=(free_port(), mode, backend, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{mode} run did not finish within {TIMEOUT_S} s")
    except Exception as exc:
        errors = [p.read_text() for p in sorted(tmp_path.glob("rank*.err"))]
        pytest.fail(f"{mode} worker failed: {exc}\n" + "\n".join(errors))
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(params=["torch", "cpp"])
def dist_backend(request):
    from conftest import require_backend

    require_backend(request.param, torch.device("cpu"))
    return request.param


def test_ddp_replicas_stay_identical_and_match_one_process(dist_backend, tmp_path):
    results = run_ranks("ddp", dist_backend, tmp_path)
    assert results[0]["backend"] == dist_backend
    for p0, p1 in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(p0, p1), "the replicas drifted apart"
    expected = single_process_run(dist_backend)
    for p, e in zip(results[0]["params"], expected):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)


def test_fsdp2_sharded_equals_unsharded(dist_backend, tmp_path):
    results = run_ranks("fsdp", dist_backend, tmp_path)
    expected = single_process_run(dist_backend)
    for r in range(WORLD):
        for p, e in zip(results[r]["params"], expected):
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)


def test_without_averaging_the_replicas_would_drift(tmp_path):
    """The property the averaging exists for: per-rank losses give per-rank step sizes."""
    sizes = []
    for rank in range(WORLD):
        model = make_model()
        opt = FusedALIG(model.parameters(), backend="torch", lr=None, momentum=0.9)
        x, y = batch(rank, 0)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        sizes.append(float(opt.param_groups[0]["step_size"]))
    assert sizes[0] != pytest.approx(sizes[1], rel=1e-3)


def test_one_rank_only_step_needs_average_loss_false_and_says_why(tmp_path):
    """An optimizer stepped on rank 0 alone: average_loss=False steps locally (no collective,
    no hang); the default waits for rank 1 in the loss all-reduce, and its error says why."""
    results = run_ranks("one_rank", "torch", tmp_path, worker=_one_rank_worker)
    expected = local_run("torch", 0, 3)
    for p, e in zip(results[0]["local"], expected):
        torch.testing.assert_close(p, e, rtol=0, atol=0)
    error = results[0]["error"]
    assert error is not None, "a loss all-reduce on one rank only should have timed out"
    assert "average_loss=False" in error and "Every rank" in error
    assert results[0]["unchanged"], "the failed step changed the parameters"


@pytest.mark.parametrize("mode", ["ddp:momo", "fsdp:momo"])
def test_momo_distributed_equals_one_process(dist_backend, mode, tmp_path):
    """FusedMoMo: the loss averaged across ranks, sharded sums reduced in one collective."""
    results = run_ranks(mode, dist_backend, tmp_path)
    expected = single_process_run(dist_backend, "momo")
    for r in range(WORLD):
        for p, e in zip(results[r]["params"], expected):
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
