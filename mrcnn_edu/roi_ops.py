"""RoIPool and RoIAlign: a fixed-size feature grid for every region of interest.

Both ops cut a region ``(x1, y1, x2, y2)`` (image pixels) out of a feature map ``(N, C, H, W)``
and return a ``(PH, PW)`` grid of features per RoI, so that box and mask heads see inputs of one
size. They differ in how the region meets the feature grid:

* **RoIPool** (Fast R-CNN) rounds the RoI to whole feature pixels, cuts it into ``PH x PW`` bins
  with integer (floor / ceil) edges and takes the maximum of each bin. Two quantisations: the
  pooled features can be up to a pixel (16 image pixels at stride 16) away from the box.
* **RoIAlign** (Mask R-CNN, section 3) rounds nothing: each bin averages ``g x g`` bilinear samples
  taken at the exact sub-pixel positions. ``aligned=True`` also shifts the RoI by half a pixel so
  that pixel *centres* line up (Detectron2's correction).

Semantics and signatures follow torchvision (written down in ``SEMANTICS.md``), so results compare
line by line. ``docs/roi_pooling.md`` derives the forward and backward passes.

Two implementations of each op live here:

* the **readable definitions** (``roi_align_reference``, ``roi_pool_reference``): Python loops over
  RoIs, bins and samples, written as the paper describes them;
* the **fast forms** used by ``roi_align`` / ``roi_pool``, tested equal to the definitions.
  RoIAlign is separable: a bin average of bilinear samples weights rows and columns
  independently, so for one RoI ``out[c] = Ay @ F[c] @ Ax.T`` with small interpolation matrices
  ``Ay (PH, H)`` and ``Ax (PW, W)`` -- two BLAS matrix products on the RoI's window of the map.
  RoIPool's max over a bin is the max of four overlapping power-of-two rectangles read from a
  precomputed 2-D "sparse table", so every bin costs four lookups whatever its size.

CuPy arrays are handed to the GPU kernels in ``mrcnn_edu.kernels`` (after the same validation);
the NumPy path never imports cupy.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .backend import get_xp, gpu_kernel, is_cupy_array
from .nn.module import Module

__all__ = [
    "roi_align",
    "roi_align_backward",
    "roi_pool",
    "roi_pool_backward",
    "MultiScaleRoIAlign",
    "LevelMapper",
    "infer_scale",
    "boxes_to_rois",
    "interpolation_matrices",
    "roi_pool_bins",
    "roi_align_reference",
    "roi_align_backward_reference",
    "roi_pool_reference",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# torchvision starts every non-empty RoIPool bin at -FLT_MAX (also for float64 input) and keeps
# an element only if it is strictly greater; a bin holding nothing above it outputs -FLT_MAX.
_NEG_FLT_MAX = -float(np.finfo(np.float32).max)


# ============================================================================================
# Public API
# ============================================================================================
def roi_align(
    input,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
):
    """RoIAlign forward (torchvision ``roi_align``).

    input: (N, C, H, W) float32/float64 feature map.
    rois: (K, 5) rows ``(batch_index, x1, y1, x2, y2)`` in image pixels, same dtype as input
        (or a list of N arrays (K_i, 4) of boxes, one per image).
    output_size: ``PH`` or ``(PH, PW)``.
    spatial_scale: feature pixels per image pixel (1/16 for a stride-16 map).
    sampling_ratio: bilinear samples per bin side; ``<= 0`` means adaptive,
        ``ceil(roi_size / output_size)`` per RoI and axis.
    aligned: subtract half a pixel from the scaled RoI (Detectron2's pixel model). When False
        (torchvision's default) RoIs are also at least 1 feature pixel wide and high.
    Returns (K, C, PH, PW) in input's dtype.
    """
    input, rois, (ph, pw) = _check_pool_args(input, rois, output_size, spatial_scale)
    sampling_ratio, aligned = _check_align_args(sampling_ratio, aligned)
    _check_finite_features(input)
    if is_cupy_array(input):
        fn = gpu_kernel("roi_align", "roi_align")
        return fn(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)
    return _roi_align_forward(input, rois, ph, pw, spatial_scale, sampling_ratio, aligned)


def roi_align_backward(
    grad_output,
    rois,
    input_shape,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
):
    """RoIAlign backward: the gradient with respect to the feature map.

    grad_output: (K, C, PH, PW) float32/float64, the gradient of the loss w.r.t. roi_align's
    output; rois, output_size, spatial_scale, sampling_ratio, aligned: as given to the forward;
    input_shape: (N, C, H, W) of the forward's input. Returns (N, C, H, W) in grad_output's dtype.

    RoIAlign is linear in the features, ``out = A F``, so the backward is ``A.T G``: every sample
    hands ``grad / count`` back to its four bilinear neighbours (per RoI: ``Ay.T @ G[c] @ Ax``).
    There is no gradient with respect to the RoI coordinates (as in torchvision).
    """
    shape = _check_input_shape(input_shape)
    _check_array(grad_output, "grad_output")
    if grad_output.ndim != 4:
        raise ValueError(
            f"grad_output must be (K, C, PH, PW), got shape {tuple(grad_output.shape)}"
        )
    grad_output, rois, (ph, pw) = _check_pool_args(
        grad_output, rois, output_size, spatial_scale, n_images=shape[0], what="grad_output"
    )
    sampling_ratio, aligned = _check_align_args(sampling_ratio, aligned)
    want = (rois.shape[0], shape[1], ph, pw)
    if tuple(grad_output.shape) != want:
        raise ValueError(
            f"grad_output has shape {tuple(grad_output.shape)} but the K rois, the C of "
            f"input_shape and output_size give {want}; pass the forward's rois and output_size"
        )
    if is_cupy_array(grad_output):
        fn = gpu_kernel("roi_align", "roi_align_backward")
        return fn(grad_output, rois, shape, (ph, pw), spatial_scale, sampling_ratio, aligned)
    return _roi_align_backward(
        grad_output, rois, shape, ph, pw, spatial_scale, sampling_ratio, aligned
    )


def roi_pool(input, rois, output_size, spatial_scale: float = 1.0):
    """RoIPool forward (torchvision ``roi_pool``), returning the argmax too.

    input: (N, C, H, W) float32/float64; rois: (K, 5) ``(batch_index, x1, y1, x2, y2)`` in image
    pixels (or a list of (K_i, 4) boxes per image); output_size: ``PH`` or ``(PH, PW)``.
    Returns ``(output, argmax)``: output (K, C, PH, PW) in input's dtype, the maximum of each
    bin; argmax (K, C, PH, PW) int64, where the maximum is inside its feature plane,
    ``h * W + w`` (torchvision's convention), or -1 for a bin that holds nothing (output 0).

    The RoI corners are rounded to the feature grid (half away from zero); bin ``p`` covers rows
    ``floor(p * bin_h) .. ceil((p + 1) * bin_h)`` (exclusive) of the rounded RoI, clamped to the
    map; ties go to the first element in row-major order. See ``roi_pool_bins``.
    """
    input, rois, (ph, pw) = _check_pool_args(input, rois, output_size, spatial_scale)
    xp = get_xp(input)
    if bool(xp.isnan(input).any()):
        raise ValueError(
            "input contains NaN; the maximum of a bin holding a NaN is ill-defined (torchvision "
            "silently skips them) -- find where the NaN comes from first"
        )
    if is_cupy_array(input):
        return gpu_kernel("roi_align", "roi_pool")(input, rois, (ph, pw), spatial_scale)
    return _roi_pool_forward(input, rois, ph, pw, spatial_scale)


def roi_pool_backward(grad_output, argmax, input_shape, rois=None):
    """RoIPool backward: each output gradient goes, whole, to the element that was the maximum.

    grad_output: (K, C, PH, PW) float32/float64; argmax: (K, C, PH, PW) integer, from
    ``roi_pool`` (plane index ``h * W + w`` or -1); input_shape: (N, C, H, W);
    rois: the forward's (K, 5) rois -- only their batch index column is used, to know which
    image each RoI came from. It may be omitted when N == 1.
    Returns (N, C, H, W) in grad_output's dtype. Bins with argmax -1 pass no gradient.
    """
    n, c, h, w = _check_input_shape(input_shape)
    _check_array(grad_output, "grad_output")
    _check_array(argmax, "argmax")
    if grad_output.ndim != 4 or grad_output.shape[1] != c:
        raise ValueError(
            f"grad_output must be (K, C, PH, PW) with C = {c} from input_shape, "
            f"got shape {tuple(grad_output.shape)}"
        )
    _check_float(grad_output, "grad_output")
    if tuple(argmax.shape) != tuple(grad_output.shape):
        raise ValueError(
            f"argmax has shape {tuple(argmax.shape)} but grad_output has "
            f"{tuple(grad_output.shape)}; pass the argmax returned by the same roi_pool call"
        )
    if argmax.dtype.kind not in "iu":
        raise ValueError(f"argmax must be an integer array from roi_pool, got {argmax.dtype}")
    xp = get_xp(grad_output)
    k = grad_output.shape[0]
    if argmax.size and (int(argmax.min()) < -1 or int(argmax.max()) >= h * w):
        raise ValueError(
            f"argmax values must be -1 or plane indices in [0, H*W = {h * w}); these do not "
            "come from a roi_pool on a map of this input_shape"
        )
    if rois is None:
        if n != 1 and k > 0:
            raise ValueError(
                f"roi_pool_backward needs the forward's rois when N = {n} > 1, to know which "
                "image each RoI was pooled from: roi_pool_backward(grad, argmax, shape, rois)"
            )
    else:
        rois = _check_rois(rois, n, grad_output.dtype, xp, "grad_output")
        if rois.shape[0] != k:
            raise ValueError(
                f"rois has {rois.shape[0]} rows but grad_output has K = {k}; pass the "
                "forward's rois"
            )
    if is_cupy_array(grad_output):
        fn = gpu_kernel("roi_align", "roi_pool_backward")
        return fn(grad_output, argmax, (n, c, h, w), rois)
    return _roi_pool_backward(grad_output, argmax, (n, c, h, w), rois)


class MultiScaleRoIAlign(Module):
    """RoIAlign over an FPN: each box is pooled from the level that suits its size.

    featmap_names: names of the feature maps to pool from, finest first (``["p2", .., "p5"]``);
        other maps in the features dict (e.g. ``"pool"``) are ignored.
    output_size: ``PH`` or ``(PH, PW)``; sampling_ratio: as in ``roi_align``.
    canonical_scale, canonical_level: a box of ``sqrt(area) = canonical_scale`` goes to level
        ``canonical_level`` (FPN paper eq. 1: 224 -> P4); see ``LevelMapper``.
    aligned: forwarded to ``roi_align`` (torchvision: False; Detectron2: True).

    ``forward(features, boxes, image_shapes)``: features maps name -> (N, C, H_l, W_l); boxes
    is a list of N arrays (K_i, 4) in image pixels; image_shapes a list of N ``(h, w)`` sizes of
    the (padded) images the boxes live in. Returns (sum K_i, C, PH, PW), RoIs in image order.
    ``backward(grad_out)`` returns ``{name: grad}`` for the pooled maps (same shapes as the
    features).

    The scale of each map is inferred as ``2 ** round(log2(H_l / max image height))``, and the
    level range from the first and last map, as torchvision does.
    """

    def __init__(
        self,
        featmap_names,
        output_size,
        sampling_ratio: int,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        aligned: bool = False,
    ):
        if isinstance(featmap_names, str) or not all(isinstance(n, str) for n in featmap_names):
            raise ValueError(f"featmap_names must be a list of str, got {featmap_names!r}")
        if len(featmap_names) == 0:
            raise ValueError("featmap_names must name at least one feature map")
        self.featmap_names = list(featmap_names)
        self.output_size = _pair(output_size)
        self.sampling_ratio, self.aligned = _check_align_args(sampling_ratio, aligned)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.cache = None

    def forward(self, features: dict, boxes: list, image_shapes: list):
        """Pool every box from its level: (sum K_i, C, PH, PW), RoIs in image order."""
        feats = self._check_features(features)
        n, dtype = feats[0].shape[0], feats[0].dtype
        xp = get_xp(feats[0])
        if not isinstance(boxes, (list, tuple)) or len(boxes) != n:
            got = len(boxes) if isinstance(boxes, (list, tuple)) else type(boxes).__name__
            raise ValueError(
                f"boxes must be a list with one (K_i, 4) array per image (N = {n}), got {got}"
            )
        for i, b in enumerate(boxes):
            _check_array(b, f"boxes[{i}]")
            if b.dtype != dtype:
                raise ValueError(
                    f"boxes[{i}] is {b.dtype} but the features are {dtype}; cast the boxes with "
                    ".astype(features.dtype)"
                )
        image_shapes = _check_image_shapes(image_shapes, n)
        rois = boxes_to_rois(boxes)
        # The padded batch size: torchvision takes the largest height and width over images.
        original_size = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        scales = [infer_scale(f.shape[-2:], original_size) for f in feats]
        if len(feats) == 1:
            levels = xp.zeros(rois.shape[0], dtype=np.int64)
        else:
            mapper = LevelMapper(
                int(round(-math.log2(scales[0]))),
                int(round(-math.log2(scales[-1]))),
                self.canonical_scale,
                self.canonical_level,
            )
            levels = mapper(boxes)
        c = feats[0].shape[1]
        out = xp.zeros((rois.shape[0], c) + self.output_size, dtype=dtype)
        per_level = []
        for level, (feat, scale) in enumerate(zip(feats, scales)):
            idx = xp.flatnonzero(levels == level)
            per_level.append(idx)
            if idx.size:
                out[idx] = roi_align(
                    feat, rois[idx], self.output_size, scale, self.sampling_ratio, self.aligned
                )
        self.cache = dict(
            rois=rois,
            per_level=per_level,
            scales=scales,
            shapes=[tuple(f.shape) for f in feats],
            levels=levels,
        )
        return out

    def backward(self, grad_out) -> dict:
        """grad_out: (sum K_i, C, PH, PW) -> {featmap name: (N, C, H_l, W_l) gradient}."""
        if self.cache is None:
            raise RuntimeError("MultiScaleRoIAlign.backward() needs a forward first")
        c = self.cache
        want = (c["rois"].shape[0], c["shapes"][0][1]) + self.output_size
        if tuple(grad_out.shape) != want:
            raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}, forward gave {want}")
        grads = {}
        for name, idx, scale, shape in zip(
            self.featmap_names, c["per_level"], c["scales"], c["shapes"]
        ):
            grads[name] = roi_align_backward(
                grad_out[idx],
                c["rois"][idx],
                shape,
                self.output_size,
                scale,
                self.sampling_ratio,
                self.aligned,
            )
        return grads

    def _check_features(self, features) -> list:
        if not isinstance(features, dict):
            raise ValueError(
                f"features must be a dict name -> (N, C, H, W) array, got {type(features).__name__}"
            )
        missing = [name for name in self.featmap_names if name not in features]
        if missing:
            raise ValueError(
                f"features has no map named {missing} (it has {list(features)}); "
                "featmap_names must name keys of the features dict"
            )
        feats = [features[name] for name in self.featmap_names]
        for name, f in zip(self.featmap_names, feats):
            _check_features_array(f, f"features[{name!r}]")
        first = feats[0]
        for name, f in zip(self.featmap_names, feats):
            if f.shape[:2] != first.shape[:2] or f.dtype != first.dtype:
                raise ValueError(
                    f"features[{name!r}] is {tuple(f.shape)} {f.dtype}, but "
                    f"features[{self.featmap_names[0]!r}] is {tuple(first.shape)} {first.dtype}; "
                    "all levels need the same batch size, channels and dtype"
                )
        return feats

    def __repr__(self) -> str:
        return (
            f"MultiScaleRoIAlign(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned})"
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


def infer_scale(feature_hw, original_size) -> float:
    """Scale of a feature map relative to the image: ``2 ** round(log2(H_feat / H_image))``.

    feature_hw: (H, W) of the map; original_size: (H, W) of the padded image batch. Only the
    height ratio decides, as in torchvision (maps are an exact power-of-two stride apart).
    """
    approx = float(feature_hw[0]) / float(original_size[0])
    return float(2.0 ** round(math.log2(approx)))


def boxes_to_rois(boxes):
    """A list of N arrays (K_i, 4) of boxes -> (sum K_i, 5) rois (batch_index, x1, y1, x2, y2)."""
    if len(boxes) == 0:
        raise ValueError("boxes_to_rois needs a list with one (K_i, 4) array per image")
    xp = get_xp(*boxes)
    rows = []
    for i, b in enumerate(boxes):
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must be (K_i, 4) (x1, y1, x2, y2), got {b.shape}")
        index = xp.full((b.shape[0], 1), i, dtype=b.dtype)
        rows.append(xp.concatenate([index, b], axis=1))
    return xp.concatenate(rows, axis=0)


def interpolation_matrices(
    rois,
    height: int,
    width: int,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
):
    """RoIAlign's separable weights: ``Ay (K, PH, H)`` and ``Ax (K, PW, W)`` in rois' dtype.

    ``Ay[k, p, h]`` is the weight of feature row ``h`` in bin row ``p`` of RoI ``k``: the average,
    over the bin's ``grid_h`` sample rows, of their 1-D linear interpolation weights (0 for a
    sample row outside ``[-1, H]``). Then for every channel
    ``roi_align(F)[k, c] = Ay[k] @ F[b_k, c] @ Ax[k].T``.
    The rows of ``Ay[k]`` sum to 1 when all samples fall inside the map.
    """
    rois = np.asarray(rois)
    ph, pw = _pair(output_size)
    dt = rois.dtype.type
    (y0, bin_h, grid_h), (x0, bin_w, grid_w) = _align_geometry(
        rois, ph, pw, spatial_scale, sampling_ratio, aligned
    )
    ay = _axis_interpolation(y0, bin_h, grid_h, ph, height, dt)
    ax = _axis_interpolation(x0, bin_w, grid_w, pw, width, dt)
    return ay, ax


def roi_pool_bins(rois, output_size, spatial_scale: float, height: int, width: int):
    """RoIPool's integer bins: ``(hstart, hend)`` (K, PH) and ``(wstart, wend)`` (K, PW).

    Bin ``(p, q)`` of RoI ``k`` covers rows ``hstart[k, p] <= h < hend[k, p]`` and columns
    ``wstart[k, q] <= w < wend[k, q]``, clamped to the map (so it may be empty). This is where
    RoIPool quantises: corners rounded to the grid, bin edges floored and ceiled.
    """
    rois = np.asarray(rois)
    ph, pw = _pair(output_size)
    dt = rois.dtype.type

    def axis(lo, hi, pooled, length):
        start = _c_round(lo * dt(spatial_scale))
        end = _c_round(hi * dt(spatial_scale))
        # "+ 1": the rounded RoI includes both end pixels.
        size = np.maximum(end - start + 1, 1).astype(rois.dtype)
        bin_size = size / dt(pooled)
        p = np.arange(pooled, dtype=rois.dtype)
        first = np.floor(p * bin_size[:, None]).astype(np.int64) + start[:, None]
        last = np.ceil((p + 1) * bin_size[:, None]).astype(np.int64) + start[:, None]
        return np.clip(first, 0, length), np.clip(last, 0, length)

    hstart, hend = axis(rois[:, 2], rois[:, 4], ph, height)
    wstart, wend = axis(rois[:, 1], rois[:, 3], pw, width)
    return hstart, hend, wstart, wend


# ============================================================================================
# Readable definitions: loops over RoIs, bins and samples (slow; the tests compare against them)
# ============================================================================================
def roi_align_reference(
    input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False
) -> np.ndarray:
    """RoIAlign written sample by sample, in float64 Python arithmetic. Same API as roi_align."""
    input, rois, (ph, pw) = _check_pool_args(input, rois, output_size, spatial_scale)
    sampling_ratio, aligned = _check_align_args(sampling_ratio, aligned)
    n, c, h, w = input.shape
    out = np.zeros((rois.shape[0], c, ph, pw), dtype=np.float64)
    for k, roi in enumerate(rois.tolist()):
        fmap = input[int(roi[0])].astype(np.float64)
        ys, xs = _reference_samples(roi, ph, pw, spatial_scale, sampling_ratio, aligned)
        for p in range(ph):
            for q in range(pw):
                count = max(len(ys[p]) * len(xs[q]), 1)
                for y in ys[p]:
                    for x in xs[q]:
                        for (yy, xx), weight in _bilinear_neighbours(y, x, h, w):
                            out[k, :, p, q] += weight * fmap[:, yy, xx] / count
    return out.astype(input.dtype)


def roi_align_backward_reference(
    grad_output, rois, input_shape, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False
) -> np.ndarray:
    """RoIAlign backward sample by sample: each sample scatters ``grad * weight / count``."""
    n, c, h, w = _check_input_shape(input_shape)
    ph, pw = _pair(output_size)
    rois = np.asarray(rois)
    grad = np.zeros((n, c, h, w), dtype=np.float64)
    for k, roi in enumerate(rois.tolist()):
        b = int(roi[0])
        ys, xs = _reference_samples(roi, ph, pw, spatial_scale, sampling_ratio, aligned)
        for p in range(ph):
            for q in range(pw):
                count = max(len(ys[p]) * len(xs[q]), 1)
                g = grad_output[k, :, p, q].astype(np.float64)
                for y in ys[p]:
                    for x in xs[q]:
                        for (yy, xx), weight in _bilinear_neighbours(y, x, h, w):
                            grad[b, :, yy, xx] += g * weight / count
    return grad.astype(grad_output.dtype)


def roi_pool_reference(input, rois, output_size, spatial_scale=1.0):
    """RoIPool written bin by bin: a row-major scan keeping strictly greater elements."""
    input, rois, (ph, pw) = _check_pool_args(input, rois, output_size, spatial_scale)
    n, c, h, w = input.shape
    out = np.zeros((rois.shape[0], c, ph, pw), dtype=input.dtype)
    argmax = np.full((rois.shape[0], c, ph, pw), -1, dtype=np.int64)
    hstart, hend, wstart, wend = roi_pool_bins(rois, (ph, pw), spatial_scale, h, w)
    for k in range(rois.shape[0]):
        fmap = input[int(rois[k, 0])]
        for p in range(ph):
            for q in range(pw):
                rows = range(hstart[k, p], hend[k, p])
                cols = range(wstart[k, q], wend[k, q])
                if len(rows) == 0 or len(cols) == 0:
                    continue  # empty bin: 0, argmax -1
                for ch in range(c):
                    best, best_at = _NEG_FLT_MAX, -1
                    for yy in rows:
                        for xx in cols:
                            if fmap[ch, yy, xx] > best:
                                best, best_at = fmap[ch, yy, xx], yy * w + xx
                    out[k, ch, p, q], argmax[k, ch, p, q] = best, best_at
    return out, argmax


def _reference_samples(roi, ph, pw, spatial_scale, sampling_ratio, aligned):
    """Sample coordinates (feature pixels) of every bin row and column, as Python lists."""
    offset = 0.5 if aligned else 0.0
    _, x1, y1, x2, y2 = roi
    start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
    roi_w = x2 * spatial_scale - offset - start_x
    roi_h = y2 * spatial_scale - offset - start_y
    if not aligned:  # torchvision forces malformed (tiny) RoIs to be 1 x 1
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw)
    ys = [
        [start_y + p * bin_h + (i + 0.5) * bin_h / grid_h for i in range(grid_h)] for p in range(ph)
    ]
    xs = [
        [start_x + q * bin_w + (i + 0.5) * bin_w / grid_w for i in range(grid_w)] for q in range(pw)
    ]
    return ys, xs


def _bilinear_neighbours(y: float, x: float, height: int, width: int):
    """The (pixel, weight) pairs of a bilinear sample at (y, x), torchvision's border rules.

    A sample more than one pixel outside the map is 0 (but still counts in the bin average);
    one within a pixel of the border is clamped onto it.
    """
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [
        ((y_low, x_low), hy * hx),
        ((y_low, x_high), hy * lx),
        ((y_high, x_low), ly * hx),
        ((y_high, x_high), ly * lx),
    ]


# ============================================================================================
# Fast NumPy forms
# ============================================================================================
def _roi_align_forward(input, rois, ph, pw, spatial_scale, sampling_ratio, aligned):
    """out[k, c] = Ay[k] @ F[b_k, c] @ Ax[k].T, on the window of the map the RoI touches.

    The map is moved to channels-last (N, H, W, C) once, so that every column of a window is a
    contiguous (h, C) matrix. Per RoI, two batched matrix products:
    rows ``t[w] = Ay @ window[:, w]`` -> (w, PH, C), then columns ``out[:, p] = t[:, p].T @ Ax.T``
    written straight into the (C, PH, PW) output. Every product is small (PH x h x C), which
    BLAS runs on one thread: larger products made multi-threaded BLAS stall badly whenever
    another process shares the cores. A loop over RoIs only: batching padded windows, or
    contracting whole maps, measured slower (docs/roi_pooling.md, "Speed").
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = np.zeros((k, c, ph, pw), dtype=input.dtype)
    if k == 0 or c == 0:
        return out
    ay, ax = interpolation_matrices(rois, h, w, (ph, pw), spatial_scale, sampling_ratio, aligned)
    rows = _support(ay)
    cols = _support(ax)
    feat = np.ascontiguousarray(input.transpose(0, 2, 3, 1))
    batch = rois[:, 0].astype(np.int64).tolist()
    for i, (b, r0, r1, c0, c1) in enumerate(zip(batch, *rows, *cols)):
        if r1 <= r0 or c1 <= c0:
            continue  # every sample fell outside the map: zeros
        window = feat[b, r0:r1, c0:c1]  # (h, w, C), a view
        t = np.matmul(ay[i, :, r0:r1], window.transpose(1, 0, 2))  # (w, PH, C)
        # (PH, C, w) @ (w, PW) -> (PH, C, PW), i.e. out[i] (C, PH, PW) seen with PH first.
        np.matmul(t.transpose(1, 2, 0), ax[i, :, c0:c1].T, out=out[i].transpose(1, 0, 2))
    return out


def _roi_align_backward(grad_output, rois, shape, ph, pw, spatial_scale, sampling_ratio, aligned):
    """grad[b_k, c] += Ay[k].T @ G[k, c] @ Ax[k], accumulated into each RoI's window.

    The transpose of the forward, with the same small batched products:
    ``u[q] = Ay.T @ G[:, :, q].T`` -> (PW, h, C), then ``window[h] += Ax.T @ u[:, h]``.
    """
    n, c, h, w = shape
    grad = np.zeros((n, h, w, c), dtype=grad_output.dtype)  # channels-last, as the forward
    k = rois.shape[0]
    if k and c:
        ay, ax = interpolation_matrices(
            rois, h, w, (ph, pw), spatial_scale, sampling_ratio, aligned
        )
        rows = _support(ay)
        cols = _support(ax)
        g = np.empty((pw, ph, c), dtype=grad_output.dtype)
        batch = rois[:, 0].astype(np.int64).tolist()
        for i, (b, r0, r1, c0, c1) in enumerate(zip(batch, *rows, *cols)):
            if r1 <= r0 or c1 <= c0:
                continue
            g[...] = grad_output[i].transpose(2, 1, 0)  # (PW, PH, C), contiguous
            u = np.matmul(ay[i, :, r0:r1].T, g)  # (PW, h, C)
            grad[b, r0:r1, c0:c1] += np.matmul(ax[i, :, c0:c1].T, u.transpose(1, 0, 2))
    return np.ascontiguousarray(grad.transpose(0, 3, 1, 2))


def _align_geometry(rois, ph, pw, spatial_scale, sampling_ratio, aligned):
    """Per RoI and axis: (start, bin size, samples per bin), as torchvision computes them.

    Arithmetic in the rois' dtype and in torchvision's order, so float32 results match its
    float32 kernels.
    """
    dt = rois.dtype.type
    offset = dt(0.5 if aligned else 0.0)
    scale = dt(spatial_scale)

    def axis(lo, hi, pooled):
        start = lo * scale - offset
        size = (hi * scale - offset) - start
        if not aligned:
            size = np.maximum(size, dt(1.0))
        bin_size = size / dt(pooled)
        if sampling_ratio > 0:
            grid = np.full(rois.shape[0], sampling_ratio, dtype=np.int64)
        else:
            grid = np.ceil(bin_size).astype(np.int64)
        return start, bin_size, grid

    return axis(rois[:, 2], rois[:, 4], ph), axis(rois[:, 1], rois[:, 3], pw)


def _axis_interpolation(start, bin_size, grid, pooled, length, dt):
    """(K, pooled, length) matrix: bin p's average of its samples' 1-D interpolation weights."""
    k = start.shape[0]
    gmax = int(grid.max()) if k else 0
    i = np.arange(gmax)
    p = np.arange(pooled, dtype=start.dtype)[None, :, None]
    g = np.maximum(grid, 1).astype(start.dtype)[:, None, None]
    b = bin_size[:, None, None]
    # sample = start + p * bin + (i + 0.5) * bin / grid   (torchvision's expression)
    coord = start[:, None, None] + p * b + (i + dt(0.5)).astype(start.dtype) * b / g
    # Samples beyond the grid of this RoI (gmax pads) and samples outside [-1, length] weigh 0.
    used = (i < grid[:, None, None]) & (coord >= -1) & (coord <= length)
    coord = np.maximum(coord, dt(0))
    low = np.floor(coord)
    at_end = low >= length - 1  # the last row/column: clamp, no neighbour beyond
    frac = np.where(at_end, dt(0), coord - low)
    low = np.where(at_end, length - 1, low).astype(np.int64)
    high = np.where(at_end, length - 1, low + 1)
    weight = used / g  # 1/grid per sample: the bin average along this axis
    base = (np.arange(k)[:, None, None] * pooled + np.arange(pooled)[None, :, None]) * length
    index = np.concatenate([(base + low).ravel(), (base + high).ravel()])
    value = np.concatenate([(weight * (1 - frac)).ravel(), (weight * frac).ravel()])
    mat = np.bincount(index, value, minlength=k * pooled * length)
    return mat.reshape(k, pooled, length).astype(start.dtype)


def _support(mat):
    """First and one-past-last index with a nonzero weight, per RoI: the window to read."""
    nonzero = mat.any(axis=1)  # (K, length)
    length = nonzero.shape[1]
    first = nonzero.argmax(axis=1)
    last = length - nonzero[:, ::-1].argmax(axis=1)
    last = np.where(nonzero.any(axis=1), last, first)  # no support: empty window
    return first.tolist(), last.tolist()


def _roi_pool_forward(input, rois, ph, pw, spatial_scale, table_budget=1 << 28, chunk=1 << 20):
    """RoIPool as range-maximum queries on a 2-D sparse table.

    ``table[jy, jx][h, w]`` holds the maximum over rows ``h .. h + 2**jy`` and columns
    ``w .. w + 2**jx`` (exclusive). A bin of height ``bh`` and width ``bw`` is the union of the
    four such rectangles with ``2**jy <= bh < 2**(jy+1)`` anchored at its corners, so its maximum
    is the maximum of four table lookups. The max and the argmax travel together as one int64
    key per element: an order-preserving integer image of the value in the high 32 bits and the
    *reversed* position in the low 32 bits, so that among equal values the first one in
    row-major order has the largest key (torchvision's "strictly greater" rule).
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    # Every element is written below, chunk by chunk: no need to fill them first.
    out = np.empty((k, c, ph, pw), dtype=input.dtype)
    argmax = np.empty((k, c, ph, pw), dtype=np.int64)
    if k == 0 or c == 0:
        return out, argmax
    hw = h * w
    hstart, hend, wstart, wend = roi_pool_bins(rois, (ph, pw), spatial_scale, h, w)
    empty = (hend <= hstart)[:, :, None] | (wend <= wstart)[:, None, :]  # (K, PH, PW)
    # Level of each bin side: the largest power of two not above its size.
    jy = _floor_log2(np.maximum(hend - hstart, 1))
    jx = _floor_log2(np.maximum(wend - wstart, 1))
    ny, nx = int(jy.max()) + 1, int(jx.max()) + 1
    top, left = np.minimum(hstart, h - 1), np.minimum(wstart, w - 1)
    bottom = np.clip(hend - (1 << jy), 0, h - 1)
    right = np.clip(wend - (1 << jx), 0, w - 1)
    # Row of each corner lookup in the flattened tables (ny * nx, N, H, W) -> (K, 4, PH, PW).
    batch = rois[:, 0].astype(np.int64)[:, None, None]
    level = jy[:, :, None] * nx + jx[:, None, :]
    base = (level * n + batch) * hw
    corners = np.stack(
        [
            base + (yy[:, :, None] * w + xx[:, None, :])
            for yy in (top, bottom)
            for xx in (left, right)
        ],
        axis=1,
    )
    keys, key_to_value = _pool_keys(np.ascontiguousarray(input.transpose(0, 2, 3, 1)))
    # torchvision starts each bin at -FLT_MAX and takes only strictly greater elements, so a
    # bin whose elements are all <= -FLT_MAX outputs -FLT_MAX with argmax -1. Rare: check once.
    has_floor = bool((input <= _NEG_FLT_MAX).any())
    # Channel chunks bound the tables' memory; RoI chunks keep the gathered keys in cache.
    per_channel = ny * nx * n * hw * 8
    cc = int(min(c, max(1, table_budget // per_channel)))
    kk = int(max(1, chunk // (ph * pw * cc * 8)))
    low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        tables = _sparse_table(keys[..., c0:c1], ny, nx).reshape(-1, c1 - c0)
        for k0 in range(0, k, kk):
            k1 = min(k, k0 + kk)
            best = tables[corners[k0:k1, 0]]  # (k, PH, PW, cc)
            for corner in range(1, 4):
                np.maximum(best, tables[corners[k0:k1, corner]], out=best)
            words = best.view(np.int32)  # the two 32-bit halves of each key
            value = key_to_value(words[..., high::2])
            where = (hw - 1) - words[..., low::2]  # undo the reversal of the position
            if has_floor:
                below = value <= _NEG_FLT_MAX
                value[below], where[below] = _NEG_FLT_MAX, -1
            bins_empty = empty[k0:k1]
            if bins_empty.any():
                value[bins_empty], where[bins_empty] = 0, -1
            out[k0:k1, c0:c1] = value.transpose(0, 3, 1, 2)
            argmax[k0:k1, c0:c1] = where.transpose(0, 3, 1, 2)
    return out, argmax


def _pool_keys(feat):
    """Channels-last map -> (int64 keys, decoder of the high words back to values).

    The high word orders like the value: for float32 its bit pattern with the magnitude bits of
    negative numbers flipped (an order-preserving map of IEEE floats onto int32); for float64,
    which has no room for a position beside it, its rank among the map's distinct values.
    """
    n, h, w, c = feat.shape
    feat = feat + feat.dtype.type(0)  # -0.0 -> +0.0: equal values must get equal keys
    if feat.dtype == np.float32:
        bits = feat.view(np.int32)
        high = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))

        def key_to_value(words):
            return (words ^ ((words >> 31) & np.int32(0x7FFFFFFF))).view(np.float32)

    else:
        distinct, rank = np.unique(feat, return_inverse=True)
        high = rank.reshape(feat.shape)

        def key_to_value(words):
            return distinct[words]

    position = (h * w - 1) - np.arange(h * w, dtype=np.int64).reshape(1, h, w, 1)
    return (high.astype(np.int64) << 32) | position, key_to_value


def _sparse_table(keys, ny: int, nx: int):
    """(ny * nx, N, H, W, C) maxima over [h, h + 2**jy) x [w, w + 2**jx), level (jy, jx) at
    ``jy * nx + jx``. Entries whose rectangle would leave the map are never read."""
    n, h, w, c = keys.shape
    table = np.empty((ny * nx, n, h, w, c), dtype=np.int64)
    table[0] = keys
    for jx in range(1, nx):  # double the width
        s = 1 << (jx - 1)
        np.maximum(
            table[jx - 1, :, :, : w - s], table[jx - 1, :, :, s:], out=table[jx, :, :, : w - s]
        )
    for jy in range(1, ny):  # double the height of every width
        s = 1 << (jy - 1)
        for jx in range(nx):
            src, dst = table[(jy - 1) * nx + jx], table[jy * nx + jx]
            np.maximum(src[:, : h - s], src[:, s:], out=dst[:, : h - s])
    return table


def _roi_pool_backward(grad_output, argmax, shape, rois, chunk=1 << 18):
    """grad[b_k, c].flat[argmax] += grad_output, a scatter-add (bins of overlapping RoIs may
    share their maximum).

    Each feature plane gets one extra slot in front, ``plane = [sink, pixel 0, pixel 1, ..]``,
    so the index ``plane_start + 1 + argmax`` sends argmax -1 (an empty bin) to the sink
    without a separate mask. RoI chunks keep the index array in cache.
    """
    n, c, h, w = shape
    hw = h * w
    grad = np.zeros((n * c, hw + 1), dtype=grad_output.dtype)
    k = grad_output.shape[0]
    if k and c:
        batch = np.zeros(k, np.int64) if rois is None else rois[:, 0].astype(np.int64)
        start = ((batch[:, None] * c + np.arange(c)) * (hw + 1) + 1)[:, :, None, None]
        flat = grad.reshape(-1)
        step = max(1, chunk // (c * grad_output.shape[2] * grad_output.shape[3]))
        for k0 in range(0, k, step):
            index = start[k0 : k0 + step] + argmax[k0 : k0 + step]
            np.add.at(flat, index.ravel(), grad_output[k0 : k0 + step].ravel())
    return np.ascontiguousarray(grad[:, 1:]).reshape(shape)


def _floor_log2(x):
    """floor(log2(x)) for positive int64 arrays, exactly (no float rounding)."""
    out = np.zeros_like(x)
    x = x.copy()
    while True:
        x >>= 1
        more = x > 0
        if not more.any():
            return out
        out += more


def _c_round(v):
    """C's round() (half away from zero) -> int64, without float tricks that misround."""
    whole = np.trunc(v)
    rounded = whole + np.where(np.abs(v - whole) >= 0.5, np.sign(v), 0)
    return np.clip(rounded, -(2.0**62), 2.0**62).astype(np.int64)


# ============================================================================================
# Validation
# ============================================================================================
def _check_pool_args(input, rois, output_size, spatial_scale, n_images=None, what="input"):
    """Shared checks of roi_align/roi_pool (and their backward): returns (input, rois, (PH, PW))."""
    _check_features_array(input, what)
    xp = get_xp(input)
    n = input.shape[0] if n_images is None else n_images
    rois = _check_rois(rois, n, input.dtype, xp, what)
    size = _pair(output_size)
    if (
        isinstance(spatial_scale, bool)
        or not isinstance(spatial_scale, (int, float, np.floating, np.integer))
        or not math.isfinite(spatial_scale)
        or spatial_scale <= 0
    ):
        raise ValueError(
            f"spatial_scale must be a positive number (1/stride, e.g. 1/16), got {spatial_scale!r}"
        )
    return input, rois, size


def _check_align_args(sampling_ratio, aligned):
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, np.integer)):
        raise ValueError(
            f"sampling_ratio must be an int (samples per bin side; -1 for adaptive), "
            f"got {sampling_ratio!r}"
        )
    if not isinstance(aligned, (bool, np.bool_)):
        raise ValueError(f"aligned must be True or False, got {aligned!r}")
    return int(sampling_ratio), bool(aligned)


