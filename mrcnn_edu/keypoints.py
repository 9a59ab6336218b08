"""Human pose (Mask R-CNN, Sec. 5): keypoint targets on each RoI's grid, their loss, and the
decoding of predicted heatmaps back to image pixels, with torchvision's ``keypointrcnn`` rules.

A keypoint is a one-hot m x m mask (m = 56): the RoI's box is cut into an m x m grid and the
keypoint's target is the one cell it falls in. The keypoint head predicts one m x m map of
logits per keypoint and RoI, and the loss is a softmax cross-entropy over the m² cells of each
keypoint -- "which one of m² locations", not m² independent yes/no pixels as in the mask
branch -- averaged over the labelled keypoints (docs/keypoints.md says why).

**Formats** (COCO's convention; the data loaders, the model and the evaluation share them):

- a target's ``keypoints``: (G, K, 3) float rows ``(x, y, v)``, one (K, 3) block per GT box, in
  image pixels; ``v`` = 0 not labelled (``x = y = 0``), 1 labelled but hidden, 2 visible.
  Every keypoint with ``v > 0`` is trained (torchvision's rule), so COCO's hidden-but-labelled
  keypoints count;
- a prediction's ``keypoints``: (D, K, 3) rows ``(x, y, 1)`` in image pixels, and
  ``keypoints_scores`` (D, K): the upsampled heatmap's logit at the chosen location.

**Targets** (torchvision's ``keypoints_to_heatmap``), for an RoI ``(x1, y1, x2, y2)``::

    col = floor((x - x1) * (m / (x2 - x1))),   row = floor((y - y1) * (m / (y2 - y1)))
    x == x2 exactly -> col = m - 1 (likewise y): the RoI's right/bottom edge is inside it
    target = row * m + col;  no loss where v == 0 or (row, col) falls outside the m x m grid

**Decoding** (torchvision's ``heatmaps_to_keypoints``), per RoI with ``w = max(x2 - x1, 1)``
and ``h = max(y2 - y1, 1)``: the K maps are resized bicubically (``align_corners=False``,
a = -0.75, :func:`resize_bicubic`) to ``ceil(h) x ceil(w)`` pixels; the argmax of each (the
first maximum in row-major order) at ``(row r, column c)`` gives
``x = (c + 0.5) * (w / ceil(w)) + x1``, ``y = (r + 0.5) * (h / ceil(h)) + y1`` -- the centre of
the chosen pixel, stretched back to the box's true size -- and the score is the resized map's
value there.
"""

from __future__ import annotations

import numpy as np

from .backend import get_xp
from .nn.losses import softmax_cross_entropy

CUBIC_A = -0.75  # the free parameter of Keys' cubic kernel in torch's bicubic resize
VISIBILITY_VALUES = (0, 1, 2)  # COCO: not labelled, labelled but hidden, visible


# ------------------------------------------------------------------------------------------------
# Targets and loss
# ------------------------------------------------------------------------------------------------
def keypoints_to_heatmap(keypoints, rois, heatmap_size: int):
    """Each keypoint's cell on its RoI's ``heatmap_size`` x ``heatmap_size`` grid.

    keypoints: (P, K, 3) rows ``(x, y, v)``, the GT keypoints matched to each RoI; rois: (P, 4)
    boxes in image pixels. Returns ``(index, valid)``, both (P, K): ``index`` (int64) is
    ``row * m + col`` where ``valid`` and 0 elsewhere; ``valid`` (bool) says the keypoint has
    ``v > 0`` and falls inside the grid (the rule in the module docstring, computed in the
    boxes' dtype as torchvision does)."""
    xp = get_xp(keypoints, rois)
    m = int(heatmap_size)
    size = rois.dtype.type(m)
    cells = []
    for axis in (0, 1):  # x then y
        low, high = rois[:, axis][:, None], rois[:, axis + 2][:, None]
        coord = keypoints[..., axis].astype(rois.dtype, copy=False)
        cell = xp.floor((coord - low) * (size / (high - low)))
        cells.append(xp.where(coord == high, m - 1, cell))  # on the far edge: the last cell
    col, row = cells
    # compared as floats: a NaN (zero-size box) is simply invalid instead of a bad int cast
    inside = (col >= 0) & (row >= 0) & (col < m) & (row < m)
    valid = inside & (keypoints[..., 2] > 0)
    index = xp.where(valid, row * m + col, 0).astype(np.int64)
    return index, valid


