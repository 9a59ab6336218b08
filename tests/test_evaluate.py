"""COCO evaluation: hand-built cases whose AP can be worked out on paper.

COCO AP averages, over the IoU thresholds 0.50, 0.55, ..., 0.95, the precision interpolated
at 101 recall points; a class with one ground truth and one correct detection scores 1, a
class whose only ground truth is missed scores 0, and the AP is the mean over classes.
"""

import json

import numpy as np
import pytest

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from mrcnn_edu.data.coco import CocoDataset  # noqa: E402
from mrcnn_edu.data.shapes import ShapesDataset, to_coco_dict, write_coco  # noqa: E402
from mrcnn_edu.evaluate import (  # noqa: E402
    STAT_NAMES,
    coco_eval,
    evaluate_coco,
    per_class_ap,
    predictions_to_coco_results,
    write_coco_results,
)

H = W = 100

# pycocotools' own decode warns under NumPy 2 (its RLE object lacks __array__(copy=)).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def square(x1, y1, x2, y2):
    mask = np.zeros((H, W), np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def gt_dict(objects, crowds=()):
    """One 100x100 image; ``objects``: (category_id, x1, y1, x2, y2) squares."""
    annotations = []
    for category_id, x1, y1, x2, y2 in objects:
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": 1,
                "category_id": category_id,
                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float((x2 - x1) * (y2 - y1)),
                "iscrowd": 0,
            }
        )
    for category_id, x1, y1, x2, y2 in crowds:
        rle = mask_utils.encode(np.asfortranarray(square(x1, y1, x2, y2)))
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": 1,
                "category_id": category_id,
                "segmentation": {"size": [H, W], "counts": rle["counts"].decode()},
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float((x2 - x1) * (y2 - y1)),
                "iscrowd": 1,
            }
        )
    return {
        "images": [{"id": 1, "file_name": "1.png", "height": H, "width": W}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def prediction(detections):
    """``detections``: (label, score, x1, y1, x2, y2) squares, with matching masks."""
    return {
        "boxes": np.array([d[2:] for d in detections], np.float32).reshape(-1, 4),
        "labels": np.array([d[0] for d in detections], np.int64),
        "scores": np.array([d[1] for d in detections], np.float32),
        "masks": np.stack([square(*d[2:]) for d in detections])
        if detections
        else np.zeros((0, H, W), np.uint8),
    }


def evaluate(gt, detections, **kwargs):
    results = predictions_to_coco_results([prediction(detections)], [1])
    return evaluate_coco(gt, results, print_table=False, **kwargs)


A = (1, 10, 10, 30, 30)  # class 1, 20 x 20
B = (2, 50, 50, 80, 80)  # class 2, 30 x 30


def test_perfect_predictions_score_one():
    metrics = evaluate(gt_dict([A, B]), [(1, 0.9, *A[1:]), (2, 0.8, *B[1:])])
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AR100"] == pytest.approx(1.0)
        assert list(metrics[iou_type]) == list(STAT_NAMES)


def test_perfect_predictions_from_a_shapes_dataset_score_one(tmp_path):
    ds = ShapesDataset(6, image_size=(64, 64), seed=3, min_objects=0, max_objects=4)
    items = [ds[i] for i in range(len(ds))]
    predictions = [
        {
            "boxes": it["boxes"],
            "labels": it["labels"],
            "scores": np.linspace(1.0, 0.5, len(it["labels"]), dtype=np.float32),
            # probabilities, not binary: thresholded at 0.5 on the way to RLE
            "masks": it["masks"] * np.float32(0.9) + np.float32(0.05),
        }
        for it in items
    ]
    results = predictions_to_coco_results(
        predictions, [it["image_id"] for it in items], ds.label_to_category_id
    )
    json_path = write_coco(ds, tmp_path)
    from_files = CocoDataset(json_path, tmp_path / "images")
    for gt in (to_coco_dict(ds), json_path, ds, from_files, from_files.coco):
        metrics = evaluate_coco(gt, results, print_table=False)
        assert metrics["bbox"]["AP"] == pytest.approx(1.0)
        assert metrics["segm"]["AP"] == pytest.approx(1.0)


def test_wrong_class_with_a_lower_score_costs_that_class_its_ap():
    # class a: its own detection first, then B's (a false positive): precision 1 up to recall
    # 1, AP 1. class b: its only object missed, AP 0. Mean 0.5.
    cocoeval = coco_eval(gt_dict([A, B]), predictions_to_coco_results(
        [prediction([(1, 0.9, *A[1:]), (1, 0.8, *B[1:])])], [1]), "bbox")  # fmt: skip
    assert cocoeval.stats[0] == pytest.approx(0.5)
    assert per_class_ap(cocoeval) == pytest.approx({"a": 1.0, "b": 0.0})


def test_wrong_class_with_a_higher_score_halves_the_other_class_too():
    # class a: the false positive ranks first, so precision is 1/2 at recall 1 and the
    # interpolated precision is 1/2 everywhere: AP 0.5. class b: 0. Mean 0.25.
    metrics = evaluate(gt_dict([A, B]), [(1, 0.9, *A[1:]), (1, 0.95, *B[1:])])
    assert metrics["bbox"]["AP"] == pytest.approx(0.25)
    assert metrics["segm"]["AP"] == pytest.approx(0.25)


def test_shifted_prediction_counts_below_its_iou_only():
    # shifted 4 px right: overlap 16 x 20, union 24 x 20, IoU 2/3 -- a hit at thresholds
    # 0.50 ... 0.65 (4 of 10), a miss above: AP 0.4, AP50 1, AP75 0.
    gt = gt_dict([(1, 10, 10, 30, 30)])
    metrics = evaluate(gt, [(1, 0.9, 14, 10, 34, 30)])
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        assert m["AP"] == pytest.approx(0.4)
        assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(0.0)
        assert m["APs"] == pytest.approx(0.4)  # 400 px < 32^2: a small object
        assert m["APm"] == -1 and m["APl"] == -1  # no medium or large ground truth


def test_empty_predictions_score_zero_without_crashing(capsys):
    gt = gt_dict([A, B])
    for results in ([], predictions_to_coco_results([prediction([])], [1])):
        assert results == []
        metrics = evaluate_coco(gt, results)
        for iou_type in ("bbox", "segm"):
            assert metrics[iou_type]["AP"] == 0.0 and metrics[iou_type]["AR100"] == 0.0
    table = capsys.readouterr().out
    assert "COCO segm evaluation (1 images)" in table
    assert table.count("Average Precision") == 4 * 6 and table.count("Average Recall") == 4 * 6


def test_print_table_false_prints_nothing(capsys):
    evaluate(gt_dict([A]), [(1, 0.9, *A[1:])])
    assert capsys.readouterr().out == ""


def test_detections_inside_a_crowd_are_not_false_positives():
    detections = [(1, 0.9, *A[1:]), (1, 0.95, 60, 60, 80, 80)]
    with_crowd = evaluate(gt_dict([A], crowds=[(1, 50, 50, 100, 100)]), detections)
    without = evaluate(gt_dict([A]), detections)
    assert with_crowd["bbox"]["AP"] == pytest.approx(1.0)
    assert without["bbox"]["AP"] == pytest.approx(0.5)  # the unexcused FP ranks first


def test_segm_sizes_come_from_mask_areas_not_boxes():
    # A false positive with a small mask but a box covering the whole image. By its mask
    # (400 px) it is small, so it counts against APs (ranked first: APs 0.5); by its box
    # (10000 px > 96^2) it would be large and ignored for APs.
    results = predictions_to_coco_results([prediction([(1, 0.9, *A[1:])])], [1])
    fp = predictions_to_coco_results([prediction([(1, 0.95, 60, 60, 80, 80)])], [1])[0]
    fp["bbox"] = [0.0, 0.0, 100.0, 100.0]
    metrics = evaluate_coco(gt_dict([A]), results + [fp], iou_types=("segm",), print_table=False)
    assert metrics["segm"]["APs"] == pytest.approx(0.5)


def test_per_class_ap_averages_to_the_overall_ap():
    gt = gt_dict([A, B, (1, 60, 10, 90, 35)])
    results = predictions_to_coco_results(
        [prediction([(1, 0.9, *A[1:]), (2, 0.7, 52, 50, 80, 80), (1, 0.8, 60, 12, 90, 35)])],
        [1],
    )
    cocoeval = coco_eval(gt, results, "segm")
    per_class = per_class_ap(cocoeval)
    assert np.mean(list(per_class.values())) == pytest.approx(cocoeval.stats[0])
    per_class_50 = per_class_ap(cocoeval, iou_threshold=0.5)
    assert per_class_50 == pytest.approx({"a": 1.0, "b": 1.0})
    assert cocoeval.stats[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not one of COCOeval's thresholds"):
        per_class_ap(cocoeval, iou_threshold=0.52)


def test_results_are_coco_boxes_with_rle_masks_and_category_ids():
    probabilities = np.zeros((1, 1, H, W), np.float32)  # torchvision's (D, 1, H, W)
    probabilities[0, 0, 10:20, 30:50] = 0.7
    probabilities[0, 0, 20:25, 30:50] = 0.5  # not above the threshold
    pred = {
        "boxes": np.array([[30, 10, 50, 20]], np.float32),
        "labels": np.array([2]),
        "scores": np.array([0.25], np.float32),
        "masks": probabilities,
    }
    (result,) = predictions_to_coco_results([pred], [7], {1: 3, 2: 11})
    assert result["image_id"] == 7 and result["category_id"] == 11
    assert result["bbox"] == [30.0, 10.0, 20.0, 10.0] and result["score"] == pytest.approx(0.25)
    json.dumps(result)
    decoded = mask_utils.decode(result["segmentation"])  # counts are a str, for JSON
    np.testing.assert_array_equal(decoded, probabilities[0, 0] > 0.5)
    assert decoded.sum() == 200
    no_masks = predictions_to_coco_results(
        [{k: pred[k] for k in ("boxes", "labels", "scores")}], [7]
    )
    assert "segmentation" not in no_masks[0] and no_masks[0]["category_id"] == 2


def test_bad_predictions_and_results_are_rejected():
    pred = prediction([(1, 0.9, *A[1:])])
    with pytest.raises(ValueError, match="1 predictions but 2 image ids"):
        predictions_to_coco_results([pred], [1, 2])
    with pytest.raises(ValueError, match="label 1, which label_to_category_id does not map"):
        predictions_to_coco_results([pred], [1], {2: 5})
    with pytest.raises(ValueError, match=r"labels are 1\.\.K"):
        predictions_to_coco_results([{**pred, "labels": np.array([0])}], [1])
    with pytest.raises(ValueError, match=r"'masks'\] must be \(D, H, W\)"):
        predictions_to_coco_results([{**pred, "masks": np.zeros((2, H, W))}], [1])
    with pytest.raises(ValueError, match=r"'boxes'\] must be \(D, 4\)"):
        predictions_to_coco_results([{**pred, "boxes": np.zeros((1, 5))}], [1])

    gt = gt_dict([A])
    results = predictions_to_coco_results([pred], [1])
    with pytest.raises(ValueError, match="category_id 9, not a ground-truth category"):
        evaluate_coco(gt, [{**results[0], "category_id": 9}], print_table=False)
    with pytest.raises(ValueError, match="image_id 3, which is not in the ground truth"):
        evaluate_coco(gt, [{**results[0], "image_id": 3}], print_table=False)
    small = predictions_to_coco_results([{**pred, "masks": np.ones((1, 50, 50))}], [1])
    with pytest.raises(ValueError, match=r"mask size \[50, 50\] is not image 1's"):
        evaluate_coco(gt, small, print_table=False)
    boxes_only = [{k: v for k, v in results[0].items() if k != "segmentation"}]
    with pytest.raises(ValueError, match=r"lacks \['segmentation'\].*iou_types=\('bbox',\)"):
        evaluate_coco(gt, boxes_only, print_table=False)
    bbox_only = evaluate_coco(gt, boxes_only, ("bbox",), print_table=False)
    assert bbox_only["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="iou_type must be one of"):
        evaluate_coco(gt, results, ("keypoints",), print_table=False)


def test_ground_truth_without_area_or_iscrowd_gets_the_coco_defaults():
    gt = gt_dict([A])
    for annotation in gt["annotations"]:
        del annotation["area"], annotation["iscrowd"]
    metrics = evaluate(gt, [(1, 0.9, *A[1:])])
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["APs"] == pytest.approx(1.0)  # area 400 filled in from the polygon
    assert "area" not in gt["annotations"][0]  # the caller's dict is left as it was


def test_per_class_metrics_of_a_hand_built_set(capsys):
    # a: both objects found exactly -> 1. b: its object missed (a crowd of b is not counted)
    # -> 0. d (id 12): one of two objects found -> precision 1 up to recall 1/2, 0 above: the
    # 51 of 101 recall points 0, 0.01, ..., 0.50 -> 51/101. c (id 7): no ground truth, one
    # false positive -> no AP (None, printed "-"), not 0.
    a2, d1, d2 = (1, 60, 10, 90, 35), (12, 10, 60, 30, 90), (12, 40, 60, 45, 65)
    gt = gt_dict([A, a2, B, d1, d2], crowds=[(2, 85, 85, 100, 100)])
    gt["categories"] += [{"id": 12, "name": "d"}, {"id": 7, "name": "c"}]
    detections = [(1, 0.9, *A[1:]), (1, 0.8, *a2[1:]), (12, 0.7, *d1[1:]), (7, 0.95, 0, 0, 5, 5)]
    results = predictions_to_coco_results([prediction(detections)], [1])
    metrics = evaluate_coco(gt, results, per_class=True)  # prints the tables
    per_class = metrics["per_class"]
    assert list(per_class) == ["a", "b", "c", "d"]  # category id order: 1, 2, 7, 12
    expected = {"a": 1.0, "b": 0.0, "c": None, "d": 51 / 101}
    for name, ap in expected.items():
        row = per_class[name]
        for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"):
            assert row[key] == (None if ap is None else pytest.approx(ap)), (name, key)
    counts = {name: (row["category_id"], row["instances"]) for name, row in per_class.items()}
    assert counts == {"a": (1, 2), "b": (2, 1), "c": (7, 0), "d": (12, 2)}
    assert '"bbox_AP": null' in json.dumps(per_class)  # JSON null, not NaN or -1
    # the classes with ground truth average to COCOeval's AP
    assert np.mean([1.0, 0.0, 51 / 101]) == pytest.approx(metrics["segm"]["AP"])
    table = capsys.readouterr().out.split("per-class AP (4 classes):\n")[1].splitlines()
    assert [line.split() for line in table[1:]] == [
        ["a", "1.000", "1.000", "1.000", "1.000", "2"],
        ["b", "0.000", "0.000", "0.000", "0.000", "1"],
        ["c", "-", "-", "-", "-", "0"],
        ["d", "0.505", "0.505", "0.505", "0.505", "2"],
    ]


def test_per_class_counts_the_evaluated_images_and_iou_types_only():
    gt = gt_dict([A, B])
    gt["images"].append({"id": 2, "file_name": "2.png", "height": H, "width": W})
    gt["annotations"].append({**gt["annotations"][1], "id": 3, "image_id": 2})
    results = predictions_to_coco_results([prediction([(2, 0.9, *B[1:])])], [2])
    metrics = evaluate_coco(gt, results, ("bbox",), print_table=False, image_ids=[2],
                            per_class=True)  # fmt: skip
    assert metrics["per_class"] == {
        "a": {"category_id": 1, "instances": 0, "bbox_AP": None, "bbox_AP50": None},
        "b": {"category_id": 2, "instances": 1, "bbox_AP": pytest.approx(1.0),
              "bbox_AP50": pytest.approx(1.0)},
    }  # fmt: skip
    assert "per_class" not in evaluate(gt, [])  # off unless asked: metrics keep their keys


def test_categories_sharing_a_name_are_told_apart():
    gt = gt_dict([A, B])
    gt["categories"][1]["name"] = "a"
    per_class = evaluate(gt, [(1, 0.9, *A[1:])], per_class=True)["per_class"]
    assert list(per_class) == ["a (id 1)", "a (id 2)"]
    assert per_class["a (id 1)"]["segm_AP"] == pytest.approx(1.0)
    assert per_class["a (id 2)"]["segm_AP"] == pytest.approx(0.0)


def test_write_coco_results_loads_in_pycocotools_and_replaces_whole(tmp_path):
    from pycocotools.coco import COCO

    gt = gt_dict([A, B])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    results = predictions_to_coco_results([prediction([(1, 0.9, *A[1:]), (2, 0.8, *B[1:])])], [1])
    out = tmp_path / "results.json"
    assert write_coco_results(results, out) == str(out)
    loaded = COCO(str(path)).loadRes(str(out))
    assert sorted(a["category_id"] for a in loaded.anns.values()) == [1, 2]
    assert evaluate_coco(str(path), str(out), print_table=False)["segm"]["AP"] == pytest.approx(1)
    before = out.read_text()
    with pytest.raises(ValueError, match="cannot write results json.*Out of range float"):
        write_coco_results([{**results[0], "score": float("nan")}], out)
    assert out.read_text() == before  # the old file is whole, and no temp file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt.json", "results.json"]
    with pytest.raises(FileNotFoundError, match="folder .* does not exist"):
        write_coco_results(results, tmp_path / "missing" / "r.json")
    with pytest.raises(FileNotFoundError, match="does not exist \\(or is a file\\)"):
        write_coco_results(results, out / "r.json")  # under a file
    with pytest.raises(ValueError, match="is a folder"):
        write_coco_results(results, tmp_path)
