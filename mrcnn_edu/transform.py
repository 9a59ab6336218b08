"""The model's input transform and its inverse (torchvision's ``GeneralizedRCNNTransform``).

On the way in, every image of a batch is::

    checked ─ normalised (ImageNet mean/std) ─ resized (min_size/max_size) ─ padded to /32

and its targets go along: masks checked against the image, boxes scaled by the same factor
per axis, masks resized by nearest neighbour. On the way out, each image's detections are
mapped back: boxes scaled by the inverse factors, masks pasted at the original resolution.

**The resize rule** (torchvision's, to the last bit). With ``short``/``long`` the image's
shorter/longer side, ``scale = min(min_size / short, max_size / long)`` in float64, and each
side becomes ``floor(side * scale)`` (``interpolate(..., recompute_scale_factor=True)``): the
shorter side reaches ``min_size`` unless the longer would then pass ``max_size``. The pixels
are resampled bilinearly with ``align_corners=False``: output pixel ``i`` of an axis of ``n``
input pixels resampled to ``m`` reads the input at ``s = (i + 0.5) * n / m - 0.5`` (clamped at
0), between input pixels ``floor(s)`` and the next one, with weights ``1 - (s - floor(s))``
and ``s - floor(s)``. Bilinear interpolation is separable, so an image is resized as
``Wy @ (image @ Wx.T)``, along x first, then y, where ``W`` (``interpolation_matrix``) has those two
weights in each row. Stored densely, ``W`` would cost ``n`` multiply-adds per output pixel
(27 billion for a 2000 x 3000 photo), so ``resize_image`` keeps only its two non-zeros per row
(``linear_taps``): the same matrix product, two taps per output pixel.

``min_size`` may list several sizes: in training each image draws one from the model's
generator (scale jitter); at inference the last one is used. ``min_size = None`` (the shapes
preset) resizes nothing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .backend import get_xp
from .config_checks import ConfigError
from .postprocess import paste_masks_in_image


class ModelInputs(NamedTuple):
    """What the model's stages take: the padded, normalised ``batch`` (N, 3, Hp, Wp), each
    image's ``image_sizes`` (h, w) inside it, the ``original_sizes`` the images came in at,
    and the ``targets`` (checked and resized with their images; None at inference)."""

    batch: object
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    targets: list[dict] | None


# -------------------------------------------------------------------------------------------
# The resize rule
# -------------------------------------------------------------------------------------------
def check_size_settings(min_size, max_size) -> tuple[int, ...] | None:
    """``min_size`` as a tuple of ints (None: native size), after checking the two settings
    of ``MaskRCNNConfig``: both None, or positive ints with every ``min_size <= max_size``."""
    if min_size is None and max_size is None:
        return None
    if min_size is None or max_size is None:
        missing, given = ("min_size", "max_size") if min_size is None else ("max_size", "min_size")
        raise ConfigError(
            missing,
            f"must be set too when {given} is: the two go together (torchvision's detection "
            "default is min_size 800, max_size 1333); leave both null for native size",
        )
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ConfigError(
            "min_size", f"must be a positive int or a list of them, got {list(sizes)}"
        )
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ConfigError("max_size", f"must be a positive int, got {max_size!r}")
    if max(sizes) > max_size:
        raise ConfigError("min_size", f"must not exceed max_size={max_size}, got {list(sizes)}")
    return sizes


def resize_scale(size: tuple[int, int], min_size: int, max_size: int) -> float:
    """``min(min_size / short side, max_size / long side)``, in float64 as torchvision does."""
    return min(min_size / min(size), max_size / max(size))


def resized_size(size: tuple[int, int], min_size: int, max_size: int) -> tuple[int, int]:
    """``(floor(h * scale), floor(w * scale))``: 2000 x 3000 with 800/1333 gives 800 x 1200."""
    scale = resize_scale(size, min_size, max_size)
    return tuple(int(math.floor(float(s) * scale)) for s in size)


# -------------------------------------------------------------------------------------------
# Bilinear resampling of images, nearest of masks, scaling of boxes
# -------------------------------------------------------------------------------------------
def linear_taps(n_in: int, n_out: int, dtype=np.float32):
    """The two non-zeros of each row of the (n_out, n_in) bilinear interpolation matrix:
    ``(i0, i1, w0, w1)``, output pixel ``i`` = ``w0[i] * x[i0[i]] + w1[i] * x[i1[i]]``.

    Computed in ``dtype`` the way torchvision's CPU kernel does: the ratio ``n_in / n_out``
    rounded to ``dtype``, the source position ``ratio * (i + 0.5) - 0.5`` with one rounding (a
    fused multiply-add), ``w1 = s - floor(s)`` and ``w0 = 1 - w1``; at the last input pixel
    both taps read it. ``n_in == n_out`` is the identity (``w0 = 1``, ``w1 = 0``).
    """
    i = np.arange(n_out)
    if n_in == n_out:
        return i, i, np.ones(n_out, dtype), np.zeros(n_out, dtype)
    dtype = np.dtype(dtype)
    ratio = dtype.type(n_in) / dtype.type(n_out)
    src = _fma(np.full(n_out, ratio, dtype), (i + 0.5).astype(dtype), np.full(n_out, -0.5, dtype))
    src = np.maximum(src, dtype.type(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(dtype), 0, 1).astype(dtype)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (dtype.type(1) - w1).astype(dtype), w1


def interpolation_matrix(n_in: int, n_out: int, dtype=np.float32) -> np.ndarray:
    """The (n_out, n_in) bilinear interpolation matrix ``W``: resizing one axis of an image is
    ``W @ x``. Each row holds the two weights of :func:`linear_taps` and sums to 1."""
    i0, i1, w0, w1 = linear_taps(n_in, n_out, dtype)
    w = np.zeros((n_out, n_in), dtype)
    rows = np.arange(n_out)
    np.add.at(w, (rows, i0), w0)
    np.add.at(w, (rows, i1), w1)
    return w


def resize_image(image, size: tuple[int, int]):
    """Bilinear resize (``align_corners=False``) of a (C, H, W) float image to ``size`` (h, w):
    ``Wy @ (image @ Wx.T)``, along x first, each output a two-tap sum ``w0 * x0 + w1 * x1``.

    In float32 this is torchvision's generic CPU kernel bit for bit (its sums are fused
    multiply-adds, ``fma(x0, w0, x1 * w1)``, emulated here exactly); other dtypes are computed
    with plain rounding. One channel at a time, so the float64 temporaries of the emulation
    stay near the size of one output channel."""
    xp = get_xp(image)
    h, w = int(size[0]), int(size[1])
    if image.ndim != 3 or h < 1 or w < 1:
        raise ValueError(
            f"resize_image needs a (C, H, W) image and a positive size, got {image.shape} -> {size}"
        )
    cols = [xp.asarray(a) for a in linear_taps(image.shape[2], w, image.dtype)]
    rows = [xp.asarray(a) for a in linear_taps(image.shape[1], h, image.dtype)]
    out = xp.empty((image.shape[0], h, w), dtype=image.dtype)
    for c, plane in enumerate(image):
        if w != image.shape[2]:
            i0, i1, w0, w1 = cols
            plane = _fma(plane[:, i0], w0, plane[:, i1] * w1)
        if h != image.shape[1]:
            i0, i1, w0, w1 = rows
            plane = _fma(plane[i0, :], w0[:, None], plane[i1, :] * w1[:, None])
        out[c] = plane
    return out


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source pixel of each output pixel for nearest resizing (torchvision's masks):
    ``min(floor(i * float32(n_in / n_out)), n_in - 1)``, the ratio rounded to float32."""
    ratio = np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out, dtype=np.float32) * ratio).astype(np.int64)
    return np.minimum(src, n_in - 1)


