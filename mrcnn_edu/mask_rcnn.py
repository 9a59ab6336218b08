"""Mask R-CNN: the stages put together, with a backward that a reader can follow.

Forward (training), in the order the data flows::

    images ─ transform (normalise, pad to /32) ─ backbone (ResNet + FPN) ─ {p2..p6}
    {p2..p6} ─ RPN ─ proposals (no gradient)             + loss_objectness, loss_rpn_box_reg
    {p2..p5} + proposals + targets ─ RoI heads:
        match (IoU 0.5), sample 512 RoIs/image at 25% positives
        RoIAlign 7x7 ─ box head ─ class logits, box deltas  + loss_classifier, loss_box_reg
        positive RoIs ─ RoIAlign 14x14 ─ mask head ─ K masks + loss_mask (GT class channel only)

``backward()`` walks the same path in reverse: RoI heads (mask branch, then box branch) →
gradients of P2..P5; RPN head → gradients of P2..P6; the two are summed per level and sent
through FPN and ResNet. The total loss is the plain sum of the five.

``predict(images)`` runs the inference path: RPN proposals (test top-n) → RoI heads (box head,
per-class NMS, mask head on the final boxes) → masks pasted into each image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .backbone import BackboneConfig, ResNetConfig, ResNetFPN
from .backend import get_xp, to_host
from .nn.module import Module
from .nn.utils import add_named_grads, as_generator
from .postprocess import paste_masks_in_image
from .roi_heads import RoIHeads, RoIHeadsConfig
from .rpn import RPN, RPNConfig

# Parameter-name prefixes of the RoI heads in checkpoints written before ``RoIHeads`` existed.
_LEGACY_HEAD_PREFIXES = ("box_head.", "box_predictor.", "mask_head.", "mask_predictor.")
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        rng = as_generator(rng)
        self.backbone = ResNetFPN(cfg.backbone, rng)
        strides = self.backbone.strides  # {"p2": 4, ..., "p6": 64}, declared by the backbone
        channels = self.backbone.out_channels
        self.rpn = RPN(channels, cfg.rpn, rng, strides=tuple(strides.values()))
        roi_levels = self.backbone.roi_levels
        self.roi_heads = RoIHeads(
            channels,
            cfg.num_classes,
            cfg.roi_heads,
            roi_levels,
            [strides[name] for name in roi_levels],
            rng,
        )
        self._rng = rng

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
        self.roi_heads.fg_bg_sampler.rng = generator

    def forward(self, images, targets, proposals=None) -> dict:
        """Losses for a batch: ``{loss_objectness, loss_rpn_box_reg, loss_classifier,
        loss_box_reg, loss_mask}`` as floats. ``proposals`` (list of (R_i, 4)) replaces the
        RPN's proposals when given (the whole-model gradcheck holds them fixed)."""
        batch, image_sizes = self.transform(images)
        targets = self._check_targets(targets, image_sizes)
        features = self.backbone(batch)  # {"p2": P2, ..., "p6": P6}
        rpn_proposals, rpn_losses = self.rpn(features, image_sizes, targets, batch.shape[-2:])
        if proposals is None:
            proposals = rpn_proposals
        _, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
        return {**rpn_losses, **roi_losses}

    def backward(self) -> None:
        """Gradients of the sum of the five losses of the last forward, into every ``.grad``.

        Nothing is returned: the inputs are images, and training a detector never needs their
        gradient (``backbone.backward(..., need_input_grad=True)`` computes it on request)."""
        feature_grads = self.roi_heads.backward()  # 1. mask and box branches -> P2..P5
        add_named_grads(feature_grads, self.rpn.backward())  # 2. RPN head -> P2..P6
        self.backbone.backward(feature_grads)  # 3. FPN -> ResNet

    def predict(self, images, mask_threshold: float | None = 0.5) -> list[dict]:
        """Detections for each image: ``{"boxes" (D, 4), "labels" (D,) in 1..K, "scores" (D,),
        "masks" (D, H, W) uint8}``, best first, at most ``detections_per_img``
        (``mask_threshold=None`` keeps the pasted mask probabilities instead)."""
        was_training = self.training
        self.eval()
        try:
            batch, image_sizes = self.transform(images)
            features = self.backbone(batch)
            proposals, _ = self.rpn(features, image_sizes, None, batch.shape[-2:])
            detections, _ = self.roi_heads(features, proposals, image_sizes)
            for det, size in zip(detections, image_sizes):
                probs = det.pop("mask_probs")
                det["masks"] = paste_masks_in_image(probs, det["boxes"], size, mask_threshold)
            return [to_host(det) for det in detections]
        finally:
            self.train(was_training)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """As ``Module.load_state_dict``; also reads checkpoints written before the RoI heads had
        a module of their own, whose head parameters lack the ``roi_heads.`` prefix."""
        super().load_state_dict(
            {
                ("roi_heads." + k if k.startswith(_LEGACY_HEAD_PREFIXES) else k): v
                for k, v in state.items()
            },
            strict,
        )

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
