"""NMS: the greedy definition, exact-threshold and tie behaviour, tiling, validation, GPU hook."""

import numpy as np
import pytest
from helpers import clustered_boxes

import mrcnn_edu.nms as nms_module
from mrcnn_edu.boxes import box_iou
from mrcnn_edu.nms import batched_nms, nms


def greedy_nms_definition(boxes, scores, threshold):
    """The rule written as plainly as possible: visit by decreasing score (ties by index), keep a
    box unless a kept box overlaps it with IoU > threshold."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    iou = box_iou(boxes, boxes)
    kept = []
    for i in order:
        if all(iou[j, i] <= threshold for j in kept):
            kept.append(i)
    return np.array(kept, dtype=np.int64)


def test_hand_example_suppresses_the_overlapping_lower_score():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 9]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # box 3 (best) overlaps box 0 with IoU 90/100 = 0.9 and box 1 with 81/109 = 0.74
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [3, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.75), [3, 1, 2])
    assert nms(boxes, scores, 0.5).dtype == np.int64


def test_only_kept_boxes_suppress():
    # A suppresses B, B would suppress C, but B is gone so C survives (A-C IoU is small)
    boxes = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], float)
    np.testing.assert_array_equal(nms(boxes, np.array([3.0, 2.0, 1.0]), 0.4), [0, 2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_iou_exactly_at_threshold_survives(dtype):
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], dtype=dtype)  # IoU = 50/100 = 0.5 exactly
    np.testing.assert_array_equal(nms(boxes, np.array([1.0, 0.5], dtype), 0.5), [0, 1])
    np.testing.assert_array_equal(nms(boxes, np.array([1.0, 0.5], dtype), 0.4999), [0])


def test_float32_iou_is_compared_with_the_threshold_in_double():
    # IoU = 30/100 computed in float32 is float32(0.3) = 0.30000001..., which is > 0.3 (double):
    # suppressed, as in torchvision's C++ (float IoU vs double threshold). In float64 the IoU is
    # exactly the double 0.3 and survives.
    boxes32 = np.array([[0, 0, 10, 10], [0, 0, 10, 3]], dtype=np.float32)
    np.testing.assert_array_equal(nms(boxes32, np.array([1.0, 0.5], np.float32), 0.3), [0])
    boxes64 = boxes32.astype(np.float64)
    np.testing.assert_array_equal(nms(boxes64, np.array([1.0, 0.5]), 0.3), [0, 1])


def test_equal_scores_are_visited_in_index_order():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    scores = np.array([0.5, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [0, 3])
    np.testing.assert_array_equal(nms(boxes[::-1].copy(), scores, 0.5), [0, 1])


def test_empty_and_single_box():
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)
    np.testing.assert_array_equal(nms(np.array([[0.0, 0, 1, 1]]), np.array([0.3]), 0.5), [0])


def test_zero_area_duplicates_are_not_suppressed():
    # IoU of two identical points is 0/0 = NaN, and NaN > t is False: both survive (torchvision)
    boxes = np.array([[5.0, 5, 5, 5], [5.0, 5, 5, 5]])
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(nms(boxes, np.array([0.9, 0.8]), 0.5), [0, 1])


@pytest.mark.parametrize("n", [1, 7, 300, 1200])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_matches_the_definition_across_tiles(n, threshold):
    # 1200 boxes span several TILE rows and COLUMN_CHUNK columns of the tiled algorithm
    rng = np.random.default_rng(n)
    boxes, scores = clustered_boxes(rng, n)
    np.testing.assert_array_equal(
        nms(boxes, scores, threshold), greedy_nms_definition(boxes, scores, threshold)
    )


def test_matches_the_definition_with_many_ties(monkeypatch):
    monkeypatch.setattr(nms_module, "TILE", 16)  # many small tiles: ties straddle tile borders
    monkeypatch.setattr(nms_module, "COLUMN_CHUNK", 40)
    rng = np.random.default_rng(1)
    boxes, scores = clustered_boxes(rng, 400, objects=5)
    scores = np.round(scores * 4) / 4  # 5 distinct values
    for threshold in (0.2, 0.5, 0.8):
        np.testing.assert_array_equal(
            nms(boxes, scores, threshold), greedy_nms_definition(boxes, scores, threshold)
        )


def test_batched_nms_never_suppresses_across_categories():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    idxs = np.array([0, 1, 0, 1])
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, 0.5), [3, 0])
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.arange(4), 0.5), [3, 0, 1, 2])


def test_batched_nms_equals_nms_per_category_then_sorted():
    rng = np.random.default_rng(3)
    boxes, scores = clustered_boxes(rng, 600)
    idxs = rng.integers(0, 5, 600)
    keep = batched_nms(boxes, scores, idxs, 0.5)
    expected = np.concatenate(
        [np.flatnonzero(idxs == c)[nms(boxes[idxs == c], scores[idxs == c], 0.5)] for c in range(5)]
    )
    expected = expected[np.argsort(-scores[expected], kind="stable")]
    np.testing.assert_array_equal(keep, expected)
    assert np.all(np.diff(scores[keep]) <= 0)


@pytest.mark.parametrize(
    "boxes, scores, match",
    [
        (np.array([[0.0, 0, 1, 1]]), np.array([np.nan]), "NaN"),
        (np.array([[2.0, 0, 1, 1]]), np.array([1.0]), "x2 < x1"),
        (np.array([[0.0, 0, np.inf, 1]]), np.array([1.0]), "NaN or inf"),
        (np.array([[0.0, np.nan, 1, 1]]), np.array([1.0]), "NaN or inf"),
        (np.zeros((2, 5)), np.ones(2), r"shape \(N, 4\)"),
        (np.zeros((2, 4)), np.ones(3), "one per box"),
        (np.array([["a", "b", "c", "d"]]), np.ones(1), "float array"),
    ],
)
def test_malformed_inputs_raise_value_error(boxes, scores, match):
    with pytest.raises(ValueError, match=match):
        nms(boxes, scores, 0.5)
    with pytest.raises(ValueError, match=match):
        batched_nms(boxes, scores, np.zeros(len(scores), dtype=np.int64), 0.5)


def test_nan_threshold_and_bad_idxs_raise():
    boxes, scores = np.array([[0.0, 0, 1, 1]]), np.array([1.0])
    with pytest.raises(ValueError, match="iou_threshold"):
        nms(boxes, scores, float("nan"))
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(boxes, scores, np.array([0.5]), 0.5)


def test_gpu_arrays_are_validated_then_handed_to_the_kernel(monkeypatch):
    calls = []

    def fake_kernel(boxes, scores, iou_threshold):
        calls.append(iou_threshold)
        return "kernel result"

    monkeypatch.setattr(nms_module, "is_device_array", lambda a: True)
    monkeypatch.setattr(nms_module, "device_kernel", lambda array, family, name: fake_kernel)
    boxes = np.array([[0.0, 0, 1, 1]])
    assert nms(boxes, np.array([1.0]), 0.5) == "kernel result"
    assert calls == [0.5]
    with pytest.raises(ValueError, match="NaN"):  # validation happens before dispatch
        nms(boxes, np.array([np.nan]), 0.5)
    assert calls == [0.5]


def test_numpy_path_never_imports_cupy():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from mrcnn_edu.nms import nms, batched_nms; "
        "b = np.array([[0., 0, 1, 1]]); nms(b, np.ones(1), .5); "
        "batched_nms(b, np.ones(1), np.zeros(1, int), .5); "
        "assert 'cupy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
