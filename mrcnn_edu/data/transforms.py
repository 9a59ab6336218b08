"""Data augmentation: flips and 90-degree rotations of a whole dataset item, kept consistent.

An item is ``{"image" (3, H, W), "boxes" (G, 4), "masks" (G, H, W), "labels", ...}``, and may
hold ``"crowd_boxes"`` (C, 4) and ``"keypoints"`` (G, K, 3) rows of ``(x, y, visibility)``.
Boxes are continuous pixel edges (pixel ``(row r, column c)`` covers ``[c, c + 1) x [r, r + 1)``),
so each transform is one map of the image plane, applied alike to pixels and coordinates::

    hflip   (x, y) -> (W - x, y)        pixel column c -> W - 1 - c
    vflip   (x, y) -> (x, H - y)        pixel row r    -> H - 1 - r
    rot90   (x, y) -> (y, W - x)        counter-clockwise (numpy.rot90); the image becomes W x H

A box's corners are mapped and re-sorted (``hflip``: ``x1' = W - x2``, ``x2' = W - x1``), so the
tight box of a transformed mask is the transformed box of the mask. A mirror (either flip) turns
a person's left side into the right: keypoints are then renumbered with a left/right swap map
(``keypoint_flip_index``); rotations keep handedness. Invisible keypoints (visibility 0) stay
at ``(0, 0)``, COCO's convention.

``Augment(AugmentConfig(hflip=True))`` is the callable ``(item, rng) -> item`` the trainer
applies to every training item, drawing from its own generator: each enabled flip happens with
probability 0.5 (the paper's and torchvision's reference recipe), ``rot90`` turns by a uniform
0, 90, 180 or 270 degrees. Nothing is drawn for a disabled transform. Items are never modified
in place (a dataset may hand out the same arrays again).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..backend import get_xp
from ..config_checks import check_fields

BOX_KEYS = ("boxes", "crowd_boxes")
FLIP_PROBABILITY = 0.5


@dataclass
class AugmentConfig:
    """Which augmentations training uses (all off by default): ``hflip`` and ``vflip`` flip an
    item with probability 0.5, ``rot90`` turns it by a random multiple of 90 degrees."""

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False

    def __post_init__(self):
        check_fields(self)

    @property
    def active(self) -> tuple[str, ...]:
        """The names of the enabled augmentations, in the order they are applied."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name))

    @classmethod
    def from_names(cls, text: str) -> AugmentConfig:
        """From a comma list such as ``"hflip,rot90"``, or ``"none"`` (the CLI's ``--augment``)."""
        names = [n.strip() for n in str(text).split(",") if n.strip()]
        if names == ["none"]:
            return cls()
        valid = [f.name for f in fields(cls)]
        unknown = [n for n in names if n not in valid]
        if unknown or not names:
            raise ValueError(
                f"unknown augmentation(s) {unknown or [text]}; give a comma list of {valid}, "
                "or 'none'"
            )
        return cls(**{n: True for n in names})


class Augment:
    """``augment(item, rng) -> item``: the enabled transforms of ``config``, each drawn from
    ``rng`` (a ``numpy.random.Generator``). ``keypoint_flip`` is the left/right swap map the
    flips need for items with keypoints (``keypoint_flip_index(names)``)."""

    def __init__(self, config: AugmentConfig, keypoint_flip=None):
        if not isinstance(config, AugmentConfig):
            raise ValueError(f"config must be an AugmentConfig, got {type(config).__name__}")
        self.config = config
        self.keypoint_flip = None if keypoint_flip is None else np.asarray(keypoint_flip)

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        c = self.config
        if c.hflip and rng.random() < FLIP_PROBABILITY:
            item = hflip(item, self.keypoint_flip)
        if c.vflip and rng.random() < FLIP_PROBABILITY:
            item = vflip(item, self.keypoint_flip)
        if c.rot90:
            item = rot90(item, int(rng.integers(4)))
        return item

    def __repr__(self) -> str:
        return f"Augment({', '.join(self.config.active) or 'none'})"


def build_augment(config: AugmentConfig, keypoint_flip=None) -> Augment | None:
    """The trainer's ``augment`` callable for ``config``, or None when nothing is enabled."""
    return Augment(config, keypoint_flip) if config.active else None


def hflip(item: dict, keypoint_flip=None) -> dict:
    """Mirror left to right: ``x -> W - x``."""
    w = _image_size(item)[1]

    def point(x, y):
        return w - x, y

    return _mapped(item, lambda a: a[..., ::-1], point, mirror=True, keypoint_flip=keypoint_flip)


