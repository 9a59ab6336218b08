"""Convert torchvision's Mask R-CNN weights to this project's parameter names, without torch.

``from_torchvision(path_or_state_dict)`` reads a ``maskrcnn_resnet50_fpn`` state dict (a
``.pth`` file through the restricted reader of ``torch_pickle.py``, or a dict of arrays or
tensors already in memory) and returns ``{our name: float32 array}`` that
``MaskRCNN(MaskRCNNConfig.resnet50_fpn(K)).load_state_dict`` takes as is (strict). Most names
are already ours; the differences (docs/weights.md has the full table):

- torchvision >= 0.13 wraps each FPN conv, the RPN conv and each mask-head conv in a
  ``Conv2dNormActivation`` (``fpn.inner_blocks.0.0.weight``, ``rpn.head.conv.0.0.weight``,
  ``mask_head.0.0.weight``); older files and this project use the plain names
  (``fpn.inner_blocks.0.weight``, ``rpn.head.conv.weight``, ``mask_head.mask_fcn1.weight``).
  Both layouts are read.
- ``*.num_batches_tracked`` (a BatchNorm counter, meaningless for FrozenBN) is dropped.
- The mask predictor's first output channel, torchvision's unused background mask, is dropped:
  our mask head has K channels (class k in channel k-1), torchvision's K+1.
- ``keypointrcnn_resnet50_fpn`` files (no mask head; a keypoint head) convert too: its
  ``keypoint_head`` is an ``nn.Sequential`` of conv, ReLU, conv, ... whose convs
  ``keypoint_head.0``, ``.2`` ... ``.14`` are our ``keypoint_head.conv_fcn1`` ... ``conv_fcn8``;
  ``keypoint_predictor.kps_score_lowres`` has the same name on both sides. Such a file gets
  ``MaskRCNNConfig.keypointrcnn_resnet50_fpn(K)`` by default.

Every other key must have a counterpart of the same shape; unknown keys, missing keys and shape
mismatches are all listed in one ValueError, never skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from .torch_pickle import read_state_dict, unwrap_state_dict

DROPPED_SUFFIX = ".num_batches_tracked"
MASK_LOGITS = (
    "roi_heads.mask_predictor.mask_fcn_logits.weight",
    "roi_heads.mask_predictor.mask_fcn_logits.bias",
)
CLASS_LOGITS = "roi_heads.box_predictor.cls_score.weight"
KEYPOINT_LOGITS = "roi_heads.keypoint_predictor.kps_score_lowres.weight"  # (C, K, 4, 4)
_SHOWN = 25  # names listed per kind of problem in an error message

# torchvision >= 0.13 name -> ours; a name no rule matches is the same on both sides.
_RENAMES = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^rpn\.head\.conv\.0\.0\.(weight|bias)$"), r"rpn.head.conv.\1"),
    (
        re.compile(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}",
    ),
    (  # nn.Sequential(conv, ReLU, conv, ReLU ...): the convs are its even entries
        re.compile(r"^roi_heads\.keypoint_head\.(\d*[02468])\.(weight|bias)$"),
        lambda m: f"roi_heads.keypoint_head.conv_fcn{int(m[1]) // 2 + 1}.{m[2]}",
    ),
)


def torchvision_to_ours(name: str) -> str:
    """Our parameter name for a torchvision ``maskrcnn_resnet50_fpn`` state-dict key."""
    for pattern, replacement in _RENAMES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return name


def from_torchvision(source, config=None) -> dict[str, np.ndarray]:
    """Our state dict from torchvision Mask R-CNN weights.

    Args:
        source: a ``.pth``/``.pt`` path (zip or legacy format; a checkpoint dict with the state
            dict under ``"model"`` or ``"state_dict"`` is accepted), or such a dict in memory
            with NumPy arrays or torch tensors as values.
        config: the ``MaskRCNNConfig`` the weights are for; default
            ``MaskRCNNConfig.resnet50_fpn(K)`` with K = (rows of ``cls_score``) - 1, or
            ``keypointrcnn_resnet50_fpn(num_keypoints, K)`` for a keypoint model's file.

    Returns:
        ``{name: float32 array}`` in our model's parameter order.

    Raises:
        ValueError: unknown or missing keys, shape mismatches, non-float parameters, or a file
            that cannot be read safely (all listed in the message).
    """
    from .mask_rcnn import MaskRCNN

    if isinstance(source, (str, os.PathLike)):
        name = repr(os.fspath(source))
        state = read_state_dict(source)
    else:
        name = "the given state dict"
        state = unwrap_state_dict(_numpy_tree(source), name)
    converted, problems = _rename(state)
    if config is None:
        config = default_config(state)
    expected = {k: v.shape for k, v in MaskRCNN(config, rng=0).state_dict().items()}
    problems += _compare(converted, expected)
    if problems:
        raise ValueError(
            f"cannot convert {name} to MaskRCNN(num_classes={config.num_classes}): "
            + "; ".join(problems)
            + " (the key table is in docs/weights.md)"
        )
    return {k: converted[k][1] for k in expected}


def _rename(state: dict) -> tuple[dict, list[str]]:
    """``{our name: (torchvision name, float32 array)}`` and the problems found on the way."""
    converted: dict[str, tuple[str, np.ndarray]] = {}
    problems = []
    for key, value in state.items():
        if key.endswith(DROPPED_SUFFIX):
            continue
        ours = torchvision_to_ours(key)
        if ours in converted:
            problems.append(f"{converted[ours][0]!r} and {key!r} both map to {ours!r}")
            continue
        if value.dtype.kind != "f":
            problems.append(f"{key!r} has dtype {value.dtype}, expected floating point")
            continue
        if ours in MASK_LOGITS:
            value = value[1:]  # torchvision's channel 0 is the background's mask: unused
        converted[ours] = (key, np.ascontiguousarray(value, dtype=np.float32))
    return converted, problems


def _compare(converted: dict, expected: dict) -> list[str]:
    unknown = [src for ours, (src, _) in converted.items() if ours not in expected]
    missing = [k for k in expected if k not in converted]
    shapes = [
        f"{src!r} -> {ours!r}: {tuple(a.shape)} vs {tuple(expected[ours])}"
        for ours, (src, a) in converted.items()
        if ours in expected and tuple(a.shape) != tuple(expected[ours])
    ]
    problems = []
    for what, names in (
        ("unknown keys (no parameter of ours)", unknown),
        ("missing keys (ours, nothing maps to them)", missing),
        ("shape mismatches (torchvision -> ours: got vs expected)", shapes),
    ):
        if names:
            more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
            problems.append(f"{len(names)} {what}: {names[:_SHOWN]}{more}")
    return problems


def default_config(state: dict):
    """The preset a torchvision state dict fits: ``keypointrcnn_resnet50_fpn`` when it has a
    keypoint predictor (K keypoints from its shape), else ``resnet50_fpn``; the number of
    classes from ``cls_score``."""
    from .mask_rcnn import MaskRCNNConfig

    keypoints = state.get(KEYPOINT_LOGITS)
    if isinstance(keypoints, np.ndarray) and keypoints.ndim == 4:
        return MaskRCNNConfig.keypointrcnn_resnet50_fpn(keypoints.shape[1], _num_classes(state))
    return MaskRCNNConfig.resnet50_fpn(num_classes=_num_classes(state))


def _num_classes(state: dict) -> int:
    logits = state.get(CLASS_LOGITS)
    if isinstance(logits, np.ndarray) and logits.ndim == 2 and logits.shape[0] >= 2:
        return int(logits.shape[0]) - 1
    return 90  # COCO; a missing or odd cls_score is reported by the key/shape check


def _numpy_tree(obj):
    """Torch tensors (duck-typed: ``detach`` and ``numpy``) in nested dicts -> NumPy arrays."""
    if isinstance(obj, Mapping):
        return {k: _numpy_tree(v) for k, v in obj.items()}
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):
        t = obj.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()  # NumPy has no bfloat16; the widening is exact
        return t.numpy()
    return obj
