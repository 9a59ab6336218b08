"""Checks of a COCO instances dict: every problem at once, or the first one raised.

``find_coco_problems`` walks the whole dict (and, given the image folder, looks for each image
file) and returns one message per problem, in file order: top-level keys, ``images``,
``categories``, ``annotations``. Each names the file, the entry (``images[3]``,
``annotations[17] (id 18, image_id 4)``) and what to fix. ``validate_coco_instances`` raises
the first of them as a ``ValueError`` -- what ``CocoDataset`` and evaluation do on load.

Compressed RLE strings are decoded to their run lengths (``rle.compressed_rle_problems``, all
strings of the file in one vectorised pass) and must cover exactly ``height * width`` pixels:
pycocotools itself would stop training with "Invalid RLE mask representation" on some of them
and silently return a wrong mask for others.
"""

from __future__ import annotations

import math
import os
from numbers import Real

import numpy as np

from .rle import compressed_rle_problems

TOP_LEVEL_KEYS = ("images", "annotations", "categories")
_INVALID = ("<invalid keypoint names>",)  # a category whose keypoint names are reported bad
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation")


def validate_coco_instances(content, source: str = "<dict>") -> dict:
    """Check a COCO instances dict; raise ``ValueError`` naming ``source`` and the bad entry.

    Checks: the top-level keys ``images``/``annotations``/``categories``; each image has an
    unique integer id, a ``file_name`` and positive integer ``width``/``height``; each category
    an unique integer id and a name; each annotation an unique positive id, a known
    ``image_id`` and ``category_id``, a ``bbox`` of 4 finite numbers with non-negative width and
    height, and a ``segmentation`` that is a list of polygons (each an even number >= 6 of
    coordinates) or an RLE dict whose ``size`` is the image's ``[height, width]`` and whose
    counts (a list, or a compressed string that must decode) sum to ``height * width``.
    Keypoints (COCO person_keypoints): a category's ``keypoints`` are distinct names and its
    ``skeleton`` pairs of 1-based keypoint numbers; every category with keypoints lists the
    same ones; an annotation's ``keypoints`` are ``3 K`` finite numbers ``[x, y, v, ...]`` with
    each ``v`` in {0, 1, 2}, and its ``num_keypoints`` (when given) counts those with ``v > 0``.

    Returns ``{"num_crowd": int, "num_degenerate": int}`` (annotations that are crowd regions,
    and non-crowd ones whose box is empty after clipping to the image).
    """
    problems, summary = _collect(content, source, None)
    if problems:
        raise ValueError(problems[0])
    return summary


def find_coco_problems(
    content, image_root: str | os.PathLike | None = None, source: str = "<dict>"
) -> list[str]:
    """Every problem ``validate_coco_instances`` would raise the first of, as a list of
    messages (empty: the dict is valid). With ``image_root``, a missing folder or image file is
    a problem too (one message per missing file, naming the image entry, id and file)."""
    return _collect(content, source, image_root)[0]


def _collect(content, source, image_root):
    """(problems, summary); the summary is None when the top level is unusable."""
    problems = _top_level_problems(content, source)
    if problems:
        return problems, None
    if image_root is not None and not os.path.isdir(image_root):
        problems.append(f"{source}: image folder {os.fspath(image_root)!r} does not exist")
        image_root = None
    images, known_ids, image_problems = _check_images(content["images"], source, image_root)
    category_ids, category_problems = _check_categories(content["categories"], source)
    ann_problems, summary = _check_annotations(
        content["annotations"], images, known_ids, category_ids, source
    )
    return problems + image_problems + category_problems + ann_problems, summary


def _top_level_problems(content, source) -> list[str]:
    if not isinstance(content, dict):
        return [
            f"{source}: the top level must be a JSON object with 'images', 'annotations' and "
            f"'categories', got a {type(content).__name__}"
        ]
    missing = [k for k in TOP_LEVEL_KEYS if k not in content]
    if missing:
        return [
            f"{source}: missing required key(s) {missing}; a COCO instances file needs "
            f"'images', 'annotations' and 'categories'"
        ]
    return [
        f"{source}: '{key}' must be a list, got {type(content[key]).__name__}"
        for key in TOP_LEVEL_KEYS
        if not isinstance(content[key], list)
    ]