def resize_masks(masks, size: tuple[int, int]):
    """Nearest-neighbour resize of (G, H, W) masks to ``size`` (h, w); the dtype is kept."""
    xp = get_xp(masks)
    rows = xp.asarray(nearest_indices(masks.shape[1], int(size[0])))
    cols = xp.asarray(nearest_indices(masks.shape[2], int(size[1])))
    return masks[:, rows[:, None], cols[None, :]]


def resize_boxes(boxes, from_size: tuple[int, int], to_size: tuple[int, int]):
    """Boxes (N, 4) x1y1x2y2 of an image of ``from_size`` (h, w) in the pixels of the same
    image resized to ``to_size``: x times ``to_w / from_w``, y times ``to_h / from_h`` (the
    ratios rounded to float32, as torchvision's ``resize_boxes``)."""
    xp = get_xp(boxes)
    ratio_h = np.float32(to_size[0]) / np.float32(from_size[0])
    ratio_w = np.float32(to_size[1]) / np.float32(from_size[1])
    ratios = xp.asarray([ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float32)
    return (boxes * ratios).astype(boxes.dtype, copy=False)


def _fma(a, b, c):
    """``a * b + c`` elementwise with one rounding, as a fused multiply-add. For float32 the
    product is exact in float64, the sum is rounded there "to odd" (the last bit of an
    inexact result set), and the cast to float32 is then the correctly rounded fma; other
    dtypes use plain ``a * b + c``."""
    xp = get_xp(a, b, c)
    if a.dtype != np.float32:
        return a * b + c
    p = a.astype(np.float64) * xp.asarray(b, dtype=np.float64)
    q = xp.asarray(c, dtype=np.float64)
    s = p + q
    t = s - p  # Knuth's two-sum: err is exactly (p + q) - s
    err = (p - (s - t)) + (q - t)
    even = (s.view(np.int64) & 1) == 0
    fix = (err != 0) & even & xp.isfinite(err)
    s = xp.where(fix, xp.nextafter(s, xp.where(err > 0, xp.inf, -xp.inf)), s)
    return s.astype(np.float32)


# -------------------------------------------------------------------------------------------
# Checks and the whole transform
# -------------------------------------------------------------------------------------------
def check_images(images) -> list:
    """``images`` as a list of float (3, H, W) arrays in [0, 1], or a ValueError saying which
    one is not. A single (3, H, W) array is a batch of one."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    elif getattr(images, "ndim", None) == 3 and not isinstance(images, (list, tuple)):
        images = [images]
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of (3, H, W) arrays")
    for i, im in enumerate(images):
        if getattr(im, "ndim", None) != 3 or im.shape[0] != 3:
            raise ValueError(
                f"images[{i}] must have shape (3, H, W), got {getattr(im, 'shape', im)}"
            )
        if im.dtype.kind != "f":
            raise ValueError(
                f"images[{i}] has dtype {im.dtype}; pass float images in [0, 1] "
                "(divide uint8 images by 255)"
            )
        if im.size and (float(im.max()) > 1.5 or float(im.min()) < -0.5):
            raise ValueError(
                f"images[{i}] values span [{float(im.min()):.3g}, {float(im.max()):.3g}]; "
                "expected [0, 1] (divide uint8 images by 255)"
            )
    return list(images)


def check_targets(targets, image_sizes, num_classes: int, dtype) -> list[dict]:
    """One target dict per image, each checked against its image's size: ``boxes`` (G, 4)
    with x2 > x1 and y2 > y1 (returned in ``dtype``), ``labels`` (G,) ints in 1..K,
    ``masks`` (G, h, w). Raises a ValueError naming the target and the problem."""
    if targets is None or len(targets) != len(image_sizes):
        raise ValueError(
            f"training needs one target dict per image ({len(image_sizes)}), got "
            f"{None if targets is None else len(targets)}; use predict() for inference"
        )
    out = []
    for i, (t, (h, w)) in enumerate(zip(targets, image_sizes)):
        missing = {"boxes", "labels", "masks"} - set(t)
        if missing:
            raise ValueError(f"targets[{i}] lacks {sorted(missing)}")
        xp = get_xp(t["boxes"])
        boxes = xp.asarray(t["boxes"], dtype=dtype).reshape(-1, 4)
        labels = xp.asarray(t["labels"])
        masks = xp.asarray(t["masks"])
        g = boxes.shape[0]
        if labels.shape != (g,) or labels.dtype.kind not in "iu":
            raise ValueError(f"targets[{i}]['labels'] must be ({g},) integers")
        if g and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
            raise ValueError(
                f"targets[{i}]['labels'] must be in 1..{num_classes} (0 is background), got "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        if masks.shape != (g, h, w):
            raise ValueError(
                f"targets[{i}]['masks'] must have shape ({g}, {h}, {w}), got {masks.shape}"
            )
        if g and bool(xp.any((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))):
            raise ValueError(f"targets[{i}]['boxes'] has boxes with x2 <= x1 or y2 <= y1")
        out.append({"boxes": boxes, "labels": labels.astype(np.int64), "masks": masks})
    return out


def prepare_inputs(
    images, config, dtype, targets=None, need_targets: bool = False, training=False, rng=None
) -> ModelInputs:
    """The whole input transform for a model of ``config`` (a ``MaskRCNNConfig``) whose
    parameters are ``dtype``. ``training`` with several ``config.min_size`` values draws one
    per image from ``rng`` (nothing is drawn otherwise); ``need_targets`` requires targets."""
    images = check_images(images)
    original = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    if need_targets or targets is not None:
        targets = check_targets(targets, original, config.num_classes, dtype)
    xp = get_xp(images[0])
    mean = xp.asarray(config.image_mean, dtype=dtype).reshape(3, 1, 1)
    std = xp.asarray(config.image_std, dtype=dtype).reshape(3, 1, 1)
    normalised, sizes = [], []
    for i, im in enumerate(images):
        im = (im.astype(dtype) - mean) / std
        size = _target_size(original[i], config, training, rng)
        if size != original[i]:
            im = resize_image(im, size)
            if targets is not None:
                targets[i] = _resize_target(targets[i], original[i], size)
        normalised.append(im)
        sizes.append(size)
    return ModelInputs(
        _pad(normalised, sizes, config.size_divisible, dtype), sizes, original, targets
    )


def to_original_size(detections, image_sizes, original_sizes, mask_threshold=0.5) -> list[dict]:
    """Detections of the resized images, mapped back to the images as given: boxes scaled by
    original / resized per axis, and the ``mask_probs`` (D, M, M) pasted into the original
    image as ``masks`` (D, H, W) (uint8 ``> mask_threshold``; probabilities with None)."""
    out = []
    for det, size, original in zip(detections, image_sizes, original_sizes):
        det = dict(det)
        if tuple(size) != tuple(original):
            det["boxes"] = resize_boxes(det["boxes"], size, original)
        probs = det.pop("mask_probs")
        det["masks"] = paste_masks_in_image(probs, det["boxes"], original, mask_threshold)
        out.append(det)
    return out


def _target_size(size, config, training: bool, rng) -> tuple[int, int]:
    """The size an image of ``size`` is resized to (itself when ``config.min_size`` is None)."""
    if config.min_size is None:
        return size
    choices = config.min_size
    if training and len(choices) > 1:
        if rng is None:
            raise ValueError("scale jitter (several min_size values) needs a generator (rng)")
        min_size = choices[int(rng.integers(len(choices)))]
    else:
        min_size = choices[-1]
    return resized_size(size, min_size, config.max_size)


def _resize_target(target: dict, size, new_size) -> dict:
    return {
        **target,
        "boxes": resize_boxes(target["boxes"], size, new_size),
        "masks": resize_masks(target["masks"], new_size),
    }


def _pad(images, sizes, divisible: int, dtype):
    """Stack the images into a zero batch padded (bottom/right) to a multiple of ``divisible``."""
    xp = get_xp(images[0])
    hp = -(-max(h for h, _ in sizes) // divisible) * divisible
    wp = -(-max(w for _, w in sizes) // divisible) * divisible
    batch = xp.zeros((len(images), 3, hp, wp), dtype=dtype)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        batch[i, :, :h, :w] = im
    return batch
