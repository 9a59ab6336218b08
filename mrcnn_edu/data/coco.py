"""COCO-format instance segmentation: any ``instances_*.json`` plus its image folder.

``CocoDataset`` validates the whole json when it is built (so a bad file fails at once, with
the file and the entry named), checks that every image file exists, and then serves items in
the same layout as ``ShapesDataset``. Masks come from ``pycocotools`` (polygons, compressed and
uncompressed RLE all go through ``COCO.annToMask``); images are read with Pillow.

Category ids in COCO files are arbitrary (COCO itself uses 1..90 with gaps); the model wants
contiguous labels ``1..K`` with 0 for background. Categories are sorted by id and numbered:
``category_id_to_label`` and ``label_to_category_id`` map both ways; evaluation maps the
model's labels back before comparing with the original json.

Crowd annotations (``iscrowd: 1``, one region covering many objects) are not training targets,
as in torchvision's and detectron2's COCO training; they are reported (``num_crowd``, the
item's ``"crowd_boxes"``) and stay in ``dataset.coco``, where COCOeval uses them to ignore
detections that land in a crowd.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from numbers import Real

import numpy as np

_EXTRA_HINT = "pip install 'mrcnn-edu[demo]'"


class CocoDataset:
    """Items from a COCO instances json and its image folder.

    ``dataset[i]`` is a dict:

    - ``"image"``: ``(3, H, W)`` float32 RGB in [0, 1] (grey or RGBA files are converted)
    - ``"boxes"``: ``(G, 4)`` float32 xyxy pixels, from the json's ``[x, y, w, h]``, clipped
      to the image
    - ``"labels"``: ``(G,)`` int64 contiguous labels ``1..K``
    - ``"masks"``: ``(G, H, W)`` uint8 binary masks
    - ``"image_id"``: int, the json's image id
    - ``"orig_size"``: ``(H, W)``
    - ``"crowd_boxes"``: ``(C, 4)`` float32 xyxy boxes of the crowd regions (not targets)

    Annotations with an empty (after clipping) box are skipped too, and counted in
    ``num_degenerate``.

    Args:
        annotation_json: path of the instances json.
        image_root: folder that ``file_name`` entries are relative to.
        skip_empty: leave out images that have no (non-crowd) annotation, as detection
            training usually does; default keeps every image.
    """

    def __init__(
        self,
        annotation_json: str | os.PathLike,
        image_root: str | os.PathLike,
        skip_empty: bool = False,
    ) -> None:
        self.annotation_json = os.fspath(annotation_json)
        self.image_root = os.fspath(image_root)
        content = read_coco_json(self.annotation_json)
        summary = validate_coco_instances(content, source=self.annotation_json)
        if not os.path.isdir(self.image_root):
            raise FileNotFoundError(
                f"image folder {self.image_root!r} (for {self.annotation_json!r}) does not exist"
            )
        _check_images_exist(content["images"], self.image_root, self.annotation_json)

        self.coco = coco_from_dict(content)
        category_ids = sorted(self.coco.cats)
        self.category_id_to_label = {cid: k + 1 for k, cid in enumerate(category_ids)}
        self.label_to_category_id = {k + 1: cid for k, cid in enumerate(category_ids)}
        self.num_crowd = summary["num_crowd"]
        self.num_degenerate = summary["num_degenerate"]
        image_ids = sorted(self.coco.imgs)
        if skip_empty:
            image_ids = [i for i in image_ids if any(self._is_target(a) for a in self._anns(i))]
        self.image_ids = image_ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset index must be an int, got {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index out of range for a dataset of {len(self)} images")
        image_id = self.image_ids[int(index)]
        info = self.coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        image = self._load_image(info)

        boxes, labels, masks, crowd_boxes = [], [], [], []
        for ann in self._anns(image_id):
            box = _clipped_xyxy(ann["bbox"], height, width)
            if ann.get("iscrowd", 0):
                crowd_boxes.append(box)
            elif self._is_target(ann):
                boxes.append(box)
                labels.append(self.category_id_to_label[ann["category_id"]])
                masks.append(_ann_to_mask(self.coco, ann))
        return {
            "image": image,
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64),
            "masks": (
                np.stack(masks).astype(np.uint8)
                if masks
                else np.zeros((0, height, width), np.uint8)
            ),
            "image_id": int(image_id),
            "orig_size": (height, width),
            "crowd_boxes": np.asarray(crowd_boxes, np.float32).reshape(-1, 4),
        }

    @property
    def categories(self) -> list[dict]:
        """``[{"id": label, "name": name}]`` in label order (ids are the contiguous labels; the
        json's own categories are ``coco.dataset["categories"]``)."""
        return [
            {"id": label, "name": self.coco.cats[cid]["name"]}
            for label, cid in self.label_to_category_id.items()
        ]

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of labels ``1..K`` (``class_names[label - 1]``)."""
        return tuple(c["name"] for c in self.categories)

    def __repr__(self) -> str:
        return (
            f"CocoDataset({self.annotation_json!r}: {len(self)} images, "
            f"{len(self.label_to_category_id)} categories, {self.num_crowd} crowd and "
            f"{self.num_degenerate} empty-box annotations skipped as targets)"
        )

    def _anns(self, image_id):
        return self.coco.imgToAnns.get(image_id, [])

    def _is_target(self, ann) -> bool:
        if ann.get("iscrowd", 0):
            return False
        info = self.coco.imgs[ann["image_id"]]
        x1, y1, x2, y2 = _clipped_xyxy(ann["bbox"], info["height"], info["width"])
        return x2 > x1 and y2 > y1

    def _load_image(self, info) -> np.ndarray:
        Image = import_pil_image()
        path = os.path.join(self.image_root, info["file_name"])
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image file {path!r} (image id {info['id']} in {self.annotation_json!r}) "
                f"has disappeared since the dataset was built"
            ) from None
        except OSError as err:
            raise ValueError(f"cannot read image file {path!r}: {err}") from err
        if pixels.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"image file {path!r} is {pixels.shape[0]}x{pixels.shape[1]} (HxW) but "
                f"{self.annotation_json!r} says {info['height']}x{info['width']}; fix the "
                f"json's height/width or the image"
            )
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)


def validate_coco_instances(content, source: str = "<dict>") -> dict:
    """Check a COCO instances dict; raise ``ValueError`` naming ``source`` and the bad entry.

    Checks: the top-level keys ``images``/``annotations``/``categories``; each image has an
    unique id, a ``file_name`` and positive integer ``width``/``height``; each category an
    unique id and a name; each annotation an unique positive id, a known ``image_id`` and
    ``category_id``, a ``bbox`` of 4 finite numbers with non-negative width and height, and a
    ``segmentation`` that is a list of polygons (each an even number >= 6 of coordinates) or
    an RLE dict whose ``size`` is the image's ``[height, width]``.

    Returns ``{"num_crowd": int, "num_degenerate": int}`` (annotations that are crowd regions,
    and non-crowd ones whose box is empty after clipping to the image).
    """
    _check_top_level(content, source)
    images = _validate_images(content["images"], source)
    category_ids = _validate_categories(content["categories"], source)
    return _validate_annotations(content["annotations"], images, category_ids, source)


def _check_top_level(content, source):
    if not isinstance(content, dict):
        raise ValueError(
            f"{source}: the top level must be a JSON object with 'images', 'annotations' and "
            f"'categories', got a {type(content).__name__}"
        )
    missing = [k for k in ("images", "annotations", "categories") if k not in content]
    if missing:
        raise ValueError(
            f"{source}: missing required key(s) {missing}; a COCO instances file needs "
            f"'images', 'annotations' and 'categories'"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(content[key], list):
            raise ValueError(f"{source}: '{key}' must be a list, got {type(content[key]).__name__}")


def _validate_images(entries, source) -> dict:
    """``{image id: image entry}`` of a checked ``images`` list."""
    images = {}
    for i, img in enumerate(entries):
        where = f"{source}: images[{i}]"
        _require_keys(img, ("id", "file_name", "width", "height"), where)
        if img["id"] in images:
            raise ValueError(f"{where}: duplicate image id {img['id']!r}")
        for dim in ("width", "height"):
            if not _is_int(img[dim]) or img[dim] <= 0:
                raise ValueError(f"{where}: '{dim}' must be a positive integer, got {img[dim]!r}")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise ValueError(f"{where}: 'file_name' must be a non-empty string")
        images[img["id"]] = img
    return images


def _validate_categories(entries, source) -> set:
    """The category ids of a checked ``categories`` list."""
    category_ids = set()
    for i, cat in enumerate(entries):
        where = f"{source}: categories[{i}]"
        _require_keys(cat, ("id", "name"), where)
        if cat["id"] in category_ids:
            raise ValueError(f"{where}: duplicate category id {cat['id']!r}")
        if not _is_int(cat["id"]):
            raise ValueError(f"{where}: category id must be an integer, got {cat['id']!r}")
        category_ids.add(cat["id"])
    return category_ids


def _validate_annotations(entries, images, category_ids, source) -> dict:
    """Check the ``annotations`` list; count its crowd and empty-box (degenerate) entries."""
    annotation_ids = set()
    num_crowd = num_degenerate = 0
    for i, ann in enumerate(entries):
        where = f"{source}: annotations[{i}]"
        _require_keys(ann, ("id", "image_id", "category_id", "bbox", "segmentation"), where)
        where += f" (id {ann['id']!r})"
        _check_annotation_ids(ann, annotation_ids, images, category_ids, where)
        annotation_ids.add(ann["id"])
        _check_bbox(ann["bbox"], where)
        image = images[ann["image_id"]]
        _check_segmentation(ann["segmentation"], image, where)
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise ValueError(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        if crowd:
            num_crowd += 1
        else:
            x1, y1, x2, y2 = _clipped_xyxy(ann["bbox"], image["height"], image["width"])
            num_degenerate += not (x2 > x1 and y2 > y1)
    return {"num_crowd": num_crowd, "num_degenerate": num_degenerate}


def _check_annotation_ids(ann, seen_ids, images, category_ids, where):
    """An unseen positive annotation id, and an ``image_id`` and ``category_id`` that exist."""
    if not _is_int(ann["id"]) or ann["id"] <= 0:
        # COCOeval stores the matched ground-truth id and reads 0 as "unmatched".
        raise ValueError(
            f"{where}: annotation ids must be positive integers (COCOeval treats id 0 as "
            f"'no match'); renumber from 1"
        )
    if ann["id"] in seen_ids:
        raise ValueError(f"{where}: duplicate annotation id")
    if ann["image_id"] not in images:
        raise ValueError(f"{where}: refers to image_id {ann['image_id']!r}, not in 'images'")
    if ann["category_id"] not in category_ids:
        raise ValueError(
            f"{where}: refers to category_id {ann['category_id']!r}, not in 'categories' "
            f"(known ids: {sorted(category_ids)})"
        )


def _check_bbox(bbox, where):
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in bbox)
        or not all(math.isfinite(v) for v in bbox)
    ):
        raise ValueError(f"{where}: bad bbox {bbox!r}; need [x, y, width, height] numbers")
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(
            f"{where}: bad bbox {bbox!r}: negative width or height (COCO boxes are "
            f"[x, y, width, height], not [x1, y1, x2, y2])"
        )


def import_pycocotools_mask():
    """``pycocotools.mask``, or an ImportError that says how to install it."""
    try:
        from pycocotools import mask
    except ImportError as err:
        raise ImportError(
            f"COCO masks and evaluation need pycocotools ({err}); install it with "
            f"{_EXTRA_HINT} or pip install pycocotools"
        ) from err
    return mask


def import_pycocotools():
    """``(COCO, COCOeval)`` classes, or an ImportError that says how to install them."""
    import_pycocotools_mask()
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def import_pil_image():
    """``PIL.Image``, or an ImportError that says how to install Pillow."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            f"reading and writing images needs Pillow ({err}); install it with {_EXTRA_HINT} "
            f"or pip install Pillow"
        ) from err
    return Image


