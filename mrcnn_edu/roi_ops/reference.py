"""The readable definitions: RoIAlign and RoIPool as the papers describe them, loop by loop.

These are Python loops over RoIs, bins, samples and pixels, slow and plain on purpose. The fast
forms in ``align.py`` and ``pool.py`` are tested equal to them (``tests/test_roi_ops.py``).

* **RoIAlign**, sample by sample: bin ``(p, q)`` of a RoI averages ``grid_h x grid_w`` bilinear
  samples, ``out[p, q] = (1 / count) * sum_samples sum_neighbours weight * F[yy, xx]``, each
  sample reading its four neighbouring pixels with weights ``(1 - ly)(1 - lx)``, ``(1 - ly) lx``,
  ``ly (1 - lx)``, ``ly lx``. The backward hands ``grad * weight / count`` back along the very
  same terms.
* **RoIPool**, bin by bin: a row-major scan that keeps an element only when it is strictly
  greater than the running maximum, which starts at ``-FLT_MAX``.

Arithmetic is float64 Python floats (RoIAlign) or the input's own values (RoIPool);
``docs/conventions.md`` states torchvision's exact rules that both forms follow.
"""

from __future__ import annotations

import math

import numpy as np

from ..nn.utils import pair
from ._checks import check_align_args, check_input_shape, check_pool_args
from .pool import NEG_FLT_MAX, roi_pool_bins


def roi_align_reference(
    input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False
) -> np.ndarray:
    """RoIAlign written sample by sample, in float64 Python arithmetic. Same API as roi_align."""
    input, rois, (ph, pw) = check_pool_args(input, rois, output_size, spatial_scale)
    sampling_ratio, aligned = check_align_args(sampling_ratio, aligned)
    n, c, h, w = input.shape
    out = np.zeros((rois.shape[0], c, ph, pw), dtype=np.float64)
    for k, roi in enumerate(rois.tolist()):
        fmap = input[int(roi[0])].astype(np.float64)
        terms = _bilinear_terms(roi, ph, pw, h, w, spatial_scale, sampling_ratio, aligned)
        for p, q, yy, xx, weight, count in terms:
            out[k, :, p, q] += weight * fmap[:, yy, xx] / count
    return out.astype(input.dtype)


def roi_align_backward_reference(
    grad_output, rois, input_shape, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False
) -> np.ndarray:
    """RoIAlign backward sample by sample: each sample scatters ``grad * weight / count``."""
    n, c, h, w = check_input_shape(input_shape)
    ph, pw = pair(output_size, "output_size", minimum=1)
    rois = np.asarray(rois)
    grad = np.zeros((n, c, h, w), dtype=np.float64)
    for k, roi in enumerate(rois.tolist()):
        b = int(roi[0])
        terms = _bilinear_terms(roi, ph, pw, h, w, spatial_scale, sampling_ratio, aligned)
        for p, q, yy, xx, weight, count in terms:
            g = grad_output[k, :, p, q].astype(np.float64)
            grad[b, :, yy, xx] += g * weight / count
    return grad.astype(grad_output.dtype)


def roi_pool_reference(input, rois, output_size, spatial_scale=1.0):
    """RoIPool written bin by bin: a row-major scan keeping strictly greater elements."""
    input, rois, (ph, pw) = check_pool_args(input, rois, output_size, spatial_scale)
    n, c, h, w = input.shape
    out = np.zeros((rois.shape[0], c, ph, pw), dtype=input.dtype)
    argmax = np.full((rois.shape[0], c, ph, pw), -1, dtype=np.int64)
    hstart, hend, wstart, wend = roi_pool_bins(rois, (ph, pw), spatial_scale, h, w)
    for k in range(rois.shape[0]):
        fmap = input[int(rois[k, 0])]
        for p in range(ph):
            for q in range(pw):
                rows = range(hstart[k, p], hend[k, p])
                cols = range(wstart[k, q], wend[k, q])
                if len(rows) == 0 or len(cols) == 0:
                    continue  # empty bin: 0, argmax -1
                for ch in range(c):
                    best, best_at = NEG_FLT_MAX, -1
                    for yy in rows:
                        for xx in cols:
                            if fmap[ch, yy, xx] > best:
                                best, best_at = fmap[ch, yy, xx], yy * w + xx
                    out[k, ch, p, q], argmax[k, ch, p, q] = best, best_at
    return out, argmax


def _bilinear_terms(roi, ph, pw, height, width, spatial_scale, sampling_ratio, aligned):
    """Every term of one RoI's bin averages: ``(p, q, yy, xx, weight, count)``, bin by bin,
    sample by sample, neighbour by neighbour; bin ``(p, q)`` reads ``weight / count`` of pixel
    ``(yy, xx)`` in each of its terms."""
    ys, xs = _reference_samples(roi, ph, pw, spatial_scale, sampling_ratio, aligned)
    for p in range(ph):
        for q in range(pw):
            count = max(len(ys[p]) * len(xs[q]), 1)
            for y in ys[p]:
                for x in xs[q]:
                    for (yy, xx), weight in _bilinear_neighbours(y, x, height, width):
                        yield p, q, yy, xx, weight, count


def _reference_samples(roi, ph, pw, spatial_scale, sampling_ratio, aligned):
    """Sample coordinates (feature pixels) of every bin row and column, as Python lists."""
    offset = 0.5 if aligned else 0.0
    _, x1, y1, x2, y2 = roi
    start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
    roi_w = x2 * spatial_scale - offset - start_x
    roi_h = y2 * spatial_scale - offset - start_y
    if not aligned:  # torchvision forces malformed (tiny) RoIs to be 1 x 1
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw)
    ys = [
        [start_y + p * bin_h + (i + 0.5) * bin_h / grid_h for i in range(grid_h)] for p in range(ph)
    ]
    xs = [
        [start_x + q * bin_w + (i + 0.5) * bin_w / grid_w for i in range(grid_w)] for q in range(pw)
    ]
    return ys, xs


def _bilinear_neighbours(y: float, x: float, height: int, width: int):
    """The (pixel, weight) pairs of a bilinear sample at (y, x), torchvision's border rules.

    A sample more than one pixel outside the map is 0 (but still counts in the bin average);
    one within a pixel of the border is clamped onto it.
    """
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [
        ((y_low, x_low), hy * hx),
        ((y_low, x_high), hy * lx),
        ((y_high, x_low), ly * hx),
        ((y_high, x_high), ly * lx),
    ]
