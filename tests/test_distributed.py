"""Data-parallel training with real MPI: ``mpiexec -n 2`` runs ``tests/mpi_worker.py``.

The reference for the averaged quantities is computed here, in one process, with the same
Trainer code: a ``LocalRank`` communicator plays rank r of 2 without communicating, so it
draws rank r's shard and rank r's model generator and keeps its own (local) gradient.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mrcnn_edu.distributed import (
    GradientBuckets,
    SingleProcess,
    get_communicator,
    launched_world_size,
    rank_seeds,
    shard,
)
from mrcnn_edu.train import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
MPIEXEC = shutil.which("mpiexec", path=BIN) or shutil.which("mpiexec")
sys.path.insert(0, HERE)
import mpi_worker as W  # noqa: E402


def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[test]' brings it with the mpich wheel)"
    if MPIEXEC is None:
        return "no mpiexec on PATH or in the venv (the mpich wheel brings one)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


def mpirun(scenario: str, out, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [MPIEXEC, "-n", "2", sys.executable, os.path.join(HERE, "mpi_worker.py"), scenario]
    return subprocess.run(
        cmd + [str(out)], capture_output=True, text=True, timeout=timeout, env=env
    )


class LocalRank(SingleProcess):
    """Rank ``rank`` of ``world_size`` for the reference: shard and seeds, no communication."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


def reference(out_dir: str, steps: int) -> tuple[dict, dict]:
    """(mean over the two ranks' local gradients at step 1, parameters after ``steps`` SGD
    steps each taken with the mean gradient), in one process."""
    ranks = [
        Trainer(
            W.float64_model(0), W.float64_squares(), W.toy_config(out_dir), comm=LocalRank(r, 2)
        )
        for r in (0, 1)
    ]
    first = {}
    for step in range(steps):
        local = []
        for t in ranks:
            t.model.load_state_dict(ranks[0].model.state_dict())
            t.model.zero_grad()
            images, targets = t._next_batch()
            t._forward_losses(images, targets, step + 1)
            t.model.backward()
            local.append({k: p.grad.copy() for k, p in t.model.named_parameters()})
        mean = {k: (local[0][k] + local[1][k]) / 2 for k in local[0]}
        if step == 0:
            first = mean
        for k, p in ranks[0].model.named_parameters():
            p.grad[...] = mean[k]
        ranks[0].optimizer.step()
        ranks[0].scheduler.step()
    return first, ranks[0].model.state_dict()


# -- without MPI --------------------------------------------------------------------------------
def test_shard_is_distributed_sampler():
    order = np.array([7, 3, 9, 1, 0, 5, 2])
    assert shard(order, 0, 1) is order
    # padded with the start (7) to 8 items; rank r takes r, r + 2, ...
    assert shard(order, 0, 2).tolist() == [7, 9, 0, 2]
    assert shard(order, 1, 2).tolist() == [3, 1, 5, 7]
    together = np.concatenate([shard(order, r, 3) for r in range(3)])
    assert set(together.tolist()) == set(order.tolist()) and together.size == 9


def test_rank_seeds():
    zero = rank_seeds(5, 0)
    plain = np.random.SeedSequence(5).spawn(3)
    assert [s.spawn_key for s in zero] == [s.spawn_key for s in plain]  # single process unchanged
    one = rank_seeds(5, 1)
    draw = [np.random.default_rng(s).random() for s in one]
    assert draw[0] == np.random.default_rng(zero[0]).random()  # same data order on every rank
    assert draw[1] != np.random.default_rng(zero[1]).random()  # own model stream
    assert draw[1] == np.random.default_rng(rank_seeds(5, 1)[1]).random()  # deterministic


def test_launcher_detection():
    assert launched_world_size({}) == 1
    assert launched_world_size({"PMI_SIZE": "4"}) == 4
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert isinstance(get_communicator({"PMI_SIZE": "1"}), SingleProcess)


def test_buckets_group_params_by_size_and_dtype():
    class P:
        def __init__(self, n, dtype):
            self.grad = np.zeros(n, dtype)

    params = [P(10, np.float32), P(10, np.float32), P(30, np.float32), P(5, np.float64)]
    buckets = GradientBuckets(params, bucket_bytes=100).buckets
    assert [[p.grad.size for p in b] for b in buckets] == [[10, 10], [30], [5]]


