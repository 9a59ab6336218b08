"""Mask R-CNN: the stages put together, with a backward that a reader can follow.

Forward (training), in the order the data flows::

    images ─ transform (normalise, pad to /32) ─ backbone (ResNet + FPN) ─ P2..P6
    P2..P6 ─ RPN ─ proposals (no gradient)            + loss_objectness, loss_rpn_box_reg
    proposals + GT boxes ─ match (IoU 0.5) ─ sample 512 RoIs/image at 25% positives
    P2..P5 ─ RoIAlign 7x7 ─ box head ─ class logits, box deltas
                                                      + loss_classifier, loss_box_reg
    positive RoIs ─ RoIAlign 14x14 ─ mask head ─ K mask logits at 28x28
                                                      + loss_mask (GT class channel only)

``backward()`` walks the same path in reverse: mask head → its RoIAlign → feature gradients;
box head → its RoIAlign → feature gradients; RPN head → feature gradients; the three are summed
per FPN level and sent through FPN and ResNet. The total loss is the plain sum of the five.

``predict(images)`` runs the inference path: RPN proposals (test top-n) → box head → per-class
NMS → mask head on the final boxes → masks pasted into the image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .backbone import BackboneConfig, ResNetConfig, ResNetFPN
from .backend import get_xp, to_host
from .boxes import BoxCoder, box_iou
from .heads import (
    FastRCNNPredictor,
    MaskHead,
    MaskRCNNPredictor,
    TwoMLPHead,
    fastrcnn_loss,
    maskrcnn_loss,
)
from .matching import BalancedPositiveNegativeSampler, Matcher
from .nn.losses import sigmoid
from .nn.module import Module
from .postprocess import paste_masks_in_image, postprocess_detections
from .roi_ops import MultiScaleRoIAlign, roi_align
from .rpn import RPN, RPNConfig

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def __post_init__(self):
        if self.mask_size != 2 * self.mask_pool_size:
            raise ValueError(
                f"mask_size ({self.mask_size}) must be twice mask_pool_size "
                f"({self.mask_pool_size}): the mask head upsamples by a 2x deconvolution"
            )
        if not 0 < self.positive_fraction <= 1 or self.batch_size_per_image < 1:
            raise ValueError("need batch_size_per_image >= 1 and 0 < positive_fraction <= 1")


@dataclass
class MaskRCNNConfig:
    """Everything that defines a model. ``num_classes`` counts object classes (K), without
    background. ``MaskRCNNConfig()`` is ResNet-50-FPN with the paper's settings;
    ``MaskRCNNConfig.small(K)`` is the CPU preset for the synthetic-shapes demo."""

    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    image_mean: tuple = IMAGENET_MEAN
    image_std: tuple = IMAGENET_STD
    size_divisible: int = 32

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (object classes), got {self.num_classes}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std need 3 values each, std > 0")
        if self.size_divisible < 32 or self.size_divisible % 32:
            raise ValueError("size_divisible must be a positive multiple of 32 (the P5 stride)")

    @classmethod
    def small(cls, num_classes: int = 3) -> MaskRCNNConfig:
        """A narrow model for 128x128 images that trains from scratch on two CPU cores."""
        return cls(
            num_classes=num_classes,
            backbone=BackboneConfig.small(),
            rpn=RPNConfig(
                anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
                batch_size_per_image=128,
                pre_nms_top_n_train=300,
                pre_nms_top_n_test=150,
                post_nms_top_n_train=200,
                post_nms_top_n_test=100,
            ),
            roi_heads=RoIHeadsConfig(
                batch_size_per_image=64,
                representation_size=256,
                mask_channels=64,
                detections_per_img=20,
            ),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MaskRCNNConfig:
        """Build from a (JSON) dict; unknown keys raise a ValueError listing the valid ones."""
        _check_keys(d, cls, "config")
        kw = dict(d)
        if "backbone" in kw:
            b = dict(kw["backbone"])
            _check_keys(b, BackboneConfig, "config.backbone")
            if "resnet" in b:
                _check_keys(b["resnet"], ResNetConfig, "config.backbone.resnet")
                b["resnet"] = ResNetConfig(**_tuples(b["resnet"]))
            kw["backbone"] = BackboneConfig(**b)
        if "rpn" in kw:
            _check_keys(kw["rpn"], RPNConfig, "config.rpn")
            kw["rpn"] = RPNConfig(**_tuples(kw["rpn"]))
        if "roi_heads" in kw:
            _check_keys(kw["roi_heads"], RoIHeadsConfig, "config.roi_heads")
            kw["roi_heads"] = RoIHeadsConfig(**_tuples(kw["roi_heads"]))
        return cls(**_tuples(kw))


def _check_keys(d, klass, where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a dict, got {type(d).__name__}")
    valid = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(valid)}")


def _tuples(d: dict) -> dict:
    """JSON turns tuples into lists; turn them back (nested too) for the dataclasses."""

    def conv(v):
        return tuple(conv(x) for x in v) if isinstance(v, list) else v

    return {k: conv(v) for k, v in d.items()}


class MaskRCNN(Module):
    """Mask R-CNN. ``forward(images, targets) -> losses``, ``backward()``, ``predict(images)``.

    images: list of (3, H, W) float arrays with values in [0, 1] (sizes may differ).
    targets: list of dicts with ``"boxes"`` (G, 4) float x1y1x2y2 pixels, ``"labels"`` (G,) int
    in 1..K, ``"masks"`` (G, H, W) uint8/bool. An image may have G = 0.

    ``rng`` (a ``numpy.random.Generator``) drives the anchor and RoI sampling; the trainer sets
    it (``model.rng = generator``) and saves its state in checkpoints.
    """

    def __init__(self, config: MaskRCNNConfig | None = None, rng=None):
        self.config = cfg = config or MaskRCNNConfig()
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        k = cfg.num_classes
        rh = cfg.roi_heads
        self.backbone = ResNetFPN(cfg.backbone, rng)
        c = self.backbone.out_channels
        self.rpn = RPN(c, cfg.rpn, rng)
        level_names = ["p2", "p3", "p4", "p5"]
        self.box_roi_pool = MultiScaleRoIAlign(
            level_names, rh.box_pool_size, rh.sampling_ratio, aligned=rh.aligned
        )
        self.mask_roi_pool = MultiScaleRoIAlign(
            level_names, rh.mask_pool_size, rh.sampling_ratio, aligned=rh.aligned
        )
        self.box_head = TwoMLPHead(c * rh.box_pool_size**2, rh.representation_size, rng)
        self.box_predictor = FastRCNNPredictor(rh.representation_size, k + 1, rng)
        self.mask_head = MaskHead(c, rh.mask_channels, rh.mask_num_convs, rng)
        self.mask_predictor = MaskRCNNPredictor(rh.mask_channels, rh.mask_channels, k, rng)
        self.box_coder = BoxCoder(rh.box_coder_weights)
        self.proposal_matcher = Matcher(rh.fg_iou_thresh, rh.bg_iou_thresh, False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(
            rh.batch_size_per_image, rh.positive_fraction, rng
        )
        self._rng = rng
        self._cache = None

    # The one generator used for sampling, shared by the RPN's and the RoI heads' samplers.
    @property
    def rng(self) -> np.random.Generator:
        return self._rng

    @rng.setter
    def rng(self, generator: np.random.Generator) -> None:
        if not isinstance(generator, np.random.Generator):
            raise ValueError("model.rng must be a numpy.random.Generator")
        self._rng = generator
        self.rpn.sampler.rng = generator
        self.fg_bg_sampler.rng = generator

    # ---------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------
    def forward(self, images, targets, proposals=None) -> dict:
        """Losses for a batch: ``{loss_objectness, loss_rpn_box_reg, loss_classifier,
        loss_box_reg, loss_mask}`` as floats. ``proposals`` (list of (R_i, 4)) replaces the
        RPN's proposals when given (the whole-model gradcheck holds them fixed)."""
        batch, image_sizes = self.transform(images)
        targets = self._check_targets(targets, image_sizes)
        xp = get_xp(batch)
        feats = self.backbone(batch)
        rpn_proposals, rpn_losses = self.rpn(
            feats, image_sizes, targets, batch_shape=tuple(batch.shape[-2:])
        )
        if proposals is None:
            proposals = rpn_proposals
        pooled_feats = dict(zip(["p2", "p3", "p4", "p5"], feats[:4]))
        batch_hw = [tuple(batch.shape[-2:])] * len(image_sizes)

        rois, labels, regression_targets, matched = self.select_training_samples(proposals, targets)
        box_feats = self.box_roi_pool(pooled_feats, rois, batch_hw)
        class_logits, box_deltas = self.box_predictor(self.box_head(box_feats))
        all_labels = xp.concatenate(labels)
        loss_cls, loss_box, g_logits, g_deltas = fastrcnn_loss(
            class_logits,
            box_deltas,
            all_labels,
            xp.concatenate(regression_targets),
            self.config.roi_heads.box_loss_beta,
        )

        # Mask branch: positive RoIs only, targets = GT mask RoIAligned onto each RoI's grid.
        pos_rois = [r[lab > 0] for r, lab in zip(rois, labels)]
        pos_labels = all_labels[all_labels > 0]
        mask_targets = self.mask_targets(
            pos_rois, [m[lab > 0] for m, lab in zip(matched, labels)], targets
        )
        if pos_labels.size:
            mask_logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(pooled_feats, pos_rois, batch_hw))
            )
            loss_mask, g_mask = maskrcnn_loss(mask_logits, pos_labels, mask_targets)
        else:
            loss_mask, g_mask = 0.0, None
        self._cache = {"g_logits": g_logits, "g_deltas": g_deltas, "g_mask": g_mask}
        return {
            **rpn_losses,
            "loss_classifier": loss_cls,
            "loss_box_reg": loss_box,
            "loss_mask": loss_mask,
        }

    def backward(self) -> None:
        """Gradients of the sum of the five losses of the last forward, into every ``.grad``."""
        if self._cache is None:
            raise RuntimeError("MaskRCNN.backward() needs a training forward first")
        c = self._cache
        feat_grads = [None] * 5
        # 1. mask head -> its RoIAlign -> P2..P5
        if c["g_mask"] is not None:
            g = self.mask_head.backward(self.mask_predictor.backward(c["g_mask"]))
            _accumulate(feat_grads, self.mask_roi_pool.backward(g))
        # 2. box predictor + box head -> its RoIAlign -> P2..P5
        g = self.box_head.backward(self.box_predictor.backward(c["g_logits"], c["g_deltas"]))
        _accumulate(feat_grads, self.box_roi_pool.backward(g))
        # 3. RPN head -> P2..P6
        for i, g in enumerate(self.rpn.backward()):
            feat_grads[i] = g if feat_grads[i] is None else feat_grads[i] + g
        # 4. FPN -> ResNet
        self.backbone.backward(feat_grads)
        self._cache = None

    def select_training_samples(self, proposals, targets):
        """Add the GT boxes to the proposals, match them to GT at IoU 0.5, and sample
        ``batch_size_per_image`` RoIs with at most ``positive_fraction`` positives.

        Returns per-image lists: rois (S_i, 4), labels (S_i,) (0 = background), regression
        targets (S_i, 4) and matched GT indices (S_i,) (meaningful where label > 0)."""
        rois, labels, reg_targets, matched_out = [], [], [], []
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
                lab[matched_raw == Matcher.BELOW_LOW_THRESHOLD] = 0
                lab[matched_raw == Matcher.BETWEEN_THRESHOLDS] = -1
            pos, neg = self.fg_bg_sampler([lab])
            keep = xp.flatnonzero(pos[0] | neg[0])
            props, lab, matched = props[keep], lab[keep], matched[keep]
            if gt_boxes.shape[0] == 0:
                reg = xp.zeros((props.shape[0], 4), dtype=props.dtype)
            else:
                reg = self.box_coder.encode(gt_boxes[matched], props)
            rois.append(props)
            labels.append(lab)
            reg_targets.append(reg)
            matched_out.append(matched)
        return rois, labels, reg_targets, matched_out

    def mask_targets(self, pos_rois, pos_matched, targets):
        """(P, M, M) mask targets: each positive RoI's matched GT mask, RoIAligned onto the RoI
        (spatial scale 1, as the paper: "the intersection between an RoI and its GT mask").

        The crop uses ``aligned=True`` (Detectron2's choice; torchvision uses False): GT mask
        pixel j covers [j, j+1), and ``paste_masks_in_image`` puts the predicted masks back with
        that same pixel-centre model. With ``aligned=False`` targets, a perfectly learned mask
        comes back shifted by about half a pixel, which caps segm AP on the demo's shapes at
        0.90 (notebook 06 measures this ceiling)."""
        m = self.config.roi_heads.mask_size
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

    # ---------------------------------------------------------------------------------------
    # Inference
    # ---------------------------------------------------------------------------------------
    def predict(self, images, mask_threshold: float = 0.5) -> list[dict]:
        """Detections for each image: ``{"boxes" (D, 4), "labels" (D,) in 1..K, "scores" (D,),
        "masks" (D, H, W) uint8}``, best first, at most ``detections_per_img``."""
        was_training = self.training
        self.eval()
        try:
            batch, image_sizes = self.transform(images)
            xp = get_xp(batch)
            rh = self.config.roi_heads
            feats = self.backbone(batch)
            proposals, _ = self.rpn(feats, image_sizes, None, batch_shape=tuple(batch.shape[-2:]))
            pooled = dict(zip(["p2", "p3", "p4", "p5"], feats[:4]))
            batch_hw = [tuple(batch.shape[-2:])] * len(image_sizes)
            class_logits, box_deltas = self.box_predictor(
                self.box_head(self.box_roi_pool(pooled, proposals, batch_hw))
            )
            results, start = [], 0
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
                results.append({"boxes": boxes, "labels": labels, "scores": scores})
            det_boxes = [r["boxes"] for r in results]
            if sum(b.shape[0] for b in det_boxes):
                mask_logits = self.mask_predictor(
                    self.mask_head(self.mask_roi_pool(pooled, det_boxes, batch_hw))
                )
            start = 0
            for r, size in zip(results, image_sizes):
                d = r["boxes"].shape[0]
                if d == 0:
                    r["masks"] = xp.zeros((0, *size), dtype=np.uint8)
                    continue
                logits = mask_logits[start : start + d]
                start += d
                probs = sigmoid(logits[xp.arange(d), r["labels"] - 1])
                r["masks"] = paste_masks_in_image(probs, r["boxes"], size, mask_threshold)
            return [to_host(r) for r in results]
        finally:
            self.train(was_training)

    # ---------------------------------------------------------------------------------------
    # Input handling
    # ---------------------------------------------------------------------------------------
    def transform(self, images):
        """Normalise each image with the ImageNet mean/std and pad the batch (bottom/right, with
        zeros after normalisation) to a multiple of ``size_divisible``.

        Returns ``(batch (N, 3, Hp, Wp), image_sizes [(h, w), ...])``."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError("images must be a non-empty list of (3, H, W) arrays")
        xp = get_xp(images[0])
        sizes = []
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[0] != 3:
                raise ValueError(f"images[{i}] must have shape (3, H, W), got {im.shape}")
            if im.dtype.kind != "f":
                raise ValueError(
                    f"images[{i}] has dtype {im.dtype}; pass float images in [0, 1] "
                    "(divide uint8 images by 255)"
                )
            if im.size and (float(im.max()) > 1.5 or float(im.min()) < -0.5):
                raise ValueError(
                    f"images[{i}] values span [{float(im.min()):.3g}, {float(im.max()):.3g}]; "
                    "expected [0, 1] (divide uint8 images by 255)"
                )
            sizes.append((int(im.shape[1]), int(im.shape[2])))
        d = self.config.size_divisible
        hp = -(-max(h for h, _ in sizes) // d) * d
        wp = -(-max(w for _, w in sizes) // d) * d
        dtype = self._dtype()
        batch = xp.zeros((len(images), 3, hp, wp), dtype=dtype)
        mean = xp.asarray(self.config.image_mean, dtype=dtype).reshape(3, 1, 1)
        std = xp.asarray(self.config.image_std, dtype=dtype).reshape(3, 1, 1)
        for i, (im, (h, w)) in enumerate(zip(images, sizes)):
            batch[i, :, :h, :w] = (im.astype(dtype) - mean) / std
        return batch, sizes

    def _dtype(self):
        """The parameters' dtype (float32, or float64 after ``astype`` for gradchecks)."""
        return self.backbone.body.conv1.weight.data.dtype

    def _check_targets(self, targets, image_sizes):
        if targets is None or len(targets) != len(image_sizes):
            raise ValueError(
                f"training needs one target dict per image ({len(image_sizes)}), got "
                f"{None if targets is None else len(targets)}; use predict() for inference"
            )
        k = self.config.num_classes
        out = []
        for i, (t, (h, w)) in enumerate(zip(targets, image_sizes)):
            missing = {"boxes", "labels", "masks"} - set(t)
            if missing:
                raise ValueError(f"targets[{i}] lacks {sorted(missing)}")
            xp = get_xp(t["boxes"])
            boxes = xp.asarray(t["boxes"], dtype=self._dtype()).reshape(-1, 4)
            labels = xp.asarray(t["labels"])
            masks = xp.asarray(t["masks"])
            g = boxes.shape[0]
            if labels.shape != (g,) or labels.dtype.kind not in "iu":
                raise ValueError(f"targets[{i}]['labels'] must be ({g},) integers")
            if g and (int(labels.min()) < 1 or int(labels.max()) > k):
                raise ValueError(
                    f"targets[{i}]['labels'] must be in 1..{k} (0 is background), got "
                    f"{int(labels.min())}..{int(labels.max())}"
                )
            if masks.shape != (g, h, w):
                raise ValueError(
                    f"targets[{i}]['masks'] must have shape ({g}, {h}, {w}), got {masks.shape}"
                )
            if g and bool(xp.any((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))):
                raise ValueError(f"targets[{i}]['boxes'] has boxes with x2 <= x1 or y2 <= y1")
            out.append({"boxes": boxes, "labels": labels.astype(np.int64), "masks": masks})
        return out


def _accumulate(feat_grads: list, level_grads: dict) -> None:
    for i, name in enumerate(["p2", "p3", "p4", "p5"]):
        g = level_grads.get(name)
        if g is not None:
            feat_grads[i] = g if feat_grads[i] is None else feat_grads[i] + g
