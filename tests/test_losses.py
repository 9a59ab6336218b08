"""Losses: values from their definitions, gradients from finite differences, stability limits."""

import math

import numpy as np
import pytest

from mrcnn_edu.nn.gradcheck import assert_close_grad, numerical_gradient
from mrcnn_edu.nn.losses import (
    binary_cross_entropy_with_logits,
    log_softmax,
    sigmoid,
    smooth_l1,
    softmax_cross_entropy,
)


def _strict():
    """Overflow, 0/0 and log(0) raise; underflow of exp(-|z|) to 0 is harmless and expected."""
    return np.errstate(over="raise", invalid="raise", divide="raise")


def _gradcheck(loss_fn, x, **kwargs):
    """The analytic gradient returned with the loss equals central differences of the loss."""
    _, grad = loss_fn(x)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    numeric = numerical_gradient(lambda: loss_fn(x)[0], x)
    assert_close_grad(grad, numeric, **kwargs)


# -- helpers ---------------------------------------------------------------------------------------


def test_log_softmax_is_log_of_normalised_exp():
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = np.log(np.exp(x) / np.exp(x).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(log_softmax(x, axis=1), expected, rtol=1e-12)


def test_log_softmax_does_not_overflow_for_huge_logits():
    with _strict():
        out = log_softmax(np.array([[1e4, 0.0, -1e4]]), axis=1)
    np.testing.assert_allclose(out, [[0.0, -1e4, -2e4]])


def test_sigmoid_matches_definition_and_saturates_without_overflow():
    x = np.linspace(-20, 20, 41)
    np.testing.assert_allclose(sigmoid(x), 1 / (1 + np.exp(-x)), rtol=1e-12)
    with _strict():
        s = sigmoid(np.array([-1e4, 1e4], dtype=np.float32))
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s, [0.0, 1.0])


# -- softmax cross-entropy ------------------------------------------------------------------------


def test_softmax_ce_uniform_logits_give_log_num_classes():
    loss, grad = softmax_cross_entropy(np.zeros((1, 4)), np.array([2]))
    assert loss == pytest.approx(math.log(4))
    # softmax - onehot: 1/4 everywhere, minus 1 at the label
    np.testing.assert_allclose(grad, [[0.25, 0.25, -0.75, 0.25]])


def test_softmax_ce_hand_computed_value_and_gradient():
    logits = np.array([[1.0, 2.0, 3.0]])
    z = math.exp(1) + math.exp(2) + math.exp(3)
    loss, grad = softmax_cross_entropy(logits, np.array([0]))
    assert loss == pytest.approx(-1.0 + math.log(z), rel=1e-12)
    np.testing.assert_allclose(
        grad, [[math.exp(1) / z - 1, math.exp(2) / z, math.exp(3) / z]], rtol=1e-12
    )


def test_softmax_ce_mean_is_over_counted_rows_and_ignored_rows_get_zero_grad():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5))
    labels = np.array([1, -1, 4])
    loss, grad = softmax_cross_entropy(logits, labels)
    row0, g0 = softmax_cross_entropy(logits[:1], labels[:1])
    row2, g2 = softmax_cross_entropy(logits[2:], labels[2:])
    assert loss == pytest.approx((row0 + row2) / 2, rel=1e-12)  # divided by 2, not 3
    np.testing.assert_array_equal(grad[1], 0.0)
    np.testing.assert_allclose(grad[0], g0[0] / 2, rtol=1e-12)
    np.testing.assert_allclose(grad[2], g2[0] / 2, rtol=1e-12)


def test_softmax_ce_sum_is_mean_times_count():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 3))
    labels = np.array([0, 2, -1, 1, -1, 0])
    mean, gmean = softmax_cross_entropy(logits, labels, reduction="mean")
    total, gsum = softmax_cross_entropy(logits, labels, reduction="sum")
    assert total == pytest.approx(4 * mean, rel=1e-12)
    np.testing.assert_allclose(gsum, 4 * gmean, rtol=1e-12)


def test_softmax_ce_all_ignored_gives_zero_loss_and_zero_grad_not_nan():
    with _strict():
        loss, grad = softmax_cross_entropy(np.ones((3, 2)), np.array([-1, -1, -1]))
    assert loss == 0.0
    np.testing.assert_array_equal(grad, np.zeros((3, 2)))


def test_softmax_ce_empty_batch_gives_zero():
    loss, grad = softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    assert loss == 0.0 and grad.shape == (0, 3)


def test_softmax_ce_custom_ignore_index():
    logits = np.array([[0.0, 1.0], [5.0, -5.0]])
    loss, grad = softmax_cross_entropy(logits, np.array([255, 1]), ignore_index=255)
    only, _ = softmax_cross_entropy(logits[1:], np.array([1]))
    assert loss == pytest.approx(only)
    np.testing.assert_array_equal(grad[0], 0.0)


