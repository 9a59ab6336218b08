"""The Trainer's data-parallel part: what changes when several ranks train one model together.

``TrainerParallel`` is a base class of :class:`mrcnn_edu.train.Trainer`; with one rank
(``SingleProcess``) every method here is a no-op or returns its input, so a single-process run
is exactly what it was. With ``W`` ranks (``distributed.MpiCommunicator``, or
``kernels.nccl.NcclCommunicator`` on GPUs):

- at start the model moves to the trainer's device (under NCCL: the GPU the rank bound), then
  rank 0's parameters are broadcast (every rank starts from the same model);
- the learning rate is ``config.lr * W`` (linear scaling rule: ``lr`` is the rate for
  ``batch_size`` images, and the effective batch is ``W * batch_size``);
- the losses and the gradients are averaged over the ranks in one all-reduce per step, the
  losses (and a flag for a forward that met non-finite features) in front of the gradients
  (``GradientBuckets``, on the device under NCCL; the logged loss is that of the whole batch;
  a NaN on any rank makes the mean NaN on all, so the NaN guard stops every rank at the same
  step, before any parameter changes). The first step learns the losses' names with three
  separate collectives (``_forward_losses``, then the gradients);
- Ctrl-C and SIGTERM only set a flag; after each step the ranks ``agree`` and all stop together;
- any other exception on one rank aborts the job (``Communicator.abort``) with its rank and
  message, instead of leaving the others waiting in their next collective;
- only rank 0 writes logs, checkpoints and figures; a checkpoint holds every rank's generators;
- a resume with another number of ranks re-shards the data from the next epoch and scales the
  learning rate for the new number (``_resume_ranks`` says so).
"""

from __future__ import annotations

import contextlib
import signal
import threading

import numpy as np

from .backend import check_device, get_xp, is_device_array, to_device, to_host
from .distributed import (
    GradientBuckets,
    SingleProcess,
    broadcast_parameters,
    rank_device,
    rank_seeds,
)
from .nn.utils import NonFiniteError
from .train_guards import (
    TrainingDiverged,
    TrainingTerminated,
    finite_total,
    loss_dict,
    loss_vector,
)


def images_word(n: int) -> str:
    """``"1 image"``, ``"2 images"``."""
    return f"{n} image{'' if n == 1 else 's'}"