def keypointrcnn_loss(keypoint_logits, rois, gt_keypoints, matched_idxs):
    """The keypoint loss of the positive RoIs, torchvision's ``keypointrcnn_loss``.

    keypoint_logits: (P, K, m, m) heatmap logits of the P positive RoIs, in image order;
    rois: per-image lists of their boxes (P_i, 4); gt_keypoints: per image (G_i, K, 3);
    matched_idxs: per image (P_i,) the GT index each RoI was matched to.

    Every keypoint with a valid target (:func:`keypoints_to_heatmap`) contributes a softmax
    cross-entropy over its m² logits; the loss is their mean. Returns ``(loss,
    grad_logits)``; the gradient is ``(softmax - onehot) / (number of valid keypoints)`` on
    valid keypoints and exactly 0 on the others (invisible, unlabelled or outside the RoI).
    No valid keypoint at all (or no RoI) gives loss 0 and a zero gradient, as torchvision's
    ``keypoint_logits.sum() * 0``.
    """
    xp = get_xp(keypoint_logits)
    if keypoint_logits.ndim != 4 or keypoint_logits.shape[2] != keypoint_logits.shape[3]:
        raise ValueError(
            f"keypoint_logits must be (P, K, m, m) square heatmaps, got {keypoint_logits.shape}"
        )
    p, k, m, _ = keypoint_logits.shape
    index, valid = [], []
    for boxes, gt, matched in zip(rois, gt_keypoints, matched_idxs, strict=True):
        i, v = keypoints_to_heatmap(gt[matched], boxes, m)
        index.append(i.reshape(-1))
        valid.append(v.reshape(-1))
    if sum(int(i.size) for i in index) != p * k:
        raise ValueError(
            f"keypoint_logits has {p} RoIs of {k} keypoints, the targets "
            f"{sum(int(i.size) for i in index)} keypoints in all: they must match"
        )
    if p * k == 0:
        return 0.0, xp.zeros_like(keypoint_logits)
    labels = xp.where(xp.concatenate(valid), xp.concatenate(index), -1)
    loss, grad = softmax_cross_entropy(keypoint_logits.reshape(p * k, m * m), labels, -1)
    return loss, grad.reshape(keypoint_logits.shape)


def check_keypoints(keypoints, num_boxes: int, num_keypoints: int, where: str, dtype):
    """A target's ``keypoints`` as a (G, K, 3) array of ``dtype``, or a ValueError naming
    ``where`` (``"targets[0]['keypoints']"``) and the problem: the shape, a non-numeric dtype,
    NaN or inf, a visibility other than 0, 1 or 2."""
    if keypoints is None:
        raise ValueError(
            f"{where} is missing: a model with num_keypoints={num_keypoints} trains on "
            f"({num_boxes}, {num_keypoints}, 3) rows (x, y, visibility) per image"
        )
    xp = get_xp(keypoints)
    kp = xp.asarray(keypoints)
    shape = (num_boxes, num_keypoints, 3)
    if kp.shape != shape:
        raise ValueError(
            f"{where} must have shape (boxes, keypoints, 3) = {shape}: rows (x, y, v) in "
            f"image pixels for each of the {num_boxes} boxes, got {kp.shape}"
        )
    if kp.dtype.kind not in "iuf":
        raise ValueError(f"{where} must be numbers (x, y, v), got dtype {kp.dtype}")
    kp = kp.astype(dtype)
    if not bool(xp.isfinite(kp).all()):
        raise ValueError(f"{where} holds NaN or inf; an unlabelled keypoint is (0, 0, 0)")
    v = kp[..., 2]
    if not bool(((v == 0) | (v == 1) | (v == 2)).all()):
        raise ValueError(
            f"{where}: visibility (the third value) must be 0 (not labelled), 1 (hidden) or "
            f"2 (visible), COCO's convention; got {sorted(set(to_list(v)) - {0, 1, 2})[:5]}"
        )
    return kp


def to_list(a) -> list:
    """A NumPy or CuPy array's values as a Python list (for error messages)."""
    return a.get().ravel().tolist() if hasattr(a, "get") else np.asarray(a).ravel().tolist()


