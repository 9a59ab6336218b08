"""Inference post-processing: detections from the box head, and masks pasted into the image.

Detections (torchvision's ``postprocess_detections``): per-class boxes decoded from the deltas,
clipped, background dropped, low scores removed, per-class NMS, the best ``detections_per_img``.

Pasting a 28x28 mask into its box is a resampling problem, like RoIAlign in reverse: every image
pixel centre inside the box is mapped to continuous mask coordinates and the mask is sampled
bilinearly there (Detectron2's ``paste_masks_in_image``), with no rounding of the box. Bilinear
sampling is separable, so one mask is pasted as ``Wy @ mask @ Wx.T`` with two small
interpolation matrices. ``mode="torchvision"`` pastes as torchvision does instead (the box
rounded to whole pixels, the mask resized onto them), which its published weights are measured
with (docs/conventions.md section 11).
"""

from __future__ import annotations

import numpy as np

from .backend import get_xp, to_host
from .boxes import BoxCoder, clip_boxes_to_image, remove_small_boxes
from .nms import batched_nms
from .resample import resize_image

# How a 28x28 mask is put back into its image: our sub-pixel bilinear paste, or torchvision's.
MASK_PASTE_MODES = ("subpixel", "torchvision")


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


def paste_masks_in_image(
    masks,
    boxes,
    image_size: tuple[int, int],
    threshold: float | None = 0.5,
    mode: str = "subpixel",
):
    """Paste per-box mask probabilities into full-image masks.

    masks: (D, M, M) probabilities for each box; boxes: (D, 4) in image pixels; image_size:
    (h, w). Returns (D, h, w): uint8 ``prob > threshold``, or the float probabilities when
    ``threshold`` is None. ``mode`` says how a mask is resampled into its box:

    - ``"subpixel"`` (the default, Detectron2's): mask cell (i, j) covers box fraction
      [j/M, (j+1)/M) horizontally, so image pixel centre x + 0.5 samples the mask at
      u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5, with zeros outside the mask (the mask fades
      to 0 over half a cell at the box border); the box is never rounded.
    - ``"torchvision"``: torchvision's ``paste_masks_in_image``, to reproduce its masks
      (:func:`torchvision_paste_boxes`: the mask padded by one zero cell, the box grown by the
      same ratio and truncated to whole pixels, the padded mask resized bilinearly onto those
      pixels, end pixel included).
    """
    if mode not in MASK_PASTE_MODES:
        raise ValueError(f"mask paste mode must be one of {list(MASK_PASTE_MODES)}, got {mode!r}")
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
    if mode == "torchvision":
        place, boxes = _torchvision_patch, torchvision_paste_boxes(boxes, masks.shape[1])
    else:
        place, boxes = _subpixel_patch, to_host(boxes)
    for k in range(d):
        placed = place(masks[k], boxes[k], (h, w), xp)
        if placed is None:
            continue
        (r0, r1, c0, c1), patch = placed
        out[k, r0:r1, c0:c1] = patch > threshold if threshold is not None else patch
    return out


def torchvision_paste_boxes(boxes, mask_size: int, padding: int = 1) -> np.ndarray:
    """The whole-pixel boxes torchvision pastes (M + 2 * padding)-cell padded masks into:
    each box grown about its centre by ``(M + 2 * padding) / M`` (so the padded mask keeps
    the original cells' scale), in the boxes' float dtype, then truncated toward zero to int64.
    A pasted box covers pixels x1..x2 and y1..y2, both ends included (torchvision's
    ``TO_REMOVE = 1``). Returns (D, 4) int64 on the host."""
    b = to_host(boxes)
    b = b.astype(b.dtype if b.dtype.kind == "f" else np.float32)
    half = b.dtype.type(0.5)
    scale = b.dtype.type((mask_size + 2 * padding) / mask_size)
    w_half = (b[:, 2] - b[:, 0]) * half * scale
    h_half = (b[:, 3] - b[:, 1]) * half * scale
    x_c = (b[:, 2] + b[:, 0]) * half
    y_c = (b[:, 3] + b[:, 1]) * half
    grown = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
    return grown.astype(np.int64)  # C-style conversion: truncation toward zero


def _torchvision_patch(mask, box, image_size, xp):
    """torchvision's paste of one (M, M) mask into the whole-pixel ``box`` (int64 x1, y1, x2,
    y2, ends included): the mask padded by one zero cell, resized bilinearly to the box's
    pixels and cropped to the image. Returns ``((r0, r1, c0, c1), patch)`` or None."""
    x1, y1, x2, y2 = (int(v) for v in box)
    r0, r1 = max(y1, 0), min(y2 + 1, int(image_size[0]))
    c0, c1 = max(x1, 0), min(x2 + 1, int(image_size[1]))
    if r1 <= r0 or c1 <= c0:
        return None
    size = (max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1))
    resized = resize_image(xp.pad(mask, 1)[None], size)[0]
    return (r0, r1, c0, c1), resized[r0 - y1 : r1 - y1, c0 - x1 : c1 - x1]


def _subpixel_patch(mask, box, image_size, xp):
    """The sub-pixel paste of one (M, M) mask into ``box`` (float x1, y1, x2, y2):
    ``Wy @ mask @ Wx.T``. Returns ``((r0, r1, c0, c1), patch)`` or None."""
    x1, y1, x2, y2 = (float(v) for v in box)
    m = mask.shape[0]
    rows, wy = _paste_weights(y1, y2, m, int(image_size[0]), xp, mask.dtype)
    cols, wx = _paste_weights(x1, x2, m, int(image_size[1]), xp, mask.dtype)
    if wy is None or wx is None:
        return None
    return (rows[0], rows[1], cols[0], cols[1]), wy @ mask @ wx.T


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
