"""Matcher thresholds and low-quality rule; balanced positive/negative sampling."""

import numpy as np
import pytest

from mrcnn_edu.matching import BalancedPositiveNegativeSampler, Matcher


def test_thresholds_give_index_between_and_below():
    # 1 GT x 5 predictions
    iou = np.array([[0.9, 0.7, 0.5, 0.3, 0.1]])
    matches = Matcher(0.7, 0.3)(iou)
    # 0.7 itself is a match (>= high), 0.3 itself is "between" (>= low)
    np.testing.assert_array_equal(matches, [0, 0, -2, -2, -1])
    assert matches.dtype == np.int64


def test_each_prediction_takes_its_best_gt_first_max_wins():
    iou = np.array([[0.8, 0.75, 0.2], [0.9, 0.75, 0.1]])
    np.testing.assert_array_equal(Matcher(0.7, 0.3)(iou), [1, 0, -1])


def test_low_quality_matches_rescue_each_gts_best_predictions_with_ties():
    iou = np.array(
        [
            [0.4, 0.4, 0.1, 0.0],  # GT 0's best is 0.4, reached by preds 0 and 1 (a tie)
            [0.0, 0.0, 0.2, 0.1],  # GT 1's best is 0.2 at pred 2
        ]
    )
    plain = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
    np.testing.assert_array_equal(plain, [-2, -2, -1, -1])
    rescued = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    np.testing.assert_array_equal(rescued, [0, 0, 1, -1])


def test_low_quality_match_gets_its_original_argmax_not_the_gt_that_rescued_it():
    iou = np.array(
        [
            [0.5, 0.0],  # GT 0: its best prediction is pred 0 (0.5)...
            [0.6, 0.4],  # ...but pred 0 overlaps GT 1 more (0.6), so pred 0 goes to GT 1
        ]
    )
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    # GT 1's best is pred 0 as well; pred 1 (0.4 with GT 1) is nobody's best: stays ignored
    np.testing.assert_array_equal(matches, [1, -2])


def test_no_ground_truth_means_all_background():
    matches = Matcher(0.7, 0.3, True)(np.zeros((0, 6)))
    np.testing.assert_array_equal(matches, [-1] * 6)
    assert Matcher(0.7, 0.3, True)(np.zeros((2, 0))).shape == (0,)


def test_matcher_validates():
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)
    with pytest.raises(ValueError, match="2-D"):
        Matcher(0.7, 0.3)(np.zeros(5))


def _labels(num_pos, num_neg, num_ignore, rng):
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * num_ignore)
    return labels[rng.permutation(labels.size)]


def test_sampler_caps_positives_at_the_fraction():
    labels = _labels(400, 1000, 50, np.random.default_rng(0))
    pos, neg = BalancedPositiveNegativeSampler(256, 0.5, np.random.default_rng(1))([labels])
    assert pos[0].sum() == 128 and neg[0].sum() == 128
    assert np.all(labels[pos[0]] == 1) and np.all(labels[neg[0]] == 0)
    assert not np.any(pos[0] & neg[0])


def test_sampler_fills_with_negatives_when_positives_are_few():
    labels = _labels(10, 1000, 50, np.random.default_rng(0))
    pos, neg = BalancedPositiveNegativeSampler(256, 0.5, np.random.default_rng(1))([labels])
    assert pos[0].sum() == 10 and neg[0].sum() == 246


def test_sampler_batch_can_be_smaller_when_both_run_out():
    labels = _labels(3, 5, 100, np.random.default_rng(0))
    pos, neg = BalancedPositiveNegativeSampler(256, 0.5, np.random.default_rng(1))([labels])
    assert pos[0].sum() == 3 and neg[0].sum() == 5  # ignored anchors are never sampled


def test_sampler_image_without_positives():
    labels = np.zeros(300, dtype=np.int64)
    pos, neg = BalancedPositiveNegativeSampler(256, 0.5, np.random.default_rng(0))([labels])
    assert pos[0].sum() == 0 and neg[0].sum() == 256


def test_sampler_is_deterministic_given_the_generator():
    labels = [_labels(200, 1000, 0, np.random.default_rng(i)) for i in range(2)]

    def sample(seed):
        return BalancedPositiveNegativeSampler(64, 0.25, np.random.default_rng(seed))(labels)

    a, b, c = sample(5), sample(5), sample(6)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a[0] + a[1], c[0] + c[1]))
    assert a[0][0].sum() == 16 and a[1][0].sum() == 48  # 25% of 64


def test_sampler_treats_any_label_at_least_one_as_positive():
    labels = np.array([3, 0, 7, -1, 0])  # class labels of RoI heads
    pos, neg = BalancedPositiveNegativeSampler(10, 0.5, np.random.default_rng(0))([labels])
    np.testing.assert_array_equal(pos[0], [True, False, True, False, False])
    np.testing.assert_array_equal(neg[0], [False, True, False, False, True])