def _check_images(entries, source, image_root):
    """``({id: entry} of the usable images, every image id seen, problems)``."""
    images, known_ids, problems = {}, set(), []
    for i, img in enumerate(entries):
        where = f"{source}: images[{i}]"
        found = _missing_keys(img, ("id", "file_name", "width", "height"), where)
        if not found and not _is_int(img["id"]):
            found = [f"{where}: image id must be an integer, got {img['id']!r}"]
        elif not found and img["id"] in known_ids:
            found = [f"{where}: duplicate image id {img['id']!r}"]
        if found:
            problems += found
            continue
        known_ids.add(img["id"])
        for dim in ("width", "height"):
            if not _is_int(img[dim]) or img[dim] <= 0:
                found.append(f"{where}: '{dim}' must be a positive integer, got {img[dim]!r}")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            found.append(f"{where}: 'file_name' must be a non-empty string")
        elif image_root is not None:
            path = os.path.join(image_root, img["file_name"])
            if not os.path.isfile(path):
                found.append(
                    f"{where} (id {img['id']}): image file {img['file_name']!r} not found "
                    f"under {os.fspath(image_root)!r}"
                )
        problems += found
        if not found:
            images[img["id"]] = img
    return images, known_ids, problems


def _check_categories(entries, source):
    """``({category id: its keypoint names, or None}, problems)``."""
    category_ids, problems = {}, []
    for i, cat in enumerate(entries):
        where = f"{source}: categories[{i}]"
        found = _missing_keys(cat, ("id", "name"), where)
        if found:
            problems += found
        elif not _is_int(cat["id"]):
            problems.append(f"{where}: category id must be an integer, got {cat['id']!r}")
        elif cat["id"] in category_ids:
            problems.append(f"{where}: duplicate category id {cat['id']!r}")
        else:
            found = _keypoint_category_problems(cat, where)
            problems += found
            names = None if found else cat.get("keypoints")
            category_ids[cat["id"]] = _INVALID if found else names and tuple(names)
    return category_ids, problems + _mixed_keypoint_problems(category_ids, source)


def _keypoint_category_problems(cat, where) -> list[str]:
    """A keypoints category (COCO person_keypoints): ``keypoints`` a list of distinct names,
    ``skeleton`` (optional) a list of ``[a, b]`` pairs of 1-based keypoint numbers."""
    names, skeleton = cat.get("keypoints"), cat.get("skeleton")
    if names is None:
        return [f"{where}: has a 'skeleton' but no 'keypoints' names"] if skeleton else []
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        return [f"{where}: 'keypoints' must be a non-empty list of distinct keypoint names"]
    k = len(names)
    if skeleton is not None and not (
        isinstance(skeleton, list)
        and all(
            isinstance(e, list) and len(e) == 2 and all(_is_int(j) and 1 <= j <= k for j in e)
            for e in skeleton
        )
    ):
        return [
            f"{where}: 'skeleton' must be a list of [a, b] pairs of keypoint numbers 1..{k} "
            f"(1-based, as in COCO)"
        ]
    return []


def _mixed_keypoint_problems(category_ids, source) -> list[str]:
    """Every category that declares keypoints must declare the same ones (one keypoint head
    predicts the same K keypoints for every class)."""
    declared = {c: n for c, n in category_ids.items() if n is not None and n is not _INVALID}
    if len(set(declared.values())) <= 1:
        return []
    shown = "; ".join(f"id {cid}: {len(n)} {list(n)[:3]}..." for cid, n in declared.items())
    return [
        f"{source}: categories declare different keypoints ({shown}); every category with "
        "keypoints must list the same names in the same order"
    ]


