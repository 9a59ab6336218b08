"""Synthetic shapes: rasterised circles, squares, triangles (and more) with exact binary masks.

The shapes are drawn analytically (a pixel belongs to a shape when its centre does), so masks
are exact and the data needs no download. Two datasets are built from them:

- ``toy_classification``: one noisy shape per small grey image, the image-level task the
  toolkit demo trains on.
- ``ShapesDataset``: the instance-segmentation set Mask R-CNN trains on. Each image holds a few
  coloured shapes on a random background; shapes may overlap (later ones on top), and every
  instance keeps at least ``min_visible`` of its area visible so it stays recognisable. Targets
  are the *visible* masks and their tight boxes. Item ``i`` is generated from
  ``np.random.default_rng([seed, i])``, so any item can be regenerated on its own, in any order.

``to_coco_dict`` / ``write_coco`` turn a dataset into the COCO instances format (RLE masks via
``pycocotools.mask``), which ``mrcnn_edu.data.coco.CocoDataset`` reads back and
``mrcnn_edu.evaluate`` scores against.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from ..nn.utils import as_generator

# The three classic kinds; ``toy_classification`` and the toolkit demo use exactly these.
SHAPE_KINDS = ("circle", "square", "triangle")
# Every kind ``shape_mask`` can draw; ``ShapesDataset(classes=...)`` may use any of them.
ALL_SHAPE_KINDS = SHAPE_KINDS + ("diamond", "ellipse")
BACKGROUNDS = ("flat", "gradient", "smooth", "noise")

# An ellipse is drawn with semi-axes (r, ELLIPSE_ASPECT * r): flat enough not to pass for a circle.
ELLIPSE_ASPECT = 0.55


def shape_mask(kind: str, height: int, width: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask ``(height, width)`` of one shape centred at ``(cx, cy)`` with "radius" ``r``.

    circle: disc of radius r; square: axis-aligned, side 2r; triangle: upward isosceles with
    base 2r and height 2r; diamond: square of diagonal 2r turned 45 degrees; ellipse: horizontal,
    semi-axes r and 0.55 r. Pixel (i, j) is inside when its centre (j + 0.5, i + 0.5) is.
    """
    if kind not in ALL_SHAPE_KINDS:
        raise ValueError(f"unknown shape kind {kind!r}; choose from {ALL_SHAPE_KINDS}")
    if r <= 0:
        raise ValueError(f"shape radius must be positive, got {r}")
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if kind == "ellipse":
        ry = ELLIPSE_ASPECT * r
        return (dx / r) ** 2 + (dy / ry) ** 2 <= 1.0
    # triangle: apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r); the half
    # width grows linearly from 0 at the apex to r at the base.
    t = (dy + r) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)


