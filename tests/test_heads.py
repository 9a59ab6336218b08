"""Box and mask heads: gradchecks, and the losses' defining properties."""

import numpy as np
import pytest
from helpers import rand

from mrcnn_edu.heads import FastRCNNPredictor, MaskHead, MaskRCNNPredictor, TwoMLPHead
from mrcnn_edu.nn.gradcheck import assert_close_grad, check_module, numerical_gradient
from mrcnn_edu.nn.losses import sigmoid
from mrcnn_edu.roi_heads import fastrcnn_loss, maskrcnn_loss


def test_two_mlp_head_gradcheck():
    head = TwoMLPHead(3 * 2 * 2, 5, rng=0).astype(np.float64)
    check_module(head, rand(4, 3, 2, 2))


def test_mask_head_and_predictor_gradcheck_and_shapes():
    head = MaskHead(3, 4, num_convs=2, rng=0).astype(np.float64)
    check_module(head, rand(2, 3, 5, 5))
    pred = MaskRCNNPredictor(4, 4, 3, rng=0).astype(np.float64)
    x = rand(2, 4, 5, 5)
    assert pred(x).shape == (2, 3, 10, 10)  # K masks at twice the pooled size
    check_module(pred, x)


def test_box_predictor_gradcheck():
    pred = FastRCNNPredictor(6, 4, rng=0).astype(np.float64)
    x = rand(3, 6)
    logits, deltas = pred(x)
    assert logits.shape == (3, 4) and deltas.shape == (3, 16)
    g1, g2 = rand(3, 4, seed=1), rand(3, 16, seed=2)
    pred.zero_grad()
    gx = pred.backward((g1, g2))

    def loss():
        a, b = pred(x)
        return np.sum(a * g1) + np.sum(b * g2)

    assert_close_grad(gx, numerical_gradient(loss, x))


def test_fastrcnn_loss_uses_only_the_gt_class_deltas():
    logits = rand(4, 3)
    deltas = rand(4, 12, seed=1)
    labels = np.array([0, 2, 1, -1])  # background, class 2, class 1, ignored
    targets = rand(4, 4, seed=2)
    loss_cls, loss_box, g_logits, g_deltas = fastrcnn_loss(logits, deltas, labels, targets)
    # only row 1's columns 8..11 and row 2's columns 4..7 may carry gradient
    mask = np.zeros_like(g_deltas, dtype=bool)
    mask[1, 8:12] = mask[2, 4:8] = True
    assert np.all(g_deltas[~mask] == 0) and np.all(g_deltas[mask] != 0)
    assert np.all(g_logits[3] == 0)  # the ignored row
    # box loss: smooth L1 (beta 1/9) summed over the positives, divided by all 4 sampled rows
    diff = np.concatenate([deltas[1, 8:12] - targets[1], deltas[2, 4:8] - targets[2]])
    beta = 1 / 9
    ref = np.where(np.abs(diff) < beta, 0.5 * diff**2 / beta, np.abs(diff) - 0.5 * beta).sum()
    assert np.isclose(loss_box, ref / 4)
    # and the gradients are those of the losses
    num = numerical_gradient(lambda: fastrcnn_loss(logits, deltas, labels, targets)[1], deltas)
    assert_close_grad(g_deltas, num)
    num = numerical_gradient(lambda: fastrcnn_loss(logits, deltas, labels, targets)[0], logits)
    assert_close_grad(g_logits, num)


def test_fastrcnn_loss_without_positives_has_zero_box_loss():
    _, loss_box, _, g = fastrcnn_loss(rand(3, 3), rand(3, 12), np.zeros(3, int), rand(3, 4))
    assert loss_box == 0.0 and not g.any()


def test_mask_loss_counts_only_the_gt_channel():
    logits = rand(3, 4, 5, 5)
    labels = np.array([2, 4, 1])
    targets = (rand(3, 5, 5, seed=1) > 0).astype(np.float64)
    loss, grad = maskrcnn_loss(logits, labels, targets)
    for r, k in enumerate(labels):
        for c in range(4):
            if c == k - 1:
                assert np.any(grad[r, c] != 0)
            else:
                assert np.all(grad[r, c] == 0), f"RoI {r} channel {c} must get no gradient"
    # changing another class's logits does not change the loss at all
    other = logits.copy()
    other[0, 0] += 100.0
    assert maskrcnn_loss(other, labels, targets)[0] == loss
    # value: mean BCE over all pixels of the GT channels
    z = logits[np.arange(3), labels - 1]
    p = sigmoid(z)
    ref = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean()
    assert np.isclose(loss, ref)
    assert_close_grad(
        grad, numerical_gradient(lambda: maskrcnn_loss(logits, labels, targets)[0], logits)
    )


def test_mask_loss_with_no_positive_rois():
    loss, grad = maskrcnn_loss(np.zeros((0, 3, 4, 4)), np.zeros(0, int), np.zeros((0, 4, 4)))
    assert loss == 0.0 and grad.shape == (0, 3, 4, 4)


@pytest.mark.parametrize("labels", [np.array([0]), np.array([5])])
def test_mask_loss_rejects_labels_outside_1_to_k(labels):
    with pytest.raises((IndexError, ValueError)):
        maskrcnn_loss(rand(1, 4, 3, 3), labels, np.zeros((1, 3, 3)))