def test_nccl_module_imports_without_cupy():
    code = (
        "import sys, mrcnn_edu.kernels.nccl as n; "
        "assert 'cupy' not in sys.modules; assert hasattr(n, 'NcclCommunicator')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- with mpiexec -n 2 ----------------------------------------------------------------------------
@needs_mpi
def test_averaged_gradients_and_parameters_match_one_process(tmp_path):
    done = mpirun("grads", tmp_path)
    assert done.returncode == 0, done.stderr
    rank0, rank1 = (dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1))
    first, params = reference(str(tmp_path / "ref"), W.K_STEPS)
    for k, g in first.items():
        assert g.dtype == np.float64 and np.abs(g).max() > 0
        for got in (rank0, rank1):
            np.testing.assert_allclose(got[f"grad/{k}"], g, rtol=0, atol=1e-12, err_msg=k)
    for k, p in params.items():
        assert np.array_equal(rank0[f"param/{k}"], rank1[f"param/{k}"]), f"{k}: ranks differ"
        np.testing.assert_allclose(rank0[f"param/{k}"], p, rtol=0, atol=1e-10, err_msg=k)


@needs_mpi
def test_two_rank_training_learns_and_only_rank0_writes(tmp_path):
    done = mpirun("train", tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "rank1").exists()
    files = sorted(os.listdir(tmp_path / "rank0"))
    assert "log.csv" in files and "last.npz" in files and "checkpoint_6.npz" in files
    with open(tmp_path / "rank0" / "log.csv") as f:
        totals = [float(r["total"]) for r in csv.DictReader(f)]
    assert len(totals) == 12
    assert np.mean(totals[-3:]) < 0.8 * np.mean(totals[:3])
    from mrcnn_edu import weights

    ckpt = weights.load(str(tmp_path / "rank0" / "last.npz"), nested=True)
    assert int(ckpt["data"]["world_size"]) == 2 and "ranks" in ckpt["rng"]


@needs_mpi
def test_one_rank_failing_ends_the_job(tmp_path):
    started = time.perf_counter()
    done = mpirun("bad", tmp_path, timeout=60)  # a hang would raise TimeoutExpired
    assert time.perf_counter() - started < 30
    assert done.returncode != 0
    assert "rank 1 of 2 failed: FileNotFoundError" in done.stderr
    assert "broken_" in done.stderr and "mpi_worker.py" in done.stderr


# -- NCCL (GPU; tests/conftest.py skips these without a CUDA device) -------------------------------
NCCL_SCRIPT = """
import sys, cupy as cp
from kernels.nccl import NcclCommunicator
c = NcclCommunicator()
x = cp.arange(6, dtype=cp.float64) + 10 * c.rank
c.allreduce_mean_(x)
want = cp.arange(6, dtype=cp.float64) + 10 * (c.world_size - 1) / 2
assert bool(cp.all(x == want)), (x, want)
y = cp.full(3, float(c.rank), dtype=cp.float32)
c.broadcast_(y, root=0)
assert bool(cp.all(y == 0)), y
assert c.agree(c.rank == c.world_size - 1) and not c.agree(False)
c.barrier()
print("ok", c.rank, c.device)
"""


def _nccl_run(n: int) -> None:
    pytest.importorskip("cupy")
    if _mpi_missing():
        pytest.skip(_mpi_missing())
    root = os.path.dirname(HERE)
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-c", NCCL_SCRIPT]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ok") == n


@pytest.mark.gpu
def test_nccl_world_size_one():
    _nccl_run(1)


@pytest.mark.gpu
def test_nccl_all_devices():
    cp = pytest.importorskip("cupy")
    count = cp.cuda.runtime.getDeviceCount()
    if count < 2:
        pytest.skip(f"{count} GPU: the multi-GPU NCCL test needs two or more")
    _nccl_run(count)


@needs_mpi
def test_resume_with_the_same_world_size_is_exact(tmp_path):
    done = mpirun("resume", tmp_path)
    assert done.returncode == 0, done.stderr
    for r in (0, 1):
        got = dict(np.load(tmp_path / f"rank{r}.npz"))
        for k in [k for k in got if k.startswith("full/")]:
            split = got["split/" + k[len("full/") :]]
            assert np.array_equal(got[k], split), f"rank {r}: {k} differs after resume"


@needs_mpi
def test_nan_on_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    done = mpirun("nan", tmp_path)
    assert done.returncode == 0, done.stderr
    steps = [int(np.load(tmp_path / f"rank{r}.npz")["step"]) for r in (0, 1)]
    assert steps == [3, 3]
    from mrcnn_edu import weights

    assert int(weights.load(str(tmp_path / "last.npz"), nested=True)["step"]) == 2


@needs_mpi
def test_cli_two_ranks_real_small_model(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [MPIEXEC, "-n", "2", os.path.join(BIN, "mrcnn-edu"), "demo", "--quick", "--steps",
           "3", "--out", str(out), "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "data parallel: 2 ranks x 2 images = effective batch 4" in done.stdout
    assert done.stdout.count("training 3 steps") == 1  # rank 1 prints nothing
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert all(np.isfinite(float(r["total"])) for r in rows)
