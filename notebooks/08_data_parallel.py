# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 8. Data parallel: two processes, one model
#
# Mask R-CNN was trained on 8 GPUs at once, 2 images each: *synchronous data parallelism*.
# Every worker (a *rank*) holds a whole copy of the model. Each step, each rank runs forward
# and backward on its own images; then the ranks **average their gradients** (an
# *all-reduce*), and every rank applies the same SGD step to the same parameters. The copies
# never drift apart, so after the start no parameter is ever sent again.
#
# From the command line it is one word in front of the usual command (`docs/data_parallel.md`):
#
# ```
# mpiexec -n 2 .venv/bin/mrcnn-edu train --config run.json                # 2 CPU processes, MPI
# mpiexec -n 8 .venv/bin/mrcnn-edu train --config run.json --device cuda  # 8 GPUs, NCCL
# ```
#
# Here we launch a tiny 2-rank run with `mpiexec`, record what each rank saw, and check the
# claim of the first paragraph against a **single-process reference** that computes both
# ranks' gradients one after the other and averages them by hand: the losses the ranks log
# are the reference's, step for step, and the two ranks end with identical parameters.
#
# **Time.** With `MRCNN_EDU_QUICK=1` (the test suite) the run is 4 steps of 2 images per rank
# on 64 × 64 images (a few seconds, most of it starting the processes); without it, 40 steps.

# %%
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np

from mrcnn_edu.distributed import SingleProcess
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.run_config import DataConfig, RunConfig, build_datasets, demo_train_config
from mrcnn_edu.train import Trainer

QUICK = os.environ.get("MRCNN_EDU_QUICK") == "1"
STEPS = 4 if QUICK else 40
NUM_TRAIN = 8 if QUICK else 64
OUT = os.path.join("runs", "nb08")  # everything this notebook writes goes here, under the cwd
os.makedirs(OUT, exist_ok=True)

# mpiexec comes with the `dist` extra (the mpich wheel puts it next to this Python)
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
if MPIEXEC is None:
    raise RuntimeError("no mpiexec: pip install 'mrcnn-edu[dist]' (mpi4py and the mpich wheel)")

# %% [markdown]
# ## A tiny run config
#
# The small model of the demo on a handful of 64 × 64 shapes images. `batch_size` is the
# batch of **one rank**: with 2 ranks each step sees 4 images, the *effective batch*. `lr` is
# the rate for `batch_size` images; the trainer multiplies it by the number of ranks (the
# linear scaling rule, below), so the same `run.json` works on one process or many.

# %%
cfg = RunConfig(
    model=MaskRCNNConfig.small(3),
    train=demo_train_config(
        batch_size=2,
        max_steps=STEPS,
        lr=0.01,
        warmup_iters=STEPS // 4,
        milestones=(),
        checkpoint_every=0,
        progress=False,
        out_dir=os.path.join(OUT, "two_ranks"),
    ),
    data=DataConfig(num_train=NUM_TRAIN, num_val=0, image_size=(64, 64)),
)
config_path = os.path.join(OUT, "run.json")
cfg.save(config_path)
shown = ("batch_size", "lr", "warmup_iters", "warmup_factor", "max_steps", "seed")
print({k: v for k, v in cfg.to_dict()["train"].items() if k in shown})

# %% [markdown]
# ## What each rank runs
#
# `mpiexec -n 2 python worker.py` starts the same script twice. `get_communicator()` sees the
# launcher's environment and returns an `MpiCommunicator`: `comm.rank` is 0 in one process and
# 1 in the other, `comm.world_size` is 2. The `Trainer` does the rest (`train_parallel.py`):
# rank 0's initial parameters are broadcast; each rank takes its share of every epoch (the
# same shuffled order on both, rank r taking items r, r+2, r+4, ... like PyTorch's
# `DistributedSampler`); after each backward the gradients are averaged; only rank 0 writes
# files. The worker also records each rank's *own* loss (its two images, before averaging)
# by wrapping the model's forward.

# %%
WORKER = """
import json, math, sys
import numpy as np
from mrcnn_edu.distributed import get_communicator
from mrcnn_edu.mask_rcnn import MaskRCNN
from mrcnn_edu.run_config import RunConfig, build_datasets
from mrcnn_edu.train import Trainer

cfg = RunConfig.load(sys.argv[1])
comm = get_communicator()             # MpiCommunicator under mpiexec -n 2
train_set, _, _ = build_datasets(cfg.data)
model = MaskRCNN(cfg.model, rng=cfg.train.seed)
own = []                              # this rank's loss on its own images, each step
forward = model.forward

def recorded(images, targets):
    losses = forward(images, targets)
    own.append(math.fsum(losses.values()))
    return losses

model.forward = recorded
trainer = Trainer(model, train_set, cfg.train, comm=comm)
if comm.rank == 0:
    print(trainer.parallel_summary())
logged = [math.fsum(trainer.train_step().values()) for _ in range(cfg.train.max_steps)]
out = sys.argv[2]
json.dump({"own": own, "logged": logged}, open(f"{out}/rank{comm.rank}.json", "w"))
np.savez(f"{out}/rank{comm.rank}_params.npz", **model.state_dict())
"""
worker_path = os.path.join(OUT, "worker.py")
with open(worker_path, "w") as f:
    f.write(WORKER)

# %% [markdown]
# ## Launch
#
# One BLAS thread per rank (two ranks on two cores), and the run takes its config as argument.

# %%
env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
cmd = [MPIEXEC, "-n", "2", sys.executable, worker_path, config_path, OUT]
done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
print(done.stdout)
if done.returncode != 0:
    raise RuntimeError(f"the 2-rank run failed:\n{done.stderr}")
