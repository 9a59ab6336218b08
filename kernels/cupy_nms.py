"""Non-maximum suppression on the GPU with CuPy: the bitmask algorithm.

Read next to ``mrcnn_edu/nms.py`` (the NumPy reference, the single source of truth for what the
result must be). The greedy rule is inherently sequential -- whether box i survives depends on
which earlier boxes survived -- but the expensive part, the O(N^2) IoU tests, is not. So:

1. sort the boxes by decreasing score (stable: equal scores keep index order);
2. ``nms_iou_mask``: a grid of (N/64) x (N/64) blocks of 64 threads. Block (row, col) loads the 64
   boxes of tile ``col`` into shared memory; thread t compares box ``row*64 + t`` with them and
   writes one 64-bit word whose bit j says "IoU with box col*64 + j is above the threshold".
   Only tiles with ``col >= row`` matter: a box can only suppress boxes sorted after it;
3. ``nms_reduce``: one block walks the sorted boxes in order, the short sequential part. A box
   not yet marked as removed is kept, and its row of words is OR-ed into the ``removed`` bitmap
   (in shared memory, one word per tile, the words spread over the block's threads).

The result equals the NumPy reference exactly, because every IoU is computed with the same float
operations (see ``_SOURCE``: no fused multiply-add, the comparison in double precision).
"""

from __future__ import annotations

import numpy as np

from mrcnn_edu.backend import require_cupy

from ._common import NMS_TILE, CupyKernels, blocks_for, check_nms_args, nms_reduce_threads


def nms(boxes, scores, iou_threshold: float):
    """Greedy NMS of CuPy arrays; the same result as ``mrcnn_edu.nms.nms``.

    boxes: (N, 4) float32/float64 CuPy array ``(x1, y1, x2, y2)``; scores: (N,) float.
    iou_threshold: a box is dropped when its IoU with a kept box is ``> iou_threshold``.
    Returns (K,) int64 CuPy array of kept indices by decreasing score (ties: lower index first).
    """
    return _nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes, scores, idxs, iou_threshold: float):
    """NMS within each category; the same result as ``mrcnn_edu.nms.batched_nms``.

    boxes: (N, 4), scores: (N,), idxs: (N,) int category per box. Returns (K,) int64 CuPy array
    sorted by decreasing score.

    torchvision shifts every category's boxes by ``idx * (max_coord + 1)`` so that one plain NMS
    never sees two categories overlap. The shift changes the float rounding of the IoUs (the
    reference's docstring says so), so here the category goes into the mask kernel instead: a
    pair of boxes of different categories simply never sets its bit. Same effect, one integer
    compare per pair, and every IoU is computed on the original coordinates.
    """
    cp = require_cupy()
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must have shape {tuple(scores.shape)}, got {tuple(idxs.shape)}")
    return _nms(boxes, scores, cp.ascontiguousarray(idxs, dtype=cp.int64), iou_threshold)


# -- implementation ------------------------------------------------------------------------
def _nms(boxes, scores, categories, iou_threshold: float):
    cp = require_cupy()
    check_nms_args(boxes, scores)
    n = boxes.shape[0]
    if n == 0:
        return cp.empty((0,), dtype=cp.int64)

    # 1. sort. cupy.argsort is stable; "+ 0" turns -0.0 into +0.0, which a radix sort would
    #    otherwise order apart although they compare equal (NumPy keeps them in index order).
    order = cp.argsort(-scores + 0)
    sorted_boxes = cp.ascontiguousarray(boxes[order])
    dtype = sorted_boxes.dtype
    tiles = blocks_for(n, NMS_TILE)

    # 2. the IoU bitmask: mask[i, t] bit j <=> box i suppresses box t*64 + j (both sorted).
    #    Words left of the diagonal are never written and never read.
    mask = cp.empty((n, tiles), dtype=cp.uint64)
    if categories is None:
        kernel = _kernel("nms_iou_mask", dtype)
        args = (sorted_boxes, np.int32(n), np.float64(iou_threshold), mask, np.int32(tiles))
    else:
        kernel = _kernel("nms_iou_mask_by_category", dtype)
        sorted_categories = cp.ascontiguousarray(categories[order])
        args = (
            sorted_boxes,
            sorted_categories,
            np.int32(n),
            np.float64(iou_threshold),
            mask,
            np.int32(tiles),
        )
    kernel((tiles, tiles), (NMS_TILE,), args)

    # 3. the sequential sweep, one word per tile in shared memory. check_nms_args bounds the
    #    mask at 2^31 words, so tiles <= 5792 and the bitmap fits the 48 KiB every kernel gets.
    keep = cp.empty((n,), dtype=cp.uint8)
    reduce = _kernel("nms_reduce", None)
    reduce(
        (1,),
        (nms_reduce_threads(tiles),),
        (mask, np.int32(n), np.int32(tiles), keep),
        shared_mem=tiles * 8,
    )
    return order[cp.flatnonzero(keep)].astype(cp.int64)