def _check_annotations(entries, images, known_ids, category_ids, source):
    """(problems in annotation order, {"num_crowd", "num_degenerate"})."""
    found: list[tuple[int, str]] = []
    rle_jobs: list[tuple[int, str, str, int]] = []  # (index, where, counts string, h * w)
    seen_ids: set = set()
    num_crowd = num_degenerate = 0
    for i, ann in enumerate(entries):
        where = f"{source}: annotations[{i}]"
        missing = _missing_keys(ann, _ANNOTATION_KEYS, where)
        if missing:
            found += [(i, m) for m in missing]
            continue
        where += f" (id {ann['id']!r}, image_id {ann['image_id']!r})"
        problems = _annotation_id_problems(ann, seen_ids, known_ids, category_ids, where)
        if _is_int(ann["id"]):
            seen_ids.add(ann["id"])
        problems += _bbox_problems(ann["bbox"], where)
        problems += _keypoint_problems(ann, category_ids, where)
        image = images.get(ann["image_id"]) if _hashable(ann["image_id"]) else None
        if image is not None:
            segm = ann["segmentation"]
            problems += _segmentation_problems(segm, image, where)
            if not problems and isinstance(segm, dict) and isinstance(segm["counts"], str):
                rle_jobs.append((i, where, segm["counts"], image["height"] * image["width"]))
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            problems.append(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        elif crowd:
            num_crowd += 1
        elif image is not None and not problems:
            x1, y1, x2, y2 = clipped_xyxy(ann["bbox"], image["height"], image["width"])
            num_degenerate += not (x2 > x1 and y2 > y1)
        found += [(i, p) for p in problems]
    found += _compressed_rle_problems(rle_jobs)
    found.sort(key=lambda item: item[0])  # stable: an annotation's own order is kept
    return [p for _, p in found], {"num_crowd": num_crowd, "num_degenerate": num_degenerate}


def _annotation_id_problems(ann, seen_ids, known_ids, category_ids, where) -> list[str]:
    """An unseen positive annotation id, and an ``image_id`` and ``category_id`` that exist."""
    problems = []
    if not _is_int(ann["id"]) or ann["id"] <= 0:
        # COCOeval stores the matched ground-truth id and reads 0 as "unmatched".
        problems.append(
            f"{where}: annotation ids must be positive integers (COCOeval treats id 0 as "
            f"'no match'); renumber from 1"
        )
    elif ann["id"] in seen_ids:
        problems.append(f"{where}: duplicate annotation id")
    if not _hashable(ann["image_id"]) or ann["image_id"] not in known_ids:
        problems.append(f"{where}: refers to image_id {ann['image_id']!r}, not in 'images'")
    if not _hashable(ann["category_id"]) or ann["category_id"] not in category_ids:
        problems.append(
            f"{where}: refers to category_id {ann['category_id']!r}, not in 'categories' "
            f"(known ids: {sorted(category_ids)})"
        )
    return problems


def _keypoint_problems(ann, categories, where) -> list[str]:
    """``keypoints``: ``[x1, y1, v1, ...]``, 3 numbers per keypoint of the category, each
    ``v`` 0 (not labelled), 1 (labelled, hidden) or 2 (visible); ``num_keypoints`` (when
    given) the count with ``v > 0``."""
    if "keypoints" not in ann:
        if ann.get("num_keypoints", 0):
            return [f"{where}: 'num_keypoints' is {ann['num_keypoints']!r} but there are no "
                    "'keypoints'"]  # fmt: skip
        return []
    cid = ann["category_id"]
    if not _hashable(cid) or cid not in categories:
        return []  # the unknown category is reported already
    names = categories[cid]
    if names is _INVALID:
        return []  # the category's keypoint names are reported already
    if names is None:
        return [
            f"{where}: has 'keypoints' but category {cid!r} declares no keypoint names; add "
            f"'keypoints' (the names, in order) and 'skeleton' to the category"
        ]
    values, k = ann["keypoints"], len(names)
    if (
        not isinstance(values, list)
        or len(values) != 3 * k
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values)
        or not all(math.isfinite(v) for v in values)
    ):
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        return [
            f"{where}: 'keypoints' must be a flat list [x1, y1, v1, ...] of 3 x {k} = {3 * k} "
            f"numbers (category {cid} has {k} keypoints), got {got}"
        ]
    for j, v in enumerate(values[2::3]):
        if v not in (0, 1, 2):
            return [
                f"{where}: keypoint {j} ({names[j]!r}) has visibility {v!r}; COCO's v is 0 (not "
                f"labelled), 1 (labelled, hidden) or 2 (visible)"
            ]
    labelled = sum(v > 0 for v in values[2::3])
    count = ann.get("num_keypoints", labelled)
    if not _is_int(count) or count != labelled:
        return [
            f"{where}: 'num_keypoints' is {count!r} but {labelled} keypoints have v > 0; set "
            f"it to {labelled}"
        ]
    return []


