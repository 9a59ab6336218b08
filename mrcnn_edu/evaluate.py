"""COCO evaluation: model predictions -> COCO results -> COCOeval's twelve numbers.

The field reports detection and instance segmentation with ``pycocotools``' ``COCOeval``: AP
averaged over IoU thresholds 0.50:0.05:0.95 (101-point interpolated precision, up to 100
detections per image), AP at IoU 0.50 and 0.75, AP for small/medium/large objects (area below
32^2, up to 96^2, above), and average recall at 1/10/100 detections and per size. ``bbox`` uses
box IoU, ``segm`` mask IoU; everything else is the same.

The path from a model to the numbers::

    results = predictions_to_coco_results(predictions, image_ids, dataset.label_to_category_id)
    metrics = evaluate_coco(gt, results)        # gt: json path, COCO dict or pycocotools COCO
    metrics["segm"]["AP50"]
    evaluate_coco(gt, results, per_class=True)["per_class"]["circle"]["segm_AP"]
    write_coco_results(results, "results.json")  # for COCO.loadRes and other tools

A value of -1 means "no ground truth in this group" (e.g. APl when no object is large): the
COCO convention, kept so the table reads like every other COCO table. Per class
(``per_class_metrics``), a class without ground truth has AP ``None`` and prints as ``-``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .backend import to_host
from .data.coco import (
    coco_from_dict,
    import_pycocotools,
    import_pycocotools_mask,
    read_coco_json,
    validate_coco_instances,
)
from .data.shapes import ShapesDataset, to_coco_dict
from .run_folder import atomic_write_text

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
IOU_TYPES = ("bbox", "segm")


def predictions_to_coco_results(
    predictions: Sequence[Mapping],
    image_ids: Sequence[int],
    label_to_category_id: Mapping[int, int] | None = None,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """COCO results (one dict per detection) from torchvision-style predictions.

    Args:
        predictions: one dict per image with ``"boxes"`` ``(D, 4)`` xyxy pixels, ``"labels"``
            ``(D,)`` ints in ``1..K``, ``"scores"`` ``(D,)``, and optionally ``"masks"``
            ``(D, H, W)`` (or ``(D, 1, H, W)``) binary or probabilities, pasted into the full
            image, and ``"keypoints"`` ``(D, K, 3)`` rows ``(x, y, v)`` (pose models). NumPy or
            CuPy arrays.
        image_ids: the image id of each prediction (``item["image_id"]``).
        label_to_category_id: maps the model's labels to the json's category ids (the
            dataset's ``label_to_category_id``); ``None`` means they are equal.
        mask_threshold: a pixel is in the mask when its value is ``> mask_threshold``.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation"}]``;
        ``segmentation`` (compressed RLE with ``str`` counts) only when masks are given,
        ``keypoints`` (COCO's flat ``[x1, y1, v1, ...]``) only when keypoints are.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(image_ids)} image ids; give one "
            f"image id per prediction"
        )
    results = []
    for index, (pred, image_id) in enumerate(zip(predictions, image_ids)):
        boxes, labels, scores, masks = _unpack_prediction(pred, index)
        keypoints = _keypoint_rows(pred, index, len(boxes))
        category_ids = [_category_id(int(k), label_to_category_id, index) for k in labels]
        rles = None
        if masks is not None and len(masks):
            mask_utils = import_pycocotools_mask()
            binary = (masks > mask_threshold).astype(np.uint8)
            # RLE runs down columns: pycocotools wants (H, W, D) in Fortran order.
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for d in range(len(boxes)):
            x1, y1, x2, y2 = (float(v) for v in boxes[d])
            result = {
                "image_id": int(image_id),
                "category_id": category_ids[d],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(scores[d]),
            }
            if rles is not None:
                result["segmentation"] = {
                    "size": [int(s) for s in rles[d]["size"]],
                    "counts": rles[d]["counts"].decode("ascii"),
                }
            if keypoints is not None:
                result["keypoints"] = keypoints[d]
            results.append(result)
    return results


def write_coco_results(results: Sequence[Mapping], path: str | os.PathLike) -> str:
    """Write COCO results (``predictions_to_coco_results``) as a json list; return the path.

    The file is written atomically (a temporary file in the same folder, then ``os.replace``):
    an existing file at ``path`` is either left whole or replaced whole. It loads with
    ``pycocotools``' ``COCO.loadRes`` and as ``results`` of ``evaluate_coco``.
    """
    path = check_results_path(path)
    try:
        text = json.dumps(list(results), allow_nan=False)  # NaN is not JSON: refuse, not write
        return atomic_write_text(path, text)
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or err
        raise ValueError(f"cannot write results json {path!r}: {reason}") from err


def check_results_path(path: str | os.PathLike) -> str:
    """``path`` as a str if a results json can be created there, else a clear error (checked
    before a long prediction, so a typo costs nothing)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"results json {path!r} is a folder; give a file name like results.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"cannot write results json {path!r}: folder {folder!r} does not exist (or is a file)"
        )
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write results json {path!r}: folder {folder!r} is read-only")
    return path


def evaluate_coco(
    gt,
    results,
    iou_types: Sequence[str] = IOU_TYPES,
    print_table: bool = True,
    image_ids: Sequence[int] | None = None,
    per_class: bool = False,
) -> dict[str, dict]:
    """Run COCOeval for each IoU type and return ``{iou_type: {"AP": .., ..., "ARl": ..}}``.

    Args:
        gt: the ground truth: a COCO instances json path, its dict (e.g. ``to_coco_dict``), a
            ``pycocotools.coco.COCO``, a ``CocoDataset`` (its ``.coco``: the original json,
            crowd regions included) or a ``ShapesDataset`` (converted with ``to_coco_dict``).
        results: a list of result dicts (``predictions_to_coco_results``) or a results json
            path. An empty list is fine: every AP is 0 (or -1 where there is no ground truth).
        iou_types: any of ``"bbox"``, ``"segm"``; ``segm`` needs results with masks.
        print_table: print COCOeval's standard twelve-line table for each type.
        image_ids: evaluate on these images only (default: every ground-truth image; images
            without results then count as misses).
        per_class: also return ``metrics["per_class"]``, the AP and AP50 of each class
            (``per_class_metrics``), and print them as a table after COCOeval's.
    """
    coco_gt = _as_coco_gt(gt)
    results = _as_results(results)
    metrics, cocoevals = {}, {}
    for iou_type in iou_types:
        cocoeval, table = _run_cocoeval(coco_gt, results, iou_type, image_ids)
        cocoevals[iou_type] = cocoeval
        metrics[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, cocoeval.stats)}
        if print_table:
            num_images = len(cocoeval.params.imgIds)
            print(f"COCO {iou_type} evaluation ({num_images} images):")
            print(table.rstrip())
    if per_class and cocoevals:
        metrics["per_class"] = per_class_metrics(cocoevals)
        if print_table:
            print(per_class_table(metrics["per_class"]))
    return metrics


def coco_eval(gt, results, iou_type: str = "segm", image_ids: Sequence[int] | None = None):
    """The evaluated, accumulated and summarised ``COCOeval`` object for one IoU type (same
    arguments as ``evaluate_coco``); ``.stats`` holds the twelve numbers, ``.eval`` the
    precision/recall arrays that ``per_class_ap`` reads."""
    cocoeval, _ = _run_cocoeval(_as_coco_gt(gt), _as_results(results), iou_type, image_ids)
    return cocoeval


def per_class_ap(
    cocoeval, iou_threshold: float | None = None, area: str = "all"
) -> dict[str, float]:
    """``{category name: AP}`` from an accumulated ``COCOeval`` (see ``coco_eval``).

    AP is the mean interpolated precision over the recall points and the IoU thresholds
    (all of them, or only ``iou_threshold``, e.g. 0.5 for AP50), at 100 detections per image
    and the given area range (``"all"``, ``"small"``, ``"medium"``, ``"large"``). A category
    without ground truth gets -1. Averaging the classes that have ground truth gives
    ``cocoeval.stats[0]`` (or ``stats[1]`` for ``iou_threshold=0.5``). Two categories sharing
    a name are told apart as ``"name (id N)"``.
    """
    aps = _category_aps(cocoeval, iou_threshold, area)
    names = _category_names(cocoeval.cocoGt, cocoeval.params.catIds)
    return {names[cid]: float(ap) for cid, ap in zip(cocoeval.params.catIds, aps)}


def per_class_metrics(cocoevals: Mapping[str, object]) -> dict[str, dict]:
    """The AP and AP50 of every class, for each evaluated IoU type, and its ground-truth count.

    Args:
        cocoevals: ``{iou_type: accumulated COCOeval}`` (see ``coco_eval``), all on the same
            ground truth and images.

    Returns:
        ``{class name: {"category_id", "instances", "bbox_AP", "bbox_AP50", "segm_AP",
        "segm_AP50"}}`` in category id order, with the keys of the IoU types given.
        ``instances`` counts the class's non-crowd ground truths in the evaluated images. A
        class without any has no AP: ``None`` (``null`` in JSON), not 0 -- nothing was missed.
        Two categories with the same name are told apart as ``"name (id N)"``.
    """
    if not cocoevals:
        raise ValueError("per_class_metrics needs at least one COCOeval")
    first = next(iter(cocoevals.values()))
    coco_gt, category_ids = first.cocoGt, list(first.params.catIds)
    images = set(first.params.imgIds)
    counts = dict.fromkeys(category_ids, 0)
    for ann in coco_gt.anns.values():
        if ann["image_id"] in images and not ann.get("iscrowd", 0) and ann["category_id"] in counts:
            counts[ann["category_id"]] += 1
    columns = {}
    for iou_type, cocoeval in cocoevals.items():
        if list(cocoeval.params.catIds) != category_ids:
            raise ValueError("the COCOevals of per_class_metrics must share their categories")
        columns[f"{iou_type}_AP"] = _category_aps(cocoeval, None, "all")
        columns[f"{iou_type}_AP50"] = _category_aps(cocoeval, 0.5, "all")
    names = _category_names(coco_gt, category_ids)
    out = {}
    for k, cid in enumerate(category_ids):
        row = {"category_id": int(cid), "instances": counts[cid]}
        for key, aps in columns.items():
            row[key] = float(aps[k]) if aps[k] >= 0 else None
        out[names[cid]] = row
    return out


def per_class_table(per_class: Mapping[str, Mapping]) -> str:
    """``per_class_metrics``' result as a text table: one row per class, a column per AP and
    the ground-truth count; a class without ground truth shows ``-``."""
    keys = ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")
    ap_keys = [k for k in keys if any(k in row for row in per_class.values())]
    headers = [k.replace("_", " ") for k in ap_keys]
    width = max([len("class"), *(len(name) for name in per_class)])
    lines = [
        f"per-class AP ({len(per_class)} classes):",
        "  ".join([f"{'class':<{width}}", *(f"{h:>9}" for h in headers), f"{'instances':>9}"]),
    ]
    for name, row in per_class.items():
        cells = ["-" if row.get(k) is None else f"{row[k]:.3f}" for k in ap_keys]
        lines.append(
            "  ".join([f"{name:<{width}}", *(f"{c:>9}" for c in cells), f"{row['instances']:>9}"])
        )
    return "\n".join(lines)


def _category_aps(cocoeval, iou_threshold, area) -> np.ndarray:
    """``(K,)`` AP of each category of ``cocoeval.params.catIds`` (-1: no ground truth)."""
    if not getattr(cocoeval, "eval", None) or "precision" not in cocoeval.eval:
        raise ValueError("cocoeval has no results: run evaluate() and accumulate() first")
    params = cocoeval.params
    if not params.useCats:
        raise ValueError("cocoeval was run with useCats=0: there are no per-class results")
    # precision: (IoU thresholds T, recall points R, categories K, area ranges A, maxDets M)
    precision = cocoeval.eval["precision"]
    if area not in params.areaRngLbl:
        raise ValueError(f"area must be one of {params.areaRngLbl}, got {area!r}")
    precision = precision[:, :, :, params.areaRngLbl.index(area), -1]
    if iou_threshold is not None:
        matches = np.flatnonzero(np.isclose(params.iouThrs, iou_threshold))
        if matches.size == 0:
            raise ValueError(
                f"iou_threshold {iou_threshold} is not one of COCOeval's thresholds "
                f"{np.round(params.iouThrs, 2).tolist()}"
            )
        precision = precision[matches]
    aps = np.full(len(params.catIds), -1.0)
    for k in range(len(params.catIds)):
        p = precision[:, :, k]
        valid = p[p > -1]
        if valid.size:
            aps[k] = valid.mean()
    return aps


def _category_names(coco_gt, category_ids) -> dict[int, str]:
    """``{category id: name}``; a name shared by several categories gets ``" (id N)"``."""
    names = {cid: str(coco_gt.cats[cid]["name"]) for cid in category_ids}
    shared = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {cid: f"{n} (id {cid})" if n in shared else n for cid, n in names.items()}


def _run_cocoeval(coco_gt, results, iou_type, image_ids):
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    _, COCOeval = import_pycocotools()
    detections = _results_for(results, iou_type, coco_gt)
    coco_dt = _load_results(coco_gt, detections)
    cocoeval = COCOeval(coco_gt, coco_dt, iou_type)
    if image_ids is not None:
        unknown = sorted(set(int(i) for i in image_ids) - set(coco_gt.imgs))
        if unknown:
            raise ValueError(f"image_ids {unknown[:5]} are not in the ground truth")
        cocoeval.params.imgIds = sorted(set(int(i) for i in image_ids))
    with contextlib.redirect_stdout(io.StringIO()):  # progress prints, not results
        cocoeval.evaluate()
        cocoeval.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        cocoeval.summarize()
    return cocoeval, table.getvalue()


def _results_for(results, iou_type, coco_gt):
    """Shallow copies of the results COCOeval needs for ``iou_type``, checked against gt."""
    field = "bbox" if iou_type == "bbox" else "segmentation"
    detections = []
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise ValueError(f"results[{i}] must be a dict, got {type(r).__name__}")
        missing = [k for k in ("image_id", "category_id", "score", field) if k not in r]
        if missing:
            hint = (
                " (pass masks to predictions_to_coco_results, or use iou_types=('bbox',))"
                if field == "segmentation"
                else ""
            )
            raise ValueError(f"results[{i}] lacks {missing} needed for {iou_type}{hint}")
        if r["image_id"] not in coco_gt.imgs:
            raise ValueError(
                f"results[{i}] is for image_id {r['image_id']!r}, which is not in the ground truth"
            )
        if r["category_id"] not in coco_gt.cats:
            raise ValueError(
                f"results[{i}] has category_id {r['category_id']!r}, not a ground-truth category "
                f"{sorted(coco_gt.cats)}; map labels with label_to_category_id"
            )
        det = dict(r)
        if iou_type == "segm":
            image = coco_gt.imgs[r["image_id"]]
            size = list(det["segmentation"].get("size", []))
            if size != [image["height"], image["width"]]:
                raise ValueError(
                    f"results[{i}]: mask size {size} is not image {r['image_id']}'s "
                    f"[height, width] [{image['height']}, {image['width']}]; paste masks into "
                    f"the full image"
                )
            # With a bbox present, loadRes would give the detection its box area instead of
            # its mask area, changing what counts as small/medium/large for segm.
            det.pop("bbox", None)
        else:
            det.pop("segmentation", None)
        detections.append(det)
    return detections


def _load_results(coco_gt, detections):
    COCO, _ = import_pycocotools()
    if not detections:
        # loadRes cannot take an empty list; an empty result set is a COCO with no annotations.
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": list(coco_gt.dataset["images"]),
            "categories": list(coco_gt.dataset["categories"]),
            "annotations": [],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt.createIndex()
        return coco_dt
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(detections)


def _as_coco_gt(gt):
    COCO, _ = import_pycocotools()
    if isinstance(gt, COCO):
        coco = gt
    elif isinstance(getattr(gt, "coco", None), COCO):  # a CocoDataset: its json, crowds and all
        coco = gt.coco
    elif isinstance(gt, ShapesDataset):
        coco = coco_from_dict(to_coco_dict(gt))
    elif isinstance(gt, (str, os.PathLike)):
        content = read_coco_json(os.fspath(gt))
        validate_coco_instances(content, source=os.fspath(gt))
        coco = coco_from_dict(content)
    elif isinstance(gt, Mapping):
        validate_coco_instances(dict(gt), source="ground-truth dict")
        # Copy the annotation dicts: defaults are filled in below and the caller's stay as given.
        content = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
        coco = coco_from_dict(content)
    else:
        raise ValueError(
            f"gt must be a json path, a COCO dict, a pycocotools COCO, a CocoDataset or a "
            f"ShapesDataset, got {type(gt).__name__}"
        )
    _fill_gt_defaults(coco)
    return coco


def _fill_gt_defaults(coco):
    """COCOeval reads ``iscrowd`` and ``area`` of every ground truth; hand-written files often
    omit them. Fill the COCO meanings: not a crowd, and the area of the segmentation."""
    mask_utils = None
    for ann in coco.anns.values():
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            mask_utils = mask_utils or import_pycocotools_mask()
            ann["area"] = float(mask_utils.area(coco.annToRLE(ann)))


def _as_results(results):
    if isinstance(results, (str, os.PathLike)):
        results = read_coco_json(os.fspath(results))
    if not isinstance(results, list):
        raise ValueError(f"results must be a list of dicts, got {type(results).__name__}")
    return results


def _unpack_prediction(pred, index):
    if not isinstance(pred, Mapping):
        raise ValueError(f"predictions[{index}] must be a dict, got {type(pred).__name__}")
    missing = [k for k in ("boxes", "labels", "scores") if k not in pred]
    if missing:
        raise ValueError(f"predictions[{index}] lacks {missing}")
    boxes = np.asarray(to_host(pred["boxes"]), dtype=np.float64)
    labels = np.asarray(to_host(pred["labels"]))
    scores = np.asarray(to_host(pred["scores"]), dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        else:
            raise ValueError(f"predictions[{index}]['boxes'] must be (D, 4), got {boxes.shape}")
    num = boxes.shape[0]
    if labels.shape != (num,) or scores.shape != (num,):
        raise ValueError(
            f"predictions[{index}]: labels {labels.shape} and scores {scores.shape} must be "
            f"({num},) to match boxes {boxes.shape}"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"predictions[{index}]['labels'] must be integers, got {labels.dtype}")
    masks = pred.get("masks")
    if masks is not None:
        masks = np.asarray(to_host(masks))
        if masks.ndim == 4 and masks.shape[1] == 1:  # torchvision's (D, 1, H, W)
            masks = masks[:, 0]
        if masks.ndim != 3 or masks.shape[0] != num:
            raise ValueError(
                f"predictions[{index}]['masks'] must be (D, H, W) with D = {num}, got {masks.shape}"
            )
    return boxes, labels, scores, masks


def _keypoint_rows(pred, index, num):
    """A prediction's ``keypoints`` ``(D, K, 3)`` as D flat lists ``[x1, y1, v1, ...]``."""
    if pred.get("keypoints") is None:
        return None
    keypoints = np.asarray(to_host(pred["keypoints"]), dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[0] != num or keypoints.shape[2] != 3:
        raise ValueError(
            f"predictions[{index}]['keypoints'] must be (D, K, 3) with D = {num}, got "
            f"{keypoints.shape}"
        )
    return [row.ravel().tolist() for row in keypoints]


def _category_id(label, label_to_category_id, index):
    if label_to_category_id is None:
        if label < 1:
            raise ValueError(
                f"predictions[{index}] has label {label}; labels are 1..K (0 is background)"
            )
        return label
    if label not in label_to_category_id:
        raise ValueError(
            f"predictions[{index}] has label {label}, which label_to_category_id does not map "
            f"(it covers {sorted(label_to_category_id)})"
        )
    return int(label_to_category_id[label])
