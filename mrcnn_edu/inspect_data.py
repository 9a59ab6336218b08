"""``mrcnn-edu inspect``: check a COCO dataset before training on it, and describe it.

First every problem of the json and the image folder is listed at once (``find_coco_problems``
plus, here, each image file's header: readable, and the size the json says). Then statistics:
images, instances per class and per image, object sizes against the model's anchor sizes, and
the share of objects that **no anchor matches at IoU >= 0.5** -- objects the RPN can only learn
through its "best anchor" fallback, or not at all. When the model resizes its input
(``min_size``/``max_size``), boxes are compared with the anchors at that scale. The text and the
figure are made in ``inspect_report.py``.

That share is computed with the model's own ``AnchorGenerator`` and ``box_iou``: each image is
padded to a multiple of ``size_divisible`` like ``MaskRCNN.transform`` does, each FPN level's
grid is ``ceil(padded / stride)`` (strides ``LEVEL_STRIDES``: 4..64), and each box meets only
the anchors that can reach it -- levels whose anchor areas are within a factor
``1 / iou_threshold`` of the box's (IoU <= smaller area / larger area), and on those, a window
of grid cells around the box (anchors that do not overlap it have IoU 0) -- so memory stays
bounded by one box's window, however big the dataset.

The suggested anchor sizes are ``s, 2s, 4s, 8s, 16s`` (one per level, doubling like the
strides). A size reaches objects within a factor sqrt(2) of it (a concentric square of twice
the area has IoU 0.5), so the five reach a 32x range; ``s`` runs over a quarter-octave grid of
ladders that reach the 5th-95th percentile of object sizes, and the one whose anchors leave
the fewest objects unmatched (ties: highest mean best IoU) on a sample of up to
``SUGGESTION_SAMPLE`` objects wins -- measured, so a small anchor on a coarse grid, which
misses objects that fall between its positions, loses.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .anchors import DEFAULT_ASPECT_RATIOS, AnchorGenerator
from .backbone import LEVEL_STRIDES
from .boxes import box_iou
from .data.coco_checks import clipped_xyxy, find_coco_problems
from .progress import progress_bar

SMALL_AREA, LARGE_AREA = 32**2, 96**2  # COCO's small / medium / large limits
LARGE_DATASET = 1000  # images: from here on loops show a progress bar
SUGGESTION_SAMPLE = 1000
_MAX_WINDOW = 1 << 20  # anchors compared with one box at once


def dataset_problems(annotation_json, image_root, progress: bool = False):
    """``(content, problems)``: the parsed json and every problem found in it and in the image
    folder (an empty list: none). A missing or non-JSON file raises as ``read_coco_json``."""
    from .data.coco import read_coco_json

    path = os.fspath(annotation_json)
    content = read_coco_json(path)
    problems = find_coco_problems(content, image_root, source=path)
    if isinstance(content, dict) and isinstance(content.get("images"), list):
        problems += image_file_problems(content, image_root, path, progress)
    return content, problems


def image_file_problems(content, image_root, source: str, progress: bool = False) -> list[str]:
    """Image files Pillow cannot open, or whose size differs from the json's (only the file
    header is read). Entries ``find_coco_problems`` reports (malformed, or a missing file) are
    skipped here."""
    from .data.coco import import_pil_image

    Image = import_pil_image()
    images = content["images"]
    bar = progress_bar(len(images), "image files", "img") if _large(images, progress) else None
    problems = []
    for i, img in enumerate(images):
        if bar is not None:
            bar.update(1)
        if not _well_formed(img):
            continue
        path = os.path.join(image_root, img["file_name"])
        where = f"{source}: images[{i}] (id {img['id']})"
        try:
            with Image.open(path) as opened:
                width, height = opened.size
        except FileNotFoundError:
            continue
        except OSError as err:
            problems.append(f"{where}: cannot read image file {path!r}: {err}")
            continue
        if (height, width) != (img["height"], img["width"]):
            problems.append(
                f"{where}: {path!r} is {height}x{width} (HxW) but the json says "
                f"{img['height']}x{img['width']}; fix the json's height/width or the image"
            )
    if bar is not None:
        bar.close()
    return problems


def dataset_statistics(content, model_config, progress: bool = False) -> dict:
    """Statistics of a valid COCO instances dict, against ``model_config``'s anchors.

    Instances are the training targets: non-crowd annotations whose box, clipped to the image,
    is not empty. Sizes are ``sqrt(w * h)`` of that box; COCO's small/medium/large buckets
    are box areas below 32**2, up to 96**2, and above.
    """
    images = content["images"]
    row_of = {img["id"]: row for row, img in enumerate(images)}
    image_sizes = np.array([(img["height"], img["width"]) for img in images], np.int64)
    category_ids = sorted(c["id"] for c in content["categories"])
    names = {c["id"]: str(c["name"]) for c in content["categories"]}
    boxes, rows, cats = [], [], []
    num_crowd = 0
    for ann in content["annotations"]:
        if ann.get("iscrowd", 0):
            num_crowd += 1
            continue
        row = row_of[ann["image_id"]]
        box = clipped_xyxy(ann["bbox"], *image_sizes[row])
        if box[2] > box[0] and box[3] > box[1]:
            boxes.append(box)
            rows.append(row)
            cats.append(ann["category_id"])
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    rows = np.asarray(rows, np.int64)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    areas = widths * heights
    per_image = np.bincount(rows, minlength=len(images))
    stats = {
        "num_images": len(images),
        "num_images_empty": int((per_image == 0).sum()),
        "num_instances": len(boxes),
        "num_crowd": num_crowd,
        "num_degenerate": len(content["annotations"]) - num_crowd - len(boxes),
        "class_names": [names[c] for c in category_ids],
        "instances_per_class": {names[c]: cats.count(c) for c in category_ids},
        "instances_per_image": per_image,
        "object_sizes": np.sqrt(areas),
        "size_buckets": {
            "small": int((areas < SMALL_AREA).sum()),
            "medium": int(((areas >= SMALL_AREA) & (areas < LARGE_AREA)).sum()),
            "large": int((areas >= LARGE_AREA).sum()),
        },
        "aspect_ratios": heights / widths,
    }
    input_boxes, input_sizes, resize = _model_input(boxes, rows, image_sizes, model_config)
    stats["input_resize"] = resize
    stats["input_object_sizes"] = np.sqrt(
        (input_boxes[:, 2] - input_boxes[:, 0]) * (input_boxes[:, 3] - input_boxes[:, 1])
    )
    stats.update(_anchor_statistics(input_boxes, rows, input_sizes, model_config, progress))
    return stats


def _model_input(boxes, rows, image_sizes, model_config):
    """Boxes and image sizes as the model sees them: resized by its ``min_size``/``max_size``
    rule (the last ``min_size``, the one used at inference), or as they are when it has none.
    Returns ``(boxes, image sizes, (min_size, max_size) or None)``."""
    min_size = getattr(model_config, "min_size", None)
    if min_size is None:
        return boxes, image_sizes, None
    from .transform import resized_size

    short, longest = int(min_size[-1]), int(model_config.max_size)
    sizes = np.array([resized_size(tuple(s), short, longest) for s in image_sizes], np.int64)
    # per axis new / old, rounded to float32 as the model's resize_boxes does
    ratios = sizes.astype(np.float32) / image_sizes.astype(np.float32)
    scaled = boxes * ratios[rows][:, [1, 0, 1, 0]].astype(np.float64)
    return scaled, sizes, (short, longest)


def _anchor_statistics(boxes, rows, image_sizes, model_config, progress) -> dict:
    rpn = model_config.rpn
    divisible = model_config.size_divisible
    generator = AnchorGenerator(rpn.anchor_sizes, rpn.aspect_ratios)
    best = best_anchor_iou(
        boxes, rows, image_sizes, rpn.anchor_sizes, rpn.aspect_ratios, divisible,
        progress=progress and len(image_sizes) >= LARGE_DATASET,
    )  # fmt: skip
    sample = np.arange(len(boxes))
    if len(boxes) > SUGGESTION_SAMPLE:  # a fixed sample: the same answer every time
        sample = np.sort(np.random.default_rng(0).choice(len(boxes), SUGGESTION_SAMPLE, False))

    def score(sizes):
        iou = best_anchor_iou(
            boxes[sample], rows[sample], image_sizes, sizes, rpn.aspect_ratios, divisible
        )
        return float(np.mean(iou < 0.5)), -float(np.mean(iou))

    sizes = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    suggestion, note = suggest_anchor_sizes(sizes, score, len(rpn.anchor_sizes))
    return {
        "anchor_sizes": generator.sizes,
        "anchor_aspect_ratios": generator.aspect_ratios,
        "strides": tuple(sorted(LEVEL_STRIDES.values())),
        "best_anchor_iou": best,
        "unmatched_share": float(np.mean(best < 0.5)) if len(best) else 0.0,
        "suggested_anchor_sizes": suggestion,
        # (unmatched share, mean best IoU) on the sample, for the suggestion and the model
        "suggested_score": _score_pair(score(suggestion)) if suggestion else None,
        "model_score": _score_pair(score(rpn.anchor_sizes)) if suggestion else None,
        "suggestion_note": note,
    }


def best_anchor_iou(
    boxes,
    image_index,
    image_sizes,
    anchor_sizes,
    aspect_ratios=DEFAULT_ASPECT_RATIOS,
    size_divisible: int = 32,
    iou_threshold: float = 0.5,
    progress: bool = False,
) -> np.ndarray:
    """The highest IoU of each box with the anchors of its image, ``(N,)`` float64.

    boxes: ``(N, 4)`` xyxy pixels; image_index: ``(N,)`` row of each box's image in
    image_sizes, ``(M, 2)`` ``(height, width)`` before padding. Anchors are the model's:
    ``AnchorGenerator(anchor_sizes, aspect_ratios)`` on the padded image with one level per
    stride of ``LEVEL_STRIDES``. Values ``>= iou_threshold`` are exact; below it they are
    lower bounds (levels whose anchor areas cannot reach the threshold are skipped), 0 when no
    level can reach it.
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    generator = AnchorGenerator(anchor_sizes, aspect_ratios)
    strides = sorted(LEVEL_STRIDES.values())
    if len(generator.sizes) != len(strides):
        raise ValueError(
            f"anchor_sizes has {len(generator.sizes)} levels but the FPN has {len(strides)} "
            f"(strides {strides}); give one tuple of sizes per level"
        )
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    image_index = np.asarray(image_index, np.int64).reshape(-1)
    best = np.zeros(len(boxes))
    cell_areas = [(c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]) for c in generator.cell_anchors()]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    padded = -(-np.asarray(image_sizes, np.int64) // size_divisible) * size_divisible
    # boxes grouped by image, images of one padded size together: one anchor grid at a time
    order = np.lexsort((image_index, padded[image_index, 1], padded[image_index, 0]))
    starts = np.flatnonzero(np.diff(image_index[order], prepend=-1))
    bar = progress_bar(len(starts), "anchor match", "img") if progress else None
    grids: dict = {}
    for group in np.split(order, starts[1:]) if len(order) else []:
        size = tuple(int(v) for v in padded[image_index[group[0]]])
        if size not in grids:
            grids = {size: _level_grids(generator, size, strides)}
        for b in group:
            for level, (grid, stride, extent) in enumerate(grids[size]):
                reach = cell_areas[level]
                if np.any(
                    (reach >= iou_threshold * areas[b]) & (reach <= areas[b] / iou_threshold)
                ):
                    best[b] = max(best[b], _window_best_iou(boxes[b], grid, stride, extent))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return best


def _level_grids(generator, padded, strides):
    """Per level: anchors as an ``(H_l, W_l, A, 4)`` grid, the level's ``(stride_y, stride_x)``
    and the cell anchors' extent ``(min x1, min y1, max x2, max y2)`` around a position."""
    shapes = [(-(-padded[0] // s), -(-padded[1] // s)) for s in strides]
    level_strides = generator.strides(padded, shapes)
    levels = generator.grid_anchors(shapes, level_strides, np.float64)
    cells = generator.cell_anchors()
    return [
        (
            anchors.reshape(h, w, -1, 4),
            stride,
            (*cell[:, :2].min(axis=0), *cell[:, 2:].max(axis=0)),
        )
        for anchors, (h, w), stride, cell in zip(levels, shapes, level_strides, cells)
    ]


def _window_best_iou(box, grid, stride, extent) -> float:
    """Highest IoU of ``box`` with the anchors of ``grid`` at positions where they can
    overlap it (position ``x`` spans ``x * stride + extent``)."""
    (stride_y, stride_x), (ex1, ey1, ex2, ey2) = stride, extent
    h, w = grid.shape[:2]
    x_lo = max(math.floor((box[0] - ex2) / stride_x), 0)
    x_hi = min(math.ceil((box[2] - ex1) / stride_x), w - 1)
    y_lo = max(math.floor((box[1] - ey2) / stride_y), 0)
    y_hi = min(math.ceil((box[3] - ey1) / stride_y), h - 1)
    if x_lo > x_hi or y_lo > y_hi:
        return 0.0
    rows_at_once = max(1, _MAX_WINDOW // ((x_hi - x_lo + 1) * grid.shape[2]))
    best = 0.0
    for y in range(y_lo, y_hi + 1, rows_at_once):
        window = grid[y : min(y + rows_at_once, y_hi + 1), x_lo : x_hi + 1].reshape(-1, 4)
        iou = box_iou(box[None, :], window)
        best = max(best, float(np.nanmax(iou)))
    return best


def suggest_anchor_sizes(object_sizes, score=None, num_levels: int = 5):
    """``(sizes, note)``: ``num_levels`` anchor sizes ``s * 2**k``, one per level.

    Candidates ``s`` lie on a quarter-octave grid (rounded to whole pixels) such that the
    ladder reaches the 5th-95th percentile ``[p5, p95]`` of ``object_sizes``: ``s / sqrt(2)
    <= p5`` and ``s * 2**(num_levels - 1) * sqrt(2) >= p95``; when the range is too wide for
    that, ``s`` within an octave of the ladder centred on it. ``score(sizes)`` (lower is
    better, e.g. ``(unmatched share, -mean IoU)``) picks among them; without it, the centred
    ladder is returned. ``note`` explains a range too wide to cover.
    """
    object_sizes = np.asarray(object_sizes, np.float64)
    if object_sizes.size == 0:
        return (), "no objects: nothing to suggest"
    p5, p95 = np.percentile(object_sizes, [5, 95])
    span = 2.0 ** (num_levels - 1)
    centred = math.sqrt(p5 * p95 / span)
    low, high = p95 / (span * math.sqrt(2)), p5 * math.sqrt(2)
    note = ""
    if low > high:
        note = (
            f"object sizes (5th-95th percentile {p5:.0f}-{p95:.0f} px) span more than the "
            f"{2 * span:.0f}x that {num_levels} doubling sizes reach; consider two sizes per "
            f"level (s and s * sqrt(2))"
        )
        low, high = centred / 2, centred * 2
    grid = 2.0 ** (
        np.arange(math.ceil(4 * math.log2(low)), math.floor(4 * math.log2(high)) + 1) / 4
    )
    candidates = sorted({max(1, round(v)) for v in grid} or {max(1, round(centred))})
    candidates = [s for s in candidates if low <= s <= high] or candidates
    ladders = [tuple((s * 2**k,) for k in range(num_levels)) for s in candidates]
    if score is None or len(ladders) == 1:
        s = max(1, round(centred)) if score is None else candidates[0]
        return tuple((s * 2**k,) for k in range(num_levels)), note
    return min(ladders, key=score), note


def _well_formed(img) -> bool:
    """An image entry with a file name and a size to compare with."""
    return (
        isinstance(img, dict)
        and isinstance(img.get("file_name"), str)
        and all(isinstance(img.get(k), int) for k in ("id", "height", "width"))
    )


def _large(images, progress: bool) -> bool:
    return progress and len(images) >= LARGE_DATASET


def _score_pair(score) -> tuple[float, float]:
    """``(unmatched share, mean best IoU)`` from a ``(share, -mean IoU)`` score."""
    return score[0], -score[1]


def run_inspect(
    annotation_json,
    image_root,
    config: str | None = None,
    out: str = "inspect.png",
    overwrite: bool = False,
    progress: bool = True,
    num_samples: int = 4,
) -> dict:
    """What ``mrcnn-edu inspect`` does: print every problem and raise a ``ValueError``
    counting them, or print the statistics and write the figure to ``out``; return the
    statistics. ``config`` is a run config json whose model's anchors to compare with
    (default ``MaskRCNNConfig.small(K)``, the shapes preset)."""
    from .inspect_report import check_output_path, format_statistics, save_inspection_figure

    check_output_path(out, overwrite)
    path = os.fspath(annotation_json)
    content, problems = dataset_problems(path, image_root, progress)
    if problems:
        print("\n".join(problems))
        raise ValueError(
            f"{len(problems)} problem(s) found in {path!r} and its images (listed above); "
            f"fix them and run inspect again"
        )
    print(
        f"{path}: no problems ({len(content['images'])} images, "
        f"{len(content['annotations'])} annotations, {len(content['categories'])} categories)"
    )
    stats = dataset_statistics(content, _model_config(config, content), progress)
    print(format_statistics(stats))
    with_instances = [
        img["id"] for img, n in zip(content["images"], stats["instances_per_image"]) if n
    ]
    del content  # the dataset below reads the json again: do not hold it twice
    picked = np.unique(np.linspace(0, len(with_instances) - 1, num_samples).round().astype(int))
    from .data.coco import CocoDataset

    dataset = CocoDataset(path, image_root)
    index_of = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    samples = [dataset[index_of[with_instances[i]]] for i in picked] if with_instances else []
    save_inspection_figure(samples, stats, out, overwrite, class_names=dataset.class_names)
    print(f"figure: {out}")
    return stats


def _model_config(config, content):
    """The model of run config ``config``, or the shapes preset for the dataset's classes."""
    if config is not None:
        from .run_config import RunConfig

        return RunConfig.load(config).model
    from .mask_rcnn import MaskRCNNConfig

    return MaskRCNNConfig.small(max(1, len(content["categories"])))
