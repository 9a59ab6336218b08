"""Detections from head outputs, and masks pasted into the image."""

import numpy as np

from mrcnn_edu.boxes import BoxCoder
from mrcnn_edu.postprocess import paste_masks_in_image, postprocess_detections


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