def _check_array(a, name):
    if not (isinstance(a, np.ndarray) or is_cupy_array(a)):
        raise ValueError(f"{name} must be a NumPy (or CuPy) array, got {type(a).__name__}")


def _check_float(a, name):
    if np.dtype(a.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {a.dtype}; cast it with astype")


def _check_features_array(a, name):
    _check_array(a, name)
    if a.ndim != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {tuple(a.shape)}")
    _check_float(a, name)
    if name == "input" and (a.shape[2] == 0 or a.shape[3] == 0):
        raise ValueError(f"{name} has an empty spatial size {tuple(a.shape[2:])}")


def _check_finite_features(input):
    # The separable form multiplies whole windows by weights that may be 0, and 0 * inf = NaN
    # would leak into bins whose samples never touch the inf: refuse rather than differ.
    xp = get_xp(input)
    if not bool(xp.isfinite(input).all()):
        raise ValueError("input contains NaN or inf; RoIAlign needs finite features")


def _check_rois(rois, n_images, dtype, xp, what="input"):
    """rois: (K, 5) (or a list of (K_i, 4) boxes) -> validated (K, 5) array."""
    if isinstance(rois, (list, tuple)):
        if len(rois) != n_images:
            raise ValueError(
                f"rois given as a list must hold one (K_i, 4) array per image: expected "
                f"{n_images}, got {len(rois)}"
            )
        for i, b in enumerate(rois):
            _check_array(b, f"rois[{i}]")
        rois = boxes_to_rois(list(rois))
    _check_array(rois, "rois")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"rois must be (K, 5) rows (batch_index, x1, y1, x2, y2), got shape "
            f"{tuple(rois.shape)}; for per-image (K_i, 4) boxes pass a list of arrays"
        )
    if rois.dtype != dtype:
        raise ValueError(
            f"rois are {rois.dtype} but {what} is {dtype}; cast them with rois.astype({what}.dtype)"
        )
    if rois.shape[0] == 0:
        return rois
    if not bool(xp.isfinite(rois).all()):
        raise ValueError("rois contain NaN or inf coordinates")
    batch = rois[:, 0]
    if bool((batch != xp.floor(batch)).any()):
        raise ValueError("rois[:, 0] must hold whole batch indices (0, 1, ...)")
    if bool((batch < 0).any()) or bool((batch >= n_images).any()):
        raise ValueError(
            f"rois[:, 0] (batch index) must be in [0, N = {n_images}), got values from "
            f"{float(batch.min()):g} to {float(batch.max()):g}"
        )
    if bool((rois[:, 3] < rois[:, 1]).any()) or bool((rois[:, 4] < rois[:, 2]).any()):
        bad = int(xp.flatnonzero((rois[:, 3] < rois[:, 1]) | (rois[:, 4] < rois[:, 2]))[0])
        raise ValueError(
            f"rois must have x2 >= x1 and y2 >= y1 (x1, y1, x2, y2 order); row {bad} is "
            f"{[float(v) for v in rois[bad]]}"
        )
    return rois


