"""One rank of the data-parallel tests, started by ``tests/test_distributed.py`` as
``mpiexec -n 2 python tests/mpi_worker.py SCENARIO OUT_DIR``. Each rank writes what the test
compares into ``OUT_DIR/rank<r>.npz`` (``steps`` and ``bad`` write nothing of their own).

Scenarios:
    grads   one step's averaged gradients, then the parameters after K_STEPS SGD steps
    train   a short Trainer.train() run (rank r's out_dir is OUT_DIR/rank<r>)
    bad     rank 1 alone meets an unreadable image in its second batch
    resume  8 steps straight, and 5 steps + a resume to 8: rank r's final parameters
    nan     rank 1 alone gets a NaN loss at step 3: the step each rank stopped at
    slow    a slow run of SIGNAL_STEPS steps in OUT_DIR/run, until the test sends mpiexec a
            signal: the step each rank stopped at and what it raised
    finish  that run resumed to the end, and the same run straight in OUT_DIR/full: rank r's
            final parameters (``resumed/``, ``full/``)
    reshard a run written by one process (OUT_DIR/one, at step 5) resumed on two ranks up to
            step 9: each rank's epoch and data position before and after its first step
    grads_fake  ``grads`` with a model that moves its inputs to its device, on the fake device
    grads_cuda  the same on GPUs through NCCL (``--device cuda``)
    waiting rank 1 arrives WAIT_SECONDS late at each collective; rank 0 records the CPU time it
            spent waiting in each, and both the results
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_train import FailingModel, ToyModel, ToySquares  # noqa: E402

from mrcnn_edu.backend import is_device_array, to_host  # noqa: E402
from mrcnn_edu.distributed import MpiCommunicator, rank_seeds, shard  # noqa: E402
from mrcnn_edu.train import TrainConfig, Trainer, TrainingDiverged  # noqa: E402

K_STEPS = 3
BATCH = 3
SIGNAL_STEPS = 60  # the slow run: 0.1 s a step, long enough for the test to signal it


def float64_model(seed: int) -> ToyModel:
    model = ToyModel(seed=seed)
    for _, p in model.named_parameters():
        p.data = p.data.astype(np.float64)
        p.grad = np.zeros_like(p.data)
    return model


def float64_squares(n: int = 10) -> ToySquares:
    ds = ToySquares(n)
    for item in ds.items:
        item["image"] = item["image"].astype(np.float64)
    return ds


def toy_config(out_dir: str, **kw) -> TrainConfig:
    base = dict(lr=0.05, batch_size=BATCH, max_steps=K_STEPS, warmup_iters=1, milestones=())
    base.update(checkpoint_every=0, out_dir=out_dir, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def float64_regressor(seed: int):
    from test_train_device import Regressor

    return Regressor(seed=seed).astype(np.float64)


def grads(comm, out: str, make_model=float64_model, device=None) -> None:
    # rank 1 starts from other weights: the broadcast from rank 0 must replace them
    model = make_model(seed=comm.rank)
    trainer = Trainer(model, float64_squares(), toy_config(out), comm=comm, device=device)
    saved = {}
    for step in range(K_STEPS):  # the first step meets three times, the others once
        trainer.train_step()  # the averaged gradient stays in p.grad until the next step
        if device is not None:  # the buckets were averaged where the gradients are
            assert all(is_device_array(b) for b in trainer._buckets._buffers), device
        if step == 0:
            grads = {k: p.grad for k, p in trainer.model.named_parameters()}
            saved.update({f"grad/{k}": np.array(to_host(g)) for k, g in grads.items()})  # copies
    saved.update({f"param/{k}": to_host(v) for k, v in trainer.model.state_dict().items()})
    np.savez(os.path.join(out, f"rank{comm.rank}.npz"), **saved)


def grads_fake(comm, out: str) -> None:
    """``grads`` with the model on the fake device of ``tests/fake_device.py``: the trainer's
    device path (losses and gradient buckets on the device) between two real processes."""
    from fake_device import fake_device

    with fake_device():
        grads(comm, out, float64_regressor, device="fake")


def grads_cuda(comm, out: str) -> None:
    from mrcnn_edu.kernels.nccl import NcclCommunicator

    grads(NcclCommunicator(comm), out, float64_regressor, device="cuda")


def train(comm, out: str) -> None:
    cfg = toy_config(os.path.join(out, f"rank{comm.rank}"), max_steps=12, batch_size=2,
                     lr=0.05, checkpoint_every=6, milestones=(0.75,))  # fmt: skip
    Trainer(ToyModel(seed=0), ToySquares(16), cfg, comm=comm).train()


class UnreadableAt(ToySquares):
    def __init__(self, bad: int, **kw):
        super().__init__(**kw)
        self.bad = bad

    def __getitem__(self, i: int) -> dict:
        if i == self.bad:
            raise FileNotFoundError(f"cannot read image 'broken_{i}.png' (dataset item {i})")
        return super().__getitem__(i)


def bad(comm, out: str) -> None:
    cfg = toy_config(out, max_steps=6, batch_size=2)
    n = 10
    order = np.random.default_rng(rank_seeds(cfg.seed, 0)[0]).permutation(n)
    bad_index = int(shard(order, 1, 2)[cfg.batch_size])  # rank 1's first item of step 2
    Trainer(ToyModel(seed=0), UnreadableAt(bad_index, n=n), cfg, comm=comm).train()


def resume(comm, out: str) -> None:
    def run(name, until=None, resume=None):
        cfg = toy_config(os.path.join(out, name), max_steps=8, batch_size=2, checkpoint_every=4)
        trainer = Trainer(ToyModel(seed=0), ToySquares(7), cfg, comm=comm)
        trainer.train(until=until, resume=resume)
        return trainer.model.state_dict()

    full = run("full")
    run("split", until=5)
    comm.barrier()  # rank 0 has written last.npz
    split = run("split", resume=os.path.join(out, "split"))
    saved = {
        **{f"full/{k}": v for k, v in full.items()},
        **{f"split/{k}": v for k, v in split.items()},
    }
    np.savez(os.path.join(out, f"rank{comm.rank}.npz"), **saved)


def nan(comm, out: str) -> None:
    model = FailingModel(fail_at=3, how="nan") if comm.rank == 1 else ToyModel(seed=0)
    try:
        Trainer(
            model, ToySquares(10), toy_config(out, max_steps=6, batch_size=2), comm=comm
        ).train()
    except TrainingDiverged as err:
        np.savez(os.path.join(out, f"rank{comm.rank}.npz"), step=err.step)


class SlowModel(ToyModel):
    """ToyModel at 0.1 s a step: the test has time to signal the job while it trains."""

    def forward(self, images, targets):
        time.sleep(0.1)
        return super().forward(images, targets)


def signal_config(out: str, name: str) -> TrainConfig:
    return toy_config(os.path.join(out, name), max_steps=SIGNAL_STEPS, batch_size=2)


def slow(comm, out: str) -> None:
    trainer = Trainer(SlowModel(seed=0), ToySquares(7), signal_config(out, "run"), comm=comm)
    try:
        trainer.train()
    except KeyboardInterrupt as err:  # TrainingTerminated (SIGTERM) is one too
        np.savez(os.path.join(out, f"rank{comm.rank}.npz"), step=trainer.step,
                 raised=type(err).__name__)  # fmt: skip


def finish(comm, out: str) -> None:
    resumed = Trainer(ToyModel(seed=0), ToySquares(7), signal_config(out, "run"), comm=comm)
    resumed.train(resume=os.path.join(out, "run"))
    full = Trainer(ToyModel(seed=0), ToySquares(7), signal_config(out, "full"), comm=comm)
    full.train()
    saved = {
        **{f"resumed/{k}": v for k, v in resumed.model.state_dict().items()},
        **{f"full/{k}": v for k, v in full.model.state_dict().items()},
    }
    np.savez(os.path.join(out, f"rank{comm.rank}.npz"), **saved)


RESHARD_STEPS, RESHARD_UNTIL = 12, 9


def reshard_config(out: str) -> TrainConfig:
    return toy_config(os.path.join(out, "one"), max_steps=RESHARD_STEPS, batch_size=2)


def reshard(comm, out: str) -> None:
    trainer = Trainer(ToyModel(seed=0), ToySquares(7), reshard_config(out), comm=comm)
    trainer.resume(os.path.join(out, "one"))
    lr = (trainer.scheduler.base_lr, trainer.optimizer.lr)
    before = (trainer._epoch, trainer._position)
    trainer.train_step()
    after = (trainer._epoch, trainer._position)
    trainer.train(until=RESHARD_UNTIL)
    np.savez(os.path.join(out, f"rank{comm.rank}.npz"), before=before, after=after,
             step=trainer.step, lr=lr)  # fmt: skip


WAIT_SECONDS = 0.5


def waiting(comm, out: str) -> None:
    """Each collective once, rank 1 late: the CPU seconds rank 0 used while it waited."""
    buf = np.full(1000, comm.rank + 1.0)
    late = {
        "allreduce": lambda: comm.allreduce_mean_(buf),
        "broadcast": lambda: comm.broadcast_(np.full(10, float(comm.rank)), root=1),
        "barrier": comm.barrier,
        "agree": lambda: comm.agree(comm.rank == 1),
    }
    cpu, wall, results = {}, {}, {}
    for name, call in late.items():
        comm.barrier()
        if comm.rank == 1:
            time.sleep(WAIT_SECONDS)
        c0, t0 = time.process_time(), time.perf_counter()
        results[name] = call()
        cpu[name], wall[name] = time.process_time() - c0, time.perf_counter() - t0
    np.savez(
        os.path.join(out, f"rank{comm.rank}.npz"),
        names=list(late), cpu=[cpu[k] for k in late], wall=[wall[k] for k in late],
        allreduce=results["allreduce"], broadcast=results["broadcast"], agree=results["agree"],
    )  # fmt: skip


SCENARIOS = {"grads": grads, "train": train, "bad": bad, "resume": resume, "nan": nan}
SCENARIOS.update(slow=slow, finish=finish, reshard=reshard, grads_cuda=grads_cuda)
SCENARIOS.update(grads_fake=grads_fake, waiting=waiting)

if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], sys.argv[2]
    SCENARIOS[scenario](MpiCommunicator(), out_dir)
