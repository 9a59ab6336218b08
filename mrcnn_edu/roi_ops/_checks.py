"""Argument checks of the RoI ops, and ``boxes_to_rois``, the RoI format they all accept.

Every op validates its arguments completely, here, before any arithmetic or any dispatch to a
GPU kernel, so that a wrong call fails with a message that says what to pass instead:

* feature maps: NumPy (or CuPy) arrays ``(N, C, H, W)`` of float32 or float64, never cast;
* RoIs: ``(K, 5)`` rows ``(batch_index, x1, y1, x2, y2)`` in image pixels, in the features'
  dtype, finite, with whole batch indices in ``[0, N)`` and ``x1 <= x2``, ``y1 <= y2``; or a list
  of N ``(K_i, 4)`` box arrays, which ``boxes_to_rois`` turns into those rows;
* ``output_size`` (``PH`` or ``(PH, PW)``, positive), ``spatial_scale`` (a positive number,
  ``1 / stride``), ``sampling_ratio`` (an int, ``<= 0`` adaptive) and ``aligned`` (a bool);
* the backward passes' gradients, argmax and ``input_shape`` against what the forward made;
* ``MultiScaleRoIAlign``'s features dict, per-image boxes, image sizes and declared strides.

The exact rules of every op (torchvision's) are written down in ``docs/conventions.md``.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_xp, raise_if
from ..nn.utils import NonFiniteError, check_array, check_float_array, pair


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


# ============================================================================================
# Forward arguments
# ============================================================================================
def check_pool_args(input, rois, output_size, spatial_scale, n_images=None, what="input"):
    """Shared checks of roi_align/roi_pool (and their backward): returns (input, rois, (PH, PW))."""
    check_features_array(input, what)
    xp = get_xp(input)
    n = input.shape[0] if n_images is None else n_images
    rois = check_rois(rois, n, input.dtype, xp, what)
    size = pair(output_size, "output_size", minimum=1)
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


def check_align_args(sampling_ratio, aligned) -> tuple[int, bool]:
    """RoIAlign's own arguments: an int sampling_ratio and a bool aligned."""
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, np.integer)):
        raise ValueError(
            f"sampling_ratio must be an int (samples per bin side; -1 for adaptive), "
            f"got {sampling_ratio!r}"
        )
    if not isinstance(aligned, (bool, np.bool_)):
        raise ValueError(f"aligned must be True or False, got {aligned!r}")
    return int(sampling_ratio), bool(aligned)


# With adaptive sampling a RoI's samples per bin grow with its size (memory and time); a RoI
# this many times the map (plus one pixel) is refused: it lies mostly outside the map.
ADAPTIVE_EXTENT_LIMIT = 4


def check_adaptive_extent(rois, shape, spatial_scale, sampling_ratio) -> None:
    """With ``sampling_ratio <= 0``, refuse RoIs whose scaled height (width) exceeds
    ``ADAPTIVE_EXTENT_LIMIT * (H + 1)`` (``W``): their sample count, hence the memory and time
    of the op, would grow with the RoI (2 GB per ~1e8 feature pixels of RoI)."""
    if sampling_ratio > 0 or rois.shape[0] == 0:
        return
    xp = get_xp(rois)
    height, width = shape[-2:]
    sides = (rois[:, 3:5] - rois[:, 1:3]).astype(xp.float64) * float(spatial_scale)  # (w, h)
    limits = xp.asarray([width + 1, height + 1], dtype=xp.float64) * ADAPTIVE_EXTENT_LIMIT
    too_big = (sides > limits).any(axis=1)

    def error():
        i = int(xp.flatnonzero(too_big)[0])
        w, h = (float(v) for v in sides[i])
        return ValueError(
            f"rois[{i}] spans {h:.4g} x {w:.4g} feature pixels (h x w) on a {height} x {width} "
            f"map: with adaptive sampling (sampling_ratio <= 0) its samples grow with its size, "
            f"so RoIs over {ADAPTIVE_EXTENT_LIMIT}x the map (+1 pixel) are refused; clip the "
            "boxes to the image, or pass a fixed sampling_ratio"
        )

    raise_if(too_big.any(), error)


def check_features_array(a, name) -> None:
    """A float32/float64 (N, C, H, W) array; the forward's input also needs H, W > 0."""
    check_array(a, name)
    if a.ndim != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {tuple(a.shape)}")
    check_float_array(a, name)
    if name == "input" and (a.shape[2] == 0 or a.shape[3] == 0):
        raise ValueError(f"{name} has an empty spatial size {tuple(a.shape[2:])}")


def check_finite_features(input) -> None:
    """RoIAlign's input holds no NaN or inf."""
    # The separable form multiplies whole windows by weights that may be 0, and 0 * inf = NaN
    # would leak into bins whose samples never touch the inf: refuse rather than differ.
    xp = get_xp(input)
    raise_if(
        ~xp.isfinite(input).all(),
        lambda: NonFiniteError("input contains NaN or inf; RoIAlign needs finite features"),
    )


