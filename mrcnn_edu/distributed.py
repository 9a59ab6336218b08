"""Synchronous data parallelism: one process per rank, gradients averaged after each backward.

    mpiexec -n 2 mrcnn-edu train --config run.json      # two CPU processes, MPI between them
    mpiexec -n 8 mrcnn-edu train --config run.json --device cuda   # 8 GPUs, NCCL between them

Every rank holds the whole model. Each step, rank ``r`` runs forward and backward on its own
``batch_size`` images, then the gradients of all ranks are *averaged* (one all-reduce per
bucket of about 25 MB) so every rank applies the same SGD step and the parameters stay
identical without ever being sent again. ``docs/data_parallel.md`` tells the story.

- :class:`Communicator`: what the trainer needs from a transport -- ``rank``, ``world_size``,
  ``allreduce_mean_``, ``broadcast_``, ``barrier``, ``agree`` and ``abort``.
- :class:`SingleProcess` (no communication), :class:`MpiCommunicator` (mpi4py, NumPy arrays);
  ``kernels/nccl.py`` has ``NcclCommunicator`` (CuPy arrays, NCCL).
- :func:`get_communicator`: MPI when launched by ``mpiexec`` with more than one rank (NCCL
  with ``device="cuda"``), else :class:`SingleProcess`; mpi4py is imported only then.
- :class:`GradientBuckets`: the gradients flattened into buckets and averaged in place.
- :func:`shard`: the DistributedSampler rule, rank ``r``'s strided share of an epoch's order.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback

import numpy as np

from .backend import get_xp

BUCKET_BYTES = 25 * 1024 * 1024  # the gradient bucket size (PyTorch DDP's default, 25 MB)

# Environment variables an MPI launcher sets in every process it starts (MPICH/Hydra and Intel
# MPI: PMI_SIZE; Open MPI: OMPI_COMM_WORLD_SIZE; PMIx launchers: PMIX_SIZE).
_WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
# This process's index among the ranks on its node (MPICH/Hydra, Open MPI).
_LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")


class Communicator:
    """The collective operations data-parallel training needs; every rank calls each one in
    the same order (a rank that skips one leaves the others waiting)."""

    rank: int = 0
    world_size: int = 1
    # True when the collectives take device (CuPy) arrays: NCCL. MPI and a single process take
    # host (NumPy) arrays.
    on_device: bool = False

    def allreduce_mean_(self, buffer):
        """Replace ``buffer`` (a flat array) in place by its mean over the ranks; returns it."""
        raise NotImplementedError

    def broadcast_(self, buffer, root: int = 0):
        """Overwrite ``buffer`` in place with rank ``root``'s; returns it."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank has arrived here."""
        raise NotImplementedError

    def agree(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (a failure, a NaN, a Ctrl-C)."""
        raise NotImplementedError

    def gather_object(self, obj, root: int = 0) -> list | None:
        """Rank ``root`` gets ``[obj of rank 0, obj of rank 1, ...]``; the others None."""
        raise NotImplementedError

    def abort(self, err: BaseException) -> None:
        """End the whole job at once, after printing which rank failed and why."""
        raise NotImplementedError

    @property
    def is_root(self) -> bool:
        return self.rank == 0


class SingleProcess(Communicator):
    """World size 1: every operation leaves its argument as it is."""

    def allreduce_mean_(self, buffer):
        return buffer

    def broadcast_(self, buffer, root: int = 0):
        return buffer

    def barrier(self) -> None:
        pass

    def agree(self, flag: bool) -> bool:
        return bool(flag)

    def gather_object(self, obj, root: int = 0) -> list | None:
        return [obj]

    def abort(self, err: BaseException) -> None:
        raise err


class MpiCommunicator(Communicator):
    """MPI through mpi4py, on host (NumPy) arrays: ``Allreduce`` in place, then divide.

    A rank that reaches a collective first waits for the others in a non-blocking barrier
    finished by :func:`wait_politely` (it sleeps instead of spinning inside MPI), and only then
    moves the data with the blocking call, which runs at full speed because every rank is
    there. On a machine with more ranks than free cores (another program running, an
    oversubscribed laptop) the core a waiting rank would burn goes to the rank still computing.

    Args:
        comm: an ``mpi4py.MPI.Comm``; default ``MPI.COMM_WORLD``.
    """

    def __init__(self, comm=None):
        from mpi4py import MPI  # imported only for a multi-process run

        self._mpi = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self._flag = np.zeros(1, dtype=np.int32)

    def allreduce_mean_(self, buffer):
        _check_buffer(buffer)
        self.barrier()  # everyone has arrived: the data moves without waiting
        self.comm.Allreduce(self._mpi.IN_PLACE, buffer, op=self._mpi.SUM)
        buffer /= self.world_size
        return buffer

    def broadcast_(self, buffer, root: int = 0):
        _check_buffer(buffer)
        self.barrier()
        self.comm.Bcast(buffer, root=root)
        return buffer

    def barrier(self) -> None:
        wait_politely(self.comm.Ibarrier())

    def agree(self, flag: bool) -> bool:
        self._flag[0] = int(bool(flag))  # 4 bytes: done in the same polls as a barrier
        wait_politely(self.comm.Iallreduce(self._mpi.IN_PLACE, self._flag, op=self._mpi.MAX))
        return bool(self._flag[0])

    def gather_object(self, obj, root: int = 0) -> list | None:
        return self.comm.gather(obj, root=root)

    def abort(self, err: BaseException) -> None:
        sys.stderr.write(failure_message(self.rank, self.world_size, err))
        sys.stderr.flush()
        # The launcher forwards a rank's stderr and its abort request on separate channels;
        # aborting at once can end mpiexec before the message above reaches the terminal
        # (seen about once in eight runs with MPICH's Hydra). A moment's pause lets it through.
        time.sleep(_ABORT_GRACE_SECONDS)
        self.comm.Abort(1)


# abort: how long a failing rank waits after writing its message before ending the job.
_ABORT_GRACE_SECONDS = 0.5

# wait_politely: poll at full speed for this long (a partner that is nearly there costs no
# sleep), then sleep between polls, doubling the pause up to the cap.
_SPIN_SECONDS = 2e-4
_FIRST_SLEEP_SECONDS = 2e-5
_MAX_SLEEP_SECONDS = 1e-3


def wait_politely(request) -> None:
    """Finish a non-blocking MPI request without holding a core while waiting.

    MPI's blocking collectives busy-poll: a rank that reaches ``Allreduce`` first spins at
    100% of its core until the last rank arrives. With one core per rank that costs nothing,
    but when the ranks share cores with anything else (a second program, more ranks than
    cores) the spinning rank takes CPU time from the one it waits for, and every step takes as
    long as the slowest rank's unlucky share. Here the first ``_SPIN_SECONDS`` are polled at
    full speed (``Test`` also drives MPI's progress), then the rank sleeps between polls, the
    pause doubling from 20 us to at most 1 ms: on a quiet machine a step pays at most about
    1 ms of extra latency per collective, on a busy one the waiting rank gives its core away.
    """
    if request.Test():
        return
    start = time.perf_counter()
    while time.perf_counter() - start < _SPIN_SECONDS:
        if request.Test():
            return
    pause = _FIRST_SLEEP_SECONDS
    while not request.Test():
        time.sleep(pause)
        pause = min(2 * pause, _MAX_SLEEP_SECONDS)


def _check_buffer(buffer) -> None:
    if not isinstance(buffer, np.ndarray) or buffer.ndim != 1 or not buffer.flags.c_contiguous:
        raise ValueError(
            "MPI collectives here take a flat, contiguous NumPy array (host memory), got "
            f"{type(buffer).__name__} {getattr(buffer, 'shape', '')}; CuPy arrays go through "
            "NcclCommunicator (kernels/nccl.py)"
        )


def failure_message(rank: int, world_size: int, err: BaseException) -> str:
    """``rank 1 of 2 failed: FileNotFoundError: ... (at file.py:123)``, and the traceback."""
    where = ""
    tb = traceback.extract_tb(err.__traceback__)
    if tb:
        where = f" (at {tb[-1].filename}:{tb[-1].lineno})"
    trace = ""
    if not isinstance(err, (ValueError, OSError)):  # bad input needs no traceback
        trace = "".join(traceback.format_exception(type(err), err, err.__traceback__)) + "\n"
    return (
        f"{trace}rank {rank} of {world_size} failed: {type(err).__name__}: {err}{where}; "
        "aborting all ranks\n"
    )


def launched_world_size(environ=None) -> int:
    """The number of ranks an MPI launcher started (1 when not started by one)."""
    return _launcher_number(_WORLD_SIZE_VARIABLES, 1, environ)


def launched_rank(environ=None) -> int:
    """This process's rank as its MPI launcher numbered it (0 when not started by one)."""
    return _launcher_number(_RANK_VARIABLES, 0, environ)


def launched_local_rank(environ=None) -> int | None:
    """This process's index among the ranks its launcher started on this node (None when no
    launcher says it)."""
    return _launcher_number(_LOCAL_RANK_VARIABLES, None, environ)


def _launcher_number(names, default: int | None, environ=None) -> int | None:
    """The first of the launcher's variables ``names`` that holds a whole number."""
    environ = os.environ if environ is None else environ
    for name in names:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


def get_communicator(environ=None, device: str | None = None) -> Communicator:
    """The communicator of this process: :class:`SingleProcess` unless launched by
    ``mpiexec -n N`` with N > 1; then :class:`MpiCommunicator`, or with a CUDA ``device``
    (``"cuda"``) ``kernels.nccl.NcclCommunicator``, which binds rank r to GPU
    ``r % device_count`` before anything is allocated there.

    Raises:
        ValueError: several ranks and ``device`` names one GPU (``"cuda:1"``): each rank needs
            its own; or NCCL is missing from CuPy.
        ImportError: launched with several ranks but mpi4py is missing (naming the extra).
    """
    world = launched_world_size(environ)
    if world <= 1:
        return SingleProcess()
    cuda = device is not None and str(device).split(":")[0] == "cuda"
    if cuda and ":" in str(device):
        raise ValueError(
            f"device {device!r} names one GPU, but this job has {world} ranks and each needs "
            "its own: use --device cuda (rank r then uses GPU r % device_count)"
        )
    try:
        mpi = MpiCommunicator()
    except ImportError as err:
        raise ImportError(
            "this process was started by mpiexec with several ranks, but mpi4py is not "
            "installed: pip install 'mrcnn-edu[dist]' (mpi4py and the mpich wheel)"
        ) from err
    if not cuda:
        return mpi
    from .kernels.nccl import NcclCommunicator

    return NcclCommunicator(mpi)


def rank_device(device: str | None, comm: Communicator) -> str | None:
    """The device this rank trains on: ``device`` itself, except that under NCCL ``"cuda"``
    (or None) is the GPU the communicator bound, ``"cuda:<r % device_count>"``."""
    gpu = getattr(comm, "gpu", None)
    if gpu is None or device not in (None, "cuda"):
        return device
    return f"cuda:{gpu}"


@contextlib.contextmanager
def abort_on_error(comm: Communicator):
    """Any exception in the block on one rank ends the whole job (``comm.abort``) instead of
    leaving the other ranks waiting forever in their next collective. Single process: the
    exception passes through unchanged. An exception marked ``agreed`` (every rank raised it at
    the same step: a divergence, Ctrl-C, SIGTERM) passes through too."""
    try:
        yield
    except BaseException as err:
        if comm.world_size > 1 and not getattr(err, "agreed", False):
            comm.abort(err)
        raise


def shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of an epoch's permutation ``order`` (DistributedSampler rule).

    The order is padded by repeating its start up to a multiple of ``world_size``, then rank r
    takes items ``r, r + W, r + 2W, ...``: every item once per epoch across the ranks (a few
    twice when the length is not a multiple of W), all shards of equal length. With one rank
    the shard is ``order`` itself.
    """
    if world_size == 1:
        return order
    n = order.size
    padded = -(-n // world_size) * world_size
    if padded > n:
        order = np.concatenate([order, np.resize(order, padded - n)])
    return order[rank::world_size]


def rank_seeds(seed: int, rank: int) -> list[np.random.SeedSequence]:
    """The (data, model, augment) seed sequences of ``rank``.

    Rank 0's are ``SeedSequence(seed).spawn(3)`` (a single-process run's). The data stream is
    the same on every rank (every rank draws the same epoch permutation); rank r > 0 gets model
    and augment streams of its own, the r-th children of rank 0's (``spawn_key=(k, r)``).
    """
    data, model, augment = np.random.SeedSequence(seed).spawn(3)
    if rank == 0:
        return [data, model, augment]
    return [data] + [np.random.SeedSequence(seed, spawn_key=(k, rank)) for k in (1, 2)]


class GradientBuckets:
    """The gradients of ``params`` averaged over the ranks, a few large messages at a time.

    The params are grouped, in order, into buckets of at most ``bucket_bytes`` (one dtype per
    bucket; a larger param gets a bucket of its own). :meth:`allreduce_mean_` copies each
    bucket's gradients into one flat buffer, averages it over the ranks and copies it back.
    A ``header`` (a short vector: the Trainer's failure flag and losses) rides at the front of
    the first bucket's buffer, so it is averaged in the same message, in that bucket's dtype.
    """

    def __init__(self, params, bucket_bytes: int = BUCKET_BYTES):
        self.buckets: list[list] = []
        current, size = [], 0
        for p in params:
            nbytes = p.grad.size * p.grad.dtype.itemsize
            same_dtype = not current or current[0].grad.dtype == p.grad.dtype
            if current and (size + nbytes > bucket_bytes or not same_dtype):
                self.buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self.buckets.append(current)
        self._buffers = [None] * len(self.buckets)

    def allreduce_mean_(self, comm: Communicator, header=None) -> None:
        """Average every gradient over the ranks, and ``header`` (1-d, on the gradients'
        device) in place with the first bucket."""
        if comm.world_size == 1:
            return
        if not self.buckets and header is not None:  # a model without parameters
            comm.allreduce_mean_(header)
        for i, bucket in enumerate(self.buckets):
            xp = get_xp(bucket[0].grad)
            extra = 0 if header is None or i > 0 else header.size
            total = extra + sum(p.grad.size for p in bucket)
            if self._buffers[i] is None or self._buffers[i].size != total:
                self._buffers[i] = xp.empty(total, dtype=bucket[0].grad.dtype)
            flat = self._buffers[i]
            if extra:
                flat[:extra] = header
            offset = extra
            for p in bucket:
                flat[offset : offset + p.grad.size] = p.grad.ravel()
                offset += p.grad.size
            comm.allreduce_mean_(flat)
            if extra:
                header[...] = flat[:extra]
            offset = extra
            for p in bucket:
                p.grad[...] = flat[offset : offset + p.grad.size].reshape(p.grad.shape)
                offset += p.grad.size


def broadcast_parameters(model, comm: Communicator, root: int = 0) -> None:
    """Copy rank ``root``'s parameters (frozen buffers included) into every rank's model."""
    if comm.world_size == 1:
        return
    for _, p in model.named_parameters():
        flat = get_xp(p.data).ascontiguousarray(p.data).reshape(-1).copy()
        comm.broadcast_(flat, root)
        p.data[...] = flat.reshape(p.data.shape)
