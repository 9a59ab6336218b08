"""COCO keypoint evaluation: AP over object keypoint similarity (OKS), with per-keypoint sigmas.

OKS plays for keypoints the part IoU plays for boxes. Between a detection with keypoints
``(x_i, y_i)`` and a ground-truth person with keypoints ``(x*_i, y*_i, v_i)`` and mask area
``A`` (COCO's ``area``, the scale ``s^2``)::

    OKS = mean over the labelled keypoints (v_i > 0) of  exp(-d_i^2 / (2 A (2 sigma_i)^2))

with ``d_i`` the pixel distance and ``sigma_i`` a per-keypoint constant: an error of
``2 sigma_i sqrt(A)`` pixels costs the keypoint ``exp(-1/2)``. COCO measured its sigmas as the
spread of human annotators' clicks (``COCO_KEYPOINT_SIGMAS``: 0.025 for the eyes, 0.107 for the
hips); ``data/pose.py`` derives the ones of its stick figures from them (docs/keypoints.md).
``object_keypoint_similarity`` computes the formula in NumPy; evaluation runs pycocotools'
``COCOeval(iouType="keypoints")``, which matches detections to people by OKS, averages AP over
OKS thresholds 0.50:0.05:0.95 with up to 20 detections per image, and reports ten numbers
(``KEYPOINT_STAT_NAMES``: AP, AP50, AP75, AP for medium (32^2 to 96^2) and large people, and the
same five for recall). People without a labelled keypoint are ignored.

    results = predictions_to_coco_results(predictions, image_ids)   # keypoints included
    evaluate_keypoints(dataset, results, sigmas=dataset.keypoint_sigmas)["AP"]
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np

from .data.coco import import_pycocotools
from .evaluate import _as_coco_gt, _as_results, _load_results

KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
# COCO's 17 person keypoints (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles):
# the sigmas of the COCO keypoint challenge, pycocotools' defaults.
COCO_KEYPOINT_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)  # fmt: skip


def object_keypoint_similarity(keypoints, gt_keypoints, area: float, sigmas) -> float:
    """OKS of predicted ``keypoints`` ``(K, 2 or 3)`` against ``gt_keypoints`` ``(K, 3)``
    ``(x, y, v)`` of a person with mask ``area``: the mean of ``exp(-d^2 / (2 area (2 sigma)^2))``
    over the keypoints with ``v > 0`` (what COCOeval computes; NaN without any)."""
    pred = np.asarray(keypoints, np.float64)[:, :2]
    gt = np.asarray(gt_keypoints, np.float64)
    sigmas = np.asarray(sigmas, np.float64)
    if gt.ndim != 2 or gt.shape[1] != 3 or pred.shape[0] != gt.shape[0] != sigmas.shape[0]:
        raise ValueError(
            f"need keypoints (K, 2), gt_keypoints (K, 3) and K sigmas, got {pred.shape}, "
            f"{gt.shape} and {sigmas.shape}"
        )
    labelled = gt[:, 2] > 0
    d2 = ((pred - gt[:, :2]) ** 2).sum(axis=1)
    e = d2 / ((2 * sigmas) ** 2 * 2 * (area + np.spacing(1)))
    return float(np.exp(-e[labelled]).mean()) if labelled.any() else float("nan")


def evaluate_keypoints(
    gt,
    results,
    sigmas: Sequence[float] | None = None,
    print_table: bool = True,
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Keypoint AP with COCOeval: ``{"AP": .., "AP50": .., ..., "ARl": ..}``.

    Args:
        gt: the ground truth, as ``evaluate_coco`` takes it (json path, COCO dict,
            pycocotools COCO, a ``CocoDataset`` or ``PoseDataset``), with keypoint categories.
        results: COCO results with ``"keypoints"`` (``predictions_to_coco_results`` of a pose
            model's predictions) or their json path; an empty list gives AP 0.
        sigmas: one OKS sigma per keypoint; None: COCO's, for COCO's 17 keypoints only.
        print_table: print COCOeval's ten-line keypoint table.
        image_ids: evaluate on these images only (default: every ground-truth image).
    """
    cocoeval = keypoint_cocoeval(gt, results, sigmas, image_ids)
    if print_table:
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            cocoeval.summarize()
        print(f"COCO keypoints evaluation ({len(cocoeval.params.imgIds)} images, OKS):")
        print(table.getvalue().rstrip())
    return {name: float(v) for name, v in zip(KEYPOINT_STAT_NAMES, cocoeval.stats)}


