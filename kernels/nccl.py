"""NCCL between GPUs, through CuPy: the gradient transport of ``mpiexec -n N ... --device cuda``.

MPI starts the processes and carries the start-up handshake; NCCL moves the gradients, GPU to
GPU, on the current CUDA stream (NVLink/PCIe inside a node, the network between nodes). Rank 0
creates NCCL's unique id and broadcasts it over MPI; every rank then joins the communicator with
it. Rank r uses GPU ``r % device_count`` (one process per GPU; several nodes each number their
GPUs from 0, so ranks are placed node by node), bound before anything is allocated on a GPU.
cupy and mpi4py are imported when a communicator is created, never at import.
"""

from __future__ import annotations

from mrcnn_edu.backend import is_cupy_array
from mrcnn_edu.distributed import Communicator, MpiCommunicator

_NO_NCCL = (
    "--device cuda with several ranks all-reduces the gradients with NCCL, but CuPy cannot load "
    "it ({err}); pip install 'mrcnn-edu[gpu]' brings it (nvidia-nccl-cu12), or use --device cpu"
)


class NcclCommunicator(Communicator):
    """``Communicator`` on CuPy arrays (``cupy.cuda.nccl``); control messages (``agree``,
    ``barrier``, ``gather_object``, ``abort``) go over MPI.

    Args:
        mpi: the ``MpiCommunicator`` that started the job; default ``MpiCommunicator()``.

    Attributes:
        gpu: the CUDA device this rank uses, ``rank % device_count`` (made current here).
        device_count: the CUDA devices this process sees.
    """

    on_device = True

    def __init__(self, mpi: MpiCommunicator | None = None):
        import cupy

        try:
            from cupy.cuda import nccl
        except ImportError as err:
            raise ValueError(_NO_NCCL.format(err=err)) from err
        if not getattr(nccl, "available", True):  # CuPy built or installed without NCCL
            raise ValueError(_NO_NCCL.format(err="cupy.cuda.nccl.available is False"))
        self._cp, self._nccl = cupy, nccl
        self.mpi = mpi if mpi is not None else MpiCommunicator()
        self.rank, self.world_size = self.mpi.rank, self.mpi.world_size
        self.device_count = cupy.cuda.runtime.getDeviceCount()
        self.gpu = self.rank % self.device_count
        cupy.cuda.Device(self.gpu).use()  # before NCCL or anyone allocates on a GPU
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.mpi.comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.world_size, uid, self.rank)

    def _nccl_dtype(self, buffer):
        """NCCL's code for ``buffer``'s dtype, after checking it is a flat, contiguous float
        CuPy array on this rank's GPU."""
        kinds = {
            "float16": self._nccl.NCCL_FLOAT16,
            "float32": self._nccl.NCCL_FLOAT32,
            "float64": self._nccl.NCCL_FLOAT64,
        }
        ok = (
            is_cupy_array(buffer)
            and buffer.ndim == 1
            and buffer.flags.c_contiguous
            and buffer.dtype.name in kinds
        )
        if not ok:
            raise ValueError(
                "NCCL collectives here take a flat, contiguous float16/32/64 CuPy array, got "
                f"{type(buffer).__name__} {getattr(buffer, 'dtype', '')} "
                f"{getattr(buffer, 'shape', '')}; host (NumPy) arrays go through MpiCommunicator"
            )
        if buffer.device.id != self.gpu:
            raise ValueError(
                f"rank {self.rank} uses GPU {self.gpu}, but this buffer is on GPU "
                f"{buffer.device.id}; move the model with .to('cuda:{self.gpu}')"
            )
        return kinds[buffer.dtype.name]

    def allreduce_mean_(self, buffer):
        dtype = self._nccl_dtype(buffer)
        stream = self._cp.cuda.get_current_stream().ptr
        ptr = buffer.data.ptr
        self.comm.allReduce(ptr, ptr, buffer.size, dtype, self._nccl.NCCL_SUM, stream)
        buffer /= self.world_size  # queued on the same stream, after the reduction
        return buffer

    def broadcast_(self, buffer, root: int = 0):
        dtype = self._nccl_dtype(buffer)
        stream = self._cp.cuda.get_current_stream().ptr
        self.comm.bcast(buffer.data.ptr, buffer.size, dtype, root, stream)
        return buffer

    def barrier(self) -> None:
        self._cp.cuda.get_current_stream().synchronize()
        self.mpi.barrier()

    def agree(self, flag: bool) -> bool:
        return self.mpi.agree(flag)

    def gather_object(self, obj, root: int = 0) -> list | None:
        return self.mpi.gather_object(obj, root)

    def abort(self, err: BaseException) -> None:
        self.mpi.abort(err)
