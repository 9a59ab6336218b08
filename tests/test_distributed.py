"""Data-parallel training with real MPI: ``mpiexec -n 2`` runs ``tests/mpi_worker.py``.

The reference for the averaged quantities is computed here, in one process, with the same
Trainer code: a ``LocalRank`` communicator plays rank r of 2 without communicating, so it
draws rank r's shard and rank r's model generator and keeps its own (local) gradient.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import signal
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
    rank_device,
    rank_seeds,
    shard,
)
from mrcnn_edu.train import Trainer
from mrcnn_edu.train_guards import TrainingDiverged

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
MPIEXEC = shutil.which("mpiexec", path=BIN) or shutil.which("mpiexec")
sys.path.insert(0, HERE)
import mpi_worker as W  # noqa: E402
from test_train import FailingModel, ToyModel, ToySquares  # noqa: E402


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


def reference(
    out_dir: str, steps: int, make_model=W.float64_model, world: int = 2
) -> tuple[dict, dict, list[float]]:
    """(mean over the ``world`` ranks' local gradients at step 1, parameters after ``steps``
    SGD steps each taken with the mean gradient, each step's mean total loss), in one
    process."""
    cfg = W.toy_config(out_dir)
    ranks = [
        Trainer(make_model(0), W.float64_squares(), cfg, comm=LocalRank(r, world))
        for r in range(world)
    ]
    first, totals = {}, []
    for step in range(steps):
        local, total = [], 0.0
        for t in ranks:
            t.model.load_state_dict(ranks[0].model.state_dict())
            t.model.zero_grad()
            images, targets = t._next_batch()
            total += sum(t._forward_losses(images, targets, step + 1).values()) / world
            t.model.backward()
            local.append({k: p.grad.copy() for k, p in t.model.named_parameters()})
        totals.append(total)
        mean = {k: sum(g[k] for g in local) / world for k in local[0]}
        if step == 0:
            first = mean
        for k, p in ranks[0].model.named_parameters():
            p.grad[...] = mean[k]
        ranks[0].optimizer.step()
        ranks[0].scheduler.step()
    return first, ranks[0].model.state_dict(), totals


# -- without MPI --------------------------------------------------------------------------------
class EchoRanks(SingleProcess):
    """Rank 0 of 2 whose partner brings exactly its numbers (so every mean is the value
    itself), recording each collective the Trainer calls."""

    def __init__(self):
        self.rank, self.world_size, self.calls = 0, 2, []

    def allreduce_mean_(self, buffer):
        self.calls.append(("allreduce", buffer.size))
        return buffer

    def agree(self, flag: bool) -> bool:
        self.calls.append(("agree", 1))
        return bool(flag)


def test_after_the_first_step_the_ranks_meet_once_per_step(tmp_path):
    comm = EchoRanks()
    cfg = W.toy_config(str(tmp_path), max_steps=4, batch_size=2)
    trainer = Trainer(ToyModel(seed=0), ToySquares(10), cfg, comm=comm)
    comm.calls.clear()
    first = trainer.train_step()
    assert [kind for kind, _ in comm.calls] == ["agree", "allreduce", "allreduce"]
    comm.calls.clear()
    second = trainer.train_step()
    gradients = sum(p.grad.size for p in trainer.model.parameters())
    # one message: the failure flag, the losses, every gradient
    assert comm.calls == [("allreduce", 1 + len(second) + gradients)]
    assert list(second) == list(first) and all(np.isfinite(list(second.values())))


def test_losses_that_change_between_steps_are_refused_with_several_ranks(tmp_path):
    cfg = W.toy_config(str(tmp_path), max_steps=4, batch_size=2)
    trainer = Trainer(FailingModel(2, "extra_loss", seed=0), ToySquares(10), cfg, comm=EchoRanks())
    trainer.train_step()
    with pytest.raises(ValueError, match="'loss_extra'.*every step must return the same"):
        trainer.train_step()  # the vectors would not line up across the ranks


def test_a_forward_refusing_nan_after_the_first_step_stops_every_rank_together(tmp_path):
    comm = EchoRanks()
    cfg = W.toy_config(str(tmp_path), max_steps=4, batch_size=2)
    trainer = Trainer(FailingModel(2, "refuse", seed=0), ToySquares(10), cfg, comm=comm)
    trainer.train_step()
    before = {k: v.copy() for k, v in trainer.model.state_dict().items()}
    comm.calls.clear()
    with pytest.raises(TrainingDiverged, match="rank 0: the toy's features hold NaN") as err:
        trainer.train_step()
    assert err.value.step == 2 and err.value.agreed
    assert [kind for kind, _ in comm.calls] == ["allreduce"]  # it still joined the step's message
    after = trainer.model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before) and trainer.step == 1


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


def test_start_banner_gives_the_batches_and_the_scaled_learning_rate(tmp_path):
    cfg = W.toy_config(str(tmp_path), lr=0.02, batch_size=2, max_steps=200, warmup_iters=100,
                       warmup_factor=0.001)  # fmt: skip
    assert Trainer(ToyModel(), ToySquares(), cfg).parallel_summary() == "device: cpu"
    two = Trainer(ToyModel(), ToySquares(), cfg, comm=LocalRank(0, 2))
    assert two.parallel_summary().splitlines() == [
        "device: cpu, gradients over MPI",
        "data parallel: 2 ranks x 2 images per rank = effective batch 4",
        "learning rate: 0.02 (the config's, for 2 images) x 2 ranks = 0.04 (linear scaling "
        "rule); warm-up over 100 steps from 0.001 x 0.04 = 4e-05",
    ]
    # what it says is what the optimizer does: 0.04 x 0.001 at the first step, 0.04 after warm-up
    assert two.scheduler.lr_at(0) == pytest.approx(4e-05)
    assert two.scheduler.lr_at(100) == pytest.approx(0.04)
    two.config = dataclasses.replace(cfg, warmup_iters=0)
    assert two.parallel_summary().endswith("= 0.04 (linear scaling rule); no warm-up")


def test_one_gpu_cannot_serve_several_ranks():
    with pytest.raises(ValueError, match=r"'cuda:1' names one GPU, but this job has 2 ranks.*"
                       r"use --device cuda \(rank r then uses GPU r % device_count\)"):  # fmt: skip
        get_communicator({"PMI_SIZE": "2"}, device="cuda:1")  # refused before MPI starts
    assert isinstance(get_communicator({"PMI_SIZE": "1"}, device="cuda"), SingleProcess)
    assert rank_device("cuda:1", SingleProcess()) == "cuda:1"


class LocalGpuRank(LocalRank):
    on_device = True  # as NcclCommunicator: the collectives take GPU arrays
    gpu = 1


def test_the_transport_must_fit_the_device(tmp_path):
    assert rank_device("cuda", LocalGpuRank(1, 2)) == "cuda:1"  # the GPU the rank bound
    with pytest.raises(ValueError, match="arrays on GPU 1 .rank 1's., but the model trains on cpu"):
        Trainer(ToyModel(), ToySquares(), W.toy_config(str(tmp_path)), comm=LocalGpuRank(1, 2),
                device="cpu")  # fmt: skip


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
    first, params, totals = reference(str(tmp_path / "ref"), W.K_STEPS)
    for k, g in first.items():
        assert g.dtype == np.float64 and np.abs(g).max() > 0
        for got in (rank0, rank1):
            np.testing.assert_allclose(got[f"grad/{k}"], g, rtol=0, atol=1e-12, err_msg=k)
    for k, p in params.items():
        assert np.array_equal(rank0[f"param/{k}"], rank1[f"param/{k}"]), f"{k}: ranks differ"
        np.testing.assert_allclose(rank0[f"param/{k}"], p, rtol=0, atol=1e-10, err_msg=k)
    # the logged loss of every step is the mean over the ranks: step 1 averages the losses in
    # an all-reduce of their own, later steps in front of the gradients (one message a step)
    with open(tmp_path / "log.csv") as f:
        logged = [float(r["total"]) for r in csv.DictReader(f)]
    np.testing.assert_allclose(logged, totals, rtol=1e-12)


@needs_mpi
def test_averaged_gradients_on_a_device_match_one_process(tmp_path):
    """The same with the model on the (fake) device: losses and gradient buckets live there."""
    done = mpirun("grads_fake", tmp_path)
    assert done.returncode == 0, done.stderr
    first, params, _ = reference(str(tmp_path / "ref"), W.K_STEPS, W.float64_regressor)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1)]
    for k, g in first.items():
        assert np.abs(g).max() > 0
        for got in ranks:
            np.testing.assert_allclose(got[f"grad/{k}"], g, rtol=0, atol=1e-12, err_msg=k)
    for k, p in params.items():
        assert np.array_equal(ranks[0][f"param/{k}"], ranks[1][f"param/{k}"]), k
        np.testing.assert_allclose(ranks[0][f"param/{k}"], p, rtol=0, atol=1e-10, err_msg=k)


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
print("ok", c.rank, c.gpu)
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
    assert_runs_equal(tmp_path, "full", "split")


def assert_runs_equal(out, straight: str, resumed: str) -> None:
    """On both ranks, the parameters of the ``straight`` run equal the ``resumed`` run's, bit
    for bit (``OUT/rank<r>.npz`` holds both, as ``<name>/<param>``)."""
    for r in (0, 1):
        got = dict(np.load(out / f"rank{r}.npz"))
        names = [k[len(straight) + 1 :] for k in got if k.startswith(straight + "/")]
        assert names, f"rank {r} saved no {straight}/ parameters"
        for name in names:
            a, b = got[f"{straight}/{name}"], got[f"{resumed}/{name}"]
            assert np.array_equal(a, b), f"rank {r}: {name} differs after the resume"


@needs_mpi
def test_nan_on_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    done = mpirun("nan", tmp_path)
    assert done.returncode == 0, done.stderr
    steps = [int(np.load(tmp_path / f"rank{r}.npz")["step"]) for r in (0, 1)]
    assert steps == [3, 3]
    from mrcnn_edu import weights

    assert int(weights.load(str(tmp_path / "last.npz"), nested=True)["step"]) == 2


@needs_mpi
def test_cli_two_ranks_refuse_a_missing_gpu_before_writing(tmp_path):
    out = tmp_path / "run"
    cmd = [MPIEXEC, "-n", "2", os.path.join(BIN, "mrcnn-edu"), "train", "--out", str(out),
           "--device", "cuda:99"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    # every rank refuses (exit 2, no hang); mpiexec may interleave the ranks' stderr mid-line,
    # so only one intact copy of the message is certain
    assert "mrcnn-edu train: error: --device cuda:99: " in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


@needs_mpi
def test_cli_two_ranks_real_small_model(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [MPIEXEC, "-n", "2", os.path.join(BIN, "mrcnn-edu"), "demo", "--quick", "--steps",
           "3", "--out", str(out), "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    banner = [line for line in done.stdout.splitlines() if line.startswith(
        ("device:", "data parallel:", "learning rate:"))]  # fmt: skip
    assert banner == [
        "device: cpu, gradients over MPI",
        # the demo's batch (--quick: 2 images, lr 0.01) is shared by the ranks (launch.py)
        "data parallel: 2 ranks x 1 image per rank = effective batch 2",
        "learning rate: 0.005 (the config's, for 1 image) x 2 ranks = 0.01 (linear scaling "
        "rule); warm-up over 3 steps from 0.001 x 0.01 = 1e-05",
    ]
    assert done.stdout.count("training 3 steps of 1 image per rank") == 1  # rank 1: silent
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert all(np.isfinite(float(r["total"])) for r in rows)


@needs_mpi
def test_a_rank_waiting_for_a_late_one_sleeps_instead_of_spinning(tmp_path):
    """MPI's blocking collectives busy-poll: a rank that waits 0.5 s for a late one burns
    0.5 s of CPU, which on shared cores is taken from the rank it waits for. Ours wait in a
    non-blocking barrier with sleeps (distributed.wait_politely): rank 0 waits the whole
    0.5 s at every collective but uses a small part of that in CPU time, and the
    collectives still give the right answers."""
    done = mpirun("waiting", tmp_path)
    assert done.returncode == 0, done.stderr
    got = np.load(tmp_path / "rank0.npz")
    for name, cpu, wall in zip(got["names"], got["cpu"], got["wall"]):
        assert wall > 0.8 * W.WAIT_SECONDS, name  # it did wait for rank 1
        assert cpu < 0.25 * W.WAIT_SECONDS, (name, cpu)  # but mostly asleep
    np.testing.assert_array_equal(got["allreduce"], np.full(1000, 1.5))  # mean of 1 and 2
    np.testing.assert_array_equal(got["broadcast"], np.ones(10))  # rank 1's
    assert bool(got["agree"])  # rank 1 said yes


def test_wait_politely_polls_then_sleeps_with_a_growing_pause(monkeypatch):
    from mrcnn_edu import distributed

    class Request:
        def __init__(self, ready_after: int):
            self.calls, self.ready_after = 0, ready_after

        def Test(self):
            self.calls += 1
            return self.calls > self.ready_after

    pauses = []
    monkeypatch.setattr(distributed.time, "sleep", pauses.append)
    distributed.wait_politely(Request(0))  # ready at once: no sleep
    assert pauses == []
    monkeypatch.setattr(distributed, "_SPIN_SECONDS", 0.0)
    distributed.wait_politely(Request(10))
    assert pauses[0] == distributed._FIRST_SLEEP_SECONDS
    assert pauses == sorted(pauses) and max(pauses) == distributed._MAX_SLEEP_SECONDS
    assert all(b in (2 * a, distributed._MAX_SLEEP_SECONDS) for a, b in zip(pauses, pauses[1:]))


# -- stopping the whole job, resuming with another world size -----------------------------------
def _wait_for_rows(log_path, n: int, proc, timeout: float = 60) -> None:
    """Until ``log.csv`` has ``n`` steps (the run is training on both ranks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(log_path):
            with open(log_path) as f:
                if sum(1 for _ in f) > n:  # the header and n rows
                    return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the job did not reach step {n} in {timeout} s")


@needs_mpi
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_job_stops_all_ranks_at_one_step_and_resumes_exactly(tmp_path, signum):
    """Ctrl-C in the terminal, or a scheduler's SIGTERM, goes to mpiexec, which passes it to
    every rank; the ranks agree after their step, stop at the same one, and rank 0 writes one
    checkpoint; resuming it ends bit for bit where an uninterrupted 2-rank run ends."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [MPIEXEC, "-n", "2", sys.executable, os.path.join(HERE, "mpi_worker.py"), "slow"]
    proc = subprocess.Popen(cmd + [str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    _wait_for_rows(tmp_path / "run" / "log.csv", 3, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    stopped = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    step = int(stopped[0]["step"])
    assert 3 <= step < W.SIGNAL_STEPS and int(stopped[1]["step"]) == step
    raised = "KeyboardInterrupt" if signum == signal.SIGINT else "TrainingTerminated"
    assert [str(s["raised"]) for s in stopped] == [raised, raised]
    files = sorted(os.listdir(tmp_path / "run"))
    assert [f for f in files if f.endswith(".npz")] == ["last.npz"]  # one checkpoint
    from mrcnn_edu import weights

    assert int(weights.load(str(tmp_path / "run" / "last.npz"), nested=True)["step"]) == step
    with open(tmp_path / "run" / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, step + 1))
    said = [line for line in stdout.splitlines() if "saved in" in line]
    assert len(said) == 1 and f"the state after step {step} is saved in" in said[0]  # rank 0
    done = mpirun("finish", tmp_path)
    assert done.returncode == 0, done.stderr
    assert_runs_equal(tmp_path, "full", "resumed")


@needs_mpi
def test_resuming_with_another_world_size_reshards_from_the_next_epoch(tmp_path, capsys):
    cfg = W.reshard_config(str(tmp_path))
    Trainer(ToyModel(seed=0), ToySquares(7), cfg).train(until=5)  # one process, mid-epoch
    done = mpirun("reshard", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("re-sharded") == 1  # said once, by rank 0
    assert (
        "was written by 1 rank(s), this run has 2: the parameters, momentum, schedule and step "
        "continue, the rest of the current epoch is skipped and the data is re-sharded from "
        "the next epoch (not an exact resume); the base learning rate is now 0.05 x 2 = 0.1 "
        "(linear scaling rule)"
    ) in done.stdout
    for r in (0, 1):
        got = np.load(tmp_path / f"rank{r}.npz")
        epoch, position = got["before"]
        # the first step after the resume starts the next epoch, at the start of rank r's shard
        assert tuple(got["after"]) == (epoch + 1, 2) and int(got["step"]) == W.RESHARD_UNTIL
        assert tuple(got["lr"]) == (0.1, 0.1)  # base rate and step 6's: 2 x 0.05, warmed up
    # and back to one process: the same note, and the run trains on to its end
    trainer = Trainer(ToyModel(seed=0), ToySquares(7), cfg)
    result = trainer.train(resume=cfg.out_dir)
    assert "written by 2 rank(s), this run has 1" in capsys.readouterr().out
    assert trainer.scheduler.base_lr == cfg.lr == 0.05
    assert result["step"] == W.RESHARD_STEPS and np.isfinite(list(result["losses"].values())).all()
    with open(os.path.join(cfg.out_dir, "log.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, W.RESHARD_STEPS + 1))


@pytest.mark.gpu
def test_nccl_training_step_matches_the_cpu_reference(tmp_path):
    """One process per GPU (all of them; one GPU: world size 1 through real NCCL): the
    gradients NCCL averaged equal the mean of the per-shard gradients computed on the CPU."""
    cp = pytest.importorskip("cupy")
    if _mpi_missing():
        pytest.skip(_mpi_missing())
    n = cp.cuda.runtime.getDeviceCount()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [MPIEXEC, "-n", str(n), sys.executable, os.path.join(HERE, "mpi_worker.py"),
           "grads_cuda", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    first, params, _ = reference(str(tmp_path / "ref"), W.K_STEPS, W.float64_regressor, world=n)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(n)]
    for k, g in first.items():
        for got in ranks:
            np.testing.assert_allclose(got[f"grad/{k}"], g, rtol=0, atol=1e-10, err_msg=k)
    for k, p in params.items():
        for got in ranks:
            assert np.array_equal(got[f"param/{k}"], ranks[0][f"param/{k}"]), k
            np.testing.assert_allclose(got[f"param/{k}"], p, rtol=0, atol=1e-8, err_msg=k)
