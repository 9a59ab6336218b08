"""Builders of test data shared by several test files (imported as ``from helpers import ...``;
pytest puts this folder on ``sys.path``, and so does running a test file as a script).

Fixtures and hooks stay in ``conftest.py``; these are plain functions so that a reader sees
where each one comes from."""

import numpy as np

from mrcnn_edu.backbone import ResNetConfig


def rand(*shape, seed=0):
    """A seeded float64 standard-normal array of ``shape``."""
    return np.random.default_rng(seed).standard_normal(shape)


def random_boxes(rng, n, dtype=np.float32, size=500.0, wh=(4.0, 300.0)):
    """``n`` valid x1y1x2y2 boxes: corners uniform in [0, size), sides uniform in ``wh``."""
    xy = rng.uniform(0, size, (n, 2))
    sides = rng.uniform(wh[0], wh[1], (n, 2))
    return np.concatenate([xy, xy + sides], axis=1).astype(dtype)


def clustered_boxes(rng, n, objects=None, dtype=np.float64):
    """Jittered copies of a few objects, and random scores: what a detector's raw boxes look
    like (many overlapping boxes per object), the case NMS exists for."""
    objects = objects or max(n // 40, 1)
    centres = rng.uniform(0, 600, (objects, 2))
    sizes = rng.uniform(16, 200, (objects, 2))
    which = rng.integers(0, objects, n)
    ctr = centres[which] + rng.normal(0, 0.15, (n, 2)) * sizes[which]
    wh = sizes[which] * np.exp(rng.normal(0, 0.2, (n, 2)))
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(dtype)
    return boxes, rng.random(n).astype(dtype)


def tiny_resnet(**overrides) -> ResNetConfig:
    """A ResNet of one two-channel bottleneck per stage (GroupNorm): fast enough for float64
    gradchecks through the whole backbone."""
    base = dict(stem_channels=4, widths=(2, 2, 2, 2), gn_groups=2)
    return ResNetConfig.small(**{**base, **overrides})