ranks = [json.load(open(os.path.join(OUT, f"rank{r}.json"))) for r in (0, 1)]

# %% [markdown]
# The start banner says what the run does: 2 ranks × 2 images = an effective batch of 4, and
# the learning rate 0.01 (for 2 images) × 2 = 0.02, reached after the warm-up.
#
# ## The single-process reference
#
# One process plays both ranks in turn: two trainers, each told it is rank r of 2 (a
# communicator that does not communicate), so each draws rank r's images and rank r's random
# RoI sampling. For every step: both compute the gradient on their own shard; we **average the
# two gradients by hand**, put the mean into rank 0's model and take one SGD step; rank 1's
# model gets rank 0's new parameters. Its loss for the step is the mean of the two.


# %%
class PlayRank(SingleProcess):
    """Rank ``rank`` of ``world_size``: its shard and its generators, no communication."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size


train_set, _, _ = build_datasets(cfg.data)
ref_cfg = dataclasses.replace(cfg.train, out_dir=os.path.join(OUT, "reference"))
players = [
    Trainer(MaskRCNN(cfg.model, rng=cfg.train.seed), train_set, ref_cfg, comm=PlayRank(r, 2))
    for r in (0, 1)
]
reference = []
for step in range(1, STEPS + 1):
    grads, losses = [], []
    for player in players:
        player.model.load_state_dict(players[0].model.state_dict())  # the same parameters
        player.model.zero_grad()
        images, targets = player._next_batch()  # rank r's next images
        losses.append(player._forward_losses(images, targets, step))  # {name: its loss}
        player.model.backward()
        grads.append([p.grad.copy() for p in player.model.parameters()])
    for p, g0, g1 in zip(players[0].model.parameters(), *grads):
        p.grad[...] = (g0 + g1) / 2  # the all-reduce, by hand
    players[0].optimizer.step()
    players[0].scheduler.step()
    mean = {name: (losses[0][name] + losses[1][name]) / 2 for name in losses[0]}
    reference.append(math.fsum(mean.values()))
reference = np.array(reference)

# %% [markdown]
# ## The ranks against the reference
#
# Thin dashed lines: each rank's loss on its own two images — they differ, since the images
# differ. Thick lines: what each rank logged, the mean over both ranks; rank 0 and rank 1 lie
# on top of each other, and on the reference (black dots).

# %%
steps = np.arange(1, STEPS + 1)
fig, ax = plt.subplots(figsize=(8, 4))
for r, style in zip((0, 1), ("C0", "C1")):
    ax.plot(steps, ranks[r]["own"], "--", color=style, lw=1, label=f"rank {r}: its own images")
    ax.plot(steps, ranks[r]["logged"], "-", color=style, lw=4 - 2 * r,
            label=f"rank {r}: logged (mean over ranks)")  # fmt: skip
ax.plot(steps, reference, "k:", marker="o", ms=4, label="single process, averaged by hand")
ax.set_xlabel("step")
ax.set_ylabel("total loss")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

logged = np.array([ranks[0]["logged"], ranks[1]["logged"]])
gap = np.abs(logged - reference).max()
print(f"largest |logged - reference| over both ranks and all steps: {gap:.2e}")
assert np.array_equal(logged[0], logged[1]), "the two ranks logged different losses"
assert gap <= 1e-5 * np.abs(reference).max(), "the ranks do not match the reference"
params = [np.load(os.path.join(OUT, f"rank{r}_params.npz")) for r in (0, 1)]
same = all(np.array_equal(params[0][k], params[1][k]) for k in params[0].files)
print(f"rank 0 and rank 1 hold identical parameters after {STEPS} steps: {same}")
assert same

# %% [markdown]
# The gap is zero: the reference adds and halves the same numbers in the same order as the
# all-reduce (or it is a rounding error, if this notebook's process multiplies matrices with
# several BLAS threads while the ranks use one).
#
# ## The all-reduce, and why the mean
#
# After `backward()` each rank holds the gradient of *its* loss $L_r$. The loss of the whole
# effective batch is the mean of the ranks' losses, $L = \frac1W \sum_r L_r$, so
#
# $$\frac{\partial L}{\partial\theta} = \frac1W \sum_r \frac{\partial L_r}{\partial\theta}:$$
#
# averaging the gradients *is* back-propagating the loss of the whole batch. The trainer
# copies the gradients into a few flat buffers of about 25 MB (`GradientBuckets`: one message
# per bucket rather than one per tensor, since every message pays a fixed latency), sums each
# buffer over the ranks in place (`MPI_Allreduce`, or `ncclAllReduce` on GPUs) and divides by
# W. Every rank then holds the same mean gradient and takes the same step.
#
# ## The linear scaling rule, and warm-up
#
# W ranks see W times the images per step. By the linear scaling rule (Goyal et al., 2017) the
# learning rate grows by the same factor, so that an epoch moves the parameters about as far
# as before: the banner's `0.01 × 2 = 0.02`. Early in training the gradients change too fast
# for the large rate, which is what the warm-up is for: the rate climbs linearly from a small
# fraction to the full value over `warmup_iters` steps.
#
# ## What is *not* one big batch
#
# Each rank normalises its losses over its own batch: the RPN loss over its own sampled
# anchors, the box and mask losses over its own positive RoIs. The mean of the ranks' losses
# equals the loss of one 4-image batch only when both ranks have as many sampled anchors and
# positive RoIs; the RoI sampling also draws from each rank's images separately. So a 2-rank
# run is not bit-for-bit a 1-process run with `batch_size` 4 — it is exactly the reference
# above, which is what the paper's 8-GPU training computed too.
