"""Mask R-CNN: the stages put together, with a backward that a reader can follow.

Forward (training), in the order the data flows::

    images ─ transform (normalise, resize, pad to /32) ─ backbone (ResNet + FPN) ─ {p2..p6}
    {p2..p6} ─ RPN ─ proposals (no gradient)             + loss_objectness, loss_rpn_box_reg
    {p2..p5} + proposals + targets ─ RoI heads:
        match (IoU 0.5), sample 512 RoIs/image at 25% positives
        RoIAlign 7x7 ─ box head ─ class logits, box deltas  + loss_classifier, loss_box_reg
        positive RoIs ─ RoIAlign 14x14 ─ mask head ─ K masks + loss_mask (GT class channel only)

``backward()`` walks the same path in reverse: RoI heads (mask branch, then box branch) →
gradients of P2..P5; RPN head → gradients of P2..P6; the two are summed per level and sent
through FPN and ResNet. The total loss is the plain sum of the five.

``predict(images)`` runs the inference path: RPN proposals (test top-n) → RoI heads (box head,
per-class NMS, mask head on the final boxes) → boxes mapped back to each image as given (when
the transform resized it) and masks pasted into it at its own resolution.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .backbone import LEVEL_STRIDES, BackboneConfig, ResNetConfig, ResNetFPN
from .backend import deferred_checks, device_of, to_host
from .config_checks import ConfigError, Rule, check_fields, from_mapping, positive_numbers
from .nn.module import Module
from .nn.utils import add_named_grads, as_generator
from .roi_heads import RoIHeads, RoIHeadsConfig
from .rpn import RPN, RPNConfig
from .transform import check_size_settings, check_targets, prepare_inputs, to_original_size

# Parameter-name prefixes of the RoI heads in checkpoints written before ``RoIHeads`` existed.
_LEGACY_HEAD_PREFIXES = ("box_head.", "box_predictor.", "mask_head.", "mask_predictor.")
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MODEL_RULES = {
    "num_classes": Rule(lambda k: k >= 1, "must be >= 1 (object classes, no background)"),
    "image_mean": Rule(lambda v: len(v) == 3, "must hold 3 numbers (R, G, B)"),
    "image_std": positive_numbers(3),
    "size_divisible": Rule(lambda v: v >= 32 and v % 32 == 0, "must be a multiple of 32 (P5)"),
    "num_keypoints": Rule(lambda k: k >= 0, "must be >= 0 (keypoints per object; 0: none)"),
}


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
    # Resize rule of transform.py: shorter side to min_size (one drawn per training image when
    # several), longer side at most max_size; both None (the default) keeps the native size.
    min_size: int | tuple[int, ...] | None = None
    max_size: int | None = None
    # K > 0 adds the keypoint branch (human pose, keypoints.py): targets then carry
    # "keypoints" (G, K, 3) and predictions "keypoints" (D, K, 3) and "keypoints_scores" (D, K)
    num_keypoints: int = 0

    def __post_init__(self):
        check_fields(self, _MODEL_RULES)
        self.min_size = check_size_settings(self.min_size, self.max_size)
        levels = list(LEVEL_STRIDES)
        ratios = self.rpn.aspect_ratios
        for key, value in (("anchor_sizes", self.rpn.anchor_sizes), ("aspect_ratios", ratios)):
            nested = key == "anchor_sizes" or any(isinstance(r, tuple) for r in value)
            if nested and len(value) != len(levels):
                raise ConfigError(
                    f"rpn.{key}",
                    f"must have {len(levels)} entries, one per pyramid level {levels}, got "
                    f"{len(value)}",
                )

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
                # 64 RoIs per image (at most 16 positives) for the box branch. The mask head,
                # the costliest part of a step, trains on at most 4 positives per image and
                # works at half the paper's resolution, fitting the 128x128 images: 7x7
                # RoIAlign features, 14x14 masks (the paper: 14x14 and 28x28). Measured the
                # same day, the 2-rank demo trained in 2.6 min instead of 3.3 at full
                # resolution, at a higher held-out segm AP (0.818 against 0.809, mean of three
                # seeds; docs/training.md, "A coarser mask head").
                batch_size_per_image=64,
                mask_positives_per_image=4,
                mask_pool_size=7,
                mask_size=14,
                representation_size=256,
                mask_channels=64,
                detections_per_img=20,
            ),
        )

    @classmethod
    def resnet50_fpn(cls, num_classes: int = 90) -> MaskRCNNConfig:
        """torchvision's ``maskrcnn_resnet50_fpn`` (v1), the model its published COCO weights
        fit once converted (``mrcnn-edu convert torchvision``, docs/weights.md).

        ResNet-50 with FrozenBatchNorm, stem and res2 frozen (trainable_layers=3), FPN 256,
        sigmoid RPN objectness, RPN top-n 2000/2000 (train) and 1000/1000 (test) before/after
        NMS, box score 0.05, NMS 0.5, 100 detections, ImageNet mean/std, images resized to a
        shorter side of 800 and a longer side of at most 1333, masks pasted as torchvision
        does (``mask_paste="torchvision"``): its detections, box for box
        (tests/test_parity_torchvision.py). ``num_classes`` counts object classes:
        torchvision's ``num_classes=91`` includes the background, so its COCO model is
        ``num_classes=90`` here (labels are COCO category ids 1..90)."""
        return cls(
            num_classes=num_classes,
            backbone=BackboneConfig(
                resnet=ResNetConfig(depth=50, norm="frozen_bn", frozen_stages=2),
                fpn_channels=256,
            ),
            rpn=RPNConfig(
                objectness_loss="sigmoid",
                pre_nms_top_n_train=2000,
                pre_nms_top_n_test=1000,
                post_nms_top_n_train=2000,
                post_nms_top_n_test=1000,
                nms_thresh=0.7,
            ),
            roi_heads=RoIHeadsConfig(
                score_thresh=0.05,
                nms_thresh=0.5,
                detections_per_img=100,
                mask_paste="torchvision",
            ),
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            min_size=800,
            max_size=1333,
        )

    @classmethod
    def small_pose(cls, num_keypoints: int, num_classes: int = 1) -> MaskRCNNConfig:
        """The CPU preset for human pose (``demo --pose``): ``small(num_classes)`` plus a
        keypoint branch of ``num_keypoints`` heatmaps behind 4 conv3x3 of 64 channels
        (torchvision's has 8 of 512) on 14x14 RoIs, 56x56 heatmaps; the mask branch stays."""
        base = cls.small(num_classes)
        heads = dataclasses.replace(
            base.roi_heads,
            keypoint_channels=64,
            keypoint_num_convs=4,
            # the mask branch as the pose demo was measured with (README): every positive,
            # 14x14 RoIs, 28x28 masks; the shapes demo's cheaper mask head was not tried here
            mask_positives_per_image=None,
            mask_pool_size=14,
            mask_size=28,
        )
        return dataclasses.replace(base, roi_heads=heads, num_keypoints=num_keypoints)

    @classmethod
    def keypointrcnn_resnet50_fpn(cls, num_keypoints: int = 17, num_classes: int = 1):
        """torchvision's ``keypointrcnn_resnet50_fpn``: ``resnet50_fpn`` without the mask
        branch, with a keypoint branch of 8 conv3x3 of 512 channels on 14x14 RoIs (sampling
        ratio 2), 56x56 heatmaps, and training sizes 640..800 (inference 800, at most 1333).
        ``num_classes=1`` is torchvision's ``num_classes=2`` (person and background); 17 are
        COCO's person keypoints. Its weights convert with ``convert.from_torchvision``."""
        base = cls.resnet50_fpn(num_classes)
        return dataclasses.replace(
            base,
            roi_heads=dataclasses.replace(base.roi_heads, mask_branch=False),
            min_size=(640, 672, 704, 736, 768, 800),
            num_keypoints=num_keypoints,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MaskRCNNConfig:
        """Build from a (JSON) dict, every value checked; unknown keys raise a ValueError
        listing the valid ones, a bad value one naming its key (``rpn.nms_thresh``)."""
        return from_mapping(cls, d)


class MaskRCNN(Module):
    """Mask R-CNN. ``forward(images, targets) -> losses``, ``backward()``, ``predict(images)``.

    images: list of (3, H, W) float arrays with values in [0, 1] (sizes may differ).
    targets: list of dicts with ``"boxes"`` (G, 4) float x1y1x2y2 pixels, ``"labels"`` (G,) int
    in 1..K, ``"masks"`` (G, H, W) uint8/bool, and with ``config.num_keypoints`` = K > 0
    ``"keypoints"`` (G, K, 3) rows (x, y, v), COCO's visibility v in {0, 1, 2} (keypoints.py).
    An image may have G = 0.

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
            num_keypoints=cfg.num_keypoints,
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
        loss_box_reg, loss_mask}`` as floats (and ``loss_keypoint`` with the keypoint branch;
        no ``loss_mask`` without the mask branch). ``proposals`` (list of (R_i, 4)) replaces the
        RPN's proposals when given (the whole-model gradcheck holds them fixed).

        Host (NumPy) images and targets are moved to the model's device. There the five loss
        scalars and the value checks of the step (``backend.raise_if``) reach the host in one
        transfer, the step's only explicit sync (docs/gpu_kernels.md)."""
        with deferred_checks() as checks:
            # normalise, resize, pad; the targets checked and resized with their images
            batch, image_sizes, _, targets = self._inputs(images, targets, need_targets=True)
            features = self.backbone(batch)  # {"p2": P2, ..., "p6": P6}
            rpn_proposals, rpn_losses = self.rpn(features, image_sizes, targets, batch.shape[-2:])
            if proposals is None:
                proposals = rpn_proposals
            _, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
            return checks.fetch({**rpn_losses, **roi_losses})

    def backward(self) -> None:
        """Gradients of the sum of the five losses of the last forward, into every ``.grad``.

        Nothing is returned: the inputs are images, and training a detector never needs their
        gradient (``backbone.backward(..., need_input_grad=True)`` computes it on request).
        On a device the value checks of the backward ops are read in one transfer at the end."""
        with deferred_checks():
            feature_grads = self.roi_heads.backward()  # 1. mask and box branches -> P2..P5
            add_named_grads(feature_grads, self.rpn.backward())  # 2. RPN head -> P2..P6
            self.backbone.backward(feature_grads)  # 3. FPN -> ResNet

    def predict(self, images, mask_threshold: float | None = 0.5) -> list[dict]:
        """Detections for each image: ``{"boxes" (D, 4), "labels" (D,) in 1..K, "scores" (D,),
        "masks" (D, H, W) uint8}`` (no masks without the mask branch; with keypoints,
        ``"keypoints"`` (D, K, 3) rows (x, y, 1) and ``"keypoints_scores"`` (D, K)), best
        first, at most ``detections_per_img``
        (``mask_threshold=None`` keeps the pasted mask probabilities instead)."""
        was_training = self.training
        self.eval()
        try:
            with deferred_checks() as checks:  # on a device: the value checks read at once
                batch, image_sizes, original_sizes, _ = self._inputs(images)
                features = self.backbone(batch)
                proposals, _ = self.rpn(features, image_sizes, None, batch.shape[-2:])
                detections, _ = self.roi_heads(features, proposals, image_sizes)
                checks.fetch({})
            # boxes back to each image as given, masks pasted at its resolution
            detections = to_original_size(
                detections,
                image_sizes,
                original_sizes,
                mask_threshold,
                self.config.roi_heads.mask_paste,
            )
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
        """Normalise each image with the ImageNet mean/std, resize it by the config's
        ``min_size``/``max_size`` rule (none by default) and pad the batch (bottom/right, with
        zeros after normalisation) to a multiple of ``size_divisible`` (``transform.py``).

        Returns ``(batch (N, 3, Hp, Wp), image_sizes [(h, w), ...])``."""
        batch, image_sizes, _, _ = self._inputs(images)
        return batch, image_sizes

    def _inputs(self, images, targets=None, need_targets: bool = False):
        """``transform.prepare_inputs`` for this model: its config, dtype, mode and generator
        (scale jitter draws one ``min_size`` per image in training)."""
        return prepare_inputs(
            images,
            self.config,
            self._dtype(),
            targets,
            need_targets,
            self.training,
            self.rng,
            device=self.device,
        )

    @property
    def device(self) -> str:
        """Where the parameters live: ``"cpu"``, ``"cuda:N"``... (``to(device)`` moves them)."""
        return device_of(self.backbone.body.conv1.weight.data)

    def _dtype(self):
        """The parameters' dtype (float32, or float64 after ``astype`` for gradchecks)."""
        return self.backbone.body.conv1.weight.data.dtype

    def _check_targets(self, targets, image_sizes):
        """The targets checked against images of ``image_sizes`` (``transform.check_targets``)."""
        cfg = self.config
        return check_targets(
            targets, image_sizes, cfg.num_classes, self._dtype(), cfg.num_keypoints
        )
