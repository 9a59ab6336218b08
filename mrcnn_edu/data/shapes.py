"""Synthetic shapes: rasterised circles, squares and triangles with exact binary masks.

The shapes are drawn analytically (a pixel belongs to a shape when its centre does), so masks
are exact and the data needs no download. ``toy_classification`` makes the small image-level
task that the toolkit demo trains on.
"""

from __future__ import annotations

import numpy as np

SHAPE_KINDS = ("circle", "square", "triangle")


def shape_mask(kind: str, height: int, width: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask ``(height, width)`` of one shape centred at ``(cx, cy)`` with "radius" ``r``.

    circle: disc of radius r; square: axis-aligned, side 2r; triangle: upward isosceles with
    base 2r and height 2r. Pixel (i, j) is inside when its centre (j + 0.5, i + 0.5) is.
    """
    if kind not in SHAPE_KINDS:
        raise ValueError(f"unknown shape kind {kind!r}; choose from {SHAPE_KINDS}")
    if r <= 0:
        raise ValueError(f"shape radius must be positive, got {r}")
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # triangle: apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r); the half
    # width grows linearly from 0 at the apex to r at the base.
    t = (dy + r) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)


def toy_classification(
    n: int, size: int = 20, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` single-channel images ``(n, 1, size, size)`` float32, each with one noisy shape,
    and their labels ``(n,)`` int64 (index into ``SHAPE_KINDS``)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    images = np.empty((n, 1, size, size), np.float32)
    labels = rng.integers(0, len(SHAPE_KINDS), size=n)
    for i in range(n):
        r = rng.uniform(size * 0.18, size * 0.3)
        cx, cy = rng.uniform(r, size - r, size=2)
        mask = shape_mask(SHAPE_KINDS[labels[i]], size, size, cx, cy, r)
        images[i, 0] = mask * rng.uniform(0.6, 1.0) + rng.normal(0, 0.1, (size, size))
    return images, labels.astype(np.int64)
