"""Detections from head outputs, and masks pasted into the image."""

import numpy as np
import pytest

from mrcnn_edu.boxes import BoxCoder
from mrcnn_edu.config_checks import ConfigError
from mrcnn_edu.postprocess import (
    paste_masks_in_image,
    postprocess_detections,
    torchvision_paste_boxes,
)
from mrcnn_edu.roi_heads import RoIHeadsConfig
from mrcnn_edu.run_config import RunConfig


def test_full_mask_pastes_onto_its_box():
    masks = np.ones((1, 28, 28), np.float32)
    out = paste_masks_in_image(masks, np.array([[10.0, 20.0, 50.0, 40.0]]), (64, 80))
    ys, xs = np.nonzero(out[0])
    # pixel centres inside the box (x + 0.5 in [10, 50]) are on: columns 10..49, rows 20..39
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 49, 20, 39)
    assert out.dtype == np.uint8 and out.shape == (1, 64, 80)


def test_half_mask_pastes_onto_half_the_box():
    masks = np.zeros((1, 28, 28), np.float32)
    masks[0, :, :14] = 1.0  # left half
    out = paste_masks_in_image(masks, np.array([[0.0, 0.0, 40.0, 40.0]]), (40, 40))
    assert out[0, :, :20].all() and not out[0, :, 20:].any()


def test_paste_probabilities_are_bilinear_and_clipped_to_the_image():
    masks = np.ones((1, 4, 4), np.float64)
    probs = paste_masks_in_image(masks, np.array([[-8.0, -8.0, 8.0, 8.0]]), (10, 10), None)
    assert probs.shape == (1, 10, 10)
    # The box ends at x = 8 and a mask cell is 4 px wide: the last cell's centre is at x = 6,
    # and bilinear sampling fades linearly from 1 there to 0 at x = 10 (zero padding beyond).
    # Pixel centres 6.5, 7.5, 8.5, 9.5 get 0.875, 0.625, 0.375, 0.125.
    np.testing.assert_allclose(probs[0, 0, :6], 1.0)
    np.testing.assert_allclose(probs[0, 0, 6:], [0.875, 0.625, 0.375, 0.125])
    np.testing.assert_allclose(probs[0, :, 0], probs[0, 0, :])  # symmetric in x and y


def test_postprocess_detections_per_class_nms_and_threshold():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = np.array([[10, 10, 30, 30], [11, 11, 31, 31], [50, 50, 70, 70]], np.float64)
    # logits over (bg, class1, class2): RoI 0 and 1 are class 1, RoI 2 class 2, all confident
    logits = np.array([[0, 5, 0], [0, 4, 0], [0, 0, 6]], np.float64)
    deltas = np.zeros((3, 12))
    boxes, scores, labels = postprocess_detections(logits, deltas, proposals, (100, 100), coder)
    # RoI 1 overlaps RoI 0 (IoU 0.82) in class 1 and is suppressed; low-score class pairs
    # (e.g. RoI 0 as class 2, p = 0.0066) fall under the 0.05 threshold
    assert labels.tolist() == [2, 1]
    np.testing.assert_allclose(boxes, proposals[[2, 0]])
    assert np.all(np.diff(scores) <= 0)


# -- torchvision's paste (mode="torchvision") ---------------------------------------------------
def test_torchvision_paste_grows_the_box_by_the_padding_and_truncates_toward_zero():
    # M = 28 padded to 30: half-sizes grow by 30/28 about the centre. [10, 20, 38, 48]: centre
    # (24, 34), half-size 14 -> 15: [9, 19, 39, 49]. [-3.3, 0.2, 5.5, 2.0]: x from 1.1 -/+ 4.714
    # -> -3.614 and 5.814, truncated toward zero to -3 and 5 (floor would give -4)
    boxes = np.float32([[10, 20, 38, 48], [-3.3, 0.2, 5.5, 2.0]])
    grown = torchvision_paste_boxes(boxes, 28)
    assert grown.dtype == np.int64
    assert grown.tolist() == [[9, 19, 39, 49], [-3, 0, 5, 2]]


def test_torchvision_paste_covers_the_box_end_pixel_included():
    # The padded 30 x 30 mask (ones inside a ring of zeros) is resized to the 31 x 31 pixels of
    # [9, 19, 39, 49]. Pixel i reads the padded mask at s = (i + 0.5) * 30 / 31 - 0.5: i = 0 at
    # s < 0 (the zero ring), i = 1 at s = 0.9516 (0.9516 of a one), i = 30 at s = 29.02 (the
    # ring). So columns 10..38 and rows 20..48 are on: pixels x1..x2 with x2 included, one
    # column more than the sub-pixel paste, whose pixel centres must lie inside the box.
    masks = np.ones((1, 28, 28), np.float32)
    box = np.float32([[10, 20, 38, 48]])
    probs = paste_masks_in_image(masks, box, (60, 60), None, mode="torchvision")[0]
    edge = 30 / 31 * 1.5 - 0.5  # the same by symmetry at i = 29 (s = 28.048), up to rounding
    np.testing.assert_allclose(probs[34, 8:12], [0, 0, edge, 1], atol=1e-5)
    np.testing.assert_allclose(probs[34, 37:41], [1, edge, 0, 0], atol=1e-5)
    ys, xs = np.nonzero(paste_masks_in_image(masks, box, (60, 60), mode="torchvision")[0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 38, 20, 48)
    ys, xs = np.nonzero(paste_masks_in_image(masks, box, (60, 60))[0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 37, 20, 47)


def test_torchvision_paste_crops_at_the_image_border():
    masks = np.ones((2, 28, 28), np.float32)
    boxes = np.float32([[-20, -20, 10, 10], [5, 5, 200, 200]])  # past the top-left, bottom-right
    probs = paste_masks_in_image(masks, boxes, (40, 50), None, mode="torchvision")
    assert probs.shape == (2, 40, 50) and probs.dtype == np.float32
    assert (probs[0] > 0.5).sum() == 11 * 11  # rows and columns 0..10: the end pixel is in
    # [5, 5, 200, 200] grows to [-1, -1, 206, 206]: 208 pixels for 30 cells. Pixel i (x = i - 1)
    # reads s = (i + 0.5) * 30 / 208 - 0.5, past half of the first one-cell from i = 7 (x = 6)
    on = probs[1] > 0.5
    assert on[20, 6:].all() and not on[20, :6].any()
    assert on[6:, 20].all() and not on[:6, 20].any()


def test_paste_mode_is_checked():
    with pytest.raises(ValueError, match="must be one of"):
        paste_masks_in_image(np.ones((1, 4, 4)), np.float32([[0, 0, 4, 4]]), (8, 8), mode="round")
    with pytest.raises(ConfigError, match="mask_paste must be one of") as err:
        RoIHeadsConfig(mask_paste="round")
    assert err.value.key == "mask_paste"
    with pytest.raises(ValueError, match="model.roi_heads.mask_paste"):
        RunConfig.from_dict({"model": {"roi_heads": {"mask_paste": "nearest"}}})
    assert RoIHeadsConfig().mask_paste == "subpixel"  # the shapes presets keep ours
