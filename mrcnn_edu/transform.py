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
are resampled bilinearly with ``align_corners=False`` (``resample.resize_image``, torch's
generic CPU kernel bit for bit in float32).

``min_size`` may list several sizes: in training each image draws one from the model's
generator (scale jitter); at inference the last one is used. ``min_size = None`` (the shapes
preset) resizes nothing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .backend import get_xp, to_device
from .config_checks import ConfigError
from .keypoints import check_keypoints
from .postprocess import paste_masks_in_image
from .resample import resize_image


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
# Nearest resampling of masks, scaling of boxes (images: resample.resize_image)
# -------------------------------------------------------------------------------------------
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


def resize_keypoints(keypoints, from_size: tuple[int, int], to_size: tuple[int, int]):
    """Keypoints (..., 3) rows (x, y, v) scaled as :func:`resize_boxes` scales boxes (x by
    ``float32(to_w) / float32(from_w)``, y likewise, torchvision's ``resize_keypoints``); the
    visibility is kept, and an unlabelled keypoint stays at (0, 0)."""
    ratio_w = np.float32(to_size[1]) / np.float32(from_size[1])
    ratio_h = np.float32(to_size[0]) / np.float32(from_size[0])
    scale = get_xp(keypoints).asarray([ratio_w, ratio_h, 1], dtype=np.float32)
    return (keypoints * scale).astype(keypoints.dtype, copy=False)


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


def check_targets(
    targets, image_sizes, num_classes: int, dtype, num_keypoints: int = 0
) -> list[dict]:
    """One target dict per image, each checked against its image's size: ``boxes`` (G, 4)
    with x2 > x1 and y2 > y1 (returned in ``dtype``), ``labels`` (G,) ints in 1..K,
    ``masks`` (G, h, w), and with ``num_keypoints`` > 0 ``keypoints`` (G, num_keypoints, 3)
    (``keypoints.check_keypoints``; without, they are dropped). Raises a ValueError naming the
    target and the problem."""
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
        target = {"boxes": boxes, "labels": labels.astype(np.int64), "masks": masks}
        if num_keypoints:
            where = f"targets[{i}]['keypoints']"
            target["keypoints"] = check_keypoints(
                t.get("keypoints"), g, num_keypoints, where, dtype
            )
        out.append(target)
    return out


def prepare_inputs(
    images,
    config,
    dtype,
    targets=None,
    need_targets: bool = False,
    training=False,
    rng=None,
    device: str | None = None,
) -> ModelInputs:
    """The whole input transform for a model of ``config`` (a ``MaskRCNNConfig``) whose
    parameters are ``dtype``. ``training`` with several ``config.min_size`` values draws one
    per image from ``rng`` (nothing is drawn otherwise); ``need_targets`` requires targets.

    ``device`` (the model's, e.g. ``"cuda:0"``): the images and targets are checked where they
    are (host arrays: no device sync) and then moved there, where the rest runs."""
    images = check_images(images)
    original = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    if need_targets or targets is not None:
        targets = check_targets(
            targets, original, config.num_classes, dtype, getattr(config, "num_keypoints", 0)
        )
    if device is not None:
        images, targets = to_device(images, device), to_device(targets, device)
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


def to_original_size(
    detections, image_sizes, original_sizes, mask_threshold=0.5, mask_paste: str = "subpixel"
) -> list[dict]:
    """Detections of the resized images, mapped back to the images as given: boxes scaled by
    original / resized per axis, and the ``mask_probs`` (D, M, M) pasted into the original
    image as ``masks`` (D, H, W) (uint8 ``> mask_threshold``; probabilities with None), the
    way ``mask_paste`` says (``postprocess.paste_masks_in_image``'s ``mode``)."""
    out = []
    for det, size, original in zip(detections, image_sizes, original_sizes):
        det = dict(det)
        if tuple(size) != tuple(original):
            det["boxes"] = resize_boxes(det["boxes"], size, original)
            if "keypoints" in det:
                det["keypoints"] = resize_keypoints(det["keypoints"], size, original)
        if "mask_probs" in det:  # absent without the mask branch
            probs = det.pop("mask_probs")
            det["masks"] = paste_masks_in_image(
                probs, det["boxes"], original, mask_threshold, mode=mask_paste
            )
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
    out = {
        **target,
        "boxes": resize_boxes(target["boxes"], size, new_size),
        "masks": resize_masks(target["masks"], new_size),
    }
    if "keypoints" in target:
        out["keypoints"] = resize_keypoints(target["keypoints"], size, new_size)
    return out


def _pad(images, sizes, divisible: int, dtype):
    """Stack the images into a zero batch padded (bottom/right) to a multiple of ``divisible``."""
    xp = get_xp(images[0])
    hp = -(-max(h for h, _ in sizes) // divisible) * divisible
    wp = -(-max(w for _, w in sizes) // divisible) * divisible
    batch = xp.zeros((len(images), 3, hp, wp), dtype=dtype)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        batch[i, :, :h, :w] = im
    return batch