class TrainerParallel:
    """Data-parallel methods of the Trainer (see the module docstring)."""

    def _setup_parallel(self, comm, device: str | None) -> None:
        """The communicator and the device: the model moves to ``device`` (under NCCL: the
        GPU the communicator bound), then rank 0's parameters are broadcast."""
        self.comm = comm if comm is not None else SingleProcess()
        device = rank_device(device, self.comm)
        _check_transport(self.comm, device)
        self.device = None if device is None else check_device(device)
        if self.device is not None:
            self.model.to(self.device)
        self._buckets = GradientBuckets(self.model.parameters())
        self._loss_names: tuple[str, ...] | None = None  # learnt at the first step
        self._signals: list[int] = []
        broadcast_parameters(self.model, self.comm)

    @property
    def lr_scale(self) -> int:
        """The linear scaling rule's factor: the number of ranks."""
        return self.comm.world_size

    def parallel_summary(self) -> str:
        """The start banner: the device; with several ranks also the transport, the batch per
        rank and the effective batch, and the learning rate scaled by the linear scaling rule
        with its warm-up."""
        w, c = self.comm.world_size, self.config
        device = self.device or "cpu"
        if w == 1:
            return f"device: {device}"
        if self.comm.on_device:
            device = f"cuda (rank r on GPU r % {self.comm.device_count}), gradients over NCCL"
        else:
            device += ", gradients over MPI"
        lr = c.lr * w
        warmup = (
            f"warm-up over {c.warmup_iters} step{'s' if c.warmup_iters > 1 else ''} from "
            f"{c.warmup_factor:g} x {lr:g} = {lr * c.warmup_factor:g}"
            if c.warmup_iters
            else "no warm-up"
        )
        images = images_word(c.batch_size)
        return (
            f"device: {device}\n"
            f"data parallel: {w} ranks x {images} per rank = effective batch "
            f"{w * c.batch_size}\n"
            f"learning rate: {c.lr:g} (the config's, for {images}) x {w} ranks = "
            f"{lr:g} (linear scaling rule); {warmup}"
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
            losses = self.model.forward(images, targets)
        except NonFiniteError as err:
            failed = err
        if self.comm.agree(failed is not None):
            raise self._forward_diverged(step, failed)
        # one vector of losses, averaged where the transport works (NCCL: on the GPU), then
        # brought to the host in one transfer
        values = loss_vector(losses)
        if self.comm.on_device and not is_device_array(values):
            values = to_device(values, self.device)
        elif not self.comm.on_device:
            values = to_host(values)
        self.comm.allreduce_mean_(values)
        return dict(zip(losses, (float(v) for v in to_host(values))))

    def _forward_diverged(self, step: int, failed: NonFiniteError | None) -> TrainingDiverged:
        """The TrainingDiverged every rank raises when some rank's forward met features an op
        refuses: naming this rank's error, or saying it was another rank's."""
        where = f"a feature map of the forward (rank {self.comm.rank}: {failed})"
        if failed is None:
            where = "a feature map of the forward on another rank"
        return _agreed(TrainingDiverged(step, where, np.nan))

    def _forward_backward(self, images, targets, step: int) -> tuple[dict[str, float], float]:
        """Forward, the loss check, backward and, with several ranks, the averaging of the
        losses and gradients: ``(losses, total)``, both the mean over the ranks.

        The ranks meet once per step: the losses (and a flag for a forward that met non-finite
        features) ride in front of the gradients in one all-reduce (``GradientBuckets``). Every
        rank therefore runs its backward before it knows whether another rank's losses are
        finite; a NaN anywhere makes the mean NaN everywhere, and every rank raises the same
        TrainingDiverged before any parameter changes. The first step of a run (and of a
        resumed one) meets three times instead, to learn the names of the losses: the vector
        must have the same length on a rank whose forward failed.
        """
        if self.comm.world_size == 1 or self._loss_names is None:
            losses = self._forward_losses(images, targets, step)
            total = finite_total(step, losses)
            self.model.backward()
            self._buckets.allreduce_mean_(self.comm)
            self._loss_names = tuple(losses)
            return losses, total
        names, failed = self._loss_names, None
        try:
            raw = self.model.forward(images, targets)
        except NonFiniteError as err:
            failed = err
        if failed is None:
            if tuple(raw) != names:
                raise ValueError(
                    f"the model returned the losses {list(raw)} at step {step}, but "
                    f"{list(names)} before; with several ranks every step must return the same "
                    "losses in the same order (they are averaged as one vector)"
                )
            values = loss_vector(raw)
            self.model.backward()
        else:
            values = np.full(len(names), np.nan)
        if self.device is not None and not is_device_array(values):
            values = to_device(values, self.device)
        elif self.device is None:
            values = to_host(values)
        xp = get_xp(values)
        header = xp.concatenate([xp.full(1, float(failed is not None)), values.astype(xp.float64)])
        self._buckets.allreduce_mean_(self.comm, header=header)
        header = to_host(header)  # one transfer for the flag and every loss
        if header[0] > 0:
            raise self._forward_diverged(step, failed)
        losses = dict(zip(names, (float(v) for v in header[1:])))
        return losses, finite_total(step, losses)

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

    def _resume_ranks(self, ckpt) -> str | None:
        """After a resume: this rank's generators; for a new world size also the data order
        and the learning rate. Returns the note to print (None when the resume is exact)."""
        w = self.comm.world_size
        if ckpt.world_size == w:
            if ckpt.rank_rngs is not None:
                model_state, augment_state = ckpt.rank_rngs[self.comm.rank]
                self.model_rng.bit_generator.state = model_state
                self.augment_rng.bit_generator.state = augment_state
            return None
        # Another world size: the shards of the current epoch no longer line up. Parameters,
        # optimizer, schedule and step carry on; the data order is re-sharded from the next
        # epoch, and ranks beyond the old ones start their generators fresh from the seed. The
        # effective batch changed, so the rate is scaled for the new number of ranks.
        self._position = self._order.size
        self.scheduler = self._make_scheduler()
        self.scheduler.iteration = ckpt.step
        self.optimizer.lr = self.scheduler.lr_at(ckpt.step)
        if ckpt.rank_rngs is not None and self.comm.rank < ckpt.world_size:
            model_state, augment_state = ckpt.rank_rngs[self.comm.rank]
            self.model_rng.bit_generator.state = model_state
            self.augment_rng.bit_generator.state = augment_state
        elif self.comm.rank >= ckpt.world_size:  # not rank 0's streams, restored above
            _, model_seed, augment_seed = rank_seeds(self.config.seed, self.comm.rank)
            self.model_rng.bit_generator.state = _fresh_state(model_seed)
            self.augment_rng.bit_generator.state = _fresh_state(augment_seed)
        c = self.config
        return (
            f"{ckpt.path} was written by {ckpt.world_size} rank(s), this run has {w}: the "
            "parameters, momentum, schedule and step continue, the rest of the current epoch "
            "is skipped and the data is re-sharded from the next epoch (not an exact resume); "
            f"the base learning rate is now {c.lr:g} x {w} = {c.lr * w:g} (linear scaling rule)"
        )


def _fresh_state(seed: np.random.SeedSequence) -> dict:
    return np.random.default_rng(seed).bit_generator.state


def _check_transport(comm, device: str | None) -> None:
    """Several ranks: NCCL moves GPU arrays and MPI host arrays; refuse a mismatch now rather
    than at the first all-reduce."""
    if comm.world_size == 1:
        return
    cuda = device is not None and device.startswith("cuda")
    gpu = getattr(comm, "gpu", None)
    if comm.on_device and device != f"cuda:{gpu}":
        raise ValueError(
            f"{type(comm).__name__} all-reduces arrays on GPU {gpu} (rank {comm.rank}'s), "
            f"but the model trains on {device or 'the host'}: train with device='cuda' "
            "(--device cuda)"
        )
    if cuda and not comm.on_device:
        raise ValueError(
            f"a model on {device} needs its gradients all-reduced by NCCL, not "
            f"{type(comm).__name__}: get_communicator(device='cuda') (the CLI does it)"
        )


def _agreed(err: BaseException) -> BaseException:
    """Mark an exception every rank raises at the same step (not a reason to abort)."""
    err.agreed = True
    return err