_SOURCE = r"""
// One thread per box of a row tile, one block per (row tile, column tile) pair.
#define TILE 64

template <typename T>
__device__ __forceinline__ bool iou_above(const T* a, T area_a, const T* b, double threshold) {
  // The reference's float operations, in its order: area = (x2 - x1) * (y2 - y1),
  // union = (area_a + area_b) - inter, IoU = inter / union in T, compared in double.
  // (The module is compiled with --fmad=false: a fused multiply-add would round differently.)
  T area_b = (b[2] - b[0]) * (b[3] - b[1]);
  T w = max(min(a[2], b[2]) - max(a[0], b[0]), (T)0);
  T h = max(min(a[3], b[3]) - max(a[1], b[1]), (T)0);
  T inter = w * h;
  T iou = inter / (area_a + area_b - inter);
  return (double)iou > threshold;   // NaN (0/0 for two empty boxes) compares false: kept
}

template <typename T, bool BY_CATEGORY>
__device__ void iou_mask_tile(const T* boxes, const long long* categories, int n,
                              double threshold, unsigned long long* mask, int tiles) {
  const int row_tile = blockIdx.y;
  const int col_tile = blockIdx.x;
  // A box only ever suppresses boxes sorted after it: skip tiles left of the diagonal.
  if (col_tile < row_tile) return;
  const int row_count = min(n - row_tile * TILE, TILE);
  const int col_count = min(n - col_tile * TILE, TILE);

  // The column tile's boxes are read by all 64 threads: stage them in shared memory once.
  __shared__ T col_boxes[TILE * 4];
  __shared__ long long col_categories[TILE];
  const int t = threadIdx.x;
  if (t < col_count) {
    const int j = col_tile * TILE + t;
    for (int k = 0; k < 4; ++k) col_boxes[t * 4 + k] = boxes[j * 4 + k];
    if (BY_CATEGORY) col_categories[t] = categories[j];
  }
  __syncthreads();
  if (t >= row_count) return;

  const int i = row_tile * TILE + t;
  const T* a = boxes + i * 4;
  const T area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const long long category = BY_CATEGORY ? categories[i] : 0;
  unsigned long long bits = 0;
  // On the diagonal tile, compare only with the boxes after box i.
  for (int j = (row_tile == col_tile) ? t + 1 : 0; j < col_count; ++j) {
    if (BY_CATEGORY && col_categories[j] != category) continue;
    if (iou_above(a, area_a, col_boxes + j * 4, threshold)) bits |= 1ULL << j;
  }
  mask[(long long)i * tiles + col_tile] = bits;
}

template <typename T>
__global__ void nms_iou_mask(const T* boxes, int n, double threshold,
                             unsigned long long* mask, int tiles) {
  iou_mask_tile<T, false>(boxes, nullptr, n, threshold, mask, tiles);
}

template <typename T>
__global__ void nms_iou_mask_by_category(const T* boxes, const long long* categories, int n,
                                         double threshold, unsigned long long* mask, int tiles) {
  iou_mask_tile<T, true>(boxes, categories, n, threshold, mask, tiles);
}

// The greedy sweep, in one block. removed[w] bit b: box w*64 + b is suppressed by a kept box.
extern "C" __global__ void nms_reduce(const unsigned long long* mask, int n, int tiles,
                                      unsigned char* keep) {
  extern __shared__ unsigned long long removed[];
  for (int w = threadIdx.x; w < tiles; w += blockDim.x) removed[w] = 0;
  __syncthreads();

  for (int tile = 0; tile < tiles; ++tile) {
    // Every thread keeps its own copy of the current word: boxes kept in this tile suppress
    // later boxes of the same tile, and a private copy needs no synchronisation.
    unsigned long long current = removed[tile];
    const int count = min(n - tile * TILE, TILE);
    for (int b = 0; b < count; ++b) {
      const int i = tile * TILE + b;
      const bool kept = !((current >> b) & 1ULL);
      if (threadIdx.x == 0) keep[i] = kept;
      if (!kept) continue;
      const unsigned long long* row = mask + (long long)i * tiles;
      current |= row[tile];
      // Later tiles' words: word w is owned by thread (w - tile - 1) % blockDim.x during this
      // tile, so no two threads write the same word.
      for (int w = tile + 1 + threadIdx.x; w < tiles; w += blockDim.x) removed[w] |= row[w];
    }
    // removed[tile + 1] must be complete before any thread reads it.
    __syncthreads();
  }
}
"""

_TEMPLATED = ("nms_iou_mask", "nms_iou_mask_by_category")
_CTYPES = CupyKernels.CTYPES
_OPTIONS = ("--std=c++17", "--fmad=false")


_KERNELS = CupyKernels(_SOURCE, _TEMPLATED, _OPTIONS)


def _kernel(name: str, dtype):
    return _KERNELS.get(name, dtype)
