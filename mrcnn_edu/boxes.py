"""Axis-aligned boxes: area, IoU, clipping, and the Faster R-CNN box parametrisation.

Boxes are ``(x1, y1, x2, y2)`` in image pixels with area ``(x2 - x1) * (y2 - y1)`` -- no "+1"
anywhere (the torchvision convention, see docs/conventions.md). Every function works on NumPy or
CuPy arrays (``xp = get_xp(boxes)``) and keeps the input's floating dtype, so float32 results
agree bit for bit with torchvision's float32 ones.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import get_xp, raise_if

# exp(dw) is clamped at 1000/16: a box may grow at most ~62x wider than its anchor in one decode.
# Without the clamp a wild early-training delta sends exp() to inf and the proposals to NaN.
DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes):
    """Area of each box.

    boxes: (N, 4) float, ``(x1, y1, x2, y2)``.
    Returns (N,) in the same dtype.
    """
    boxes = validate_boxes(boxes, "boxes")
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1, boxes2):
    """Pairwise intersection-over-union, the same numbers as ``torchvision.ops.box_iou``.

    boxes1: (N, 4), boxes2: (M, 4) float, ``(x1, y1, x2, y2)`` with ``x1 <= x2``, ``y1 <= y2``.
    Returns (N, M): ``inter / (area1 + area2 - inter)``. Empty inputs give an empty (N, M) matrix.
    Two zero-area boxes give 0/0 = NaN, as in torchvision. NaN/inf coordinates, and ones so
    large that areas overflow (``max_coordinate``), raise a ValueError, as in ``nms``.
    """
    boxes1 = validate_boxes(boxes1, "boxes1", check_order=True, finite=True)
    boxes2 = validate_boxes(boxes2, "boxes2", check_order=True, finite=True)
    boxes1, boxes2 = _common_float(boxes1, boxes2)
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union


def clip_boxes_to_image(boxes, size: tuple[int, int]):
    """Clamp x to ``[0, width]`` and y to ``[0, height]``.

    boxes: (..., 4); size: ``(height, width)`` of the image (note the order: NCHW convention).
    Returns a new array of the same shape and dtype.
    """
    xp = get_xp(boxes)
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (..., 4), got {tuple(boxes.shape)}")
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    height, width = size
    out = boxes.copy()
    out[..., 0::2] = xp.clip(boxes[..., 0::2], 0, width)
    out[..., 1::2] = xp.clip(boxes[..., 1::2], 0, height)
    return out


def remove_small_boxes(boxes, min_size: float):
    """Indices of the boxes whose width and height are both ``>= min_size``.

    boxes: (N, 4). Returns (K,) int64 indices in increasing order.
    """
    boxes = validate_boxes(boxes, "boxes")
    xp = get_xp(boxes)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    keep = (widths >= min_size) & (heights >= min_size)
    return xp.flatnonzero(keep).astype(xp.int64)


class BoxCoder:
    """The box parametrisation of Faster R-CNN (Ren et al. 2015, eq. 2), with weights.

    For a reference box p (an anchor or proposal) and a target box g, with ``w = x2 - x1``,
    ``cx = x1 + 0.5 w`` (likewise h, cy)::

        dx = wx (g_cx - p_cx) / p_w        dw = ww log(g_w / p_w)
        dy = wy (g_cy - p_cy) / p_h        dh = wh log(g_h / p_h)

    The weights only rescale the targets so their spread suits the loss: the RPN uses
    ``(1, 1, 1, 1)``, the RoI box head ``(10, 10, 5, 5)`` (torchvision/Detectron defaults).

    Gradients: ``encode`` produces regression *targets* (constants of the loss) and ``decode``
    turns predicted deltas into proposals, which carry no gradient in approximate joint training
    (the paper's Sec. 3.2; torchvision detaches them too). So neither has a backward here.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float],
        bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP,
    ):
        if len(weights) != 4 or any(not w > 0 for w in weights):
            raise ValueError(f"weights must be 4 positive numbers (wx, wy, ww, wh), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def encode(self, reference_boxes, proposals):
        """Regression targets that move each proposal onto its reference (ground-truth) box.

        reference_boxes: (N, 4) the targets g; proposals: (N, 4) the boxes p they are relative
        to (anchors for the RPN). Argument order as in torchvision's ``encode_single``.
        Returns (N, 4) ``(dx, dy, dw, dh)`` in the dtype of ``reference_boxes``.
        """
        reference_boxes = validate_boxes(reference_boxes, "reference_boxes")
        proposals = validate_boxes(proposals, "proposals")
        if reference_boxes.shape[0] != proposals.shape[0]:
            raise ValueError(
                f"reference_boxes ({reference_boxes.shape[0]}) and proposals "
                f"({proposals.shape[0]}) must have the same number of rows (one target each)"
            )
        xp = get_xp(reference_boxes)
        dtype = reference_boxes.dtype
        proposals = proposals.astype(dtype, copy=False)
        wx, wy, ww, wh = self.weights

        p_w = proposals[:, 2] - proposals[:, 0]
        p_h = proposals[:, 3] - proposals[:, 1]
        p_cx = proposals[:, 0] + 0.5 * p_w
        p_cy = proposals[:, 1] + 0.5 * p_h

        g_w = reference_boxes[:, 2] - reference_boxes[:, 0]
        g_h = reference_boxes[:, 3] - reference_boxes[:, 1]
        g_cx = reference_boxes[:, 0] + 0.5 * g_w
        g_cy = reference_boxes[:, 1] + 0.5 * g_h

        dx = wx * (g_cx - p_cx) / p_w
        dy = wy * (g_cy - p_cy) / p_h
        dw = ww * xp.log(g_w / p_w)
        dh = wh * xp.log(g_h / p_h)
        return xp.stack([dx, dy, dw, dh], axis=1)

    def decode(self, rel_codes, boxes):
        """Apply deltas to reference boxes: the inverse of ``encode`` (up to the dw/dh clamp).

        rel_codes: (N, 4K) deltas ``(dx, dy, dw, dh)`` repeated for K classes (K = 1 for the
        RPN); boxes: (N, 4) the reference boxes. Returns (N, 4K) boxes in the dtype of
        ``rel_codes`` (torchvision's ``decode_single``; its ``decode`` reshapes to (N, K, 4)).
        """
        xp = get_xp(rel_codes)
        if rel_codes.ndim != 2 or rel_codes.shape[1] % 4 != 0 or rel_codes.shape[1] == 0:
            raise ValueError(
                f"rel_codes must have shape (N, 4K), got {tuple(rel_codes.shape)}; "
                "reshape per-class deltas to (N, 4 * num_classes)"
            )
        boxes = validate_boxes(boxes, "boxes")
        if boxes.shape[0] != rel_codes.shape[0]:
            raise ValueError(
                f"rel_codes ({rel_codes.shape[0]} rows) and boxes ({boxes.shape[0]} rows) "
                "must pair up row by row"
            )
        boxes = boxes.astype(rel_codes.dtype, copy=False)
        wx, wy, ww, wh = self.weights

        widths = boxes[:, 2:3] - boxes[:, 0:1]
        heights = boxes[:, 3:4] - boxes[:, 1:2]
        ctr_x = boxes[:, 0:1] + 0.5 * widths
        ctr_y = boxes[:, 1:2] + 0.5 * heights

        dx = rel_codes[:, 0::4] / wx
        dy = rel_codes[:, 1::4] / wy
        dw = xp.minimum(rel_codes[:, 2::4] / ww, self.bbox_xform_clip)
        dh = xp.minimum(rel_codes[:, 3::4] / wh, self.bbox_xform_clip)

        pred_cx = dx * widths + ctr_x
        pred_cy = dy * heights + ctr_y
        half_w = 0.5 * (xp.exp(dw) * widths)
        half_h = 0.5 * (xp.exp(dh) * heights)

        out = xp.empty_like(rel_codes)
        out[:, 0::4] = pred_cx - half_w
        out[:, 1::4] = pred_cy - half_h
        out[:, 2::4] = pred_cx + half_w
        out[:, 3::4] = pred_cy + half_h
        return out


def validate_boxes(boxes, name: str = "boxes", check_order: bool = False, finite: bool = False):
    """Check that ``boxes`` is an (N, 4) float array and return it (lists, ints -> float64).

    ``check_order`` also rejects boxes with ``x2 < x1`` or ``y2 < y1``; ``finite`` rejects
    NaN/inf coordinates and any beyond ``max_coordinate(dtype)``, whose areas overflow. Both
    are O(N) and used where a malformed box would silently give a wrong answer (IoU of a
    negative-area box, NMS keeping duplicates whose IoU is inf/inf).
    """
    xp = get_xp(boxes)
    if not hasattr(boxes, "ndim"):
        boxes = np.asarray(boxes, dtype=np.float64)
        xp = np
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"{name} must have shape (N, 4) as (x1, y1, x2, y2), got {tuple(boxes.shape)}"
        )
    if not np.issubdtype(boxes.dtype, np.floating):
        if np.issubdtype(boxes.dtype, np.integer):
            boxes = boxes.astype(xp.float64)
        else:
            raise ValueError(f"{name} must be a float array, got dtype {boxes.dtype}")
    if finite and boxes.size:
        raise_if(
            ~xp.isfinite(boxes).all(),
            lambda: ValueError(f"{name} contains NaN or inf coordinates; filter them out first"),
        )
        limit = max_coordinate(boxes.dtype)
        raise_if(
            (xp.abs(boxes) > limit).any(),
            lambda: ValueError(
                f"{name} has coordinates beyond +-{limit:.3g}, where {boxes.dtype} areas (and "
                "their sums in an IoU) overflow to inf; boxes that large are not image boxes"
            ),
        )
    if check_order and boxes.size:
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        raise_if(bad.any(), lambda: _order_error(name, boxes, bad))
    return boxes


