"""The Trainer's data-parallel part: what changes when several ranks train one model together.

``TrainerParallel`` is a base class of :class:`mrcnn_edu.train.Trainer`; with one rank
(``SingleProcess``) every method here is a no-op or returns its input, so a single-process run
is exactly what it was. With ``W`` ranks (``distributed.MpiCommunicator``):

- at start, rank 0's parameters are broadcast (every rank starts from the same model);
- the learning rate is ``config.lr * W`` (linear scaling rule: ``lr`` is the rate for
  ``batch_size`` images, and the effective batch is ``W * batch_size``);
- after ``forward`` the losses are averaged over the ranks (the logged loss is that of the
  whole batch; a NaN on any rank makes the mean NaN on all, so the NaN guard stops every rank at
  the same step); after ``backward`` the gradients are averaged (``GradientBuckets``);
- Ctrl-C and SIGTERM only set a flag; after each step the ranks ``agree`` and all stop together;
- any other exception on one rank aborts the job (``Communicator.abort``) with its rank and
  message, instead of leaving the others waiting in their next collective;
- only rank 0 writes logs, checkpoints and figures; a checkpoint holds every rank's generators.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import numpy as np

from .distributed import GradientBuckets, SingleProcess, broadcast_parameters
from .nn.utils import NonFiniteError
from .train_guards import TrainingDiverged, TrainingTerminated, loss_dict


class TrainerParallel:
    """Data-parallel methods of the Trainer (see the module docstring)."""

    def _setup_parallel(self, comm) -> None:
        self.comm = comm if comm is not None else SingleProcess()
        self._buckets = GradientBuckets(self.model.parameters())
        self._signals: list[int] = []
        broadcast_parameters(self.model, self.comm)

    @property
    def lr_scale(self) -> int:
        """The linear scaling rule's factor: the number of ranks."""
        return self.comm.world_size

    def parallel_summary(self) -> str:
        """``data parallel: 2 ranks x 4 images = 8 per step; lr 0.02 x 2 = 0.04 ...``."""
        w, c = self.comm.world_size, self.config
        return (
            f"data parallel: {w} ranks x {c.batch_size} images = effective batch "
            f"{w * c.batch_size}; learning rate {c.lr:g} x {w} = {c.lr * w:g} (linear scaling "
            f"rule: lr is the rate for batch_size images), warm-up {c.warmup_iters} steps"
        )

    def _forward_losses(self, images, targets, step: int) -> dict[str, float]:
        """``model.forward`` as a loss dict; with several ranks, the mean over the ranks."""
        if self.comm.world_size == 1:
            try:
                return loss_dict(self.model.forward(images, targets))
            except NonFiniteError as err:  # NaN/inf features met by an op that refuses them
                raise TrainingDiverged(step, "a feature map of the forward", np.nan) from err
        failed, losses = None, {}
        try:
            losses = loss_dict(self.model.forward(images, targets))
        except NonFiniteError as err:
            failed = err
        if self.comm.agree(failed is not None):
            where = f"a feature map of the forward (rank {self.comm.rank}: {failed})"
            raise _agreed(TrainingDiverged(step, where if failed else "a feature map of the "
                                           "forward on another rank", np.nan))  # fmt: skip
        values = np.array(list(losses.values()), dtype=np.float64)
        self.comm.allreduce_mean_(values)
        return dict(zip(losses, (float(v) for v in values)))

    def _average_gradients(self) -> None:
        self._buckets.allreduce_mean_(self.comm)

    @contextlib.contextmanager
    def _interrupts_flagged(self):
        """Several ranks: while training, Ctrl-C and SIGTERM are recorded, not raised; the ranks
        act on them together in :meth:`_check_stop`. One rank: nothing changes."""
        main = threading.current_thread() is threading.main_thread()
        if self.comm.world_size == 1 or not main:
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for signum in previous:
            signal.signal(signum, lambda signum, frame: self._signals.append(signum))
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _check_stop(self) -> None:
        """Several ranks, after each step: if any rank got Ctrl-C or SIGTERM, all stop here."""
        if self.comm.world_size == 1:
            return
        if self.comm.agree(bool(self._signals)):
            terminated = signal.SIGTERM in self._signals
            self._signals.clear()
            raise _agreed(TrainingTerminated() if terminated else KeyboardInterrupt())

    def _abort_unless_agreed(self, err: BaseException) -> None:
        """Several ranks: an exception the others do not share ends the whole job now."""
        if self.comm.world_size == 1:
            return
        if isinstance(err, TrainingDiverged):  # found in the mean losses/gradients: shared
            err.agreed = True
        if not getattr(err, "agreed", False):
            self.comm.abort(err)

    def _rank_rng_states(self) -> list | None:
        """Rank 0: every rank's ``[model, augment]`` generator states; the others: None."""
        mine = [self.model_rng.bit_generator.state, self.augment_rng.bit_generator.state]
        return self.comm.gather_object(mine)

    def _restore_rank_rngs(self, ckpt) -> str | None:
        """After a resume: this rank's generators, and the data order for a new world size.
        Returns the note to print (None when the resume is exact)."""
        w = self.comm.world_size
        if ckpt.world_size == w:
            if ckpt.rank_rngs is not None:
                model_state, augment_state = ckpt.rank_rngs[self.comm.rank]
                self.model_rng.bit_generator.state = model_state
                self.augment_rng.bit_generator.state = augment_state
            return None
        # Another world size: the shards of the current epoch no longer line up. Parameters,
        # optimizer, schedule and step carry on; the data order is re-sharded from the next
        # epoch, and ranks beyond the old ones start their generators fresh from the seed.
        self._position = self._order.size
        if ckpt.rank_rngs is not None and self.comm.rank < ckpt.world_size:
            model_state, augment_state = ckpt.rank_rngs[self.comm.rank]
            self.model_rng.bit_generator.state = model_state
            self.augment_rng.bit_generator.state = augment_state
        return (
            f"{ckpt.path} was written by {ckpt.world_size} rank(s), this run has {w}: the "
            "parameters, momentum, schedule and step continue, the rest of the current epoch "
            "is skipped and the data is re-sharded from the next epoch (not an exact resume)"
        )


def _agreed(err: BaseException) -> BaseException:
    """Mark an exception every rank raises at the same step (not a reason to abort)."""
    err.agreed = True
    return err
