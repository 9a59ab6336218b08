"""Non-maximum suppression on the GPU with Numba-CUDA: the bitmask algorithm.

The same three steps as ``cupy_nms.py`` (read its docstring first), written as Python kernels:

1. sort by decreasing score (stable) -- with ``cupy.argsort`` on a GPU, ``numpy.argsort`` under
   the simulator: Numba has no GPU sort;
2. ``_iou_mask``: block (row tile, column tile) of 64 threads writes 64-bit IoU bitmasks;
3. ``_reduce``: one block sweeps the boxes in order, keeping a ``removed`` bitmap in shared memory.

Arrays: on a real GPU the wrapper takes CuPy arrays and hands them to the kernels directly (Numba
reads them through the CUDA array interface, no copy). With ``NUMBA_ENABLE_CUDASIM=1`` the
kernels run as Python threads on the CPU and the wrapper takes NumPy arrays -- this is how the
tests check the kernels without a GPU.
"""

from __future__ import annotations

import functools

import numpy as np

try:
    from numba import cuda
    from numba.core import config
except ImportError as err:  # a clear message instead of a bare ModuleNotFoundError
    raise ImportError(
        f"{__name__} needs numba (pip install 'mrcnn-edu[gpu]' for a GPU, or 'mrcnn-edu[test]' "
        "for the CUDA simulator)"
    ) from err

from ._common import NMS_TILE, blocks_for, check_nms_args, nms_reduce_threads

# A dtype instance, not the class: the simulator reads its itemsize for dynamic shared memory.
U64_DTYPE = np.dtype(np.uint64)


def nms(boxes, scores, iou_threshold: float):
    """Greedy NMS; the same result as ``mrcnn_edu.nms.nms``.

    boxes: (N, 4) float32/float64 ``(x1, y1, x2, y2)``; scores: (N,) float -- CuPy arrays on a
    GPU, NumPy arrays under the CUDA simulator. Returns (K,) int64 kept indices (same array
    library), by decreasing score, ties by lower index.
    """
    return _nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes, scores, idxs, iou_threshold: float):
    """NMS within each category; the same result as ``mrcnn_edu.nms.batched_nms``.

    idxs: (N,) int category per box. As in ``cupy_nms.batched_nms``, the category goes into the
    mask kernel (boxes of different categories never set a bit) instead of shifting coordinates,
    so every IoU is the one the reference computes.
    """
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must have shape {tuple(scores.shape)}, got {tuple(idxs.shape)}")
    xp = _xp(boxes)
    return _nms(boxes, scores, xp.ascontiguousarray(idxs, dtype=xp.int64), iou_threshold)


# -- implementation ------------------------------------------------------------------------
def _nms(boxes, scores, categories, iou_threshold: float):
    xp = _xp(boxes)
    check_nms_args(boxes, scores)
    n = boxes.shape[0]
    if n == 0:
        return xp.empty((0,), dtype=xp.int64)
    # Stable sort; "+ 0" maps -0.0 to +0.0 so a radix sort (CuPy) ranks them as equal.
    order = xp.argsort(-scores + 0, kind="stable") if xp is np else xp.argsort(-scores + 0)
    sorted_boxes = xp.ascontiguousarray(boxes[order])
    tiles = blocks_for(n, NMS_TILE)
    by_category = categories is not None
    # A (1,) dummy keeps one kernel signature for both cases.
    sorted_categories = (
        xp.ascontiguousarray(categories[order]) if by_category else xp.zeros((1,), xp.int64)
    )

    mask = xp.empty((n, tiles), dtype=xp.uint64)
    iou_mask, reduce = _kernels(np.dtype(sorted_boxes.dtype))
    iou_mask[(tiles, tiles), NMS_TILE](
        sorted_boxes, sorted_categories, by_category, n, np.float64(iou_threshold), mask
    )
    keep = xp.zeros((n,), dtype=xp.uint8)
    # The 4th launch argument is the dynamic shared memory in bytes: one uint64 word per tile.
    reduce[1, nms_reduce_threads(tiles), 0, tiles * 8](mask, n, keep)
    return order[xp.flatnonzero(keep)].astype(xp.int64)


def _xp(a):
    from mrcnn_edu.backend import get_xp

    return get_xp(a)


