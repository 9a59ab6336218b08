"""The head networks: the small nets that read the features and predict.

    RPN:  (N, C, H_l, W_l) per level -> conv3x3, ReLU -> objectness (N, A*k, H_l, W_l),
          box deltas (N, A*4, H_l, W_l)                      (the same weights on every level)
    box:  (R, C, 7, 7) -> fc6, ReLU -> fc7, ReLU -> cls_score (R, K+1), bbox_pred (R, 4(K+1))
    mask: (R, C, 14, 14) -> 4 x (conv3x3, ReLU) -> deconv 2x2/2, ReLU -> conv1x1 -> (R, K, 28, 28)
    keypoint: (R, C, 14, 14) -> 8 x (conv3x3 512, ReLU) -> deconv 4x4/2 -> bilinear 2x
          -> (R, K, 56, 56) heatmap logits, one per keypoint (only with ``num_keypoints > 0``)

The stages that own them -- anchors, sampling, targets, losses and the order in which it all
runs -- are ``rpn.py`` and ``roi_heads.py``. Parameter names follow torchvision's
(``rpn.head.conv``, ``box_head.fc6``, ``box_predictor.cls_score``, ``mask_head.mask_fcn1``,
``mask_predictor.conv5_mask``, ``keypoint_head.conv_fcn1``,
``keypoint_predictor.kps_score_lowres`` ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .nn import functional as F
from .nn import layers as L
from .nn.layers import Conv2d
from .nn.module import Module
from .nn.utils import add_param_grads, as_generator
from .resample import upsample_bilinear_backward, upsample_bilinear_forward


class _HeadLevelCache(NamedTuple):
    """What the head's backward needs from one level of its forward."""

    conv: tuple  # the 3x3 conv's cache
    relu_mask: object  # where the 3x3 conv's output was positive
    cls_logits: tuple  # the objectness 1x1 conv's cache
    bbox_pred: tuple  # the box-delta 1x1 conv's cache