def vflip(item: dict, keypoint_flip=None) -> dict:
    """Mirror top to bottom: ``y -> H - y``."""
    h = _image_size(item)[0]

    def point(x, y):
        return x, h - y

    return _mapped(item, lambda a: a[..., ::-1, :], point, mirror=True, keypoint_flip=keypoint_flip)


def rot90(item: dict, k: int = 1) -> dict:
    """Turn ``k`` quarter turns counter-clockwise (``numpy.rot90`` on the last two axes): each
    turn maps ``(x, y) -> (y, W - x)`` and makes an H x W image W x H."""
    for _ in range(int(k) % 4):
        w = _image_size(item)[1]

        def point(x, y, w=w):
            return y, w - x

        item = _mapped(item, _rot90_planes, point, mirror=False)
    return item


def keypoint_flip_index(names) -> list[int]:
    """The left/right swap map of keypoint ``names``: index ``j`` gets the keypoint whose name
    swaps ``left`` and ``right`` (``left_eye`` <-> ``right_eye``); others map to themselves."""
    names = [str(n) for n in names]
    swapped = [
        n.replace("left", "\0").replace("right", "left").replace("\0", "right") for n in names
    ]
    missing = [s for s in swapped if s not in names]
    if missing:
        raise ValueError(f"keypoints {missing} have no left/right partner among {names}")
    return [names.index(s) for s in swapped]


# -- the common part of every transform ----------------------------------------------------------
def _mapped(item: dict, planes, point, mirror: bool, keypoint_flip=None) -> dict:
    """A copy of ``item`` with ``planes`` applied to the image and masks (arrays ``(..., H, W)``)
    and ``point(x, y)`` to box corners and keypoints."""
    out = dict(item)
    xp = get_xp(item["image"])
    out["image"] = xp.ascontiguousarray(planes(item["image"]))
    if "masks" in item:
        out["masks"] = xp.ascontiguousarray(planes(xp.asarray(item["masks"])))
    for key in BOX_KEYS:
        if key in item:
            out[key] = _mapped_boxes(xp.asarray(item[key]), point)
    if "keypoints" in item:
        out["keypoints"] = _mapped_keypoints(
            xp.asarray(item["keypoints"]), point, mirror, keypoint_flip
        )
    if "orig_size" in item:
        out["orig_size"] = tuple(int(s) for s in out["image"].shape[-2:])
    return out


def _mapped_boxes(boxes, point):
    """Both corners mapped, then each box's corners re-sorted into x1 <= x2, y1 <= y2."""
    xp = get_xp(boxes)
    boxes = boxes.reshape(-1, 4)
    xa, ya = point(boxes[:, 0], boxes[:, 1])
    xb, yb = point(boxes[:, 2], boxes[:, 3])
    mapped = xp.stack(
        [xp.minimum(xa, xb), xp.minimum(ya, yb), xp.maximum(xa, xb), xp.maximum(ya, yb)], axis=1
    )
    return mapped.astype(boxes.dtype, copy=False)


def _mapped_keypoints(keypoints, point, mirror: bool, keypoint_flip):
    xp = get_xp(keypoints)
    if keypoints.ndim != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must be (G, K, 3) rows of (x, y, v), got {keypoints.shape}")
    out = keypoints.copy()
    x, y = point(keypoints[..., 0], keypoints[..., 1])
    visible = keypoints[..., 2] > 0
    out[..., 0] = xp.where(visible, x, 0)
    out[..., 1] = xp.where(visible, y, 0)
    if mirror:
        k = keypoints.shape[1]
        if keypoint_flip is None or len(keypoint_flip) != k:
            raise ValueError(
                f"flipping an item with {k} keypoints needs their left/right swap map "
                "(Augment(config, keypoint_flip=keypoint_flip_index(names)))"
            )
        out = out[:, xp.asarray(keypoint_flip)]
    return out


def _rot90_planes(a):
    xp = get_xp(a)
    return xp.rot90(a, 1, axes=(-2, -1))


def _image_size(item: dict) -> tuple[int, int]:
    image = item.get("image")
    if getattr(image, "ndim", None) != 3:
        raise ValueError(
            f"an item's 'image' must be (3, H, W), got {getattr(image, 'shape', None)}"
        )
    return int(image.shape[1]), int(image.shape[2])