@functools.cache
def _kernels(dtype: np.dtype):
    """Build (once per dtype) the two kernels; Numba compiles them on their first launch.

    ``cuda`` must stay a module global: the simulator swaps it for its fake module by scanning
    the kernel function's globals.
    """
    T = dtype.type  # np.float32 or np.float64: every constant is cast to it
    u64 = np.uint64
    one = u64(1)
    mul = _exact_multiply(dtype)

    @cuda.jit(device=True, inline="always")
    def iou_above(boxes, i, col_boxes, j, area_i, threshold):
        # The reference's float operations in its order; see _exact_multiply for why ``mul``.
        bx1 = col_boxes[j, 0]
        by1 = col_boxes[j, 1]
        bx2 = col_boxes[j, 2]
        by2 = col_boxes[j, 3]
        area_j = mul(bx2 - bx1, by2 - by1)
        w = max(min(boxes[i, 2], bx2) - max(boxes[i, 0], bx1), T(0))
        h = max(min(boxes[i, 3], by2) - max(boxes[i, 1], by1), T(0))
        inter = mul(w, h)
        iou = inter / (area_i + area_j - inter)
        return np.float64(iou) > threshold

    @cuda.jit
    def iou_mask(boxes, categories, by_category, n, threshold, mask):
        row_tile = cuda.blockIdx.y
        col_tile = cuda.blockIdx.x
        # A box only suppresses boxes sorted after it: tiles left of the diagonal are unused.
        if col_tile < row_tile:
            return
        row_count = min(n - row_tile * NMS_TILE, NMS_TILE)
        col_count = min(n - col_tile * NMS_TILE, NMS_TILE)

        col_boxes = cuda.shared.array((NMS_TILE, 4), T)
        col_categories = cuda.shared.array(NMS_TILE, np.int64)
        t = cuda.threadIdx.x
        if t < col_count:
            j = col_tile * NMS_TILE + t
            for k in range(4):
                col_boxes[t, k] = boxes[j, k]
            if by_category:
                col_categories[t] = categories[j]
        cuda.syncthreads()
        if t >= row_count:
            return

        i = row_tile * NMS_TILE + t
        area_i = mul(boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1])
        category = categories[i] if by_category else 0
        bits = u64(0)
        start = t + 1 if row_tile == col_tile else 0
        for j in range(start, col_count):
            if by_category and col_categories[j] != category:
                continue
            if iou_above(boxes, i, col_boxes, j, area_i, threshold):
                bits |= one << u64(j)
        mask[i, col_tile] = bits

    @cuda.jit
    def reduce(mask, n, keep):
        tiles = mask.shape[1]
        removed = cuda.shared.array(0, U64_DTYPE)  # dynamic: size given at launch
        w = cuda.threadIdx.x
        while w < tiles:
            removed[w] = u64(0)
            w += cuda.blockDim.x
        cuda.syncthreads()

        for tile in range(tiles):
            # A private copy of the current word: boxes kept in this tile suppress later boxes
            # of the same tile without any synchronisation.
            current = removed[tile]
            count = min(n - tile * NMS_TILE, NMS_TILE)
            for b in range(count):
                i = tile * NMS_TILE + b
                if (current >> u64(b)) & one:
                    continue  # suppressed; keep[i] stays 0
                if cuda.threadIdx.x == 0:
                    keep[i] = 1
                current |= mask[i, tile]
                # Words of later tiles, spread over the threads (each word has one owner).
                w = tile + 1 + cuda.threadIdx.x
                while w < tiles:
                    removed[w] |= mask[i, w]
                    w += cuda.blockDim.x
            cuda.syncthreads()  # removed[tile + 1] is complete before anyone reads it

    return iou_mask, reduce


def _exact_multiply(dtype: np.dtype):
    """A multiply that the compiler may not fuse with a following add or subtract.

    On a GPU, ``a * b - c`` is normally contracted into one fused multiply-add, which skips the
    rounding of ``a * b``; NumPy rounds it. For IoUs at exactly the threshold that changes the
    answer, so the products go through libdevice's round-to-nearest multiply (``__nv_fmul_rn``),
    which the compiler keeps as is. The simulator runs plain Python, where ``*`` already rounds.
    """
    if config.ENABLE_CUDASIM:

        @cuda.jit(device=True)
        def mul(a, b):
            return a * b

        return mul
    from numba.cuda import libdevice

    return libdevice.fmul_rn if dtype == np.float32 else libdevice.dmul_rn