def test_softmax_ce_is_finite_for_huge_logits():
    logits = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0]], dtype=np.float32)
    with _strict():
        loss, grad = softmax_cross_entropy(logits, np.array([0, 1]))
    # row 0 is certain and right (loss 0), row 1 puts its label 2e4 below the winner
    assert loss == pytest.approx(1e4)
    assert grad.dtype == np.float32
    np.testing.assert_allclose(grad, [[0, 0, 0], [0.5, -0.5, 0]], atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_softmax_ce_gradcheck(reduction):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((5, 4))
    labels = np.array([3, -1, 0, 2, 3])
    _gradcheck(lambda x: softmax_cross_entropy(x, labels, reduction=reduction), logits)


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (np.zeros((2, 3)), np.array([0.0, 1.0]), "integer dtype"),
        (np.zeros((2, 3)), np.array([0, 3]), r"\[0, 3\)"),
        (np.zeros((2, 3)), np.array([0, -2]), "ignore_index"),
        (np.zeros((2, 3)), np.array([0, 1, 2]), r"shape \(N,\)"),
        (np.zeros(3), np.array([0]), "2-D"),
        (np.zeros((2, 3), dtype=np.int64), np.array([0, 1]), "floating-point"),
    ],
)
def test_softmax_ce_rejects_bad_inputs(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        softmax_cross_entropy(logits, labels)


def test_losses_reject_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        softmax_cross_entropy(np.zeros((1, 2)), np.array([0]), reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        binary_cross_entropy_with_logits(np.zeros(2), np.zeros(2), reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        smooth_l1(np.zeros(2), np.zeros(2), reduction="none")


# -- binary cross-entropy with logits -------------------------------------------------------------


def test_bce_hand_computed_values():
    # z=0: -log(1/2); z=2, t=0: -log(1 - s(2)) = log(1 + e^2); z=-1, t=0.25 by definition
    s = 1 / (1 + math.exp(1))
    per = [math.log(2), math.log(1 + math.e**2), -(0.25 * math.log(s) + 0.75 * math.log(1 - s))]
    logits = np.array([0.0, 2.0, -1.0])
    targets = np.array([1.0, 0.0, 0.25])
    loss, grad = binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    assert loss == pytest.approx(sum(per), rel=1e-12)
    np.testing.assert_allclose(grad, [0.5 - 1, 1 / (1 + math.exp(-2)), s - 0.25], rtol=1e-12)
    mean, gmean = binary_cross_entropy_with_logits(logits, targets)
    assert mean == pytest.approx(sum(per) / 3, rel=1e-12)
    np.testing.assert_allclose(gmean, grad / 3, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_is_exact_at_logits_of_1e4(dtype):
    logits = np.array([1e4, 1e4, -1e4, -1e4], dtype=dtype)
    targets = np.array([1, 0, 1, 0], dtype=dtype)
    with _strict():
        loss, grad = binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    # confident and right costs 0; confident and wrong costs |z|
    assert loss == pytest.approx(2e4)
    assert grad.dtype == dtype
    np.testing.assert_array_equal(grad, [0, 1, -1, 0])


def test_bce_weights_scale_each_element():
    logits = np.array([[0.5, -1.5], [2.0, 0.0]])
    targets = np.array([[1.0, 0.0], [0.0, 1.0]])
    per, gper = binary_cross_entropy_with_logits(logits[:, :1], targets[:, :1], reduction="sum")
    w = np.array([1.0, 0.0])  # broadcasts over rows: the second column does not count
    loss, grad = binary_cross_entropy_with_logits(logits, targets, w, reduction="sum")
    assert loss == pytest.approx(per, rel=1e-12)
    np.testing.assert_array_equal(grad[:, 1], 0.0)
    np.testing.assert_allclose(grad[:, :1], gper, rtol=1e-12)


def test_bce_accepts_bool_masks_and_empty_input():
    loss_bool, _ = binary_cross_entropy_with_logits(np.array([0.3, -0.2]), np.array([True, False]))
    loss_float, _ = binary_cross_entropy_with_logits(np.array([0.3, -0.2]), np.array([1.0, 0.0]))
    assert loss_bool == loss_float
    loss, grad = binary_cross_entropy_with_logits(np.zeros((0, 28, 28)), np.zeros((0, 28, 28)))
    assert loss == 0.0 and grad.shape == (0, 28, 28)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_gradcheck_with_soft_targets_and_weights(reduction):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 3, 4)) * 3
    targets = rng.uniform(size=(2, 3, 4))
    weights = rng.uniform(size=(3, 1))
    _gradcheck(
        lambda x: binary_cross_entropy_with_logits(x, targets, weights, reduction=reduction),
        logits,
    )


@pytest.mark.parametrize(
    "targets, weights, match",
    [
        (np.zeros(3), None, "shape"),
        (np.array([[0.0, 255.0]]), None, r"\[0, 1\]"),
        (np.array([[0.0, np.nan]]), None, r"\[0, 1\]"),
        (np.zeros((1, 2)), np.ones(3), "broadcast"),
    ],
)
def test_bce_rejects_bad_inputs(targets, weights, match):
    with pytest.raises(ValueError, match=match):
        binary_cross_entropy_with_logits(np.zeros((1, 2)), targets, weights)


# -- smooth L1 ------------------------------------------------------------------------------------


def test_smooth_l1_both_branches_by_hand():
    # beta = 1: x = 0.5 is quadratic (0.5 * 0.25 = 0.125); x = 2 and x = -3 are linear (1.5, 2.5)
    pred = np.array([0.5, 2.0, -3.0])
    loss, grad = smooth_l1(pred, np.zeros(3), beta=1.0)
    assert loss == pytest.approx(0.125 + 1.5 + 2.5)
    np.testing.assert_allclose(grad, [0.5, 1.0, -1.0])


def test_smooth_l1_small_beta_as_in_mask_rcnn():
    beta = 1 / 9
    x = np.array([0.05, -0.1, 0.5])
    loss, grad = smooth_l1(x + 1.0, np.ones(3), beta=beta)
    expected = 0.5 * 0.05**2 / beta + 0.5 * 0.1**2 / beta + (0.5 - 0.5 * beta)
    assert loss == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad, [0.05 / beta, -0.1 / beta, 1.0], rtol=1e-9)


def test_smooth_l1_is_continuous_at_beta():
    beta = 0.5
    inside, _ = smooth_l1(np.array([beta - 1e-9]), np.zeros(1), beta=beta)
    at, _ = smooth_l1(np.array([beta]), np.zeros(1), beta=beta)
    assert inside == pytest.approx(0.5 * beta) and at == pytest.approx(0.5 * beta)


def test_smooth_l1_beta_zero_is_l1():
    pred = np.array([0.5, -2.0, 0.0, 1e-3])
    with _strict():
        loss, grad = smooth_l1(pred, np.zeros(4), beta=0.0)
    assert loss == pytest.approx(2.501)
    np.testing.assert_array_equal(grad, [1.0, -1.0, 0.0, 1.0])


def test_smooth_l1_default_reduction_is_sum_and_mean_divides_by_size():
    pred = np.array([[0.5, 2.0], [-3.0, 0.0]])
    total, gsum = smooth_l1(pred, np.zeros((2, 2)))
    mean, gmean = smooth_l1(pred, np.zeros((2, 2)), reduction="mean")
    assert total == pytest.approx(4.125)
    assert mean == pytest.approx(4.125 / 4)
    np.testing.assert_allclose(gmean, gsum / 4)


@pytest.mark.parametrize("beta", [1.0, 1 / 9, 0.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_smooth_l1_gradcheck(beta, reduction):
    rng = np.random.default_rng(4)
    target = rng.standard_normal((4, 4))
    # keep |pred - target| away from the kinks at 0 and beta, where the derivative jumps
    offsets = rng.uniform(0.02, 0.08, size=(4, 4)) * rng.choice([-1, 1], size=(4, 4))
    offsets[::2] *= 20  # half the elements in the linear zone, half quadratic
    pred = target + offsets
    _gradcheck(lambda x: smooth_l1(x, target, beta=beta, reduction=reduction), pred)


def test_smooth_l1_rejects_bad_inputs():
    with pytest.raises(ValueError, match="beta"):
        smooth_l1(np.zeros(2), np.zeros(2), beta=-1.0)
    with pytest.raises(ValueError, match="shape"):
        smooth_l1(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="floating-point"):
        smooth_l1(np.zeros(2, dtype=np.int32), np.zeros(2))


def test_smooth_l1_keeps_float32():
    loss, grad = smooth_l1(np.ones(3, np.float32), np.zeros(3, np.float64), beta=1 / 9)
    assert grad.dtype == np.float32
    assert isinstance(loss, float)


# -- comparisons with PyTorch (skipped without torch) --------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_softmax_ce_matches_torch(reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((7, 5)) * 4
    labels = np.array([0, 4, -1, 2, 2, -1, 1])
    loss, grad = softmax_cross_entropy(logits, labels, reduction=reduction)
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(
        t, torch.tensor(labels), ignore_index=-1, reduction=reduction
    )
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_matches_torch(reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((3, 8, 8)) * 10
    logits[0, 0, :2] = [1e4, -1e4]
    targets = (rng.uniform(size=(3, 8, 8)) > 0.5).astype(np.float64)
    weights = rng.uniform(size=(8, 1))
    loss, grad = binary_cross_entropy_with_logits(logits, targets, weights, reduction=reduction)
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        t, torch.tensor(targets), weight=torch.tensor(weights), reduction=reduction
    )
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("beta", [1.0, 1 / 9, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_smooth_l1_matches_torch(beta, reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    pred = rng.standard_normal((16, 4)) * 0.3
    target = rng.standard_normal((16, 4)) * 0.3
    loss, grad = smooth_l1(pred, target, beta=beta, reduction=reduction)
    t = torch.tensor(pred, requires_grad=True)
    ref = torch.nn.functional.smooth_l1_loss(
        t, torch.tensor(target), beta=beta, reduction=reduction
    )
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-14)
