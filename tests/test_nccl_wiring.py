"""``kernels/nccl.py`` without a GPU: the calls it makes exist in CuPy with the arguments it
passes, and a stand-in for ``cupy`` shows what each rank does -- which GPU it binds, where the
NCCL unique id comes from, what it hands to NCCL and what it does with the result. The real
thing runs in ``tests/test_distributed.py``'s ``gpu`` tests.
"""

from __future__ import annotations

import re
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from mrcnn_edu.kernels.nccl import NcclCommunicator


def _parameters(method) -> list[str]:
    """The parameter names of a Cython method, from the signature line of its docstring."""
    signature = re.match(r"[\w.]+\((.*?)\)", method.__doc__.strip()).group(1)
    return [part.split()[-1] for part in signature.split(",")[1:]]  # without self


def test_the_nccl_calls_exist_in_cupy_with_these_arguments():
    pytest.importorskip("cupy")  # imports without a GPU; only allocating needs one
    import cupy
    from cupy.cuda import nccl

    assert nccl.available, "CuPy found no NCCL library (pip install nvidia-nccl-cu12)"
    for name in ("get_unique_id", "NCCL_FLOAT16", "NCCL_FLOAT32", "NCCL_FLOAT64", "NCCL_SUM"):
        assert hasattr(nccl, name), name
    comm = nccl.NcclCommunicator
    assert _parameters(comm.allReduce) == ["sendbuf", "recvbuf", "count", "datatype", "op",
                                           "stream"]  # fmt: skip
    assert _parameters(comm.bcast) == ["buff", "count", "datatype", "root", "stream"]
    assert callable(cupy.cuda.runtime.getDeviceCount) and callable(cupy.cuda.get_current_stream)
    assert callable(cupy.cuda.Device(0).use)  # a Device object is made without touching a GPU


# -- a stand-in cupy ------------------------------------------------------------------------------
class StandInArray:
    """What NcclCommunicator reads from a CuPy array, over a NumPy array."""

    def __init__(self, values, gpu: int):
        self.host = np.array(values, dtype=np.float64)
        self.device = SimpleNamespace(id=gpu)
        self.data = SimpleNamespace(ptr=1000 + gpu)
        self.ndim, self.size, self.dtype = self.host.ndim, self.host.size, self.host.dtype
        self.flags = SimpleNamespace(c_contiguous=True)

    def __itruediv__(self, k):
        self.host /= k
        return self


StandInArray.__module__ = "cupy._core.core"  # what backend.is_cupy_array looks at


class StandInNccl(ModuleType):
    """``cupy.cuda.nccl``: records what the communicator asks for. The other ranks' buffers
    are ``others``: an all-reduce with NCCL_SUM adds them to this rank's."""

    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 6, 7, 8, 0

    def __init__(self, others):
        super().__init__("cupy.cuda.nccl")
        self.calls, self.others, self.buffers = [], others, {}
        nccl = self

        class Comm:
            def __init__(self, ndev, uid, rank):
                nccl.calls.append(("init", ndev, uid, rank))

            def allReduce(self, send, recv, count, dtype, op, stream):
                nccl.calls.append(("allReduce", send, recv, count, dtype, op, stream))
                nccl.buffers[recv].host += sum(nccl.others)

            def bcast(self, buff, count, dtype, root, stream):
                nccl.calls.append(("bcast", buff, count, dtype, root, stream))

        self.NcclCommunicator = Comm

    def get_unique_id(self):
        self.calls.append(("get_unique_id",))
        return (7, 7, 7)


def stand_in_cupy(monkeypatch, device_count: int, others) -> tuple[StandInNccl, list]:
    nccl, used = StandInNccl(others), []
    cuda = ModuleType("cupy.cuda")
    cuda.nccl = nccl
    cuda.runtime = SimpleNamespace(getDeviceCount=lambda: device_count)
    cuda.Device = lambda n: SimpleNamespace(use=lambda: used.append(n))
    cuda.get_current_stream = lambda: SimpleNamespace(ptr=42, synchronize=lambda: None)
    cupy = ModuleType("cupy")
    cupy.cuda = cuda
    for name, module in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.nccl", nccl)):
        monkeypatch.setitem(sys.modules, name, module)
    return nccl, used


