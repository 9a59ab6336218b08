"""The multi-scale pooler of an FPN: each box pooled by RoIAlign from the level that suits it.

A feature pyramid offers maps at strides 4, 8, 16, 32 (P2 .. P5). A box is pooled from level

    k = floor(k0 + log2(sqrt(w * h) / s0) + 1e-6),   clamped to [k_min, k_max]

(FPN paper, eq. 1; ``LevelMapper``): a box of the canonical ImageNet size ``s0 = 224`` from level
``k0 = 4``, one half as large from level 3, and so on, so that small boxes read fine maps and
large boxes coarse ones. ``MultiScaleRoIAlign`` groups the boxes by level, runs ``roi_align`` on
each level's map at ``spatial_scale = 1 / stride`` and scatters the results back into the order
of the boxes; its backward runs ``roi_align_backward`` per level.

The strides are either declared (``strides=(4, 8, 16, 32)``: every map is checked against them)
or, as torchvision does, inferred from the map and image sizes (``infer_scale``:
``2 ** round(log2(H_map / H_image))``). ``docs/conventions.md`` states the exact rules.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..backend import get_xp, to_host
from ..nn.module import Module
from ..nn.utils import pair
from ._checks import (
    boxes_to_rois,
    check_align_args,
    check_boxes,
    check_declared_strides,
    check_featmap_names,
    check_image_shapes,
    check_level_features,
    check_strides,
)
from .align import roi_align, roi_align_backward


class PoolerCache(NamedTuple):
    """What ``MultiScaleRoIAlign.backward`` needs from its forward."""

    rois: np.ndarray  # (sum K_i, 5) rows (batch_index, x1, y1, x2, y2), in image order
    per_level: list  # per level: the indices (into rois) of the RoIs pooled from it
    scales: list  # per level: the spatial_scale used, 1 / stride
    shapes: list  # per level: the (N, C, H_l, W_l) of the map
    levels: np.ndarray  # (sum K_i,) int64: each RoI's level, as a position in featmap_names


class MultiScaleRoIAlign(Module):
    """RoIAlign over an FPN: each box is pooled from the level that suits its size.

    featmap_names: names of the feature maps to pool from, finest first (``["p2", .., "p5"]``);
        other maps in the features dict (e.g. ``"pool"``) are ignored.
    output_size: ``PH`` or ``(PH, PW)``; sampling_ratio: as in ``roi_align``.
    canonical_scale, canonical_level: a box of ``sqrt(area) = canonical_scale`` goes to level
        ``canonical_level`` (FPN paper eq. 1: 224 -> P4); see ``LevelMapper``.
    aligned: forwarded to ``roi_align`` (torchvision: False; Detectron2: True).
    strides: None (infer the scales, as torchvision), or one stride per map, finest first,
        doubling from level to level, e.g. ``(4, 8, 16, 32)``.

    ``forward(features, boxes, image_shapes)``: features maps name -> (N, C, H_l, W_l); boxes
    is a list of N arrays (K_i, 4) in image pixels; image_shapes a list of N ``(h, w)`` image
    sizes (torchvision passes each image's size before padding; only the largest height and
    width are used, to infer or check the scales). Returns (sum K_i, C, PH, PW), RoIs in image
    order.
    ``backward(grad_out)`` returns ``{name: grad}`` for the pooled maps (same shapes as the
    features).

    With ``strides`` given, the scale of map ``i`` is ``1 / strides[i]``, and forward checks that
    each map has that stride in the padded image (``infer_scale`` of its size), raising a
    ValueError otherwise. Without, the scale of each map is inferred as
    ``2 ** round(log2(H_l / max image height))``. Either way the level range ``(k_min, k_max)``
    is ``log2`` of the first and last stride.
    """

    def __init__(
        self,
        featmap_names,
        output_size,
        sampling_ratio: int,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        aligned: bool = False,
        strides=None,
    ):
        self.featmap_names = check_featmap_names(featmap_names)
        self.output_size = pair(output_size, "output_size", minimum=1)
        self.sampling_ratio, self.aligned = check_align_args(sampling_ratio, aligned)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.strides = check_strides(strides, self.featmap_names)
        self.cache: PoolerCache | None = None

    def forward(self, features: dict, boxes: list, image_shapes: list):
        """Pool every box from its level: (sum K_i, C, PH, PW), RoIs in image order."""
        feats = check_level_features(features, self.featmap_names)
        n, dtype = feats[0].shape[0], feats[0].dtype
        xp = get_xp(feats[0])
        check_boxes(boxes, n, dtype)
        image_shapes = check_image_shapes(image_shapes, n)
        rois = boxes_to_rois(boxes)
        scales = self._scales(feats, image_shapes)
        levels = self._levels(boxes, scales, rois.shape[0], xp)
        c = feats[0].shape[1]
        out = xp.zeros((rois.shape[0], c) + self.output_size, dtype=dtype)
        per_level = split_by_level(levels, len(feats))
        for feat, scale, idx in zip(feats, scales, per_level):
            if idx.size:
                out[idx] = roi_align(
                    feat, rois[idx], self.output_size, scale, self.sampling_ratio, self.aligned
                )
        shapes = [tuple(f.shape) for f in feats]
        self.cache = PoolerCache(rois, per_level, scales, shapes, levels)
        return out

    def backward(self, grad_out) -> dict:
        """grad_out: (sum K_i, C, PH, PW) -> {featmap name: (N, C, H_l, W_l) gradient}."""
        if self.cache is None:
            raise RuntimeError("MultiScaleRoIAlign.backward() needs a forward first")
        c = self.cache
        want = (c.rois.shape[0], c.shapes[0][1]) + self.output_size
        if tuple(grad_out.shape) != want:
            raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}, forward gave {want}")
        grads = {}
        for name, idx, scale, shape in zip(self.featmap_names, c.per_level, c.scales, c.shapes):
            grads[name] = roi_align_backward(
                grad_out[idx],
                c.rois[idx],
                shape,
                self.output_size,
                scale,
                self.sampling_ratio,
                self.aligned,
            )
        return grads

    def _scales(self, feats, image_shapes) -> list[float]:
        """spatial_scale of each map: 1 / its declared stride (checked), or inferred."""
        # The padded batch size: torchvision takes the largest height and width over images.
        original_size = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        scales = [infer_scale(f.shape[-2:], original_size) for f in feats]
        if self.strides is None:
            return scales
        check_declared_strides(self.featmap_names, feats, scales, self.strides, original_size)
        return [1.0 / s for s in self.strides]

    def _levels(self, boxes, scales, k, xp):
        """(K,) int64 position in featmap_names of the map each box is pooled from."""
        if len(scales) == 1:
            return xp.zeros(k, dtype=np.int64)
        # Scales are exact powers of two, so -log2 gives the levels of the first and last map.
        mapper = LevelMapper(
            int(round(-math.log2(scales[0]))),
            int(round(-math.log2(scales[-1]))),
            self.canonical_scale,
            self.canonical_level,
        )
        return mapper(boxes)

    def __repr__(self) -> str:
        strides = "" if self.strides is None else f", strides={self.strides}"
        return (
            f"MultiScaleRoIAlign(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned}{strides})"
        )


class LevelMapper:
    """FPN level of each box (FPN paper, eq. 1), as torchvision's ``LevelMapper``.

    ``k = floor(k0 + log2(sqrt(w * h) / s0) + eps)`` clamped to ``[k_min, k_max]``: a box of the
    canonical ImageNet size ``s0 = 224`` goes to level ``k0 = 4``, one twice as large to level 5,
    and so on. ``eps = 1e-6`` keeps a box exactly at a boundary (112, 224, 448 ..) on the upper
    level despite rounding in ``log2``. Returns the level index *relative to k_min* (int64), i.e.
    the position of the map in ``featmap_names``.
    """

    def __init__(
        self,
        k_min: int,
        k_max: int,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        eps: float = 1e-6,
    ):
        if k_max < k_min:
            raise ValueError(f"k_max = {k_max} < k_min = {k_min}; list the finest level first")
        self.k_min, self.k_max = k_min, k_max
        self.s0, self.lvl0, self.eps = canonical_scale, canonical_level, eps

    def __call__(self, boxes):
        """boxes: list of (K_i, 4) arrays (or one (K, 4) array) -> (sum K_i,) int64."""
        if isinstance(boxes, (list, tuple)):
            xp = get_xp(*boxes)
            boxes = xp.concatenate(boxes, axis=0) if boxes else np.zeros((0, 4))
        xp = get_xp(boxes)
        dt = boxes.dtype.type
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        s = xp.sqrt(area)
        # Computed in the boxes' dtype, in torchvision's order, so boundaries match. An empty
        # box has log2(0) = -inf and lands on the finest level, without a warning.
        with np.errstate(divide="ignore"):
            k = xp.floor(dt(self.lvl0) + xp.log2(s / dt(self.s0)) + dt(self.eps))
        k = xp.clip(k, self.k_min, self.k_max)
        return (k - self.k_min).astype(np.int64)


def split_by_level(levels, num_levels: int) -> list:
    """The indices of the RoIs of each level, increasing: ``flatnonzero(levels == l)`` for
    every ``l``, from one stable sort and one host transfer of the level counts (on a GPU, one
    sync instead of one per level for the data-sized results)."""
    xp = get_xp(levels)
    order = xp.argsort(levels, kind="stable")
    counts = (levels[None, :] == xp.arange(num_levels)[:, None]).sum(axis=1)
    bounds = np.cumsum([0, *to_host(counts).tolist()])
    return [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def infer_scale(feature_hw, original_size) -> float:
    """Scale of a feature map relative to the image: ``2 ** round(log2(H_feat / H_image))``.

    feature_hw: (H, W) of the map; original_size: (H, W) of the padded image batch. Only the
    height ratio decides, as in torchvision (maps are an exact power-of-two stride apart).
    """
    approx = float(feature_hw[0]) / float(original_size[0])
    return float(2.0 ** round(math.log2(approx)))