def check_no_nan(input) -> None:
    """RoIPool's input holds no NaN (infinities are fine: they compare)."""
    xp = get_xp(input)
    raise_if(
        xp.isnan(input).any(),
        lambda: ValueError(
            "input contains NaN; the maximum of a bin holding a NaN is ill-defined (torchvision "
            "silently skips them) -- find where the NaN comes from first"
        ),
    )


def check_rois(rois, n_images, dtype, xp, what="input"):
    """rois: (K, 5) (or a list of (K_i, 4) boxes) -> validated (K, 5) array."""
    if isinstance(rois, (list, tuple)):
        if len(rois) != n_images:
            raise ValueError(
                f"rois given as a list must hold one (K_i, 4) array per image: expected "
                f"{n_images}, got {len(rois)}"
            )
        for i, b in enumerate(rois):
            check_array(b, f"rois[{i}]")
        rois = boxes_to_rois(list(rois))
    check_array(rois, "rois")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"rois must be (K, 5) rows (batch_index, x1, y1, x2, y2), got shape "
            f"{tuple(rois.shape)}; for per-image (K_i, 4) boxes pass a list of arrays"
        )
    if rois.dtype != dtype:
        raise ValueError(
            f"rois are {rois.dtype} but {what} is {dtype}; cast them with rois.astype({what}.dtype)"
        )
    if rois.shape[0]:
        _check_roi_values(rois, n_images, xp)
    return rois


def _check_roi_values(rois, n_images, xp) -> None:
    """Finite coordinates, whole batch indices in [0, N), corners in (x1, y1, x2, y2) order."""
    raise_if(~xp.isfinite(rois).all(), lambda: ValueError("rois contain NaN or inf coordinates"))
    batch = rois[:, 0]
    raise_if(
        (batch != xp.floor(batch)).any(),
        lambda: ValueError("rois[:, 0] must hold whole batch indices (0, 1, ...)"),
    )
    raise_if(
        ((batch < 0) | (batch >= n_images)).any(),
        lambda: ValueError(
            f"rois[:, 0] (batch index) must be in [0, N = {n_images}), got values from "
            f"{float(batch.min()):g} to {float(batch.max()):g}"
        ),
    )
    unordered = (rois[:, 3] < rois[:, 1]) | (rois[:, 4] < rois[:, 2])

    def order_error():
        bad = int(xp.flatnonzero(unordered)[0])
        return ValueError(
            f"rois must have x2 >= x1 and y2 >= y1 (x1, y1, x2, y2 order); row {bad} is "
            f"{[float(v) for v in rois[bad]]}"
        )

    raise_if(unordered.any(), order_error)


# ============================================================================================
# Backward arguments
# ============================================================================================
def check_input_shape(input_shape) -> tuple[int, int, int, int]:
    """The forward input's (N, C, H, W), as four non-negative ints."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be (N, C, H, W), got {input_shape!r}") from None
    if len(shape) != 4 or min(shape) < 0:
        raise ValueError(f"input_shape must be four sizes (N, C, H, W), got {input_shape!r}")
    return shape


def check_align_grad(grad_output, rois, shape, output_size, spatial_scale):
    """roi_align_backward's gradient and forward arguments: returns (grad, rois, (PH, PW))."""
    check_array(grad_output, "grad_output")
    if grad_output.ndim != 4:
        raise ValueError(
            f"grad_output must be (K, C, PH, PW), got shape {tuple(grad_output.shape)}"
        )
    return check_pool_args(
        grad_output, rois, output_size, spatial_scale, n_images=shape[0], what="grad_output"
    )


def check_grad_shape(grad_output, want) -> None:
    """grad_output is (K, C, PH, PW) of the forward's K rois, C channels and output size."""
    if tuple(grad_output.shape) != want:
        raise ValueError(
            f"grad_output has shape {tuple(grad_output.shape)} but the K rois, the C of "
            f"input_shape and output_size give {want}; pass the forward's rois and output_size"
        )


def check_pool_grad(grad_output, argmax, shape) -> None:
    """roi_pool_backward's gradient and the argmax of the same roi_pool call."""
    n, c, h, w = shape
    check_array(grad_output, "grad_output")
    check_array(argmax, "argmax")
    if grad_output.ndim != 4 or grad_output.shape[1] != c:
        raise ValueError(
            f"grad_output must be (K, C, PH, PW) with C = {c} from input_shape, "
            f"got shape {tuple(grad_output.shape)}"
        )
    check_float_array(grad_output, "grad_output")
    if tuple(argmax.shape) != tuple(grad_output.shape):
        raise ValueError(
            f"argmax has shape {tuple(argmax.shape)} but grad_output has "
            f"{tuple(grad_output.shape)}; pass the argmax returned by the same roi_pool call"
        )
    if argmax.dtype.kind not in "iu":
        raise ValueError(f"argmax must be an integer array from roi_pool, got {argmax.dtype}")
    if argmax.size:
        raise_if(
            ((argmax < -1) | (argmax >= h * w)).any(),
            lambda: ValueError(
                f"argmax values must be -1 or plane indices in [0, H*W = {h * w}); these do "
                "not come from a roi_pool on a map of this input_shape"
            ),
        )


