"""Anchors: the reference boxes the RPN classifies and regresses (Faster R-CNN Sec. 3.1.1).

At every position of a feature map the RPN looks at A anchors, one per (aspect ratio, size)
pair, centred on that position's top-left pixel in the image (``x = col * stride``). With FPN
(Lin et al. 2017) each pyramid level gets one size -- 32 on P2 (stride 4) up to 512 on P6
(stride 64) -- and the three ratios 0.5, 1, 2, so A = 3 per level.

The numbers and their order match torchvision's ``AnchorGenerator`` exactly (docs/conventions.md):
cell anchors ratio-major then size, rounded half-to-even; anchors location-major (row by row,
then column) then cell anchor. That order is also the order of the RPN head's outputs after
the (N, A*C, H, W) -> (N, H*W*A, C) reshape, which is what makes anchor i and prediction i meet.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .backend import check_device, to_device

DEFAULT_SIZES = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * 5


class AnchorGenerator:
    """Anchors for a list of feature maps.

    sizes: one tuple of sizes (sqrt of the anchor area, in pixels) per feature level.
    aspect_ratios: one tuple of ratios ``height / width`` per level (or a single tuple, used
    for every level).

    ``gen(image_shape, feature_shapes)`` returns the (sum_l H_l W_l A_l, 4) anchors of one image;
    all images of a padded batch share them.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
        aspect_ratios: Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
    ):
        sizes = tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in sizes)
        if aspect_ratios and not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (tuple(aspect_ratios),) * len(sizes)
        aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(
                f"need one aspect-ratio tuple per level: {len(sizes)} size tuples but "
                f"{len(aspect_ratios)} ratio tuples"
            )
        for level, (s, r) in enumerate(zip(sizes, aspect_ratios)):
            if not s or not r or any(not v > 0 for v in (*s, *r)):
                raise ValueError(f"level {level}: sizes {s} and ratios {r} must be positive")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self._cache: dict[tuple, tuple[np.ndarray, list[int]]] = {}
        self._device_cache: dict[tuple, object] = {}  # device copies of _cache's anchors

    def num_anchors_per_location(self) -> list[int]:
        """A_l = len(sizes_l) * len(ratios_l) for every level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def cell_anchors(self) -> list[np.ndarray]:
        """Zero-centred anchors per level: a list of (A_l, 4) float32 arrays.

        For ratio r and size s: ``h = s sqrt(r)``, ``w = s / sqrt(r)`` (so ``w h = s^2`` and
        ``h / w = r``), anchor ``round([-w, -h, w, h] / 2)``. Rounding makes every anchor corner
        an integer, as in the original Detectron; NumPy's ``round`` is half-to-even like
        torch's. Computed in float32 like torchvision so halfway cases round the same way.
        """
        out = []
        for sizes, ratios in zip(self.sizes, self.aspect_ratios):
            scales = np.asarray(sizes, dtype=np.float32)
            ratios = np.asarray(ratios, dtype=np.float32)
            h_ratios = np.sqrt(ratios)
            w_ratios = np.float32(1) / h_ratios
            # ratio-major: all sizes of ratio 0 first, then ratio 1, ...
            ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
            hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
            base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
            out.append(np.round(base))
        return out

    def grid_anchors(
        self,
        feature_shapes: Sequence[tuple[int, int]],
        strides: Sequence[tuple[int, int]],
        dtype=np.float32,
    ) -> list[np.ndarray]:
        """Cell anchors shifted to every feature-map position, one (H_l W_l A_l, 4) array per level.

        feature_shapes: ``(H_l, W_l)`` per level; strides: ``(stride_y, stride_x)`` per level in
        image pixels. Row ``(y * W + x) * A + a`` is cell anchor a shifted by
        ``(x * stride_x, y * stride_y)``.
        """
        cells = self.cell_anchors()
        if not (len(feature_shapes) == len(strides) == len(cells)):
            raise ValueError(
                f"got {len(feature_shapes)} feature shapes and {len(strides)} strides for an "
                f"AnchorGenerator with {len(cells)} levels; pass one sizes tuple per feature map"
            )
        out = []
        for (height, width), (stride_y, stride_x), base in zip(feature_shapes, strides, cells):
            shift_x = np.arange(width, dtype=np.int64) * int(stride_x)
            shift_y = np.arange(height, dtype=np.int64) * int(stride_y)
            # y is the slow index: positions are visited row by row, like a C-order (H, W) map
            sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = np.stack([sx, sy, sx, sy], axis=1).astype(dtype)
            anchors = shifts[:, None, :] + base.astype(dtype)[None, :, :]
            out.append(anchors.reshape(-1, 4))
        return out

    def __call__(
        self,
        image_shape: tuple[int, int],
        feature_shapes: Sequence[tuple[int, int]],
        dtype=np.float32,
        device: str = "cpu",
    ) -> np.ndarray:
        return self.forward(image_shape, feature_shapes, dtype, device)

    def forward(
        self,
        image_shape: tuple[int, int],
        feature_shapes: Sequence[tuple[int, int]],
        dtype=np.float32,
        device: str = "cpu",
    ) -> np.ndarray:
        """All anchors of one image, levels concatenated: (sum_l H_l W_l A_l, 4).

        image_shape: ``(H, W)`` of the padded batch tensor (not of each image: anchors live on
        the padded grid). feature_shapes: ``(H_l, W_l)`` per level. The stride of a level is
        ``image size // feature size`` per axis. Results are cached per shape (read-only), and
        per ``device`` (a ``backend`` device name; computed on the host, copied there once).
        """
        anchors, _ = self._anchors(image_shape, feature_shapes, dtype)
        if device == "cpu":
            return anchors
        shapes = tuple((int(h), int(w)) for h, w in feature_shapes)
        key = (tuple(int(v) for v in image_shape), shapes, np.dtype(dtype).str, device)
        if key not in self._device_cache:
            if len(self._device_cache) > 16:
                self._device_cache.clear()
            self._device_cache[key] = to_device(anchors, device)
        return self._device_cache[key]

    def to(self, device: str) -> AnchorGenerator:
        """Drop the anchors cached on other devices (``Module.to`` calls this); returns self."""
        device = check_device(device)
        self._device_cache = {k: v for k, v in self._device_cache.items() if k[-1] == device}
        return self

    def num_anchors_per_level(self, feature_shapes: Sequence[tuple[int, int]]) -> list[int]:
        """H_l * W_l * A_l for every level (to split predictions back into levels)."""
        return [
            int(h) * int(w) * a
            for (h, w), a in zip(feature_shapes, self.num_anchors_per_location())
        ]

    def strides(
        self, image_shape: tuple[int, int], feature_shapes: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """``(image_h // H_l, image_w // W_l)`` per level, torchvision's rule."""
        img_h, img_w = (int(v) for v in image_shape)
        strides = []
        for h, w in feature_shapes:
            if not (0 < h <= img_h and 0 < w <= img_w):
                raise ValueError(
                    f"feature map {(h, w)} does not fit image {(img_h, img_w)}; pass the "
                    "image's (H, W) first and feature maps' (H_l, W_l) second"
                )
            strides.append((img_h // int(h), img_w // int(w)))
        return strides

    # -- helpers ---------------------------------------------------------------------------
    def _anchors(self, image_shape, feature_shapes, dtype):
        feature_shapes = tuple((int(h), int(w)) for h, w in feature_shapes)
        image_shape = tuple(int(v) for v in image_shape)
        key = (image_shape, feature_shapes, np.dtype(dtype).str)
        if key not in self._cache:
            strides = self.strides(image_shape, feature_shapes)
            levels = self.grid_anchors(feature_shapes, strides, dtype)
            anchors = np.concatenate(levels, axis=0)
            anchors.setflags(write=False)
            if len(self._cache) > 16:  # many image sizes (multi-scale training): stay bounded
                self._cache.clear()
            self._cache[key] = (anchors, [len(a) for a in levels])
        return self._cache[key]
