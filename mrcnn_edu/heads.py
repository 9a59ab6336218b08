"""RoI heads: the box head (classes + per-class box deltas) and the mask head (K masks per RoI).

Both run on RoI features pooled by RoIAlign from the FPN levels:

    box:  (R, C, 7, 7) -> fc6, ReLU -> fc7, ReLU -> cls_score (R, K+1), bbox_pred (R, 4(K+1))
    mask: (R, C, 14, 14) -> 4 x (conv3x3, ReLU) -> deconv 2x2/2, ReLU -> conv1x1 -> (R, K, 28, 28)

and their losses, each returning ``(loss, gradient(s))`` like the losses in ``nn.losses``:

- classification: softmax cross-entropy over K+1 classes, mean over the sampled RoIs;
- box regression: smooth L1 (beta 1/9) on the deltas **of the GT class only**, summed and
  divided by the number of sampled RoIs;
- mask: per-pixel binary cross-entropy on the **GT class's channel only**, mean over the pixels of
  the positive RoIs. The other K-1 channels get exactly zero gradient: the classes do not compete
  for pixels, which is the paper's decoupling of mask and class prediction (Sec. 3).

Parameter names follow torchvision's (``box_head.fc6``, ``box_predictor.cls_score``,
``mask_head.mask_fcn1``, ``mask_predictor.conv5_mask`` ...).
"""

from __future__ import annotations

import numpy as np

from .backend import get_xp
from .nn import layers as L
from .nn.losses import binary_cross_entropy_with_logits, smooth_l1, softmax_cross_entropy
from .nn.module import Module


def _rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class TwoMLPHead(Module):
    """Flatten the pooled features and apply two fully connected layers with ReLU."""

    def __init__(self, in_features: int, representation_size: int = 1024, rng=None):
        rng = _rng(rng)
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
        rng = _rng(rng)
        self.cls_score = L.Linear(in_features, num_classes, rng=rng)
        self.bbox_pred = L.Linear(in_features, num_classes * 4, rng=rng)
        # Detectron's initialisation: small normal weights, zero biases.
        self.cls_score.weight.data[...] = rng.normal(0, 0.01, self.cls_score.weight.shape)
        self.bbox_pred.weight.data[...] = rng.normal(0, 0.001, self.bbox_pred.weight.shape)
        self.cls_score.bias.data[...] = 0
        self.bbox_pred.bias.data[...] = 0

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)

    def backward(self, grad_logits, grad_deltas):
        return self.cls_score.backward(grad_logits) + self.bbox_pred.backward(grad_deltas)


class MaskHead(Module):
    """``num_convs`` conv3x3 + ReLU layers (the paper's "4 x conv", 256 channels)."""

    def __init__(self, in_channels: int, channels: int = 256, num_convs: int = 4, rng=None):
        rng = _rng(rng)
        for i in range(num_convs):
            conv = L.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, rng=rng)
            _kaiming_normal_fan_out(conv, rng)
            setattr(self, f"mask_fcn{i + 1}", conv)
            setattr(self, f"relu{i + 1}", L.ReLU())
        self.num_convs = num_convs

    def forward(self, x):
        for i in range(1, self.num_convs + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"mask_fcn{i}")(x))
        return x

    def backward(self, grad_out):
        g = grad_out
        for i in range(self.num_convs, 0, -1):
            g = getattr(self, f"mask_fcn{i}").backward(getattr(self, f"relu{i}").backward(g))
        return g


class MaskRCNNPredictor(Module):
    """2x2 stride-2 deconvolution + ReLU (14x14 -> 28x28), then a 1x1 conv to K mask logits."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, rng=None):
        rng = _rng(rng)
        self.conv5_mask = L.ConvTranspose2d(in_channels, channels, 2, stride=2, rng=rng)
        self.relu = L.ReLU()
        self.mask_fcn_logits = L.Conv2d(channels, num_classes, 1, rng=rng)
        _kaiming_normal_fan_out(self.conv5_mask, rng, fan_out=channels * 4)
        _kaiming_normal_fan_out(self.mask_fcn_logits, rng)

    def forward(self, x):
        return self.mask_fcn_logits(self.relu(self.conv5_mask(x)))

    def backward(self, grad_out):
        return self.conv5_mask.backward(self.relu.backward(self.mask_fcn_logits.backward(grad_out)))


def _kaiming_normal_fan_out(conv, rng, fan_out: int | None = None) -> None:
    """He-normal initialisation with fan-out mode and zero bias (torchvision's mask head)."""
    w = conv.weight.data
    if fan_out is None:
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    w[...] = rng.normal(0.0, np.sqrt(2.0 / fan_out), w.shape)
    if conv.bias is not None:
        conv.bias.data[...] = 0


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
    GT class's (the class-specific masks are decoupled from each other).
    """
    xp = get_xp(mask_logits)
    grad = xp.zeros_like(mask_logits)
    p = mask_logits.shape[0]
    if p == 0:
        return 0.0, grad
    k = mask_logits.shape[1]
    if labels.shape != (p,) or int(labels.min()) < 1 or int(labels.max()) > k:
        raise ValueError(f"mask loss labels must be ({p},) classes in 1..{k} (positive RoIs only)")
    idx = xp.arange(p)
    chan = labels - 1  # channel k-1 holds class k's mask (no background mask)
    loss, g = binary_cross_entropy_with_logits(mask_logits[idx, chan], mask_targets)
    grad[idx, chan] = g
    return loss, grad