def _check_input_shape(input_shape):
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be (N, C, H, W), got {input_shape!r}") from None
    if len(shape) != 4 or min(shape) < 0:
        raise ValueError(f"input_shape must be four sizes (N, C, H, W), got {input_shape!r}")
    return shape


def _check_image_shapes(image_shapes, n):
    try:
        shapes = [(int(s[0]), int(s[1])) for s in image_shapes]
    except (TypeError, IndexError):
        raise ValueError(
            f"image_shapes must be a list of (height, width), got {image_shapes!r}"
        ) from None
    if len(shapes) != n:
        raise ValueError(f"image_shapes has {len(shapes)} entries for a batch of {n} images")
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"image_shapes must be positive sizes, got {shapes}")
    return shapes


def _pair(output_size) -> tuple[int, int]:
    """``7 -> (7, 7)``, ``(7, 5) -> (7, 5)``; anything else raises ValueError."""
    if isinstance(output_size, (int, np.integer)) and not isinstance(output_size, bool):
        size = (int(output_size), int(output_size))
    elif (
        isinstance(output_size, (tuple, list))
        and len(output_size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in output_size)
    ):
        size = (int(output_size[0]), int(output_size[1]))
    else:
        raise ValueError(f"output_size must be an int or a pair of ints, got {output_size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return size
