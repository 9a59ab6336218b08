"""The second stage of Mask R-CNN: from proposals to classes, refined boxes and masks.

Training, for each image (paper Sec. 3.1, "Training")::

    proposals + GT boxes ─ match (IoU 0.5) ─ sample 512 RoIs at <= 25% positives
    P2..P5 ─ RoIAlign 7x7 (each RoI on its FPN level) ─ box head ─ class logits, box deltas
                                             + loss_classifier, loss_box_reg (GT class only)
    positive RoIs ─ RoIAlign 14x14 ─ mask head ─ K mask logits at 28x28
                                             + loss_mask (BCE on the GT class channel only)

Inference: the same box branch on the proposals, then post-processing (per-class boxes, score
threshold, per-class NMS, the best 100), then the mask branch on the *final* boxes, keeping only
the predicted class's mask (the paper's inference order, Sec. 3.1 "Inference").

With ``num_keypoints = K > 0`` a keypoint branch runs beside the mask branch (paper Sec. 5,
torchvision's ``keypointrcnn``): positive RoIs ─ RoIAlign 14x14 ─ keypoint head ─ K heatmaps at
56x56 + loss_keypoint (softmax over the 56² locations, ``keypoints.py``); at inference it runs
on the final boxes and adds ``keypoints`` (D, K, 3) and ``keypoints_scores`` (D, K).
``mask_branch=False`` drops the mask branch (torchvision's keypoint model has none).

``RoIHeads`` owns all of it: the two poolers, the heads, the matcher and sampler, the losses.
``forward`` computes the loss gradients right away (``self.cache``); ``backward()`` sends them
through the heads and poolers and returns ``{level name: gradient}`` for the backbone.
The heads themselves are in ``heads.py``, detection post-processing in ``postprocess.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .backend import get_xp, raise_if
from .boxes import BoxCoder, box_iou
from .config_checks import at_least, between, check_fields, one_of, positive_numbers
from .heads import (
    FastRCNNPredictor,
    KeypointRCNNHeads,
    KeypointRCNNPredictor,
    MaskHead,
    MaskRCNNPredictor,
    TwoMLPHead,
)
from .keypoints import heatmaps_to_keypoints, keypointrcnn_loss
from .matching import BalancedPositiveNegativeSampler, Matcher
from .nn.losses import binary_cross_entropy_with_logits, sigmoid, smooth_l1, softmax_cross_entropy
from .nn.module import Module
from .nn.utils import add_named_grads, as_generator, check_finite
from .postprocess import MASK_PASTE_MODES, postprocess_detections
from .roi_ops import MultiScaleRoIAlign, roi_align

_ROI_HEADS_RULES = {
    "fg_iou_thresh": between(0, 1),
    "bg_iou_thresh": between(0, 1),
    "batch_size_per_image": at_least(1),
    "positive_fraction": between(0, 1, low_open=True),
    "box_coder_weights": positive_numbers(4),
    "box_loss_beta": at_least(0),
    "representation_size": at_least(1),
    "box_pool_size": at_least(1),
    "mask_pool_size": at_least(1),
    "mask_size": at_least(1),
    "mask_channels": at_least(1),
    "mask_num_convs": at_least(1),
    "mask_positives_per_image": at_least(1),
    "score_thresh": between(0, 1),
    "nms_thresh": between(0, 1),
    "detections_per_img": at_least(1),
    "mask_paste": one_of(*MASK_PASTE_MODES),
    "keypoint_pool_size": at_least(1),
    "keypoint_channels": at_least(1),
    "keypoint_num_convs": at_least(1),
}


@dataclass
class RoIHeadsConfig:
    """Box and mask heads; defaults are the paper's / torchvision's."""

    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    box_coder_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    box_loss_beta: float = 1.0 / 9
    representation_size: int = 1024
    box_pool_size: int = 7
    mask_pool_size: int = 14
    mask_size: int = 28
    sampling_ratio: int = 2
    aligned: bool = False  # torchvision's Mask R-CNN pools with aligned=False; Detectron2: True
    mask_channels: int = 256
    mask_num_convs: int = 4
    # at most this many positive RoIs per image train the mask branch (a random subset, drawn
    # with the sampler's generator); None: all of them, as in the paper and torchvision
    mask_positives_per_image: int | None = None
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # how predict() pastes each 28x28 mask into the image (postprocess.paste_masks_in_image):
    # "subpixel" (ours, Detectron2's) or "torchvision" (box rounded to whole pixels)
    mask_paste: str = "subpixel"
    # False: no mask branch (no loss_mask, no masks predicted), as torchvision's keypoint model
    mask_branch: bool = True
    # the keypoint branch, built when the model's num_keypoints > 0: RoIAlign at
    # keypoint_pool_size, keypoint_num_convs conv3x3 of keypoint_channels, heatmaps at 4x the
    # pool size (torchvision: 14, 8 x 512, 56x56)
    keypoint_pool_size: int = 14
    keypoint_channels: int = 512
    keypoint_num_convs: int = 8

    def __post_init__(self):
        check_fields(self, _ROI_HEADS_RULES)
        if self.mask_size != 2 * self.mask_pool_size:
            raise ValueError(
                f"mask_size ({self.mask_size}) must be twice mask_pool_size "
                f"({self.mask_pool_size}): the mask head upsamples by a 2x deconvolution"
            )


class SampledRoIs(NamedTuple):
    """Per-image lists from :meth:`RoIHeads.select_training_samples`."""

    rois: list  # (S_i, 4) boxes in image pixels
    labels: list  # (S_i,) int64 class, 0 = background
    regression_targets: list  # (S_i, 4) encoded matched GT box (used where label > 0)
    matched_idxs: list  # (S_i,) index of the matched GT box (meaningful where label > 0)


class _RoIHeadsCache(NamedTuple):
    """The loss gradients of the last training forward, waiting for ``backward()``."""

    grad_logits: object  # (R, K+1)
    grad_deltas: object  # (R, 4(K+1))
    grad_mask: object  # (P, K, M, M), None when the batch had no positive RoI
    grad_keypoint: object = None  # (P, K, m, m), None without a keypoint branch or positives


class RoIHeads(Module):
    """Sampling, the box branch and the mask branch, with their losses.

    in_channels: C of the pooled feature maps. num_classes: K object classes (no background).
    featmap_names / strides: the levels the poolers read and their declared strides
    (``ResNetFPN.roi_levels`` and their ``ResNetFPN.strides``). rng: a seed or the Generator
    shared with the RPN; it initialises the heads and drives the RoI sampler. num_keypoints: K
    keypoints per object for the keypoint branch (0: none).

    Parameter names follow torchvision's (``roi_heads.box_head.fc6`` ...).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        config: RoIHeadsConfig | None = None,
        featmap_names=("p2", "p3", "p4", "p5"),
        strides=(4, 8, 16, 32),
        rng=None,
        num_keypoints: int = 0,
    ):
        self.config = rh = config if config is not None else RoIHeadsConfig()
        rng = as_generator(rng)
        names, strides = list(featmap_names), list(strides)
        pool = dict(sampling_ratio=rh.sampling_ratio, aligned=rh.aligned, strides=strides)
        self.box_roi_pool = MultiScaleRoIAlign(names, rh.box_pool_size, **pool)
        self.mask_roi_pool = MultiScaleRoIAlign(names, rh.mask_pool_size, **pool)
        self.box_head = TwoMLPHead(in_channels * rh.box_pool_size**2, rh.representation_size, rng)
        self.box_predictor = FastRCNNPredictor(rh.representation_size, num_classes + 1, rng)
        self.mask_head = self.mask_predictor = None
        if rh.mask_branch:
            self.mask_head = MaskHead(in_channels, rh.mask_channels, rh.mask_num_convs, rng)
            self.mask_predictor = MaskRCNNPredictor(
                rh.mask_channels, rh.mask_channels, num_classes, rng
            )
        self.num_keypoints = int(num_keypoints)
        if self.num_keypoints:  # built last: without it, nothing above draws differently
            self.keypoint_roi_pool = MultiScaleRoIAlign(names, rh.keypoint_pool_size, **pool)
            layers = (rh.keypoint_channels,) * rh.keypoint_num_convs
            self.keypoint_head = KeypointRCNNHeads(in_channels, layers, rng)
            self.keypoint_predictor = KeypointRCNNPredictor(
                rh.keypoint_channels, self.num_keypoints, rng
            )
        self.box_coder = BoxCoder(rh.box_coder_weights)
        self.proposal_matcher = Matcher(rh.fg_iou_thresh, rh.bg_iou_thresh, False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(
            rh.batch_size_per_image, rh.positive_fraction, rng
        )
        self.cache: _RoIHeadsCache | None = None

    def forward(self, features: dict, proposals: list, image_sizes: list, targets=None):
        """features: ``{name: (N, C, H_l, W_l)}``; proposals: N arrays (R_i, 4); image_sizes: N
        ``(h, w)`` before padding; targets: N dicts (``boxes``, ``labels``, ``masks``, and
        ``keypoints`` (G, K, 3) for the keypoint branch) to train.

        Returns ``(detections, losses)``: with targets, ``([], {"loss_classifier",
        "loss_box_reg", "loss_mask"})`` (``loss_mask`` only with the mask branch, plus
        ``loss_keypoint`` with the keypoint branch) and the gradients kept for :meth:`backward`;
        without, ``(detections, {})``, one dict per image with ``boxes`` (D, 4), ``labels`` (D,)
        in 1..K, ``scores`` (D,), ``mask_probs`` (D, M, M) of each box's predicted class (with
        the mask branch), ``keypoints`` (D, K, 3) and ``keypoints_scores`` (D, K) (with the
        keypoint branch)."""
        self.cache = None
        if targets is None:
            return self.detect(features, proposals, image_sizes), {}
        sampled = self.select_training_samples(proposals, targets)
        loss_cls, loss_box, g_logits, g_deltas = self._box_branch_loss(
            features, sampled, image_sizes
        )
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        g_mask = g_keypoint = None
        if self.config.mask_branch:
            losses["loss_mask"], g_mask = self._mask_branch_loss(
                features, sampled, targets, image_sizes
            )
        if self.num_keypoints:
            losses["loss_keypoint"], g_keypoint = self._keypoint_branch_loss(
                features, sampled, targets, image_sizes
            )
        self.cache = _RoIHeadsCache(g_logits, g_deltas, g_mask, g_keypoint)
        return [], losses

    def backward(self) -> dict:
        """Gradients of the losses of the last training forward -> ``{level name:
        (N, C, H_l, W_l)}`` for the pooled levels; parameter gradients go into ``.grad``."""
        if self.cache is None:
            raise RuntimeError("RoIHeads.backward() needs a training forward first (with targets)")
        c = self.cache
        feature_grads: dict = {}
        # the keypoint branch: keypoint predictor -> keypoint head -> its RoIAlign -> P2..P5
        if c.grad_keypoint is not None:
            g = self.keypoint_predictor.backward(c.grad_keypoint)
            add_named_grads(
                feature_grads, self.keypoint_roi_pool.backward(self.keypoint_head.backward(g))
            )
        # the mask branch: mask predictor -> mask head -> its RoIAlign -> P2..P5
        if c.grad_mask is not None:
            g = self.mask_head.backward(self.mask_predictor.backward(c.grad_mask))
            add_named_grads(feature_grads, self.mask_roi_pool.backward(g))
        # the box branch: box predictor -> box head -> its RoIAlign -> P2..P5
        g = self.box_head.backward(self.box_predictor.backward((c.grad_logits, c.grad_deltas)))
        add_named_grads(feature_grads, self.box_roi_pool.backward(g))
        self.cache = None
        return feature_grads

    # -- training ------------------------------------------------------------------------------
    def select_training_samples(self, proposals, targets) -> SampledRoIs:
        """Add the GT boxes to the proposals, match them to GT at IoU 0.5, and sample
        ``batch_size_per_image`` RoIs with at most ``positive_fraction`` positives, per image."""
        out = SampledRoIs([], [], [], [])
        for props, tgt in zip(proposals, targets):
            xp = get_xp(props)
            gt_boxes = tgt["boxes"].astype(props.dtype)
            props = xp.concatenate([props, gt_boxes], axis=0)
            if gt_boxes.shape[0] == 0:
                matched = xp.zeros(props.shape[0], dtype=np.int64)
                lab = xp.zeros(props.shape[0], dtype=np.int64)
            else:
                matched_raw = self.proposal_matcher(box_iou(gt_boxes, props))
                matched = xp.maximum(matched_raw, 0)
                lab = tgt["labels"][matched].astype(np.int64)
                lab = xp.where(matched_raw == Matcher.BELOW_LOW_THRESHOLD, xp.int64(0), lab)
                lab = xp.where(matched_raw == Matcher.BETWEEN_THRESHOLDS, xp.int64(-1), lab)
            pos, neg = self.fg_bg_sampler([lab])
            keep = xp.flatnonzero(pos[0] | neg[0])
            props, lab, matched = props[keep], lab[keep], matched[keep]
            if gt_boxes.shape[0] == 0:
                reg = xp.zeros((props.shape[0], 4), dtype=props.dtype)
            else:
                reg = self.box_coder.encode(gt_boxes[matched], props)
            for part, value in zip(out, (props, lab, reg, matched)):
                part.append(value)
        return out

    def mask_targets(self, pos_rois, pos_matched, targets):
        """(P, M, M) mask targets: each positive RoI's matched GT mask, RoIAligned onto the RoI
        (spatial scale 1, as the paper: "the intersection between an RoI and its GT mask").

        The crop uses ``aligned=True`` (Detectron2's choice; torchvision uses False): GT mask
        pixel j covers [j, j+1), and ``paste_masks_in_image`` puts the predicted masks back with
        that same pixel-centre model. With ``aligned=False`` targets, a perfectly learned mask
        comes back shifted by about half a pixel, which caps segm AP on the demo's shapes at
        0.90 with 28x28 masks and 0.93 with 14x14 (notebook 06 measures this ceiling)."""
        m = self.config.mask_size
        out = []
        for rois, matched, tgt in zip(pos_rois, pos_matched, targets):
            if rois.shape[0] == 0:
                continue
            xp = get_xp(rois)
            gt_masks = tgt["masks"][:, None].astype(rois.dtype)
            roi_rows = xp.concatenate([matched[:, None].astype(rois.dtype), rois], axis=1)
            t = roi_align(gt_masks, roi_rows, (m, m), 1.0, -1, True)[:, 0]
            # bilinear weights sum to 1 only up to rounding: 1.0000001 is not a valid BCE target
            out.append(xp.clip(t, 0.0, 1.0))
        if not out:
            return np.zeros((0, m, m), np.float32)
        return get_xp(out[0]).concatenate(out, axis=0)

    def _box_branch_loss(self, features, sampled: SampledRoIs, image_sizes):
        xp = get_xp(sampled.rois[0])
        box_feats = self.box_roi_pool(features, sampled.rois, image_sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(box_feats))
        return fastrcnn_loss(
            class_logits,
            box_deltas,
            xp.concatenate(sampled.labels),
            xp.concatenate(sampled.regression_targets),
            self.config.box_loss_beta,
        )

    def _mask_branch_loss(self, features, sampled: SampledRoIs, targets, image_sizes):
        """The mask branch runs on the positive RoIs only."""
        xp = get_xp(sampled.rois[0])
        # index arrays, not boolean masks: one data-sized result (a GPU sync) per image
        positive = [self._mask_positives(xp.flatnonzero(lab > 0)) for lab in sampled.labels]
        pos_rois = [r[p] for r, p in zip(sampled.rois, positive)]
        pos_labels = xp.concatenate([lab[p] for lab, p in zip(sampled.labels, positive)])
        mask_targets = self.mask_targets(
            pos_rois, [m[p] for m, p in zip(sampled.matched_idxs, positive)], targets
        )
        if not pos_labels.size:
            return 0.0, None
        mask_feats = self.mask_roi_pool(features, pos_rois, image_sizes)
        mask_logits = self.mask_predictor(self.mask_head(mask_feats))
        return maskrcnn_loss(mask_logits, pos_labels, mask_targets)

    def _mask_positives(self, positive):
        """The positives (indices into one image's sampled RoIs) that train the mask branch:
        all of them, or a random ``mask_positives_per_image`` of them in their original order."""
        cap = self.config.mask_positives_per_image
        if cap is None or positive.size <= cap:
            return positive
        # positive is increasing, so sorting the picked indices restores the original order
        return get_xp(positive).sort(self.fg_bg_sampler.random_subset(positive, cap))

    # -- inference -----------------------------------------------------------------------------
    def detect(self, features, proposals, image_sizes) -> list[dict]:
        """The inference path: box branch -> post-processing -> mask branch on the final boxes
        (per image ``boxes``, ``labels``, ``scores``, ``mask_probs`` of the predicted class)."""
        detections = self.detect_boxes(features, proposals, image_sizes)
        if self.config.mask_branch:
            detections = self.add_mask_probs(features, detections, image_sizes)
        if self.num_keypoints:
            detections = self.add_keypoints(features, detections, image_sizes)
        return detections

    def detect_boxes(self, features, proposals, image_sizes) -> list[dict]:
        """The box branch and its post-processing: per image ``{"boxes", "labels", "scores"}``."""
        rh = self.config
        box_feats = self.box_roi_pool(features, proposals, image_sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(box_feats))
        check_finite("the box head's class logits and box deltas", class_logits, box_deltas)
        detections, start = [], 0
        for props, size in zip(proposals, image_sizes):
            stop = start + props.shape[0]
            boxes, scores, labels = postprocess_detections(
                class_logits[start:stop],
                box_deltas[start:stop],
                props,
                size,
                self.box_coder,
                rh.score_thresh,
                rh.nms_thresh,
                rh.detections_per_img,
            )
            start = stop
            detections.append({"boxes": boxes, "labels": labels, "scores": scores})
        return detections

    def add_mask_probs(self, features, detections, image_sizes) -> list[dict]:
        """The mask branch on the final boxes: sets each detection dict's ``mask_probs``
        (D, M, M), the sigmoid of its predicted class's mask logits, and returns the list."""
        det_boxes = [d["boxes"] for d in detections]
        if sum(b.shape[0] for b in det_boxes):
            mask_feats = self.mask_roi_pool(features, det_boxes, image_sizes)
            mask_logits = self.mask_predictor(self.mask_head(mask_feats))
            check_finite("the mask head's logits", mask_logits)
        start, m = 0, self.config.mask_size
        for d in detections:
            n, xp = d["boxes"].shape[0], get_xp(d["boxes"])
            if n == 0:
                d["mask_probs"] = xp.zeros((0, m, m), dtype=d["boxes"].dtype)
                continue
            logits = mask_logits[start : start + n]
            start += n
            d["mask_probs"] = sigmoid(logits[xp.arange(n), d["labels"] - 1])
        return detections

    # -- the keypoint branch -------------------------------------------------------------------
    def _keypoint_branch_loss(self, features, sampled: SampledRoIs, targets, image_sizes):
        """The keypoint branch on the positive RoIs (like the mask branch), each RoI trained on
        the keypoints of the GT box it was matched to (``keypoints.keypointrcnn_loss``)."""
        gt = [t.get("keypoints") for t in targets]
        if any(g is None for g in gt):
            raise ValueError(
                f"the keypoint branch (num_keypoints={self.num_keypoints}) trains on targets "
                "with 'keypoints' (G, K, 3): rows (x, y, visibility) per box, COCO's convention"
            )
        positive = [lab > 0 for lab in sampled.labels]
        pos_rois = [r[p] for r, p in zip(sampled.rois, positive)]
        if not sum(int(r.shape[0]) for r in pos_rois):
            return 0.0, None
        feats = self.keypoint_roi_pool(features, pos_rois, image_sizes)
        logits = self.keypoint_predictor(self.keypoint_head(feats))
        matched = [m[p] for m, p in zip(sampled.matched_idxs, positive)]
        return keypointrcnn_loss(logits, pos_rois, gt, matched)

    def add_keypoints(self, features, detections, image_sizes) -> list[dict]:
        """The keypoint branch on the final boxes: sets each detection dict's ``keypoints``
        (D, K, 3), rows (x, y, 1) in the pixels of the boxes, and ``keypoints_scores`` (D, K)
        (``keypoints.heatmaps_to_keypoints``), and returns the list."""
        det_boxes = [d["boxes"] for d in detections]
        xp = get_xp(*det_boxes)
        logits = xp.zeros((0, self.num_keypoints, 1, 1), dtype=det_boxes[0].dtype)
        if sum(b.shape[0] for b in det_boxes):
            feats = self.keypoint_roi_pool(features, det_boxes, image_sizes)
            logits = self.keypoint_predictor(self.keypoint_head(feats))
            check_finite("the keypoint head's heatmaps", logits)
        start = 0
        for d, boxes in zip(detections, det_boxes):
            maps = logits[start : start + boxes.shape[0]]
            start += boxes.shape[0]
            d["keypoints"], d["keypoints_scores"] = heatmaps_to_keypoints(maps, boxes)
        return detections


# ------------------------------------------------------------------------------------------------
# Losses of the RoI heads
# ------------------------------------------------------------------------------------------------
def fastrcnn_loss(class_logits, box_deltas, labels, regression_targets, beta: float = 1.0 / 9):
    """Classification and box-regression losses of the sampled RoIs.

    class_logits: (R, K+1); box_deltas: (R, 4(K+1)); labels: (R,) int in 0..K (0 = background);
    regression_targets: (R, 4) encoded GT boxes (only rows with label > 0 are used).

    Returns ``(loss_classifier, loss_box_reg, grad_logits, grad_deltas)``. The box loss uses the
    deltas of each positive RoI's GT class only, and is normalised by R (all sampled RoIs, not
    only positives), as torchvision and Detectron do.
    """
    xp = get_xp(class_logits)
    r = class_logits.shape[0]
    loss_cls, grad_logits = softmax_cross_entropy(class_logits, labels)
    grad_deltas = xp.zeros_like(box_deltas)
    pos = xp.flatnonzero(labels > 0)
    if pos.size == 0 or r == 0:
        return loss_cls, 0.0, grad_logits, grad_deltas
    cols = 4 * labels[pos][:, None] + xp.arange(4)[None, :]  # the GT class's four deltas
    rows = pos[:, None]
    loss_box, g = smooth_l1(box_deltas[rows, cols], regression_targets[pos], beta, "sum")
    grad_deltas[rows, cols] = g / r
    return loss_cls, loss_box / r, grad_logits, grad_deltas


def maskrcnn_loss(mask_logits, labels, mask_targets):
    """Per-pixel BCE on the GT class's channel, averaged over every pixel of the positive RoIs.

    mask_logits: (P, K, M, M) for the P positive RoIs; labels: (P,) in 1..K;
    mask_targets: (P, M, M) in [0, 1] (the GT mask RoIAligned onto each RoI's 28x28 grid).

    Returns ``(loss_mask, grad_mask_logits)``; the gradient is zero on every channel but the
    GT class's: the classes do not compete for pixels, which is the paper's decoupling of mask
    and class prediction (Sec. 3).
    """
    xp = get_xp(mask_logits)
    grad = xp.zeros_like(mask_logits)
    p = mask_logits.shape[0]
    if p == 0:
        return 0.0, grad
    k = mask_logits.shape[1]

    def error():
        return ValueError(f"mask loss labels must be ({p},) classes in 1..{k} (positive RoIs only)")

    if labels.shape != (p,):
        raise error()
    raise_if(((labels < 1) | (labels > k)).any(), error)
    idx = xp.arange(p)
    chan = labels - 1  # channel k-1 holds class k's mask (no background mask)
    loss, g = binary_cross_entropy_with_logits(mask_logits[idx, chan], mask_targets)
    grad[idx, chan] = g
    return loss, grad