def stand_in_mpi(rank: int, world_size: int, root_uid=(1, 2, 3)):
    """An MpiCommunicator's face: ``comm.bcast`` hands every rank but 0 the root's id."""
    sent = []

    def bcast(obj, root):
        sent.append((obj, root))
        return obj if rank == root else root_uid

    mpi = SimpleNamespace(rank=rank, world_size=world_size, comm=SimpleNamespace(bcast=bcast))
    return mpi, sent


def test_rank_3_of_4_binds_gpu_1_and_joins_with_rank_0s_id(monkeypatch):
    nccl, used = stand_in_cupy(monkeypatch, device_count=2, others=[])
    mpi, sent = stand_in_mpi(rank=3, world_size=4)
    comm = NcclCommunicator(mpi)
    assert comm.gpu == 1 and used == [1]  # r % device_count, made current
    assert (comm.rank, comm.world_size, comm.device_count) == (3, 4, 2)
    assert sent == [(None, 0)]  # it made no id of its own: it took rank 0's
    assert nccl.calls == [("init", 4, (1, 2, 3), 3)]


def test_rank_0_makes_the_id_and_broadcasts_it(monkeypatch):
    nccl, used = stand_in_cupy(monkeypatch, device_count=8, others=[])
    mpi, sent = stand_in_mpi(rank=0, world_size=2)
    NcclCommunicator(mpi)
    assert used == [0] and sent == [((7, 7, 7), 0)]
    assert nccl.calls == [("get_unique_id",), ("init", 2, (7, 7, 7), 0)]


def test_allreduce_mean_sums_in_place_on_the_stream_then_divides(monkeypatch):
    others = [np.array([5.0, 5.0, 5.0]), np.array([7.0, 0.0, -1.0]), np.array([0.0, 1.0, 2.0])]
    nccl, _ = stand_in_cupy(monkeypatch, device_count=4, others=others)
    comm = NcclCommunicator(stand_in_mpi(rank=1, world_size=4)[0])
    buffer = StandInArray([1.0, 2.0, 3.0], gpu=1)
    nccl.buffers[buffer.data.ptr] = buffer
    assert comm.allreduce_mean_(buffer) is buffer
    np.testing.assert_array_equal(buffer.host, [13 / 4, 8 / 4, 9 / 4])
    ptr = buffer.data.ptr
    assert nccl.calls[-1] == ("allReduce", ptr, ptr, 3, nccl.NCCL_FLOAT64, nccl.NCCL_SUM, 42)
    comm.broadcast_(buffer, root=0)
    assert nccl.calls[-1] == ("bcast", ptr, 3, nccl.NCCL_FLOAT64, 0, 42)


def test_host_arrays_and_other_gpus_are_refused(monkeypatch):
    stand_in_cupy(monkeypatch, device_count=2, others=[])
    comm = NcclCommunicator(stand_in_mpi(rank=1, world_size=2)[0])
    with pytest.raises(ValueError, match="CuPy array, got ndarray.*MpiCommunicator"):
        comm.allreduce_mean_(np.zeros(3))
    with pytest.raises(ValueError, match="rank 1 uses GPU 1, but this buffer is on GPU 0"):
        comm.allreduce_mean_(StandInArray([1.0], gpu=0))


def test_cupy_without_nccl_is_a_clear_error(monkeypatch):
    nccl, _ = stand_in_cupy(monkeypatch, device_count=1, others=[])
    nccl.available = False
    with pytest.raises(ValueError, match=r"NCCL.*pip install 'mrcnn-edu\[gpu\]'.*--device cpu"):
        NcclCommunicator(stand_in_mpi(rank=0, world_size=2)[0])
