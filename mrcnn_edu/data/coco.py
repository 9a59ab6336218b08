"""COCO-format instance segmentation: any ``instances_*.json`` plus its image folder.

``CocoDataset`` validates the whole json when it is built (so a bad file fails at once, with
the file and the entry named), checks that every image file exists, and then serves items in
the same layout as ``ShapesDataset``. Masks come from ``pycocotools`` (polygons, compressed and
uncompressed RLE all go through ``COCO.annToMask``); images are read with Pillow.
The checks themselves are in ``coco_checks.py`` (``find_coco_problems`` lists every problem
of a file at once, for ``mrcnn-edu inspect``).

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
import os
import warnings

import numpy as np

from .coco_checks import clipped_xyxy as _clipped_xyxy
from .coco_checks import find_coco_problems, validate_coco_instances
from .images import read_image

__all__ = [
    "CocoDataset",
    "coco_from_dict",
    "find_coco_problems",
    "import_pil_image",
    "import_pycocotools",
    "import_pycocotools_mask",
    "read_coco_json",
    "validate_coco_instances",
]

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
    - ``"keypoints"``: ``(G, K, 3)`` float32 rows ``(x, y, v)``, only when the json's categories
      declare keypoints (COCO person_keypoints); an annotation without keypoints gets ``v = 0``

    ``keypoint_names`` and ``skeleton`` (0-based index pairs) come from the categories (empty
    without keypoints); ``keypoint_flip`` is the left/right swap map horizontal flips need.

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
        self.keypoint_names, self.skeleton = _keypoint_layout(content["categories"])
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

        boxes, labels, masks, crowd_boxes, keypoints = [], [], [], [], []
        for ann in self._anns(image_id):
            box = _clipped_xyxy(ann["bbox"], height, width)
            if ann.get("iscrowd", 0):
                crowd_boxes.append(box)
            elif self._is_target(ann):
                boxes.append(box)
                labels.append(self.category_id_to_label[ann["category_id"]])
                masks.append(_ann_to_mask(self.coco, ann))
                keypoints.append(ann.get("keypoints") or [0] * (3 * len(self.keypoint_names)))
        item = {
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
        if self.keypoint_names:
            k = len(self.keypoint_names)
            item["keypoints"] = np.asarray(keypoints, np.float32).reshape(-1, k, 3)
        return item

    @property
    def keypoint_flip(self) -> list[int] | None:
        """Keypoint ``j`` of a mirrored item is keypoint ``keypoint_flip[j]`` (left/right
        swapped by name, ``transforms.keypoint_flip_index``); None without keypoints."""
        from .transforms import keypoint_flip_index

        return keypoint_flip_index(self.keypoint_names) if self.keypoint_names else None

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
        """(3, H, W) float32 in [0, 1], scaled by the file's bit depth (``read_image``)."""
        path = os.path.join(self.image_root, info["file_name"])
        try:
            pixels = read_image(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image file {path!r} (image id {info['id']} in {self.annotation_json!r}) "
                f"has disappeared since the dataset was built"
            ) from None
        if pixels.shape[1:] != (info["height"], info["width"]):
            raise ValueError(
                f"image file {path!r} is {pixels.shape[1]}x{pixels.shape[2]} (HxW) but "
                f"{self.annotation_json!r} says {info['height']}x{info['width']}; fix the "
                f"json's height/width or the image"
            )
        return pixels


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


def _keypoint_layout(categories) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
    """``(keypoint names, skeleton as 0-based pairs)`` of the categories that declare them
    (the checks made sure they all declare the same); ``((), ())`` without keypoints."""
    for cat in categories:
        if cat.get("keypoints"):
            edges = tuple((int(a) - 1, int(b) - 1) for a, b in cat.get("skeleton") or ())
            return tuple(cat["keypoints"]), edges
    return (), ()


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