def check_pool_grad_rois(rois, n, grad_output):
    """roi_pool_backward's rois: the forward's (K, 5), or None when N == 1 (or K == 0)."""
    k = grad_output.shape[0]
    if rois is None:
        if n != 1 and k > 0:
            raise ValueError(
                f"roi_pool_backward needs the forward's rois when N = {n} > 1, to know which "
                "image each RoI was pooled from: roi_pool_backward(grad, argmax, shape, rois)"
            )
        return None
    rois = check_rois(rois, n, grad_output.dtype, get_xp(grad_output), "grad_output")
    if rois.shape[0] != k:
        raise ValueError(
            f"rois has {rois.shape[0]} rows but grad_output has K = {k}; pass the forward's rois"
        )
    return rois


# ============================================================================================
# MultiScaleRoIAlign
# ============================================================================================
def check_featmap_names(featmap_names) -> list[str]:
    """A non-empty list of str (a bare str is refused: it would read as its letters)."""
    if isinstance(featmap_names, str) or not all(isinstance(n, str) for n in featmap_names):
        raise ValueError(f"featmap_names must be a list of str, got {featmap_names!r}")
    if len(featmap_names) == 0:
        raise ValueError("featmap_names must name at least one feature map")
    return list(featmap_names)


def check_strides(strides, featmap_names) -> tuple[int, ...] | None:
    """None, or one power-of-two int per map, increasing (finest first)."""
    if strides is None:
        return None
    if not isinstance(strides, (list, tuple)) or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_)) for s in strides
    ):
        raise ValueError(f"strides must be a sequence of ints (4, 8, 16, 32), got {strides!r}")
    strides = tuple(int(s) for s in strides)
    if len(strides) != len(featmap_names):
        raise ValueError(
            f"strides has {len(strides)} entries for the {len(featmap_names)} maps "
            f"{featmap_names}; give one stride per name"
        )
    if any(s <= 0 or s & (s - 1) for s in strides):
        raise ValueError(f"strides must be powers of two, got {strides}")
    if any(b <= a for a, b in zip(strides, strides[1:])):
        raise ValueError(f"strides must increase, finest first (4, 8, 16, 32), got {strides}")
    return strides


def check_declared_strides(featmap_names, feats, inferred, strides, image_size) -> None:
    """Each map has the size its declared stride gives (inferred scale == 1 / stride), and the
    maps are consecutive pyramid levels: each stride twice the one before."""
    for name, f, scale, stride in zip(featmap_names, feats, inferred, strides):
        if scale != 1.0 / stride:
            raise ValueError(
                f"features[{name!r}] has shape {tuple(f.shape)}, i.e. stride "
                f"{1.0 / scale:g} in the padded image size {tuple(image_size)}, but strides "
                f"declares stride {stride} for it"
            )
    for i in range(1, len(strides)):
        if strides[i] != 2 * strides[i - 1]:
            raise ValueError(
                f"features[{featmap_names[i]!r}] has stride {strides[i]} right after stride "
                f"{strides[i - 1]}: the maps must be consecutive FPN levels (each stride twice "
                "the one before), or boxes would be pooled from the wrong level"
            )


def check_level_features(features, featmap_names) -> list:
    """The maps named by featmap_names: (N, C, H_l, W_l) arrays of one N, C and dtype."""
    if not isinstance(features, dict):
        raise ValueError(
            f"features must be a dict name -> (N, C, H, W) array, got {type(features).__name__}"
        )
    missing = [name for name in featmap_names if name not in features]
    if missing:
        raise ValueError(
            f"features has no map named {missing} (it has {list(features)}); "
            "featmap_names must name keys of the features dict"
        )
    feats = [features[name] for name in featmap_names]
    for name, f in zip(featmap_names, feats):
        check_features_array(f, f"features[{name!r}]")
    first = feats[0]
    for name, f in zip(featmap_names, feats):
        if f.shape[:2] != first.shape[:2] or f.dtype != first.dtype:
            raise ValueError(
                f"features[{name!r}] is {tuple(f.shape)} {f.dtype}, but "
                f"features[{featmap_names[0]!r}] is {tuple(first.shape)} {first.dtype}; "
                "all levels need the same batch size, channels and dtype"
            )
    return feats


def check_boxes(boxes, n, dtype) -> None:
    """One box array per image, in the features' dtype."""
    if not isinstance(boxes, (list, tuple)) or len(boxes) != n:
        got = len(boxes) if isinstance(boxes, (list, tuple)) else type(boxes).__name__
        raise ValueError(
            f"boxes must be a list with one (K_i, 4) array per image (N = {n}), got {got}"
        )
    for i, b in enumerate(boxes):
        check_array(b, f"boxes[{i}]")
        if b.dtype != dtype:
            raise ValueError(
                f"boxes[{i}] is {b.dtype} but the features are {dtype}; cast the boxes with "
                ".astype(features.dtype)"
            )


def check_image_shapes(image_shapes, n) -> list[tuple[int, int]]:
    """One positive (height, width) per image."""
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
