"""Box utilities: hand-computed areas and IoUs, clipping, and the Faster R-CNN box coder."""

import math

import numpy as np
import pytest
from helpers import random_boxes

from mrcnn_edu.boxes import (
    BoxCoder,
    box_area,
    box_iou,
    clip_boxes_to_image,
    remove_small_boxes,
)


def test_box_area_is_width_times_height_without_plus_one():
    boxes = np.array([[0, 0, 10, 5], [2, 3, 2, 9], [1.5, 1, 4, 2]], dtype=np.float32)
    np.testing.assert_array_equal(box_area(boxes), np.array([50, 0, 2.5], dtype=np.float32))
    assert box_area(boxes).dtype == np.float32


def test_box_iou_hand_computed_cases():
    a = np.array([[0, 0, 10, 10]], dtype=np.float64)
    b = np.array(
        [
            [0, 0, 10, 10],  # identical: 1
            [5, 0, 15, 10],  # half overlap: 50 / 150
            [10, 0, 20, 10],  # touching edge: 0
            [20, 20, 30, 30],  # disjoint: 0
            [2, 2, 4, 4],  # contained: 4 / 100
        ]
    )
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 1 / 3, 0.0, 0.0, 0.04]])
    np.testing.assert_allclose(box_iou(b, a), box_iou(a, b).T)


def test_box_iou_empty_inputs_give_empty_matrices():
    boxes = np.zeros((3, 4), dtype=np.float32)
    boxes[:, 2:] = 1
    assert box_iou(np.zeros((0, 4), np.float32), boxes).shape == (0, 3)
    assert box_iou(boxes, np.zeros((0, 4), np.float32)).shape == (3, 0)
    assert box_iou(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0, 0)


def test_box_iou_keeps_float32():
    a = np.array([[0, 0, 3, 3]], dtype=np.float32)
    assert box_iou(a, a).dtype == np.float32


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((3, 5)), r"shape \(N, 4\)"),
        (np.zeros(4), r"shape \(N, 4\)"),
        (np.array([[5.0, 0, 1, 1]]), "x2 < x1"),
        (np.array([[0.0, 5, 1, 1]]), "y2 < y1"),
    ],
)
def test_box_iou_rejects_malformed_boxes(bad, match):
    good = np.array([[0.0, 0, 1, 1]])
    with pytest.raises(ValueError, match=match):
        box_iou(bad, good)


def test_clip_boxes_to_image_uses_height_then_width():
    boxes = np.array([[-5, -5, 50, 50], [3, 4, 5, 6]], dtype=np.float32)
    out = clip_boxes_to_image(boxes, (20, 30))  # (h, w)
    np.testing.assert_array_equal(out, [[0, 0, 30, 20], [3, 4, 5, 6]])
    assert boxes[0, 0] == -5  # input untouched


def test_remove_small_boxes_keeps_sides_at_least_min_size():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 0.5, 3], [0, 0, 3, 0.999], [1, 1, 3, 3]])
    np.testing.assert_array_equal(remove_small_boxes(boxes, 1.0), [0, 3])
    assert remove_small_boxes(boxes, 1.0).dtype == np.int64


def test_encode_hand_computed_with_weights():
    anchor = np.array([[0.0, 0.0, 10.0, 20.0]])  # cx 5, cy 10, w 10, h 20
    gt = np.array([[2.0, 4.0, 22.0, 14.0]])  # cx 12, cy 9, w 20, h 10
    expected = np.array([[(12 - 5) / 10, (9 - 10) / 20, math.log(2.0), math.log(0.5)]])
    np.testing.assert_allclose(BoxCoder((1, 1, 1, 1)).encode(gt, anchor), expected)
    np.testing.assert_allclose(
        BoxCoder((10, 10, 5, 5)).encode(gt, anchor), expected * [10, 10, 5, 5]
    )


def test_encode_of_a_box_against_itself_is_zero():
    boxes = np.array([[1.0, 2.0, 7.0, 9.0], [0.0, 0.0, 3.0, 3.0]])
    np.testing.assert_array_equal(BoxCoder((10, 10, 5, 5)).encode(boxes, boxes), 0)


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (10, 10, 5, 5)])
def test_decode_inverts_encode_within_1e4_pixels(weights):
    rng = np.random.default_rng(0)
    anchors = random_boxes(rng, 500)
    gt = random_boxes(rng, 500)
    coder = BoxCoder(weights)
    deltas = coder.encode(gt, anchors)
    assert deltas.dtype == np.float32
    assert np.abs(coder.decode(deltas, anchors) - gt).max() < 1e-4


def test_decode_clamps_dw_dh_at_log_1000_over_16():
    anchor = np.array([[0.0, 0.0, 16.0, 16.0]])
    coder = BoxCoder((1, 1, 1, 1))
    out = coder.decode(np.array([[0.0, 0.0, 50.0, 50.0]]), anchor)
    # exp(log(1000/16)) * 16 = 1000 pixels wide, centred on the anchor's centre (8, 8)
    np.testing.assert_allclose(out, [[8 - 500, 8 - 500, 8 + 500, 8 + 500]])
    assert np.all(np.isfinite(out))


def test_decode_per_class_columns():
    anchor = np.array([[0.0, 0.0, 10.0, 10.0]])
    codes = np.array([[0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0]])  # class 1 moves right by 1 w/10
    out = BoxCoder((10, 10, 5, 5)).decode(codes, anchor)
    np.testing.assert_allclose(out, [[0, 0, 10, 10, 10, 0, 20, 10]])


def test_coder_rejects_bad_shapes_and_weights():
    coder = BoxCoder((1, 1, 1, 1))
    with pytest.raises(ValueError, match="4K"):
        coder.decode(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="row by row"):
        coder.decode(np.zeros((2, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="same number of rows"):
        coder.encode(np.zeros((2, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="positive"):
        BoxCoder((1, 1, 0, 1))
