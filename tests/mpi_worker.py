"""One rank of the data-parallel tests, started by ``tests/test_distributed.py`` as
``mpiexec -n 2 python tests/mpi_worker.py SCENARIO OUT_DIR``. Each rank writes what the test
compares into ``OUT_DIR/rank<r>.npz`` (``steps`` and ``bad`` write nothing of their own).

Scenarios:
    grads   one step's averaged gradients, then the parameters after K_STEPS SGD steps
    train   a short Trainer.train() run (rank r's out_dir is OUT_DIR/rank<r>)
    bad     rank 1 alone meets an unreadable image in its second batch
    resume  8 steps straight, and 5 steps + a resume to 8: rank r's final parameters
    nan     rank 1 alone gets a NaN loss at step 3: the step each rank stopped at
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_train import FailingModel, ToyModel, ToySquares  # noqa: E402

from mrcnn_edu.distributed import MpiCommunicator, rank_seeds, shard  # noqa: E402
from mrcnn_edu.train import TrainConfig, Trainer, TrainingDiverged  # noqa: E402

K_STEPS = 3
BATCH = 3


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


def grads(comm, out: str) -> None:
    # rank 1 starts from other weights: the broadcast from rank 0 must replace them
    trainer = Trainer(float64_model(seed=comm.rank), float64_squares(), toy_config(out), comm=comm)
    saved = {}
    for step in range(K_STEPS):
        trainer.model.zero_grad()
        images, targets = trainer._next_batch()
        trainer._forward_losses(images, targets, step + 1)
        trainer.model.backward()
        trainer._average_gradients()
        if step == 0:
            saved.update({f"grad/{k}": p.grad.copy() for k, p in trainer.model.named_parameters()})
        trainer.optimizer.step()
        trainer.scheduler.step()
    saved.update({f"param/{k}": v for k, v in trainer.model.state_dict().items()})
    np.savez(os.path.join(out, f"rank{comm.rank}.npz"), **saved)


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


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], sys.argv[2]
    {"grads": grads, "train": train, "bad": bad, "resume": resume, "nan": nan}[scenario](
        MpiCommunicator(), out_dir
    )