def read_coco_json(path: str):
    """The parsed content of a COCO json file (an instances file or a results list).

    A missing file raises ``FileNotFoundError``, a file that is not JSON a ``ValueError``,
    both naming the path; the content itself is not checked (see ``validate_coco_instances``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); is it a COCO instances file?") from err


def coco_from_dict(content):
    """A ``pycocotools.coco.COCO`` over an already-loaded COCO dict, indexed (pycocotools'
    index prints are muted). The dict is used as is, neither copied nor checked
    (``validate_coco_instances`` checks one)."""
    COCO, _ = import_pycocotools()
    coco = COCO()
    coco.dataset = content
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _ann_to_mask(coco, ann) -> np.ndarray:
    """``coco.annToMask(ann)`` without pycocotools' NumPy-2 DeprecationWarning (its RLE object
    lacks ``__array__(copy=...)``; harmless, but it would print once per mask)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="__array__ implementation", category=DeprecationWarning
        )
        return coco.annToMask(ann)


def _check_images_exist(images, image_root, source):
    missing = [
        img["file_name"]
        for img in images
        if not os.path.isfile(os.path.join(image_root, img["file_name"]))
    ]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(images)} images listed in {source!r} are missing under "
            f"{image_root!r}: {shown}{more}; check image_root"
        )


