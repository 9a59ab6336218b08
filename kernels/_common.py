"""Argument handling shared by the CuPy and Numba kernel wrappers.

Nothing here imports a GPU library. The public ops in ``mrcnn_edu.roi_ops`` / ``mrcnn_edu.nms``
validate their arguments fully before dispatching to a kernel; the checks here are the cheap ones
(shapes, dtypes, sizes) that keep a direct call to a kernel from reading out of bounds. None of
them reads array *values*, because that would cost a device-to-host copy on every call.
"""

from __future__ import annotations

import numpy as np

# The kernels index with 32-bit ``int`` (faster on a GPU than 64-bit division), so every array
# they touch must have fewer elements than this.
INT32_LIMIT = 2**31 - 1

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# NMS works on tiles of 64 boxes: one bit per box in a 64-bit word.
NMS_TILE = 64
# Most threads of the one block that runs the sequential NMS sweep.
NMS_REDUCE_THREADS = 256


def pair(output_size, name: str = "output_size") -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(7, 5) -> (7, 5)``. Raises ValueError for anything else."""
    if isinstance(output_size, (int, np.integer)):
        size = (int(output_size), int(output_size))
    else:
        try:
            size = tuple(int(s) for s in output_size)
        except TypeError:
            raise ValueError(
                f"{name} must be an int or a pair of ints, got {output_size!r}"
            ) from None
        if len(size) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {output_size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{name} must be positive, got {output_size!r}")
    return size


def check_float(a, name: str) -> None:
    if np.dtype(a.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {a.dtype}; cast it with astype")


def check_roi_args(input, rois) -> None:
    """input: (N, C, H, W) float32/float64; rois: (K, 5)."""
    if input.ndim != 4:
        raise ValueError(f"input must be (N, C, H, W), got shape {tuple(input.shape)}")
    check_float(input, "input")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"rois must be (K, 5) rows (batch_idx, x1, y1, x2, y2), got shape {tuple(rois.shape)}"
        )
    check_int32_sizes(input.size)


def check_input_shape(input_shape) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or min(shape) < 0:
        raise ValueError(f"input_shape must be (N, C, H, W), got {input_shape!r}")
    return shape


def check_int32_sizes(*sizes: int) -> None:
    for size in sizes:
        if size > INT32_LIMIT:
            raise ValueError(
                f"an array of {size} elements is too large for the 32-bit indexing of the GPU "
                f"kernels (limit {INT32_LIMIT}); split the batch or the RoIs into chunks"
            )


def check_nms_args(boxes, scores) -> None:
    """boxes: (N, 4) float32/float64; scores: (N,)."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    check_float(boxes, "boxes")
    if scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"scores must be (N,) with N = {boxes.shape[0]} (one per box), "
            f"got shape {tuple(scores.shape)}"
        )
    n = boxes.shape[0]
    blocks = (n + NMS_TILE - 1) // NMS_TILE
    check_int32_sizes(n * 4, n * blocks)


def blocks_for(total: int, threads: int) -> int:
    """Number of blocks so that ``blocks * threads >= total`` (one thread per element)."""
    return (total + threads - 1) // threads


def nms_reduce_threads(tiles: int) -> int:
    """Threads for the NMS sweep: one per word of the ``removed`` bitmap, in whole warps, at most
    ``NMS_REDUCE_THREADS``. Extra threads would only wait at every ``__syncthreads``."""
    return min(NMS_REDUCE_THREADS, 32 * blocks_for(tiles, 32))


def prepare_rois(xp, input, rois):
    """Checked, C-contiguous input and rois of the input's dtype: the kernels index raw memory."""
    check_roi_args(input, rois)
    return xp.ascontiguousarray(input), xp.ascontiguousarray(rois, dtype=input.dtype)


def prepare_grad(xp, grad_output, rois, chw):
    """Checked, C-contiguous grad_output (K, C, PH, PW) and rois (K, 5) of its dtype."""
    if grad_output.ndim != 4 or tuple(grad_output.shape[1:]) != chw:
        raise ValueError(
            f"grad_output must be (K, {chw[0]}, {chw[1]}, {chw[2]}) to match input_shape and "
            f"output_size, got {tuple(grad_output.shape)}"
        )
    if rois.ndim != 2 or rois.shape != (grad_output.shape[0], 5):
        raise ValueError(
            f"rois must be ({grad_output.shape[0]}, 5), one per grad_output row, "
            f"got {tuple(rois.shape)}"
        )
    if grad_output.dtype not in (np.float32, np.float64):
        raise ValueError(f"grad_output must be float32 or float64, got {grad_output.dtype}")
    return xp.ascontiguousarray(grad_output), xp.ascontiguousarray(rois, dtype=grad_output.dtype)


class CupyKernels:
    """The kernels of one CUDA C source, compiled with NVRTC on first use (per device), so
    importing a kernel file needs no GPU. ``templated`` kernels are instantiated for float and
    double: ``get("roi_align_forward", np.float32)`` is ``roi_align_forward<float>``; a plain
    kernel is ``get("nms_reduce")``. CuPy also caches NVRTC output on disk across processes."""

    CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

    def __init__(self, source: str, templated: tuple[str, ...], options: tuple[str, ...]):
        self.source, self.templated, self.options = source, templated, options
        self._modules: dict = {}  # device id -> RawModule (a loaded module belongs to a context)

    def get(self, name: str, dtype=None):
        from mrcnn_edu.backend import require_cupy

        cp = require_cupy()
        if name in self.templated:
            name = f"{name}<{self.CTYPES[np.dtype(dtype)]}>"
        device = cp.cuda.Device().id
        if device not in self._modules:
            names = [f"{k}<{c}>" for k in self.templated for c in self.CTYPES.values()]
            self._modules[device] = cp.RawModule(
                code=self.source, options=self.options, name_expressions=names
            )
        return self._modules[device].get_function(name)