def keypoint_cocoeval(gt, results, sigmas=None, image_ids=None):
    """The evaluated and accumulated ``COCOeval(iouType="keypoints")`` (its ``stats`` filled
    by ``summarize``; arguments as ``evaluate_keypoints``)."""
    _, COCOeval = import_pycocotools()
    coco_gt = _as_coco_gt(gt)
    category_ids, num_keypoints = _keypoint_categories(coco_gt)
    sigmas = _checked_sigmas(sigmas, num_keypoints)
    _fill_keypoint_defaults(coco_gt, num_keypoints)
    detections = _keypoint_detections(_as_results(results), coco_gt, category_ids, num_keypoints)
    cocoeval = COCOeval(coco_gt, _load_results(coco_gt, detections), "keypoints")
    cocoeval.params.kpt_oks_sigmas = sigmas
    cocoeval.params.catIds = category_ids
    if image_ids is not None:
        wanted = sorted({int(i) for i in image_ids})
        unknown = sorted(set(wanted) - set(coco_gt.imgs))
        if unknown:
            raise ValueError(f"image_ids {unknown[:5]} are not in the ground truth")
        cocoeval.params.imgIds = wanted
    with contextlib.redirect_stdout(io.StringIO()):  # progress prints, not results
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    return cocoeval


def _keypoint_categories(coco_gt) -> tuple[list[int], int]:
    """The ids of the categories that declare keypoints, and their number of keypoints."""
    declared = {cid: len(c["keypoints"]) for cid, c in coco_gt.cats.items() if c.get("keypoints")}
    if not declared:
        raise ValueError(
            "the ground truth has no keypoint categories (a category's 'keypoints' lists the "
            "keypoint names, as in COCO's person_keypoints files)"
        )
    return sorted(declared), next(iter(declared.values()))


def _checked_sigmas(sigmas, num_keypoints) -> np.ndarray:
    if sigmas is None:
        if num_keypoints != len(COCO_KEYPOINT_SIGMAS):
            raise ValueError(
                f"OKS needs one sigma per keypoint: COCO's are for its 17 keypoints, this data "
                f"has {num_keypoints}; pass sigmas (the dataset's keypoint_sigmas)"
            )
        sigmas = COCO_KEYPOINT_SIGMAS
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.shape != (num_keypoints,) or not (np.isfinite(sigmas) & (sigmas > 0)).all():
        raise ValueError(
            f"sigmas must be {num_keypoints} positive numbers, one per keypoint, got "
            f"{sigmas.tolist()}"
        )
    return sigmas


def _fill_keypoint_defaults(coco_gt, num_keypoints) -> None:
    """COCOeval reads every ground truth's ``keypoints`` and ``num_keypoints`` (people with 0
    are ignored): an annotation without keypoints has none labelled."""
    for ann in coco_gt.anns.values():
        if "keypoints" not in ann:
            ann["keypoints"] = [0] * (3 * num_keypoints)
        ann.setdefault("num_keypoints", int(sum(v > 0 for v in ann["keypoints"][2::3])))


def _keypoint_detections(results, coco_gt, category_ids, num_keypoints) -> list[dict]:
    """Copies of the results with just what COCOeval's keypoint path reads (``loadRes`` takes
    the box path when a ``bbox`` is present, so boxes and masks are left out), checked."""
    detections = []
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise ValueError(f"results[{i}] must be a dict, got {type(r).__name__}")
        missing = [k for k in ("image_id", "category_id", "score", "keypoints") if k not in r]
        if missing:
            raise ValueError(
                f"results[{i}] lacks {missing} needed for keypoints (a pose model's predictions "
                f"carry 'keypoints'; predictions_to_coco_results passes them on)"
            )
        if r["image_id"] not in coco_gt.imgs:
            raise ValueError(
                f"results[{i}] is for image_id {r['image_id']!r}, not in the ground truth"
            )
        if r["category_id"] not in category_ids:
            raise ValueError(
                f"results[{i}] has category_id {r['category_id']!r}, not a keypoint category "
                f"{category_ids}"
            )
        if len(r["keypoints"]) != 3 * num_keypoints:
            raise ValueError(
                f"results[{i}] has {len(r['keypoints'])} keypoint values; the ground truth has "
                f"{num_keypoints} keypoints, 3 values each [x, y, v]"
            )
        detections.append({k: r[k] for k in ("image_id", "category_id", "score", "keypoints")})
    return detections