# ------------------------------------------------------------------------------------------------
# Decoding: heatmaps -> keypoints
# ------------------------------------------------------------------------------------------------
def cubic_taps(n_in: int, n_out: int, dtype=np.float32):
    """The four taps of each output pixel of torch's bicubic resize (``align_corners=False``)
    along an axis of ``n_in`` pixels resized to ``n_out``.

    Output pixel ``i`` reads the input at ``s = (n_in / n_out) * (i + 0.5) - 0.5`` (not clamped
    at 0, unlike the bilinear rule), ``i0 = floor(s)``, ``t = s - i0``; its taps are pixels
    ``i0 - 1 .. i0 + 2``, each clamped into ``[0, n_in - 1]`` (the border pixel repeats), with
    weights ``W(t + 1), W(t), W(1 - t), W((1 - t) + 1)`` of Keys' cubic kernel (a = -0.75)::

        W(d) = ((a + 2) d - (a + 3)) d² + 1           for d <= 1
        W(d) = ((a d - 5a) d + 8a) d - 4a             for 1 < d < 2

    computed in ``dtype`` in that order (torch's). Returns ``(index (n_out, 4) int64,
    weight (n_out, 4) dtype)``; each row of weights sums to 1 (up to rounding)."""
    f = np.dtype(dtype).type
    a = f(CUBIC_A)
    ratio = f(n_in) / f(n_out)
    # torch: the ratio in dtype, the source position in double, rounded once to dtype
    src = (np.float64(ratio) * (np.arange(n_out) + 0.5) - 0.5).astype(f)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    t = np.clip(src - i0.astype(f), f(0), f(1)).astype(f)

    def near(d):  # |d| <= 1
        return ((a + f(2)) * d - (a + f(3))) * d * d + f(1)

    def far(d):  # 1 < |d| < 2
        return ((a * d - f(5) * a) * d + f(8) * a) * d - f(4) * a

    rest = (f(1) - t).astype(f)
    weight = np.stack([far(t + f(1)), near(t), near(rest), far(rest + f(1))], axis=1)
    index = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    return index, weight.astype(f)


def resize_bicubic(maps, size: tuple[int, int]):
    """Bicubic resize (``align_corners=False``, a = -0.75) of (..., H, W) maps to ``size``
    ``(h, w)``, torch's ``interpolate(mode="bicubic")``: along x first, then along y, each
    output a four-tap sum ``((x0 w0 + x1 w1) + x2 w2) + x3 w3`` (:func:`cubic_taps`)."""
    xp = get_xp(maps)
    out = maps
    for axis, n_out in ((-1, int(size[1])), (-2, int(size[0]))):
        index, weight = (xp.asarray(a) for a in cubic_taps(maps.shape[axis], n_out, maps.dtype))
        shape = [1] * maps.ndim
        shape[axis] = n_out
        acc = None
        for j in range(4):
            tap = xp.take(out, index[:, j], axis=axis) * weight[:, j].reshape(shape)
            acc = tap if acc is None else acc + tap
        out = acc
    return out


def heatmaps_to_keypoints(maps, rois):
    """Keypoints and their scores from heatmaps, torchvision's ``heatmaps_to_keypoints``.

    maps: (R, K, m, m) heatmap logits; rois: (R, 4) the boxes they were pooled from (image
    pixels). Returns ``(keypoints (R, K, 3), scores (R, K))``, in ``maps``' dtype: rows
    ``(x, y, 1)`` at the argmax of each map resized bicubically onto the box's
    ``ceil(h) x ceil(w)`` pixels (the rule in the module docstring), and that resized value.
    """
    xp = get_xp(maps, rois)
    if maps.ndim != 4 or rois.shape != (maps.shape[0], 4):
        raise ValueError(
            f"maps must be (R, K, m, m) and rois (R, 4), got {maps.shape} and {rois.shape}"
        )
    r, k = int(maps.shape[0]), int(maps.shape[1])
    f = maps.dtype.type
    rois = rois.astype(maps.dtype, copy=False)
    widths = xp.maximum(rois[:, 2] - rois[:, 0], f(1))
    heights = xp.maximum(rois[:, 3] - rois[:, 1], f(1))
    keypoints = xp.ones((r, k, 3), dtype=maps.dtype)
    scores = xp.zeros((r, k), dtype=maps.dtype)
    for i, (w, h) in enumerate(zip(to_list(xp.ceil(widths)), to_list(xp.ceil(heights)))):
        w, h = int(w), int(h)
        resized = resize_bicubic(maps[i], (h, w)).reshape(k, h * w)
        best = xp.argmax(resized, axis=1)
        col, row = best % w, best // w
        keypoints[i, :, 0] = (col.astype(maps.dtype) + f(0.5)) * (widths[i] / f(w)) + rois[i, 0]
        keypoints[i, :, 1] = (row.astype(maps.dtype) + f(0.5)) * (heights[i] / f(h)) + rois[i, 1]
        scores[i] = resized[xp.arange(k), best]
    return keypoints, scores