class RPNHead(Module):
    """3x3 conv + ReLU, then sibling 1x1 convs for objectness and box deltas (Faster R-CNN Fig. 3).

    The same weights slide over every FPN level (sharing is what makes the head's outputs
    comparable across levels), so ``forward`` takes a list of levels and ``backward`` sums each
    parameter's gradient over them.

    in_channels: C of every level. num_anchors: A per position. logits_per_anchor: 2 for the
    softmax objectness, 1 for the sigmoid one. Init: normal(std 0.01), zero bias (torchvision).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        logits_per_anchor: int = 2,
        rng=None,
        dtype=np.float32,
    ):
        if logits_per_anchor not in (1, 2):
            raise ValueError(f"logits_per_anchor must be 1 or 2, got {logits_per_anchor}")
        rng = as_generator(rng)
        self.num_anchors = int(num_anchors)
        self.logits_per_anchor = int(logits_per_anchor)
        self.conv = Conv2d(in_channels, in_channels, 3, padding=1, rng=rng, dtype=dtype)
        self.cls_logits = Conv2d(
            in_channels, num_anchors * logits_per_anchor, 1, rng=rng, dtype=dtype
        )
        self.bbox_pred = Conv2d(in_channels, num_anchors * 4, 1, rng=rng, dtype=dtype)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            layer.weight.data[...] = rng.normal(0.0, 0.01, size=layer.weight.shape)
            layer.bias.data[...] = 0
        self.cache: list | None = None

    def forward(self, features: Sequence) -> tuple[list, list]:
        """features: list of (N, C, H_l, W_l). Returns ``(objectness, deltas)``: lists of
        (N, A*logits_per_anchor, H_l, W_l) and (N, A*4, H_l, W_l)."""
        objectness, deltas = [], []
        if not self.training:  # eval mode: no caches, the ReLU in place (nn/inference.py)
            self.cache = None
            for x in features:
                t = self.conv.infer(x, relu=True)
                objectness.append(self.cls_logits.infer(t))
                deltas.append(self.bbox_pred.infer(t))
            return objectness, deltas
        self.cache = []
        for x in features:
            t, conv_cache = F.conv2d_forward(x, self.conv.weight.data, self.conv.bias.data, 1, 1)
            t, relu_mask = F.relu_forward(t)
            logits, cls_cache = F.conv2d_forward(
                t, self.cls_logits.weight.data, self.cls_logits.bias.data
            )
            box, box_cache = F.conv2d_forward(
                t, self.bbox_pred.weight.data, self.bbox_pred.bias.data
            )
            objectness.append(logits)
            deltas.append(box)
            self.cache.append(_HeadLevelCache(conv_cache, relu_mask, cls_cache, box_cache))
        return objectness, deltas

    def backward(self, grad_out: tuple[Sequence, Sequence]) -> list:
        """``grad_out``: the gradients of ``(objectness, deltas)``, two lists as forward returned
        them -> list of (N, C, H_l, W_l) feature gradients.

        Parameter gradients are accumulated (summed over levels) into ``.grad``.
        """
        grad_objectness, grad_deltas = grad_out
        grad_features = []
        for cache, g_obj, g_box in zip(
            self.forward_cache(), grad_objectness, grad_deltas, strict=True
        ):
            # the ReLU output feeds both 1x1 convs, so its gradient is the sum of theirs
            g_t, dw, db = F.conv2d_backward(g_obj, cache.cls_logits)
            add_param_grads(self.cls_logits, dw, db)
            g_t2, dw, db = F.conv2d_backward(g_box, cache.bbox_pred)
            add_param_grads(self.bbox_pred, dw, db)
            g_x, dw, db = F.conv2d_backward(
                F.relu_backward(g_t + g_t2, cache.relu_mask), cache.conv
            )
            add_param_grads(self.conv, dw, db)
            grad_features.append(g_x)
        return grad_features


class TwoMLPHead(Module):
    """Flatten the pooled features and apply two fully connected layers with ReLU."""

    def __init__(self, in_features: int, representation_size: int = 1024, rng=None):
        rng = as_generator(rng)
        self.flatten = L.Flatten()
        self.fc6 = L.Linear(in_features, representation_size, rng=rng)
        self.relu6 = L.ReLU()
        self.fc7 = L.Linear(representation_size, representation_size, rng=rng)
        self.relu7 = L.ReLU()

    def forward(self, x):
        return self.relu7(self.fc7(self.relu6(self.fc6(self.flatten(x)))))

    def backward(self, grad_out):
        g = self.fc7.backward(self.relu7.backward(grad_out))
        return self.flatten.backward(self.fc6.backward(self.relu6.backward(g)))


class FastRCNNPredictor(Module):
    """Class logits (R, K+1) and per-class box deltas (R, 4(K+1)) from the box features."""

    def __init__(self, in_features: int, num_classes: int, rng=None):
        rng = as_generator(rng)
        self.cls_score = L.Linear(in_features, num_classes, rng=rng)
        self.bbox_pred = L.Linear(in_features, num_classes * 4, rng=rng)
        # Detectron's initialisation: small normal weights, zero biases.
        self.cls_score.weight.data[...] = rng.normal(0, 0.01, self.cls_score.weight.shape)
        self.bbox_pred.weight.data[...] = rng.normal(0, 0.001, self.bbox_pred.weight.shape)
        self.cls_score.bias.data[...] = 0
        self.bbox_pred.bias.data[...] = 0

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)

    def backward(self, grad_out):
        """``grad_out``: the gradients of ``(class logits, box deltas)``, as forward returned
        them. Both layers read the same features, so their input gradients add."""
        grad_logits, grad_deltas = grad_out
        return self.cls_score.backward(grad_logits) + self.bbox_pred.backward(grad_deltas)


class _ConvReLUStack(Module):
    """``len(widths)`` conv3x3 + ReLU layers, named ``{prefix}1``, ``{prefix}2`` ... (He-normal
    initialisation with fan-out and zero bias, as torchvision's mask and keypoint heads)."""

    prefix = "conv"

    def __init__(self, in_channels: int, widths: Sequence[int], rng=None):
        rng = as_generator(rng)
        for i, width in enumerate(widths):
            conv = L.Conv2d(in_channels if i == 0 else widths[i - 1], width, 3, padding=1, rng=rng)
            _kaiming_normal_fan_out(conv, rng)
            setattr(self, f"{self.prefix}{i + 1}", conv)
            setattr(self, f"relu{i + 1}", L.ReLU())
        self.num_convs = len(widths)

    def forward(self, x):
        for i in range(1, self.num_convs + 1):
            conv = getattr(self, f"{self.prefix}{i}")
            if self.training:
                x = getattr(self, f"relu{i}")(conv(x))
            else:  # eval mode: the ReLU in place on the conv output, no caches
                x = conv.infer(x, relu=True)
        return x

    def backward(self, grad_out):
        g = grad_out
        for i in range(self.num_convs, 0, -1):
            conv = getattr(self, f"{self.prefix}{i}")
            g = conv.backward(getattr(self, f"relu{i}").backward(g))
        return g


class MaskHead(_ConvReLUStack):
    """``num_convs`` conv3x3 + ReLU layers (the paper's "4 x conv", 256 channels)."""

    prefix = "mask_fcn"

    def __init__(self, in_channels: int, channels: int = 256, num_convs: int = 4, rng=None):
        super().__init__(in_channels, (channels,) * num_convs, rng)


class MaskRCNNPredictor(Module):
    """2x2 stride-2 deconvolution + ReLU (14x14 -> 28x28), then a 1x1 conv to K mask logits."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, rng=None):
        rng = as_generator(rng)
        self.conv5_mask = L.ConvTranspose2d(in_channels, channels, 2, stride=2, rng=rng)
        self.relu = L.ReLU()
        self.mask_fcn_logits = L.Conv2d(channels, num_classes, 1, rng=rng)
        _kaiming_normal_fan_out(self.conv5_mask, rng, fan_out=channels * 4)
        _kaiming_normal_fan_out(self.mask_fcn_logits, rng)

    def forward(self, x):
        if not self.training:  # eval mode: the ReLU in place on the deconv output, no caches
            return self.mask_fcn_logits.infer(self.conv5_mask.infer(x, relu=True))
        return self.mask_fcn_logits(self.relu(self.conv5_mask(x)))

    def backward(self, grad_out):
        return self.conv5_mask.backward(self.relu.backward(self.mask_fcn_logits.backward(grad_out)))


class KeypointRCNNHeads(_ConvReLUStack):
    """The keypoint head's trunk: one conv3x3 + ReLU per entry of ``layers`` (torchvision's
    ``keypoint_head``: eight of 512 channels on 14x14 RoI features), named ``conv_fcn1`` ...
    A small CPU preset passes fewer, narrower layers."""

    prefix = "conv_fcn"

    def __init__(self, in_channels: int, layers: Sequence[int] = (512,) * 8, rng=None):
        super().__init__(in_channels, tuple(layers), rng)


class KeypointRCNNPredictor(Module):
    """K heatmaps of logits per RoI: a 4x4 stride-2 deconvolution with padding 1 (14x14 ->
    28x28, torchvision's ``kps_score_lowres``), then a 2x bilinear upsampling (-> 56x56,
    ``align_corners=False``, ``resample.upsample_bilinear_forward``). No ReLU at the end: the
    maps are logits of a softmax over the 56x56 locations (``keypoints.keypointrcnn_loss``)."""

    def __init__(self, in_channels: int, num_keypoints: int, rng=None):
        rng = as_generator(rng)
        self.kps_score_lowres = L.ConvTranspose2d(
            in_channels, num_keypoints, 4, stride=2, padding=1, rng=rng
        )
        _kaiming_normal_fan_out(self.kps_score_lowres, rng)
        self.up_scale = 2
        self.cache = None  # the upsampling's interpolation matrices

    def forward(self, x):
        if not self.training:  # eval mode: no caches
            self.cache = None
            low = self.kps_score_lowres.infer(x)
            return upsample_bilinear_forward(low, self.up_scale)[0]
        y, self.cache = upsample_bilinear_forward(self.kps_score_lowres(x), self.up_scale)
        return y

    def backward(self, grad_out):
        g = upsample_bilinear_backward(grad_out, self.forward_cache())
        return self.kps_score_lowres.backward(g)


def _kaiming_normal_fan_out(conv, rng, fan_out: int | None = None) -> None:
    """He-normal initialisation with fan-out mode and zero bias (torchvision's mask head)."""
    w = conv.weight.data
    if fan_out is None:
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    w[...] = rng.normal(0.0, np.sqrt(2.0 / fan_out), w.shape)
    if conv.bias is not None:
        conv.bias.data[...] = 0
