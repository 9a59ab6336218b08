"""Inference post-processing: detections from the box head, and masks pasted into the image.

Detections (torchvision's ``postprocess_detections``): per-class boxes decoded from the deltas,
clipped, background dropped, low scores removed, per-class NMS, the best ``detections_per_img``.

Pasting a 28x28 mask into its box is a resampling problem, like RoIAlign in reverse: every image
pixel centre inside the box is mapped to continuous mask coordinates and the mask is sampled
bilinearly there (Detectron2's ``paste_masks_in_image``), with no rounding of the box. Bilinear
sampling is separable, so one mask is pasted as ``Wy @ mask @ Wx.T`` with two small
interpolation matrices.
"""

from __future__ import annotations

import numpy as np

from .backend import get_xp
from .boxes import BoxCoder, clip_boxes_to_image, remove_small_boxes
from .nms import batched_nms


def postprocess_detections(
    class_logits,
    box_deltas,
    proposals,
    image_size: tuple[int, int],
    box_coder: BoxCoder,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
):
    """Final boxes, scores and labels for one image.

    class_logits: (R, K+1); box_deltas: (R, 4(K+1)); proposals: (R, 4); image_size: (h, w).
    Returns ``(boxes (D, 4), scores (D,), labels (D,) int64 in 1..K)``, best first.
    """
    xp = get_xp(class_logits)
    r, num_classes = class_logits.shape
    z = class_logits - class_logits.max(axis=1, keepdims=True)
    scores = xp.exp(z)
    scores /= scores.sum(axis=1, keepdims=True)
    boxes = box_coder.decode(box_deltas, proposals).reshape(r * num_classes, 4)
    boxes = clip_boxes_to_image(boxes, image_size).reshape(r, num_classes, 4)
    labels = xp.broadcast_to(xp.arange(num_classes), (r, num_classes))
    # every (RoI, class) pair is a candidate detection; the background column is not
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = labels[:, 1:].reshape(-1)
    keep = xp.flatnonzero(scores > score_thresh)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = remove_small_boxes(boxes, min_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return boxes[keep], scores[keep], labels[keep].astype(np.int64)


def paste_masks_in_image(masks, boxes, image_size: tuple[int, int], threshold: float | None = 0.5):
    """Paste per-box mask probabilities into full-image masks.

    masks: (D, M, M) probabilities for each box; boxes: (D, 4) in image pixels; image_size:
    (h, w). Returns (D, h, w): uint8 ``prob > threshold``, or the float probabilities when
    ``threshold`` is None. Mask cell (i, j) covers box fraction [j/M, (j+1)/M) horizontally, so
    image pixel centre x + 0.5 samples the mask at u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5,
    with zeros outside the mask (the mask fades to 0 over half a cell at the box border).
    """
    xp = get_xp(masks)
    h, w = int(image_size[0]), int(image_size[1])
    d = masks.shape[0]
    out = xp.zeros((d, h, w), dtype=np.uint8 if threshold is not None else masks.dtype)
    if d == 0:
        return out
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or boxes.shape != (d, 4):
        raise ValueError(
            f"paste_masks_in_image expects masks (D, M, M) and boxes (D, 4), got "
            f"{masks.shape} and {boxes.shape}"
        )
    m = masks.shape[1]
    for k in range(d):
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        rows, wy = _paste_weights(y1, y2, m, h, xp, masks.dtype)
        cols, wx = _paste_weights(x1, x2, m, w, xp, masks.dtype)
        if wy is None or wx is None:
            continue
        patch = wy @ masks[k] @ wx.T
        if threshold is not None:
            patch = patch > threshold
        out[k, rows[0] : rows[1], cols[0] : cols[1]] = patch
    return out


def _paste_weights(lo: float, hi: float, m: int, size: int, xp, dtype):
    """Pixel range [start, stop) touched by the box along one axis, and the (stop-start, M)
    bilinear interpolation matrix from mask cells to those pixels (zero padding outside)."""
    extent = max(hi - lo, 1e-6)
    cell = extent / m
    # pixels whose centre lies within half a cell of the box can receive mask weight
    start = max(int(np.floor(lo - 0.5 * cell)), 0)
    stop = min(int(np.ceil(hi + 0.5 * cell)), size)
    if stop <= start:
        return None, None
    centres = np.arange(start, stop, dtype=np.float64) + 0.5
    u = (centres - lo) / extent * m - 0.5
    i0 = np.floor(u).astype(np.int64)
    frac = u - i0
    weights = np.zeros((stop - start, m), dtype=np.float64)
    rows = np.arange(stop - start)
    for idx, wgt in ((i0, 1.0 - frac), (i0 + 1, frac)):
        valid = (idx >= 0) & (idx < m)
        weights[rows[valid], idx[valid]] += wgt[valid]
    return (start, stop), xp.asarray(weights.astype(dtype))