def _bbox_problems(bbox, where) -> list[str]:
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in bbox)
        or not all(math.isfinite(v) for v in bbox)
    ):
        return [f"{where}: bad bbox {bbox!r}; need [x, y, width, height] numbers"]
    if bbox[2] < 0 or bbox[3] < 0:
        return [
            f"{where}: bad bbox {bbox!r}: negative width or height (COCO boxes are "
            f"[x, y, width, height], not [x1, y1, x2, y2])"
        ]
    return []


def _segmentation_problems(segm, image, where) -> list[str]:
    """A list of polygons, or an RLE dict of the image's size (its string counts are checked
    afterwards, all together)."""
    if isinstance(segm, list):
        return _polygon_problems(segm, where)
    if isinstance(segm, dict):
        return _rle_problems(segm, image, where)
    return [
        f"{where}: 'segmentation' must be a list of polygons or an RLE dict, "
        f"got {type(segm).__name__}"
    ]


def _polygon_problems(segm, where) -> list[str]:
    if not segm:
        return [f"{where}: empty 'segmentation' list; give polygons or an RLE dict"]
    for polygon in segm:
        if (
            not isinstance(polygon, list)
            or len(polygon) < 6
            or len(polygon) % 2
            or not all(isinstance(v, Real) and math.isfinite(v) for v in polygon)
        ):
            return [
                f"{where}: a polygon must be a flat list [x1, y1, x2, y2, ...] of at least "
                f"3 points, got {str(polygon)[:80]}"
            ]
    return []


def _rle_problems(segm, image, where) -> list[str]:
    if "counts" not in segm or "size" not in segm:
        return [f"{where}: an RLE segmentation needs 'counts' and 'size'"]
    height, width = image["height"], image["width"]
    size = segm["size"]
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        return [f"{where}: RLE size {size} is not the image's [height, width] [{height}, {width}]"]
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
            return [
                f"{where}: uncompressed RLE counts must be non-negative and sum to "
                f"height * width = {height * width}"
            ]
    elif not isinstance(counts, str):
        return [f"{where}: RLE 'counts' must be a list of ints or a string"]
    return []


def _compressed_rle_problems(jobs) -> list[tuple[int, str]]:
    reasons = compressed_rle_problems([j[2] for j in jobs], [j[3] for j in jobs])
    return [
        (
            index,
            f"{where}: compressed RLE counts {counts[:24]!r}{'...' * (len(counts) > 24)} "
            f"cannot be decoded: {reason} "
            f"(pycocotools would fail with 'Invalid RLE mask representation' or return a "
            f"wrong mask); re-encode the mask with pycocotools.mask.encode",
        )
        for (index, where, counts, _), reason in zip(jobs, reasons)
        if reason is not None
    ]


def clipped_xyxy(bbox, height, width):
    """A COCO ``[x, y, w, h]`` box as ``(x1, y1, x2, y2)`` floats clipped to the image."""
    x, y, w, h = (float(v) for v in bbox)
    return (
        min(max(x, 0.0), width),
        min(max(y, 0.0), height),
        min(max(x + w, 0.0), width),
        min(max(y + h, 0.0), height),
    )


def _missing_keys(entry, keys, where) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: must be a JSON object, got {type(entry).__name__}"]
    missing = [k for k in keys if k not in entry]
    return [f"{where}: missing key(s) {missing}"] if missing else []


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _hashable(v) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), np.integer))
