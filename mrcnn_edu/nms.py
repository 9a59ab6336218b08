"""Non-maximum suppression: keep the best box of every cluster of overlapping boxes.

Greedy NMS (the rule of torchvision.ops.nms, written down in docs/conventions.md): visit boxes by
decreasing score; keep a box unless a box kept before it overlaps it with IoU *strictly greater*
than the threshold.
Equal scores are visited in index order (a stable sort), which is also what torchvision's CPU
kernel does; the tests check both facts against torchvision.

The NumPy version is vectorised in tiles of the score-sorted boxes, never with a Python loop over
all pairs and never with an N x N matrix in memory:

1. inside a tile of ``TILE`` consecutive boxes, the still-alive boxes' pairwise "IoU > t"
   matrix is computed at once and resolved greedily with a short pass over its rows
   (only rows that overlap something matter);
2. the boxes kept in that tile then suppress, in one vectorised step per column chunk, every
   later box that is still alive.

Work is proportional to (kept boxes) x (alive boxes), so crowded scenes -- where most boxes are
suppressed early -- are cheap, and memory stays at ``TILE x COLUMN_CHUNK`` floats.

On the GPU (CuPy arrays) ``nms`` validates and then calls the kernel returned by
``backend.device_kernel(boxes, "nms", "nms")``; this module never imports cupy.
"""

from __future__ import annotations

import numpy as np

from .backend import device_kernel, get_xp, is_device_array, raise_if
from .boxes import validate_boxes

TILE = 256  # rows resolved together; the in-tile greedy pass is O(TILE) Python steps
COLUMN_CHUNK = 2048  # later boxes tested per vectorised step: TILE x 2048 floats fit in cache


def nms(boxes, scores, iou_threshold: float):
    """Greedy non-maximum suppression, identical to ``torchvision.ops.nms``.

    boxes: (N, 4) float32/float64 ``(x1, y1, x2, y2)`` with ``x1 <= x2``, ``y1 <= y2``, finite.
    scores: (N,) float, no NaN. iou_threshold: a box is dropped when its IoU with a
    higher-scoring kept box is ``> iou_threshold`` (an IoU exactly equal survives).
    Returns (K,) int64 indices of the kept boxes, by decreasing score (ties: lower index first).
    """
    boxes, scores, iou_threshold = _validate(boxes, scores, iou_threshold)
    if is_device_array(boxes):
        return device_kernel(boxes, "nms", "nms")(boxes, scores, iou_threshold)
    if boxes.shape[0] == 0:
        return np.empty((0,), dtype=np.int64)
    return _nms_tiled(boxes, scores, iou_threshold)


def batched_nms(boxes, scores, idxs, iou_threshold: float):
    """NMS independently within each category; boxes of different categories never compete.

    boxes: (N, 4), scores: (N,), idxs: (N,) int category of each box (for the RPN: the FPN
    level). Returns (K,) int64 indices sorted by decreasing score (ties: lower index first).

    Runs ``nms`` once per category (torchvision's "vanilla" path). torchvision switches to
    shifting each category's boxes by ``idx * (max_coord + 1)`` for small inputs; the shift
    changes float rounding, so exact-threshold ties may differ there, while this loop computes
    every IoU on the original coordinates.
    """
    boxes, scores, iou_threshold = _validate(boxes, scores, iou_threshold)
    xp = get_xp(boxes)
    if not hasattr(idxs, "ndim"):
        idxs = xp.asarray(idxs)
    if idxs.shape != scores.shape or not np.issubdtype(idxs.dtype, np.integer):
        raise ValueError(
            f"idxs must be an integer array of shape {tuple(scores.shape)} (one category per "
            f"box), got dtype {idxs.dtype} and shape {tuple(idxs.shape)}"
        )
    if boxes.shape[0] == 0:
        return xp.empty((0,), dtype=xp.int64)
    if is_device_array(boxes):
        try:  # one kernel launch for all categories when the GPU module provides it
            return device_kernel(boxes, "nms", "batched_nms")(boxes, scores, idxs, iou_threshold)
        except NotImplementedError:
            pass  # fall back to one nms call (one kernel) per category
    keep_mask = xp.zeros(boxes.shape[0], dtype=bool)
    for category in xp.unique(idxs).tolist():
        members = xp.flatnonzero(idxs == category)
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = xp.flatnonzero(keep_mask)
    return kept[_argsort_descending(scores[kept])].astype(xp.int64)