def _order_error(name: str, boxes, bad) -> ValueError:
    i = int(get_xp(bad).flatnonzero(bad)[0])
    return ValueError(
        f"{name}[{i}] = {boxes[i].tolist()} has x2 < x1 or y2 < y1; boxes must be "
        "(x1, y1, x2, y2) with x1 <= x2 and y1 <= y2 (convert from (x, y, w, h)?)"
    )


def max_coordinate(dtype) -> float:
    """The largest coordinate magnitude IoU can use in ``dtype``: ``sqrt(max) / 4``, so that a
    box spanning ``[-c, c]`` has an area ``(2c)^2`` and two such areas a sum ``8 c^2`` below the
    dtype's maximum (4.6e18 for float32, 3.4e153 for float64)."""
    return math.sqrt(float(np.finfo(dtype).max)) / 4


def _common_float(a, b):
    """Cast two float arrays to their common dtype (float32 + float64 -> float64)."""
    xp = get_xp(a, b)
    dtype = xp.result_type(a.dtype, b.dtype)
    return a.astype(dtype, copy=False), b.astype(dtype, copy=False)


def _inter_union(boxes1, boxes2):
    """(N, M) intersection and union areas, in torchvision's order of operations.

    The order matters for exact agreement in float32: ``union = area1 + area2 - inter``.
    """
    xp = get_xp(boxes1, boxes2)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    left_top = xp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    right_bottom = xp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = xp.maximum(right_bottom - left_top, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter, union