def _check_segmentation(segm, image, where):
    """A list of polygons, or an RLE dict of the image's size."""
    if isinstance(segm, list):
        _check_polygons(segm, where)
    elif isinstance(segm, dict):
        _check_rle(segm, image, where)
    else:
        raise ValueError(
            f"{where}: 'segmentation' must be a list of polygons or an RLE dict, "
            f"got {type(segm).__name__}"
        )


def _check_polygons(segm, where):
    if not segm:
        raise ValueError(f"{where}: empty 'segmentation' list; give polygons or an RLE dict")
    for polygon in segm:
        if (
            not isinstance(polygon, list)
            or len(polygon) < 6
            or len(polygon) % 2
            or not all(isinstance(v, Real) and math.isfinite(v) for v in polygon)
        ):
            raise ValueError(
                f"{where}: a polygon must be a flat list [x1, y1, x2, y2, ...] of at least "
                f"3 points, got {str(polygon)[:80]}"
            )


def _check_rle(segm, image, where):
    if "counts" not in segm or "size" not in segm:
        raise ValueError(f"{where}: an RLE segmentation needs 'counts' and 'size'")
    if list(segm["size"]) != [image["height"], image["width"]]:
        raise ValueError(
            f"{where}: RLE size {segm['size']} is not the image's [height, width] "
            f"[{image['height']}, {image['width']}]"
        )
    counts = segm["counts"]
    if isinstance(counts, list):
        if (
            not all(_is_int(c) and c >= 0 for c in counts)
            or sum(counts) != image["height"] * image["width"]
        ):
            raise ValueError(
                f"{where}: uncompressed RLE counts must be non-negative and sum to "
                f"height * width = {image['height'] * image['width']}"
            )
    elif not isinstance(counts, str):
        raise ValueError(f"{where}: RLE 'counts' must be a list of ints or a string")


def _clipped_xyxy(bbox, height, width):
    x, y, w, h = (float(v) for v in bbox)
    return (
        min(max(x, 0.0), width),
        min(max(y, 0.0), height),
        min(max(x + w, 0.0), width),
        min(max(y + h, 0.0), height),
    )


def _require_keys(entry, keys, where):
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