def toy_classification(
    n: int, size: int = 20, rng: np.random.Generator | int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` single-channel images ``(n, 1, size, size)`` float32, each with one noisy shape,
    and their labels ``(n,)`` int64 (index into ``SHAPE_KINDS``). ``rng``: a Generator or a
    seed; None means seed 0."""
    rng = as_generator(0 if rng is None else rng)
    images = np.empty((n, 1, size, size), np.float32)
    labels = rng.integers(0, len(SHAPE_KINDS), size=n)
    for i in range(n):
        r = rng.uniform(size * 0.18, size * 0.3)
        cx, cy = rng.uniform(r, size - r, size=2)
        mask = shape_mask(SHAPE_KINDS[labels[i]], size, size, cx, cy, r)
        images[i, 0] = mask * rng.uniform(0.6, 1.0) + rng.normal(0, 0.1, (size, size))
    return images, labels.astype(np.int64)


class ShapesDataset:
    """Seeded synthetic instance segmentation: coloured shapes on random backgrounds.

    ``dataset[i]`` is a dict (the torchvision detection target layout, plus the image):

    - ``"image"``: ``(3, H, W)`` float32 in [0, 1]
    - ``"boxes"``: ``(G, 4)`` float32, ``(x1, y1, x2, y2)`` pixels, the tight box of the visible
      mask (``x2`` = last column + 1, so ``x2 - x1`` is the width in pixels)
    - ``"labels"``: ``(G,)`` int64 in ``1..K`` (0 is reserved for background)
    - ``"masks"``: ``(G, H, W)`` uint8, the visible part of each instance
    - ``"image_id"``: int, equal to ``i``

    ``G`` may be 0 when ``min_objects=0``.

    Args:
        num_images: dataset length.
        image_size: ``(H, W)``.
        classes: shape kinds, in label order (label ``k`` is ``classes[k - 1]``); any of
            ``ALL_SHAPE_KINDS``.
        min_objects, max_objects: the number of shapes per image is drawn uniformly from this
            range. Placement retries until the visibility rule holds; if no place is found for
            an extra shape the image keeps fewer (never fewer than ``min_objects``).
        seed: item ``i`` is drawn from ``np.random.default_rng([seed, i])``.
        radius_range: ``(r_min, r_max)`` of the shape "radius" in pixels; default 8-30 at
            128 x 128, scaled with ``min(H, W)``.
        min_visible: a placement is rejected when it would leave any shape with less than
            this fraction of its own area visible.
        backgrounds: background styles to draw from (``BACKGROUNDS``).
    """

    def __init__(
        self,
        num_images: int,
        image_size: tuple[int, int] = (128, 128),
        classes: Sequence[str] = SHAPE_KINDS,
        min_objects: int = 1,
        max_objects: int = 4,
        seed: int = 0,
        radius_range: tuple[float, float] | None = None,
        min_visible: float = 0.4,
        backgrounds: Sequence[str] = BACKGROUNDS,
    ) -> None:
        if int(num_images) != num_images or num_images < 0:
            raise ValueError(f"num_images must be a non-negative integer, got {num_images!r}")
        if len(image_size) != 2 or min(image_size) < 8:
            raise ValueError(f"image_size must be (H, W) with both >= 8, got {image_size!r}")
        classes = tuple(classes)
        if not classes:
            raise ValueError("classes is empty; give at least one shape kind")
        for kind in classes:
            if kind not in ALL_SHAPE_KINDS:
                raise ValueError(f"unknown shape kind {kind!r} in classes; use {ALL_SHAPE_KINDS}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes has duplicates: {classes}")
        if not 0 <= min_objects <= max_objects:
            raise ValueError(
                f"need 0 <= min_objects <= max_objects, got {min_objects} and {max_objects}"
            )
        height, width = int(image_size[0]), int(image_size[1])
        if radius_range is None:
            scale = min(height, width) / 128
            radius_range = (8 * scale, 30 * scale)
        r_min, r_max = float(radius_range[0]), float(radius_range[1])
        if not 1 <= r_min <= r_max <= min(height, width) / 2:
            raise ValueError(
                f"radius_range must satisfy 1 <= r_min <= r_max <= min(H, W) / 2 = "
                f"{min(height, width) / 2} so a shape fits in the image, got {radius_range}"
            )
        if not 0 <= min_visible <= 1:
            raise ValueError(f"min_visible is a fraction in [0, 1], got {min_visible}")
        backgrounds = tuple(backgrounds)
        if not backgrounds or any(b not in BACKGROUNDS for b in backgrounds):
            raise ValueError(f"backgrounds must be a non-empty subset of {BACKGROUNDS}")

        self.num_images = int(num_images)
        self.image_size = (height, width)
        self.classes = classes
        self.min_objects = int(min_objects)
        self.max_objects = int(max_objects)
        self.seed = int(seed)
        self.radius_range = (r_min, r_max)
        self.min_visible = float(min_visible)
        self.backgrounds = backgrounds

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        item, _ = self._generate(self._check_index(index))
        return item

    def describe(self, index: int) -> list[dict]:
        """How item ``index`` was drawn: one dict per instance, bottom to top, with the shape
        (``kind``, ``label``, centre ``cx``, ``cy`` and radius ``r`` in pixels, as
        ``shape_mask`` takes them), its RGB ``colour`` and ``visible_fraction``."""
        _, layout = self._generate(self._check_index(index))
        return layout

    @property
    def categories(self) -> list[dict]:
        """COCO-style categories ``[{"id": label, "name": kind}]``, ids = labels ``1..K``."""
        return [{"id": k + 1, "name": name} for k, name in enumerate(self.classes)]

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of labels ``1..K`` (``class_names[label - 1]``)."""
        return self.classes

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """Identity: the category ids this dataset writes are its labels."""
        return {k + 1: k + 1 for k in range(len(self.classes))}

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return self.label_to_category_id

    def __repr__(self) -> str:
        return (
            f"ShapesDataset({self.num_images} images of {self.image_size}, classes="
            f"{self.classes}, objects {self.min_objects}-{self.max_objects}, seed={self.seed})"
        )

    def _check_index(self, index) -> int:
        return check_index(index, self.num_images)

    def _generate(self, index: int) -> tuple[dict, list[dict]]:
        height, width = self.image_size
        rng = np.random.default_rng([self.seed, index])
        image, background_colour = _background(rng, height, width, self.backgrounds)

        num_wanted = int(rng.integers(self.min_objects, self.max_objects + 1))
        failure = (
            f"could not place {self.min_objects} shapes in image {index} with "
            f"at least {self.min_visible:.0%} of each visible; lower min_objects "
            f"or radius_range, or raise image_size"
        )
        full_masks, visible, colours, placed = layer_objects(
            rng, num_wanted, self._place, self.min_objects, background_colour, failure
        )
        labels = [label for label, _ in placed]
        layout = [{"kind": self.classes[k - 1], "label": k, **params} for k, params in placed]
        image = paint(image, full_masks, colours, rng)

        masks = (
            np.stack(visible).astype(np.uint8)
            if visible
            else np.zeros((0, height, width), np.uint8)
        )
        for entry, colour, full, vis in zip(layout, colours, full_masks, visible):
            entry["colour"] = tuple(float(c) for c in colour)
            entry["visible_fraction"] = float(vis.sum() / full.sum())
        item = {
            "image": np.ascontiguousarray(image),
            "boxes": masks_to_boxes(masks),
            "labels": np.asarray(labels, dtype=np.int64),
            "masks": masks,
            "image_id": index,
        }
        return item, layout

    def _place(self, rng, full_masks, visible):
        """Try random shapes until one leaves every shape >= min_visible visible (or give up)."""
        height, width = self.image_size
        r_min, r_max = self.radius_range
        for _ in range(100):
            label = int(rng.integers(1, len(self.classes) + 1))
            r = rng.uniform(r_min, r_max)
            # The whole shape lies inside the image (every kind fits in a 2r x 2r square).
            cx = rng.uniform(r, width - r)
            cy = rng.uniform(r, height - r)
            mask = shape_mask(self.classes[label - 1], height, width, cx, cy, r)
            if not mask.any():
                continue
            if all(
                (v & ~mask).sum() >= self.min_visible * full.sum()
                for v, full in zip(visible, full_masks)
            ):
                return mask, (label, {"cx": cx, "cy": cy, "r": r})
        return None


def layer_objects(rng, wanted: int, place, min_count: int, background_colour, failure: str):
    """Place up to ``wanted`` objects one above the other, each with its colour.

    ``place(rng, full_masks, visible_masks)`` returns ``(mask, info)`` for a new object that
    leaves every earlier one visible enough, or None when it finds no place; the new object is
    on top, hiding its pixels from the earlier ones. Fewer than ``min_count`` objects raise a
    RuntimeError with ``failure``. Returns ``(full masks, visible masks, colours, infos)``,
    bottom to top.
    """
    full, visible, colours, infos = [], [], [], []
    for _ in range(wanted):
        placed = place(rng, full, visible)
        if placed is None:
            if len(full) < min_count:
                raise RuntimeError(failure)
            break
        mask, info = placed
        visible = [v & ~mask for v in visible]
        full.append(mask)
        visible.append(mask.copy())
        infos.append(info)
        colours.append(_object_colour(rng, background_colour, colours))
    return full, visible, colours, infos


def paint(image, full_masks, colours, rng) -> np.ndarray:
    """The objects painted over the ``(H, W, 3)`` background in order (later ones on top),
    then a little sensor noise, so flat colours are not a give-away: ``(3, H, W)`` float32."""
    for mask, colour in zip(full_masks, colours):
        image[mask] = colour
    image += rng.normal(0.0, rng.uniform(0.0, 0.03), image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32).transpose(2, 0, 1)


def check_index(index, length: int) -> int:
    """``index`` of a generated dataset of ``length`` items as a position ``0..length - 1``
    (negative counts from the end); TypeError for a non-integer, IndexError out of range."""
    if not isinstance(index, (int, np.integer)):
        raise TypeError(f"dataset index must be an int, got {type(index).__name__}")
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index out of range for a dataset of {length} images")
    return int(index)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight ``(x1, y1, x2, y2)`` boxes ``(G, 4)`` float32 of binary masks ``(G, H, W)``.

    ``x2``/``y2`` are one past the last column/row, so a one-pixel mask at (row 3, col 5) has
    box (5, 3, 6, 4): pixel edges, the convention of COCO's ``[x, y, w, h]`` boxes. An empty
    mask gets the all-zero box.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (G, H, W), got shape {masks.shape}")
    boxes = np.zeros((masks.shape[0], 4), np.float32)
    for g, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes[g] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def to_coco_dict(dataset, file_name_format: str = "{:06d}.png") -> dict:
    """The COCO instances dict of ``dataset`` (any sequence of items shaped like
    ``ShapesDataset``'s, with a ``categories`` attribute).

    Masks become compressed RLE (``pycocotools.mask.encode``, counts decoded to ``str`` so the
    dict is JSON-serialisable), ``"area"`` is the mask's pixel count, ``"bbox"`` is
    ``[x, y, w, h]`` from the item's xyxy box, ``"iscrowd"`` is 0, category ids are the labels.
    Annotation ids start at 1 (COCOeval reads id 0 as "no match"). Items with ``"keypoints"``
    ``(G, K, 3)`` (``pose.PoseDataset``) also get COCO's ``"keypoints"`` ``[x1, y1, v1, ...]``
    and ``"num_keypoints"`` (the count with ``v > 0``). Evaluation can use this dict directly
    as ground truth, without writing files.
    """
    return _coco_dict(dataset, file_name_format)


def write_coco(
    dataset,
    root: str | os.PathLike,
    json_name: str = "annotations.json",
    image_dir: str = "images",
) -> str:
    """Write ``dataset`` as a COCO-format folder and return the json's path.

    Layout: ``root/<image_dir>/<image_id:06d>.png`` (8-bit RGB) and ``root/<json_name>`` (see
    ``to_coco_dict``). ``CocoDataset(json_path, root/<image_dir>)`` reads it back; images come
    back quantised to 1/255.
    """
    from .coco import import_pil_image

    Image = import_pil_image()
    image_root = os.path.join(os.fspath(root), image_dir)
    os.makedirs(image_root, exist_ok=True)

    def save_png(image, file_name):
        pixels = np.clip(np.rint(image.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(image_root, file_name))

    coco = _coco_dict(dataset, "{:06d}.png", save_png)
    json_path = os.path.join(os.fspath(root), json_name)
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path


def _coco_dict(dataset, file_name_format, save_image=None):
    """``to_coco_dict``; ``save_image(image (3, H, W), file_name)``, when given, is called for
    each item on the way, so every item is generated (or read) once."""
    from .coco import import_pycocotools_mask

    mask_utils = import_pycocotools_mask()
    images, annotations = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        _, height, width = item["image"].shape
        image_id = int(item["image_id"])
        images.append(
            {
                "id": image_id,
                "width": int(width),
                "height": int(height),
                "file_name": file_name_format.format(image_id),
            }
        )
        if save_image is not None:
            save_image(np.asarray(item["image"]), images[-1]["file_name"])
        masks = np.asarray(item["masks"], dtype=np.uint8)
        if masks.shape[0] == 0:
            continue
        # pycocotools wants (H, W, G) in Fortran (column-major) order, the order RLE runs in.
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        for box, label, rle, mask in zip(item["boxes"], item["labels"], rles, masks):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                    "area": float(mask.sum()),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                }
            )
        if "keypoints" in item:  # COCO person keypoints: [x1, y1, v1, ...] per annotation
            for annotation, rows in zip(annotations[-len(masks) :], item["keypoints"]):
                annotation["keypoints"] = [
                    float(v) if k % 3 < 2 else int(v) for k, v in enumerate(np.ravel(rows))
                ]
                annotation["num_keypoints"] = int((np.asarray(rows)[:, 2] > 0).sum())
    return {
        "info": {"description": f"written by mrcnn-edu from {dataset!r}"},
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in dataset.categories],
    }


def _background(rng, height, width, styles):
    """A random ``(H, W, 3)`` float64 background and its mean colour ``(3,)``.

    Every style stays within about 0.15 per channel of its mean colour, so an object colour far
    from the mean (``_object_colour``) is far from every background pixel.
    """
    mean = rng.uniform(0.05, 0.95, size=3)
    style = styles[int(rng.integers(len(styles)))]
    image = np.broadcast_to(mean, (height, width, 3)).copy()
    if style == "gradient":
        ys = np.linspace(-0.5, 0.5, height)[:, None, None]
        xs = np.linspace(-0.5, 0.5, width)[None, :, None]
        image += ys * rng.uniform(-0.15, 0.15, 3) + xs * rng.uniform(-0.15, 0.15, 3)
    elif style == "smooth":
        for c in range(3):
            image[..., c] += 0.12 * _smooth_field(rng, height, width, cells=4)
    elif style == "noise":
        image += rng.normal(0.0, 0.05, image.shape)
    return image, mean


def _smooth_field(rng, height, width, cells):
    """Values in [-1, 1] bilinearly interpolated from a ``(cells+1)^2`` random grid."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    ys = np.linspace(0, cells, height)
    xs = np.linspace(0, cells, width)
    rows = np.stack([np.interp(ys, np.arange(cells + 1), grid[:, j]) for j in range(cells + 1)], 1)
    return np.stack([np.interp(xs, np.arange(cells + 1), row) for row in rows])


def _object_colour(rng, background_colour, others):
    """A colour at RGB distance >= 0.5 from the background and >= 0.3 from earlier objects,
    so shapes stand out and overlapping shapes do not merge."""
    for _ in range(1000):
        colour = rng.uniform(0.0, 1.0, size=3)
        if np.linalg.norm(colour - background_colour) < 0.5:
            continue
        if all(np.linalg.norm(colour - other) >= 0.3 for other in others):
            return colour
    # Practically unreachable; the far corner of the colour cube still contrasts the background.
    return np.where(background_colour < 0.5, 1.0, 0.0)
