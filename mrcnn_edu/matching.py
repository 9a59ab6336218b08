"""Matching predictions (anchors, proposals) to ground truth, and sampling a balanced minibatch.

Faster R-CNN Sec. 3.1.2: an anchor is *positive* if its IoU with some ground-truth box is at
least 0.7, or if it is the anchor with the highest IoU for some ground-truth box (so every object
gets at least one anchor); *negative* if its IoU with every box is below 0.3; anything in between
is ignored by the loss. ``Matcher`` implements that rule with torchvision's exact tie behaviour
(docs/conventions.md, "Matcher"). ``BalancedPositiveNegativeSampler`` then picks 256 anchors per
image, at most half positive, so the rare positives are not drowned by easy background.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .backend import get_xp


class Matcher:
    """Assign each prediction the index of its ground-truth box, or a negative code.

    high_threshold, low_threshold: quality (IoU) thresholds, ``low <= high``.
    allow_low_quality_matches: also match, for every ground truth, the predictions that reach its
    best quality even if that is below ``high_threshold`` (ties included).

    ``matcher(match_quality_matrix)`` with a (G, P) matrix (ground truth x predictions) returns a
    (P,) int64 array: the GT index in ``[0, G)``, ``BELOW_LOW_THRESHOLD`` (-1, background) or
    ``BETWEEN_THRESHOLDS`` (-2, ignored).
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(
        self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False
    ):
        if not low_threshold <= high_threshold:
            raise ValueError(
                f"low_threshold ({low_threshold}) must be <= high_threshold ({high_threshold})"
            )
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, match_quality_matrix):
        """match_quality_matrix: (G, P) float, e.g. ``box_iou(gt_boxes, anchors)``.

        Returns (P,) int64. An image without ground truth (G = 0) gives all -1: every prediction
        is background (torchvision raises instead; its RPN special-cases that image).
        """
        xp = get_xp(match_quality_matrix)
        if match_quality_matrix.ndim != 2:
            raise ValueError(
                "match_quality_matrix must be 2-D (num_gt, num_predictions), got shape "
                f"{tuple(match_quality_matrix.shape)}"
            )
        num_gt, num_pred = match_quality_matrix.shape
        if num_gt == 0 or num_pred == 0:
            return xp.full((num_pred,), self.BELOW_LOW_THRESHOLD, dtype=xp.int64)

        # best GT for each prediction; argmax keeps the first of equal maxima (as torch.max does)
        matched_vals = match_quality_matrix.max(axis=0)
        all_matches = match_quality_matrix.argmax(axis=0).astype(xp.int64)

        # xp.where, not masked assignment: a boolean mask index sizes its result from the data,
        # which costs a host sync on a GPU
        below_low = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches = xp.where(below_low, xp.int64(self.BELOW_LOW_THRESHOLD), all_matches)
        matches = xp.where(between, xp.int64(self.BETWEEN_THRESHOLDS), matches)

        if self.allow_low_quality_matches:
            # For each GT, the predictions that reach its best quality (ties included) get back
            # their own best GT -- which is not necessarily this GT when a prediction is the
            # best for one box but overlaps another even more.
            highest_per_gt = match_quality_matrix.max(axis=1)
            is_best_for_some_gt = (match_quality_matrix == highest_per_gt[:, None]).any(axis=0)
            matches = xp.where(is_best_for_some_gt, all_matches, matches)
        return matches


class BalancedPositiveNegativeSampler:
    """Sample a fixed-size minibatch per image with at most a given fraction of positives.

    batch_size_per_image: anchors (or RoIs) per image, e.g. 256 for the RPN.
    positive_fraction: the largest share of positives, e.g. 0.5; if there are fewer positives the
    batch is filled with negatives (and may be smaller if those run out too).
    rng: a ``numpy.random.Generator``; the sample is a deterministic function of its state.
    """

    def __init__(
        self,
        batch_size_per_image: int,
        positive_fraction: float,
        rng: np.random.Generator | None = None,
    ):
        if batch_size_per_image < 0:
            raise ValueError(f"batch_size_per_image must be >= 0, got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.rng = rng if rng is not None else np.random.default_rng()

    def __call__(self, labels: Sequence) -> tuple[list, list]:
        """labels: one (P_i,) int array per image with -1 = ignore, 0 = negative, >= 1 = positive.

        Returns ``(pos_masks, neg_masks)``: two lists of (P_i,) bool arrays marking the sampled
        positives and negatives of each image.
        """
        pos_masks, neg_masks = [], []
        for labels_per_image in labels:
            xp = get_xp(labels_per_image)
            if labels_per_image.ndim != 1:
                raise ValueError(
                    "labels must be one 1-D array per image, got shape "
                    f"{tuple(labels_per_image.shape)}"
                )
            positive = xp.flatnonzero(labels_per_image >= 1)
            negative = xp.flatnonzero(labels_per_image == 0)

            num_pos = min(
                int(positive.size), int(self.batch_size_per_image * self.positive_fraction)
            )
            num_neg = min(int(negative.size), self.batch_size_per_image - num_pos)

            pos_pick = self.random_subset(positive, num_pos)
            neg_pick = self.random_subset(negative, num_neg)

            pos_mask = xp.zeros(labels_per_image.shape, dtype=bool)
            neg_mask = xp.zeros(labels_per_image.shape, dtype=bool)
            pos_mask[pos_pick] = True
            neg_mask[neg_pick] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks

    def random_subset(self, indices, k: int):
        """``k`` elements of the 1-D array ``indices`` drawn at random, in the order drawn. The
        permutation is drawn on the host, so CPU and GPU runs pick the same elements."""
        xp = get_xp(indices)
        return indices[xp.asarray(self.rng.permutation(int(indices.size))[:k])]
