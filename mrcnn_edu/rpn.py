"""The Region Proposal Network (Faster R-CNN Sec. 3.1, with FPN levels as in Lin et al. 2017).

A small fully convolutional head slides over every FPN level and, for each of the A anchors at
every position, predicts an objectness score and four box deltas. Training matches anchors to
ground truth (IoU 0.7 / 0.3), samples 256 anchors per image, and applies

    L = L_cls(objectness of the sampled anchors) + L_reg(deltas of the sampled positives),

both normalised by the number of sampled anchors. Proposals are the anchors moved by the deltas,
filtered (top-k per level, clip, drop tiny boxes, NMS 0.7 per level, top-k) and handed to the
RoI heads *without gradient* (the paper's approximate joint training, Sec. 3.2).

Objectness has two equivalent forms (see docs/anchors_rpn.md):
- ``"softmax"`` (the paper, the default): 2 logits per anchor ``(z_bg, z_obj)``, 2-way softmax
  cross-entropy. Head output channels are laid out ``(A, 2)``: channel ``2a + c``.
- ``"sigmoid"`` (torchvision / Detectron2): 1 logit per anchor, binary cross-entropy.
Because ``softmax([z_bg, z_obj])[1] = sigmoid(z_obj - z_bg)``, the softmax head is the sigmoid
head with an extra, redundant background logit; proposals are ranked by ``z_obj - z_bg``.

Everything else follows torchvision's ``RegionProposalNetwork`` (the rules are written down in
``docs/conventions.md``), so proposals can be compared box for box.

Feature levels come as a dict of named maps (``{"p2": P2, ..., "p6": P6}``, finest first, as the
backbone returns them) or a plain list; ``backward()`` returns their gradients in the same form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .anchors import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES, AnchorGenerator
from .backend import device_of, get_xp
from .boxes import BoxCoder, box_iou, clip_boxes_to_image, remove_small_boxes, validate_boxes
from .config_checks import at_least, between, check_fields, one_of, positive_numbers
from .heads import RPNHead
from .matching import BalancedPositiveNegativeSampler, Matcher
from .nms import batched_nms
from .nn.losses import binary_cross_entropy_with_logits, sigmoid, smooth_l1, softmax_cross_entropy
from .nn.module import Module
from .nn.utils import as_generator, check_finite

__all__ = ["RPN", "RPNConfig", "RPNHead"]  # the head network lives in heads.py

OBJECTNESS_LOSSES = ("softmax", "sigmoid")
_RPN_RULES = {
    "anchor_sizes": positive_numbers(),
    "aspect_ratios": positive_numbers(),
    "objectness_loss": one_of(*OBJECTNESS_LOSSES),
    "fg_iou_thresh": between(0, 1),
    "bg_iou_thresh": between(0, 1),
    "batch_size_per_image": at_least(1),
    "positive_fraction": between(0, 1, low_open=True),
    "pre_nms_top_n_train": at_least(1),
    "pre_nms_top_n_test": at_least(1),
    "post_nms_top_n_train": at_least(1),
    "post_nms_top_n_test": at_least(1),
    "nms_thresh": between(0, 1),
    "score_thresh": between(0, 1),
    "min_size": at_least(0),
    "box_loss_beta": at_least(0),
    "box_coder_weights": positive_numbers(4),
}


@dataclass
class RPNConfig:
    """RPN hyper-parameters; the defaults are the paper's / torchvision's Mask R-CNN values."""

    anchor_sizes: tuple = DEFAULT_SIZES
    aspect_ratios: tuple = DEFAULT_ASPECT_RATIOS
    objectness_loss: str = "softmax"  # "softmax": 2-way CE (paper); "sigmoid": 1-logit BCE
    fg_iou_thresh: float = 0.7  # IoU >= 0.7 with some GT: positive
    bg_iou_thresh: float = 0.3  # IoU < 0.3 with every GT: negative; in between: ignored
    allow_low_quality_matches: bool = True  # each GT's best anchors are positive too
    batch_size_per_image: int = 256  # sampled anchors per image
    positive_fraction: float = 0.5  # at most half of them positive
    pre_nms_top_n_train: int = 2000  # per level, before NMS
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000  # per image, after NMS
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0  # on the object probability (0 keeps everything)
    min_size: float = 1e-3  # proposals narrower or shorter than this are dropped
    box_loss_beta: float = 1.0 / 9  # smooth L1 switch point
    box_coder_weights: tuple = (1.0, 1.0, 1.0, 1.0)

    def __post_init__(self):
        check_fields(self, _RPN_RULES)
        if not self.bg_iou_thresh <= self.fg_iou_thresh:
            raise ValueError(
                "need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1, got "
                f"{self.bg_iou_thresh} and {self.fg_iou_thresh}"
            )

    @property
    def logits_per_anchor(self) -> int:
        return 2 if self.objectness_loss == "softmax" else 1


class RPN(Module):
    """Region Proposal Network: head + anchors + matching + losses + proposal filtering.

    in_channels: channels of every feature level (256 for FPN). config: :class:`RPNConfig`.
    rng: seed or ``numpy.random.Generator`` for the head's initialisation and for anchor
    sampling (``self.sampler.rng``; reseed it to replay a step exactly).
    """

    def __init__(
        self,
        in_channels: int,
        config: RPNConfig | None = None,
        rng=None,
        dtype=np.float32,
        strides: Sequence[int] | None = None,
    ):
        self.config = config = config if config is not None else RPNConfig()
        rng = as_generator(rng)
        self.anchor_generator = AnchorGenerator(config.anchor_sizes, config.aspect_ratios)
        num_anchors = self.anchor_generator.num_anchors_per_location()
        if len(set(num_anchors)) != 1:
            raise ValueError(
                f"a head shared over levels needs the same anchors per position on every level, "
                f"got {num_anchors}"
            )
        self.strides = _check_strides(strides, len(num_anchors))
        self.head = RPNHead(in_channels, num_anchors[0], config.logits_per_anchor, rng, dtype)
        self.box_coder = BoxCoder(config.box_coder_weights)
        self.matcher = Matcher(
            config.fg_iou_thresh, config.bg_iou_thresh, config.allow_low_quality_matches
        )
        self.sampler = BalancedPositiveNegativeSampler(
            config.batch_size_per_image, config.positive_fraction, rng
        )
        self.cache: _RPNCache | None = None

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        features: Mapping | Sequence,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict] | None = None,
        batch_shape: tuple[int, int] | None = None,
    ) -> tuple[list, dict]:
        """Proposals for every image, and the RPN losses when ``targets`` are given.

        features: ``{name: (N, C, H_l, W_l)}`` or a list of them, finest level first.
        image_sizes: N pairs ``(h, w)``, each image's size before padding (proposals are clipped
            to it). targets: optional N dicts with ``"boxes"``: (G_i, 4) in pixels.
        batch_shape: ``(H, W)`` of the padded batch: anchors live on its grid (default: the
            largest image size). With ``strides``, each level must be ``ceil(batch / stride)``.

        Returns ``(proposals, losses)``: N (K_i, 4) arrays, best first, without gradient (their
        object probabilities are in ``self.proposal_scores``), and ``{"loss_objectness",
        "loss_rpn_box_reg"}`` as floats (empty without targets; then :meth:`backward`).
        """
        names, features = _split_levels(features)
        self._check_inputs(features, image_sizes, targets)
        if batch_shape is None:
            batch_shape = (max(int(h) for h, _ in image_sizes), max(int(w) for _, w in image_sizes))
        feature_shapes = [tuple(f.shape[-2:]) for f in features]
        _check_level_sizes(feature_shapes, self.strides, batch_shape, names)
        xp = get_xp(features[0])
        dtype, device = features[0].dtype, device_of(features[0])  # anchors cached per device
        anchors = self.anchor_generator(batch_shape, feature_shapes, dtype, device)

        objectness, deltas = self._run_head(features)
        # (N, A*k, H, W) per level -> (N, sum_l H_l W_l A, k): row order = anchor order
        flat_logits = xp.concatenate(
            [_flatten_level(o, self.head.num_anchors) for o in objectness], 1
        )
        flat_deltas = xp.concatenate([_flatten_level(d, self.head.num_anchors) for d in deltas], 1)

        # proposals carry no gradient: nothing below is differentiated
        num_images = features[0].shape[0]
        proposals = self.box_coder.decode(
            flat_deltas.reshape(-1, 4), xp.tile(anchors, (num_images, 1))
        ).reshape(num_images, -1, 4)
        boxes, self.proposal_scores = self.filter_proposals(
            proposals,
            self.object_logit(flat_logits),  # (N, T) log-odds of "object"
            image_sizes,
            self.anchor_generator.num_anchors_per_level(feature_shapes),
        )
        self.cache = None
        if targets is None:
            return boxes, {}
        labels, regression_targets = self.assign_targets_to_anchors(anchors, targets)
        loss_obj, loss_box, g_logits, g_deltas = self.compute_loss(
            flat_logits, flat_deltas, labels, regression_targets
        )
        self.cache = _RPNCache(
            names,
            _unflatten_levels(g_logits, objectness, self.head.num_anchors),
            _unflatten_levels(g_deltas, deltas, self.head.num_anchors),
        )
        return boxes, {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_box}

    def backward(self, objectness_weight: float = 1.0, box_weight: float = 1.0):
        """Back-propagate ``loss_objectness + loss_rpn_box_reg`` of the last forward (each
        optionally weighted): accumulates the head's ``.grad`` and returns the gradient of every
        feature level, (N, C, H_l, W_l) each, as a dict by level name when the features came as
        a dict, else as a list."""
        if self.cache is None:
            raise RuntimeError("RPN.backward needs a forward with targets first (no losses yet)")
        c = self.cache
        grads = self.head.backward(
            (
                [objectness_weight * g for g in c.grad_objectness],
                [box_weight * g for g in c.grad_deltas],
            )
        )
        return grads if c.names is None else dict(zip(c.names, grads, strict=True))

    def _run_head(self, features) -> tuple[list, list]:
        """The head's objectness and deltas per level. At inference NaN/inf in the features or
        the outputs raise (NonFiniteError): training reports them as NaN losses, but inference
        would drop NaN proposals silently and answer "nothing found" for a broken model."""
        if not self.training:
            check_finite("the feature maps the RPN reads", *features)
        objectness, deltas = self.head(features)
        if not self.training:
            check_finite("the RPN head's objectness and box deltas", *objectness, *deltas)
        return objectness, deltas

    # -- the stages, public so the notebooks can show each one -----------------------------------
    def object_logit(self, flat_logits):
        """(N, T, k) head logits -> (N, T) log-odds of "object": ``z`` (sigmoid) or
        ``z_obj - z_bg`` (softmax; its sigmoid is the softmax probability of class 1)."""
        if self.config.objectness_loss == "softmax":
            return flat_logits[..., 1] - flat_logits[..., 0]
        return flat_logits[..., 0]

    def assign_targets_to_anchors(self, anchors, targets: Sequence[dict]) -> tuple[list, list]:
        """Match anchors (T, 4) to each image's GT boxes.

        Returns ``(labels, regression_targets)``: per image a (T,) int array (1 positive,
        0 negative, -1 ignored) and a (T, 4) array of encoded GT boxes (rows of non-positives
        are 0 and unused).
        """
        xp = get_xp(anchors)
        labels, regression_targets = [], []
        for target in targets:
            gt_boxes = _gt_boxes(target, xp, anchors.dtype)
            matched_idxs = self.matcher(box_iou(gt_boxes, anchors))  # all -1 without GT
            # 1 positive, -1 ignored, 0 negative (xp.where: no mask-sized result, no GPU sync)
            labels_per_image = xp.where(
                matched_idxs >= 0,
                xp.int64(1),
                xp.where(matched_idxs == Matcher.BETWEEN_THRESHOLDS, xp.int64(-1), xp.int64(0)),
            )
            targets_per_image = xp.zeros_like(anchors)
            positive = xp.flatnonzero(matched_idxs >= 0)
            if positive.size:
                targets_per_image[positive] = self.box_coder.encode(
                    gt_boxes[matched_idxs[positive]], anchors[positive]
                )
            labels.append(labels_per_image)
            regression_targets.append(targets_per_image)
        return labels, regression_targets

    def compute_loss(self, flat_logits, flat_deltas, labels, regression_targets):
        """Sample anchors and evaluate both losses and their gradients.

        flat_logits: (N, T, k); flat_deltas: (N, T, 4); labels / regression_targets: per image.
        Returns ``(loss_objectness, loss_box, grad_logits (N, T, k), grad_deltas (N, T, 4))``.

        Both losses are normalised by S, the number of anchors sampled in the whole batch
        (torchvision): objectness is the mean CE over the S anchors, the box loss the smooth-L1
        sum over the sampled positives divided by S.
        """
        xp = get_xp(flat_logits)
        pos_masks, neg_masks = self.sampler(labels)
        pos = xp.flatnonzero(xp.concatenate(pos_masks))
        neg = xp.flatnonzero(xp.concatenate(neg_masks))
        sampled = xp.concatenate([pos, neg])
        num_sampled = int(sampled.size)

        k = flat_logits.shape[-1]
        logits = flat_logits.reshape(-1, k)
        deltas = flat_deltas.reshape(-1, 4)
        sampled_labels = xp.concatenate(labels)[sampled]
        grad_logits = xp.zeros_like(logits)
        grad_deltas = xp.zeros_like(deltas)

        if self.config.objectness_loss == "softmax":
            loss_obj, g = softmax_cross_entropy(logits[sampled], sampled_labels)
        else:
            loss_obj, g = binary_cross_entropy_with_logits(logits[sampled, 0], sampled_labels)
            g = g[:, None]
        grad_logits[sampled] = g

        loss_box, g = smooth_l1(
            deltas[pos],
            xp.concatenate(regression_targets)[pos],
            beta=self.config.box_loss_beta,
            reduction="sum",
        )
        denom = max(num_sampled, 1)
        grad_deltas[pos] = g / denom
        return (
            loss_obj,
            loss_box / denom,
            grad_logits.reshape(flat_logits.shape),
            grad_deltas.reshape(flat_deltas.shape),
        )

    def filter_proposals(self, proposals, object_logit, image_sizes, num_anchors_per_level):
        """torchvision's ``filter_proposals``: decoded boxes (N, T, 4) and logits (N, T) ->
        per image (K_i, 4) boxes and (K_i,) object probabilities, best first.

        Per image: the top ``pre_nms_top_n`` logits of every level, sigmoid, clip to the image,
        drop boxes smaller than ``min_size``, drop probabilities below ``score_thresh``, NMS at
        ``nms_thresh`` within each level, keep the ``post_nms_top_n`` best. Equal logits are
        taken in anchor order (a stable sort).
        """
        xp = get_xp(proposals)
        cfg = self.config
        pre_n = cfg.pre_nms_top_n_train if self.training else cfg.pre_nms_top_n_test
        post_n = cfg.post_nms_top_n_train if self.training else cfg.post_nms_top_n_test
        levels = xp.concatenate(
            [xp.full(n, i, dtype=xp.int64) for i, n in enumerate(num_anchors_per_level)]
        )
        starts = np.cumsum([0, *num_anchors_per_level])

        final_boxes, final_scores = [], []
        for boxes, logit, image_size in zip(proposals, object_logit, image_sizes, strict=True):
            top = []
            for lo, hi in zip(starts[:-1], starts[1:]):
                order = xp.argsort(-logit[lo:hi], kind="stable")[:pre_n]
                top.append(int(lo) + order)
            top = xp.concatenate(top)
            boxes = clip_boxes_to_image(boxes[top], (int(image_size[0]), int(image_size[1])))
            scores, lvl = sigmoid(logit[top]), levels[top]

            keep = remove_small_boxes(boxes, cfg.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = xp.flatnonzero(scores >= cfg.score_thresh)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]

            keep = batched_nms(boxes, scores, lvl, cfg.nms_thresh)[:post_n]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    # -- helpers ---------------------------------------------------------------------------------
    def _check_inputs(self, features, image_sizes, targets) -> None:
        if not features:
            raise ValueError("features is empty; pass a list of (N, C, H, W) arrays, one per level")
        n, c = features[0].shape[:2]
        num_levels = len(self.anchor_generator.sizes)
        if len(features) != num_levels:
            raise ValueError(
                f"got {len(features)} feature levels but the anchor generator has {num_levels} "
                "(one anchor-size tuple per level); set RPNConfig.anchor_sizes accordingly"
            )
        for i, f in enumerate(features):
            if f.ndim != 4 or f.shape[:2] != (n, c):
                raise ValueError(
                    f"features[{i}] has shape {tuple(f.shape)}; every level must be (N, C, H, W) "
                    f"with the same N={n} and C={c}"
                )
        if c != self.head.conv.weight.shape[1]:
            raise ValueError(
                f"features have {c} channels, the RPN head expects {self.head.conv.weight.shape[1]}"
            )
        if len(image_sizes) != n:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries for a batch of {n}")
        if targets is not None:
            if len(targets) != n:
                raise ValueError(f"targets has {len(targets)} entries for a batch of {n}")
            xp = get_xp(features[0])
            for i, t in enumerate(targets):
                if "boxes" not in t:
                    raise ValueError(f"targets[{i}] has no 'boxes' entry (a (G, 4) array)")
                validate_boxes(
                    _gt_boxes(t, xp, features[0].dtype),
                    f"targets[{i}]['boxes']",
                    check_order=True,
                    finite=True,
                )


class _RPNCache(NamedTuple):
    """The loss gradients of the last forward, per level, waiting for ``backward()``."""

    names: tuple | None  # the levels' names when the features came as a dict
    grad_objectness: list  # (N, A*k, H_l, W_l) per level
    grad_deltas: list  # (N, A*4, H_l, W_l) per level


def _split_levels(features) -> tuple[tuple | None, list]:
    """``{name: map}`` -> (names, maps); a list or tuple -> (None, maps)."""
    if isinstance(features, Mapping):
        return tuple(features), list(features.values())
    return None, list(features)


def _check_strides(strides, num_levels: int) -> tuple[int, ...] | None:
    if strides is None:
        return None
    strides = tuple(strides)
    if len(strides) != num_levels or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in strides
    ):
        raise ValueError(
            f"strides must be {num_levels} positive ints, one per anchor level, got {strides!r}"
        )
    return tuple(int(s) for s in strides)


def _check_level_sizes(feature_shapes, strides, batch_shape, names) -> None:
    """Each level of a batch padded to ``batch_shape`` measures ``ceil(batch / stride)``: a
    level given in the wrong order or from another backbone fails here, not as bad anchors.

    The anchors themselves are spaced by ``batch // level size`` (torchvision's rule, see
    ``AnchorGenerator.strides``), which equals the stride except on P6 when the padded size is
    an odd multiple of 32 (800 rows over 13 cells: a step of 61)."""
    if strides is None:
        return
    for i, (shape, stride) in enumerate(zip(feature_shapes, strides, strict=True)):
        want = tuple(-(-int(b) // stride) for b in batch_shape)
        if tuple(shape) != want:
            name = names[i] if names is not None else f"level {i}"
            raise ValueError(
                f"feature map {name!r} is {tuple(shape)}, but a {tuple(batch_shape)} batch at "
                f"the declared stride {stride} gives {want}; pass the levels finest first with "
                "their batch_shape"
            )


def _gt_boxes(target: dict, xp, dtype):
    """``target["boxes"]`` as an xp array of ``dtype``; an empty list becomes (0, 4)."""
    boxes = xp.asarray(target["boxes"], dtype=dtype)
    return boxes.reshape(0, 4) if boxes.size == 0 else boxes


def _flatten_level(x, num_anchors: int):
    """(N, A*k, H, W) -> (N, H*W*A, k): location-major, then anchor -- the anchors' order."""
    n, ak, h, w = x.shape
    k = ak // num_anchors
    return x.reshape(n, num_anchors, k, h, w).transpose(0, 3, 4, 1, 2).reshape(n, -1, k)


def _unflatten_levels(flat, like_levels: list, num_anchors: int) -> list:
    """Inverse of concatenating ``_flatten_level`` outputs: (N, T, k) -> list of (N, A*k, H, W)."""
    out, start = [], 0
    for like in like_levels:
        n, ak, h, w = like.shape
        k = ak // num_anchors
        count = h * w * num_anchors
        part = flat[:, start : start + count].reshape(n, h, w, num_anchors, k)
        out.append(part.transpose(0, 3, 4, 1, 2).reshape(n, ak, h, w))
        start += count
    return out
