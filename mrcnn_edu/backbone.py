"""Backbone: ResNet (bottleneck blocks) + Feature Pyramid Network, with explicit backward.

ResNet (He et al., 2016) turns the image into four feature maps C2..C5 at strides 4, 8, 16, 32.
FPN (Lin et al., 2017) merges them top-down into P2..P5, all with the same channel count, plus
P6 (a stride-2 subsampling of P5) that only the RPN uses. Mask R-CNN's "ResNet-50-FPN" is
``ResNetConfig(depth=50)`` with ``FPN(out_channels=256)``.

``ResNetFPN`` returns the levels as a dict ``{"p2": P2, ..., "p6": P6}`` (finest first) and
declares each level's stride once, in ``LEVEL_STRIDES``; the RPN and the RoI poolers are handed
these strides and check the feature maps against them.

Parameter names follow torchvision's (``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight``)
so pretrained weights map name for name. ``ResNetConfig.small()`` is the narrow, shallow variant
the CPU demo trains from scratch (GroupNorm, since there are no pretrained statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config_checks import at_least, between, check_fields, one_of, positive_numbers
from .nn import inference as I
from .nn import layers as L
from .nn.module import Module
from .nn.utils import as_generator

DEPTH_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# The pyramid levels, finest first, and their strides in image pixels: P_k has stride 2**k.
LEVEL_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
# P6 exists only to give the RPN's 512-pixel anchors a coarse grid; the RoI heads pool from
# P2..P5 (FPN paper, Sec. 4.1-4.2).
ROI_LEVELS = ("p2", "p3", "p4", "p5")

_RESNET_RULES = {
    "blocks": positive_numbers(4),
    "stem_channels": at_least(1),
    "widths": positive_numbers(4),
    "expansion": at_least(1),
    "norm": one_of("frozen_bn", "gn"),
    "gn_groups": at_least(1),
    "frozen_stages": between(0, 5),
}


@dataclass
class ResNetConfig:
    """ResNet shape. ``blocks`` per stage (overrides ``depth`` when given), ``widths`` are the
    bottleneck widths of stages 2..5 (output channels are ``width * expansion``).

    norm: ``"frozen_bn"`` (fine-tuning pretrained weights, torchvision's default) or ``"gn"``
    (GroupNorm, for training from scratch). ``frozen_stages``: 0 trains everything, 1 freezes
    the stem, k > 1 also freezes stages 2..k (torchvision's default for Mask R-CNN is 2: stem and
    res2 frozen, i.e. trainable_layers=3)."""

    depth: int | None = 50
    blocks: tuple[int, ...] | None = None
    stem_channels: int = 64
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    expansion: int = 4
    norm: str = "frozen_bn"
    gn_groups: int = 32
    frozen_stages: int = 0

    def __post_init__(self):
        check_fields(self, _RESNET_RULES)
        if self.blocks is None:
            if self.depth not in DEPTH_BLOCKS:
                raise ValueError(
                    f"ResNet depth {self.depth} unknown; use one of {sorted(DEPTH_BLOCKS)} "
                    "or give blocks=(b2, b3, b4, b5)"
                )
            self.blocks = DEPTH_BLOCKS[self.depth]
        self.blocks = tuple(int(b) for b in self.blocks)
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.blocks) != 4 or len(self.widths) != 4 or min(self.blocks) < 1:
            raise ValueError("ResNet needs four stages: blocks and widths of length 4, blocks >= 1")
        if self.norm not in ("frozen_bn", "gn"):
            raise ValueError(f"norm must be 'frozen_bn' or 'gn', got {self.norm!r}")
        if not 0 <= self.frozen_stages <= 5:
            raise ValueError(f"frozen_stages must be in 0..5, got {self.frozen_stages}")

    @property
    def out_channels(self) -> list[int]:
        """Channels of C2..C5."""
        return [w * self.expansion for w in self.widths]

    @classmethod
    def small(cls, **overrides) -> ResNetConfig:
        """A narrow ResNet (one bottleneck per stage) that trains from scratch on a CPU."""
        base = dict(
            depth=None,
            blocks=(1, 1, 1, 1),
            stem_channels=16,
            widths=(16, 24, 32, 48),
            expansion=2,
            norm="gn",
            gn_groups=8,
        )
        base.update(overrides)
        return cls(**base)


def make_norm(kind: str, channels: int, groups: int = 32) -> Module:
    if kind == "frozen_bn":
        return L.FrozenBatchNorm2d(channels)
    # the largest group count <= ``groups`` that divides the channels (GN needs equal groups)
    g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
    return L.GroupNorm(g, channels)


class Bottleneck(Module):
    """1x1 reduce -> 3x3 (carries the stride, "ResNet v1.5" as torchvision) -> 1x1 expand,
    each followed by a norm; the shortcut is projected by a strided 1x1 conv when shapes change.

    y = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))
    """

    def __init__(
        self, in_ch: int, width: int, out_ch: int, stride: int, norm: str, groups: int, rng
    ):
        self.conv1 = L.Conv2d(in_ch, width, 1, bias=False, rng=rng)
        self.bn1 = make_norm(norm, width, groups)
        self.conv2 = L.Conv2d(width, width, 3, stride=stride, padding=1, bias=False, rng=rng)
        self.bn2 = make_norm(norm, width, groups)
        self.conv3 = L.Conv2d(width, out_ch, 1, bias=False, rng=rng)
        self.bn3 = make_norm(norm, out_ch, groups)
        self.relu1, self.relu2, self.relu3 = L.ReLU(), L.ReLU(), L.ReLU()
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = L.Sequential(
                L.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False, rng=rng),
                make_norm(norm, out_ch, groups),
            )
        if norm == "gn":
            # Zero-init the last norm's scale so each block starts as the identity (Goyal et al.,
            # 2017): training from scratch is then stable without warm-up tricks.
            self.bn3.weight.data[:] = 0

    def forward(self, x):
        if not self.training:
            return self.infer(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.downsample(x) if self.downsample is not None else x
        return self.relu3(out + shortcut)

    def infer(self, x):
        """The eval-mode forward: the same function, with each FrozenBN folded into its conv and
        the ReLUs and the residual addition done in place (``nn/inference.py``); no caches."""
        out = I.conv_norm_relu(x, self.conv1, self.bn1, relu=True)
        out = I.conv_norm_relu(out, self.conv2, self.bn2, relu=True)
        out = I.conv_norm_relu(out, self.conv3, self.bn3)
        if self.downsample is not None:
            conv, norm = self.downsample.layers
            out += I.conv_norm_relu(x, conv, norm)
        else:
            out += x
        return I.relu_(out)

    def backward(self, grad_out, need_input_grad: bool = True):
        g = self.relu3.backward(grad_out)
        # main branch, in reverse
        gm = self.conv3.backward(self.bn3.backward(g))
        gm = self.conv2.backward(self.bn2.backward(self.relu2.backward(gm)))
        gm = self.conv1.backward(self.bn1.backward(self.relu1.backward(gm)), need_input_grad)
        # shortcut
        if self.downsample is not None:
            conv, norm = self.downsample.layers
            gs = conv.backward(norm.backward(g), need_input_grad)
        else:
            gs = g
        return gm + gs if need_input_grad else None


class ResNet(Module):
    """The stem (7x7/2 conv, norm, ReLU, 3x3/2 max-pool) and stages res2..res5.

    ``forward(images (N, 3, H, W)) -> [C2, C3, C4, C5]`` at strides 4, 8, 16, 32.
    ``backward([dC2, dC3, dC4, dC5], need_input_grad=False)`` (entries may be None) fills the
    parameter gradients and returns the gradient of the images when ``need_input_grad`` is True
    (else None: training a detector never needs d(loss)/d(image), and it costs a whole conv
    backward at full resolution).
    """

    def __init__(self, cfg: ResNetConfig, rng=None):
        rng = as_generator(rng)
        self.cfg = cfg
        self.conv1 = L.Conv2d(3, cfg.stem_channels, 7, stride=2, padding=3, bias=False, rng=rng)
        self.bn1 = make_norm(cfg.norm, cfg.stem_channels, cfg.gn_groups)
        self.relu = L.ReLU()
        self.maxpool = L.MaxPool2d(3, 2, 1)
        in_ch = cfg.stem_channels
        for stage, (n_blocks, width) in enumerate(zip(cfg.blocks, cfg.widths)):
            out_ch = width * cfg.expansion
            blocks = []
            for b in range(n_blocks):
                stride = 2 if (b == 0 and stage > 0) else 1
                blocks.append(
                    Bottleneck(in_ch, width, out_ch, stride, cfg.norm, cfg.gn_groups, rng)
                )
                in_ch = out_ch
            setattr(self, f"layer{stage + 1}", blocks)
        self._freeze(cfg.frozen_stages)

    def stages(self) -> list[list[Bottleneck]]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _freeze(self, k: int) -> None:
        frozen = []
        if k >= 1:
            frozen += [self.conv1, self.bn1]
        for stage in self.stages()[: max(k - 1, 0)]:
            frozen += stage
        for m in frozen:
            for _, p in m.named_parameters():
                p.requires_grad = False

    def forward(self, x):
        if self.training:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        else:  # FrozenBN folded into the conv, ReLU in place (nn/inference.py)
            x = self.maxpool(I.conv_norm_relu(x, self.conv1, self.bn1, relu=True))
        feats = []
        for stage in self.stages():
            for block in stage:
                x = block(x)
            feats.append(x)
        return feats

    def backward(self, grads, need_input_grad: bool = False):
        """``grads``: gradients of C2..C5 (None where a level received none). Returns the
        images' gradient when ``need_input_grad`` (then frozen stages are traversed too; their
        parameters collect gradients the optimizer never reads), else None."""
        k = 0 if need_input_grad else self.cfg.frozen_stages
        g = None
        for s in range(3, -1, -1):
            if grads[s] is not None:
                g = grads[s] if g is None else g + grads[s]
            if g is None:
                continue
            if s + 2 <= k:  # this stage and everything below it are frozen: stop here
                return None
            for i, block in enumerate(reversed(self.stages()[s])):
                # The first block of the first stage still passes a gradient to the stem,
                # unless the stem is frozen.
                last = i == len(self.stages()[s]) - 1
                need = not (last and s == 0 and k >= 1)
                g = block.backward(g, need_input_grad=need)
        if g is None or k >= 1:
            return None
        g = self.bn1.backward(self.relu.backward(self.maxpool.backward(g)))
        return self.conv1.backward(g, need_input_grad=need_input_grad)


class FPN(Module):
    """Feature Pyramid Network: lateral 1x1 convs, top-down nearest upsampling + addition, a 3x3
    output conv per level, and P6 = max_pool(P5, k=1, s=2) for the RPN.

    ``forward([C2..C5]) -> [P2, P3, P4, P5, P6]``; ``backward([dP2..dP6]) -> [dC2..dC5]``.
    Parameter names follow torchvision (``inner_blocks.i``, ``layer_blocks.i``).
    """

    def __init__(
        self, in_channels: list[int], out_channels: int = 256, extra_p6: bool = True, rng=None
    ):
        rng = as_generator(rng)
        self.out_channels = out_channels
        self.extra_p6 = extra_p6
        self.inner_blocks = [L.Conv2d(c, out_channels, 1, rng=rng) for c in in_channels]
        self.layer_blocks = [
            L.Conv2d(out_channels, out_channels, 3, padding=1, rng=rng) for _ in in_channels
        ]
        # Kaiming-uniform with a=1 and zero bias, as torchvision initialises FPN convs.
        for conv in self.inner_blocks + self.layer_blocks:
            fan_in = int(np.prod(conv.weight.shape[1:]))
            bound = np.sqrt(3.0 / fan_in)
            conv.weight.data[...] = rng.uniform(-bound, bound, conv.weight.shape)
            conv.bias.data[...] = 0
        self.upsamples = [L.Upsample() for _ in in_channels[:-1]]
        self.p6_pool = L.MaxPool2d(1, 2, 0) if extra_p6 else None

    def forward(self, feats):
        n = len(self.inner_blocks)
        if len(feats) != n:
            raise ValueError(f"FPN expects {n} feature maps, got {len(feats)}")
        inner = self.inner_blocks[-1](feats[-1])
        outs = [self.layer_blocks[-1](inner)]
        for i in range(n - 2, -1, -1):
            lateral = self.inner_blocks[i](feats[i])
            if self.training:
                inner = lateral + self.upsamples[i](inner, size=lateral.shape[-2:])
            else:  # the same sum, in place into the lateral map
                inner = I.add_upsampled_(lateral, inner)
            outs.insert(0, self.layer_blocks[i](inner))
        if self.extra_p6:
            outs.append(self.p6_pool(outs[-1]))
        return outs

    def backward(self, grads):
        n = len(self.inner_blocks)
        grads = list(grads)
        if self.extra_p6:
            g6 = grads.pop()
            if g6 is not None:
                g5 = self.p6_pool.backward(g6)
                grads[-1] = g5 if grads[-1] is None else grads[-1] + g5
        feat_grads = [None] * n
        from_above = None  # gradient reaching inner_i through the upsampling of level i - 1
        for i in range(n):
            g_inner = from_above
            if grads[i] is not None:
                g_out = self.layer_blocks[i].backward(grads[i])
                g_inner = g_out if g_inner is None else g_inner + g_out
            if g_inner is None:
                from_above = None
                continue
            feat_grads[i] = self.inner_blocks[i].backward(g_inner)
            from_above = self.upsamples[i].backward(g_inner) if i < n - 1 else None
        return feat_grads


@dataclass
class BackboneConfig:
    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    fpn_channels: int = 256

    def __post_init__(self):
        check_fields(self, {"fpn_channels": at_least(1)})

    @classmethod
    def small(cls) -> BackboneConfig:
        return cls(resnet=ResNetConfig.small(), fpn_channels=64)


class ResNetFPN(Module):
    """``forward(images) -> {"p2": P2, ..., "p6": P6}``; ``backward({name: dP}) -> None``
    (or the images' gradient with ``need_input_grad=True``).

    ``strides`` maps each level name to its stride (4, 8, 16, 32, 64), declared here once;
    ``roi_levels`` names the levels the RoI heads pool from (P2..P5).
    """

    strides = LEVEL_STRIDES
    roi_levels = ROI_LEVELS

    def __init__(self, cfg: BackboneConfig | None = None, rng=None):
        cfg = cfg or BackboneConfig()
        rng = as_generator(rng)
        self.cfg = cfg
        self.body = ResNet(cfg.resnet, rng)
        self.fpn = FPN(cfg.resnet.out_channels, cfg.fpn_channels, rng=rng)
        self.out_channels = cfg.fpn_channels

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(self.strides)

    def forward(self, images) -> dict:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"backbone expects images (N, 3, H, W), got {images.shape}")
        if images.shape[2] % 32 or images.shape[3] % 32:
            raise ValueError(
                f"backbone input {images.shape[2]}x{images.shape[3]} must be a multiple of 32 "
                "(pad the batch as MaskRCNN's transform does)"
            )
        return dict(zip(self.level_names, self.fpn(self.body(images)), strict=True))

    def backward(self, grads: dict, need_input_grad: bool = False):
        """``grads``: ``{level name: gradient}``; a level that received none may be missing or
        None. Unknown names raise (a misspelt level would otherwise drop its gradient)."""
        unknown = sorted(set(grads) - set(self.level_names))
        if unknown:
            raise ValueError(f"unknown feature level(s) {unknown}; levels: {self.level_names}")
        per_level = [grads.get(name) for name in self.level_names]
        return self.body.backward(self.fpn.backward(per_level), need_input_grad)