# -- helpers -------------------------------------------------------------------------------
def _validate(boxes, scores, iou_threshold):
    """Shapes, dtypes and values of an NMS call; raises ValueError naming the problem."""
    boxes = validate_boxes(boxes, "boxes", check_order=True, finite=True)
    xp = get_xp(boxes)
    if not hasattr(scores, "ndim"):
        scores = np.asarray(scores)
    if get_xp(scores) is not xp:
        raise ValueError(
            "boxes and scores must live on the same device (both NumPy or both CuPy arrays)"
        )
    if scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"scores must have shape ({boxes.shape[0]},), one per box, got {tuple(scores.shape)}"
        )
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(xp.float64)
    if scores.size:
        raise_if(
            xp.isnan(scores).any(),
            lambda: ValueError(
                "scores contain NaN; NaN cannot be ranked -- check the model's outputs"
            ),
        )
    iou_threshold = float(iou_threshold)
    if iou_threshold != iou_threshold:
        raise ValueError("iou_threshold is NaN; pass a number such as 0.5 or 0.7")
    return boxes, scores, iou_threshold


def _argsort_descending(scores):
    """Indices that sort ``scores`` descending, equal scores in index order (stable)."""
    xp = get_xp(scores)
    return xp.argsort(-scores, kind="stable")


def _iou_above(boxes_a, area_a, boxes_b, area_b, threshold):
    """(len(a), len(b)) bool: IoU > threshold, with torchvision's float operations.

    The IoU is computed in the boxes' dtype as ``inter / (area_a + area_b - inter)``, then
    compared with the threshold in float64 -- torchvision's C++ compares a float IoU with a
    double threshold, and rounding the threshold to float32 would flip IoUs equal to it.
    Temporaries are reused (``out=``): this is the hot loop, and allocation halves its speed.
    """
    left = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    inter_w = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    inter_w -= left
    np.maximum(inter_w, 0, out=inter_w)
    top = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1], out=left)
    inter_h = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    inter_h -= top
    np.maximum(inter_h, 0, out=inter_h)
    inter = inter_w
    inter *= inter_h
    union = np.add(area_a[:, None], area_b[None, :], out=inter_h)
    union -= inter
    iou = inter
    iou /= union
    return iou > np.float64(threshold)


def _nms_tiled(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    order = _argsort_descending(scores)
    sorted_boxes = np.ascontiguousarray(boxes[order])
    area = (sorted_boxes[:, 2] - sorted_boxes[:, 0]) * (sorted_boxes[:, 3] - sorted_boxes[:, 1])
    n = sorted_boxes.shape[0]
    suppressed = np.zeros(n, dtype=bool)
    kept_chunks = []
    for start in range(0, n, TILE):
        stop = min(start + TILE, n)
        alive = start + np.flatnonzero(~suppressed[start:stop])
        if alive.size == 0:
            continue

        # 1. greedy inside the tile. over[i, j] (i < j): box i would suppress box j if kept.
        over = _iou_above(
            sorted_boxes[alive], area[alive], sorted_boxes[alive], area[alive], threshold
        )
        over = np.triu(over, k=1)
        removed = np.zeros(alive.size, dtype=bool)
        # rows are final once all earlier rows are applied, so one pass in order suffices; rows
        # overlapping nothing cannot remove anything and are skipped
        for i in np.flatnonzero(over.any(axis=1)):
            if not removed[i]:
                removed |= over[i]
        kept = alive[~removed]
        kept_chunks.append(kept)

        # 2. the tile's kept boxes suppress every later alive box they overlap
        kept_boxes, kept_area = sorted_boxes[kept], area[kept]
        for col in range(stop, n, COLUMN_CHUNK):
            later = col + np.flatnonzero(~suppressed[col : col + COLUMN_CHUNK])
            if later.size:
                hit = _iou_above(kept_boxes, kept_area, sorted_boxes[later], area[later], threshold)
                suppressed[later[hit.any(axis=0)]] = True
    return order[np.concatenate(kept_chunks)].astype(np.int64)
