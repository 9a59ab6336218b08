"""RoIPool (Fast R-CNN): forward, backward, its integer bins and the sparse-table fast form.

RoIPool quantises twice. The RoI corners are rounded to the feature grid (C's ``round``: half
away from zero), ``start = round(x1 * scale)``, ``end = round(x2 * scale)``, and the rounded RoI,
``end - start + 1`` pixels wide (at least 1), is cut into ``PW`` bins of width
``bin_w = size / PW`` with integer edges

    bin q covers columns  start + floor(q * bin_w)  ..  start + ceil((q + 1) * bin_w)  (exclusive)

clamped to the map (``roi_pool_bins``; rows alike). Each bin outputs its maximum, and the argmax
``h * W + w`` inside the feature plane: the first maximum in row-major order, because an element
replaces the running maximum (which starts at ``-FLT_MAX``) only when it is strictly greater. An
empty bin outputs 0 with argmax -1. The backward sends each output gradient, whole, to its argmax.

**The fast form.** A bin of height ``bh`` and width ``bw`` is the union of four overlapping
``2**jy x 2**jx`` rectangles anchored at its corners (``2**jy <= bh < 2**(jy+1)``), so its
maximum is the maximum of four lookups in a precomputed 2-D "sparse table" of such rectangle
maxima, whatever the bin's size. ``reference.py`` holds the bin-by-bin scan the tests compare
it with; ``docs/roi_pooling.md`` derives both, ``docs/conventions.md`` states torchvision's rules.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from ..backend import device_kernel, is_device_array
from ..nn.utils import pair
from ._checks import (
    check_input_shape,
    check_no_nan,
    check_pool_args,
    check_pool_grad,
    check_pool_grad_rois,
)

# torchvision starts every non-empty RoIPool bin at -FLT_MAX (also for float64 input) and keeps
# an element only if it is strictly greater; a bin holding nothing above it outputs -FLT_MAX.
NEG_FLT_MAX = -float(np.finfo(np.float32).max)
# Where the low and the high 32-bit word of an int64 key sit in memory.
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)


def roi_pool(input, rois, output_size, spatial_scale: float = 1.0):
    """RoIPool forward (torchvision ``roi_pool``), returning the argmax too.

    input: (N, C, H, W) float32/float64; rois: (K, 5) ``(batch_index, x1, y1, x2, y2)`` in image
    pixels (or a list of (K_i, 4) boxes per image); output_size: ``PH`` or ``(PH, PW)``.
    Returns ``(output, argmax)``: output (K, C, PH, PW) in input's dtype, the maximum of each
    bin; argmax (K, C, PH, PW) int64, where the maximum is inside its feature plane,
    ``h * W + w`` (torchvision's convention), or -1 for a bin that holds nothing (output 0).

    The RoI corners are rounded to the feature grid (half away from zero); bin ``p`` covers rows
    ``floor(p * bin_h) .. ceil((p + 1) * bin_h)`` (exclusive) of the rounded RoI, clamped to the
    map; ties go to the first element in row-major order. See ``roi_pool_bins``.
    """
    input, rois, (ph, pw) = check_pool_args(input, rois, output_size, spatial_scale)
    check_no_nan(input)
    if is_device_array(input):
        return device_kernel(input, "roi_align", "roi_pool")(input, rois, (ph, pw), spatial_scale)
    return _roi_pool_forward(input, rois, ph, pw, spatial_scale)


def roi_pool_backward(grad_output, argmax, input_shape, rois=None):
    """RoIPool backward: each output gradient goes, whole, to the element that was the maximum.

    grad_output: (K, C, PH, PW) float32/float64; argmax: (K, C, PH, PW) integer, from
    ``roi_pool`` (plane index ``h * W + w`` or -1); input_shape: (N, C, H, W);
    rois: the forward's (K, 5) rois -- only their batch index column is used, to know which
    image each RoI came from. It may be omitted when N == 1.
    Returns (N, C, H, W) in grad_output's dtype. Bins with argmax -1 pass no gradient.
    """
    n, c, h, w = check_input_shape(input_shape)
    check_pool_grad(grad_output, argmax, (n, c, h, w))
    rois = check_pool_grad_rois(rois, n, grad_output)
    if is_device_array(grad_output):
        fn = device_kernel(grad_output, "roi_align", "roi_pool_backward")
        return fn(grad_output, argmax, (n, c, h, w), rois)
    return _roi_pool_backward(grad_output, argmax, (n, c, h, w), rois)


def roi_pool_bins(rois, output_size, spatial_scale: float, height: int, width: int):
    """RoIPool's integer bins: ``(hstart, hend)`` (K, PH) and ``(wstart, wend)`` (K, PW).

    Bin ``(p, q)`` of RoI ``k`` covers rows ``hstart[k, p] <= h < hend[k, p]`` and columns
    ``wstart[k, q] <= w < wend[k, q]``, clamped to the map (so it may be empty). This is where
    RoIPool quantises: corners rounded to the grid, bin edges floored and ceiled.
    """
    rois = np.asarray(rois)
    ph, pw = pair(output_size, "output_size", minimum=1)
    dt = rois.dtype.type

    def axis(lo, hi, pooled, length):
        start = _c_round(lo * dt(spatial_scale))
        end = _c_round(hi * dt(spatial_scale))
        # "+ 1": the rounded RoI includes both end pixels.
        size = np.maximum(end - start + 1, 1).astype(rois.dtype)
        bin_size = size / dt(pooled)
        p = np.arange(pooled, dtype=rois.dtype)
        first = np.floor(p * bin_size[:, None]).astype(np.int64) + start[:, None]
        last = np.ceil((p + 1) * bin_size[:, None]).astype(np.int64) + start[:, None]
        return np.clip(first, 0, length), np.clip(last, 0, length)

    hstart, hend = axis(rois[:, 2], rois[:, 4], ph, height)
    wstart, wend = axis(rois[:, 1], rois[:, 3], pw, width)
    return hstart, hend, wstart, wend


# ============================================================================================
# The fast NumPy forms
# ============================================================================================
class BinLookups(NamedTuple):
    """Where the sparse tables answer each bin: see ``_bin_lookups``."""

    corners: np.ndarray  # (K, 4, PH, PW) int64: rows of the flattened tables, one per corner
    empty: np.ndarray  # (K, PH, PW) bool: bins clamped to nothing
    ny: int  # table levels along the height: 2**0 .. 2**(ny - 1) rows
    nx: int  # and along the width


def _roi_pool_forward(input, rois, ph, pw, spatial_scale, table_budget=1 << 28, chunk=1 << 20):
    """RoIPool as range-maximum queries on a 2-D sparse table.

    ``table[jy, jx][h, w]`` holds the maximum over rows ``h .. h + 2**jy`` and columns
    ``w .. w + 2**jx`` (exclusive). A bin of height ``bh`` and width ``bw`` is the union of the
    four such rectangles with ``2**jy <= bh < 2**(jy+1)`` anchored at its corners, so its maximum
    is the maximum of four table lookups. The max and the argmax travel together as one int64
    key per element: an order-preserving integer image of the value in the high 32 bits and the
    *reversed* position in the low 32 bits, so that among equal values the first one in
    row-major order has the largest key (torchvision's "strictly greater" rule).
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    # Every element is written below, chunk by chunk: no need to fill them first.
    out = np.empty((k, c, ph, pw), dtype=input.dtype)
    argmax = np.empty((k, c, ph, pw), dtype=np.int64)
    if k == 0 or c == 0:
        return out, argmax
    corners, empty, ny, nx = _bin_lookups(rois, ph, pw, spatial_scale, input.shape)
    keys, key_to_value = _pool_keys(np.ascontiguousarray(input.transpose(0, 2, 3, 1)))
    # torchvision starts each bin at -FLT_MAX and takes only strictly greater elements, so a
    # bin whose elements are all <= -FLT_MAX outputs -FLT_MAX with argmax -1. Rare: check once.
    has_floor = bool((input <= NEG_FLT_MAX).any())
    # Channel chunks bound the tables' memory; RoI chunks keep the gathered keys in cache.
    per_channel = ny * nx * n * h * w * 8
    cc = int(min(c, max(1, table_budget // per_channel)))
    kk = int(max(1, chunk // (ph * pw * cc * 8)))
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        tables = _sparse_table(keys[..., c0:c1], ny, nx).reshape(-1, c1 - c0)
        for k0 in range(0, k, kk):
            k1 = min(k, k0 + kk)
            value, where = _bin_maxima(
                tables, corners[k0:k1], empty[k0:k1], h * w, key_to_value, has_floor
            )
            out[k0:k1, c0:c1] = value.transpose(0, 3, 1, 2)
            argmax[k0:k1, c0:c1] = where.transpose(0, 3, 1, 2)
    return out, argmax


def _bin_lookups(rois, ph, pw, spatial_scale, shape) -> BinLookups:
    """The four corner rectangles of every bin, as rows of the flattened sparse tables.

    The tables are flattened to ``(ny * nx * N * H * W, C)``: level ``(jy, jx)`` of image ``b``
    starts at row ``((jy * nx + jx) * N + b) * H * W``.
    """
    n, c, h, w = shape
    hstart, hend, wstart, wend = roi_pool_bins(rois, (ph, pw), spatial_scale, h, w)
    empty = (hend <= hstart)[:, :, None] | (wend <= wstart)[:, None, :]  # (K, PH, PW)
    # Level of each bin side: the largest power of two not above its size.
    jy = _floor_log2(np.maximum(hend - hstart, 1))
    jx = _floor_log2(np.maximum(wend - wstart, 1))
    ny, nx = int(jy.max()) + 1, int(jx.max()) + 1
    top, left = np.minimum(hstart, h - 1), np.minimum(wstart, w - 1)
    bottom = np.clip(hend - (1 << jy), 0, h - 1)
    right = np.clip(wend - (1 << jx), 0, w - 1)
    batch = rois[:, 0].astype(np.int64)[:, None, None]
    level = jy[:, :, None] * nx + jx[:, None, :]
    base = (level * n + batch) * (h * w)
    corners = np.stack(
        [
            base + (yy[:, :, None] * w + xx[:, None, :])
            for yy in (top, bottom)
            for xx in (left, right)
        ],
        axis=1,
    )
    return BinLookups(corners, empty, ny, nx)


def _bin_maxima(tables, corners, empty, hw, key_to_value, has_floor):
    """Max and argmax of a chunk of bins: the largest key of their four corner lookups.

    tables: (rows, C) flattened sparse tables; corners (k, 4, PH, PW) and empty (k, PH, PW)
    from ``_bin_lookups``. Returns value (k, PH, PW, C) and argmax (k, PH, PW, C).
    """
    best = tables[corners[:, 0]]  # (k, PH, PW, C)
    for corner in range(1, 4):
        np.maximum(best, tables[corners[:, corner]], out=best)
    words = best.view(np.int32)  # the two 32-bit halves of each key
    value = key_to_value(words[..., _HIGH::2])
    where = (hw - 1) - words[..., _LOW::2]  # undo the reversal of the position
    if has_floor:
        below = value <= NEG_FLT_MAX
        value[below], where[below] = NEG_FLT_MAX, -1
    if empty.any():
        value[empty], where[empty] = 0, -1
    return value, where


def _pool_keys(feat):
    """Channels-last map -> (int64 keys, decoder of the high words back to values).

    The high word orders like the value: for float32 its bit pattern with the magnitude bits of
    negative numbers flipped (an order-preserving map of IEEE floats onto int32); for float64,
    which has no room for a position beside it, its rank among the map's distinct values.
    """
    n, h, w, c = feat.shape
    feat = feat + feat.dtype.type(0)  # -0.0 -> +0.0: equal values must get equal keys
    if feat.dtype == np.float32:
        bits = feat.view(np.int32)
        high = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))

        def key_to_value(words):
            return (words ^ ((words >> 31) & np.int32(0x7FFFFFFF))).view(np.float32)

    else:
        distinct, rank = np.unique(feat, return_inverse=True)
        high = rank.reshape(feat.shape)

        def key_to_value(words):
            return distinct[words]

    position = (h * w - 1) - np.arange(h * w, dtype=np.int64).reshape(1, h, w, 1)
    return (high.astype(np.int64) << 32) | position, key_to_value


def _sparse_table(keys, ny: int, nx: int):
    """(ny * nx, N, H, W, C) maxima over [h, h + 2**jy) x [w, w + 2**jx), level (jy, jx) at
    ``jy * nx + jx``. Entries whose rectangle would leave the map are never read."""
    n, h, w, c = keys.shape
    table = np.empty((ny * nx, n, h, w, c), dtype=np.int64)
    table[0] = keys
    for jx in range(1, nx):  # double the width
        s = 1 << (jx - 1)
        np.maximum(
            table[jx - 1, :, :, : w - s], table[jx - 1, :, :, s:], out=table[jx, :, :, : w - s]
        )
    for jy in range(1, ny):  # double the height of every width
        s = 1 << (jy - 1)
        for jx in range(nx):
            src, dst = table[(jy - 1) * nx + jx], table[jy * nx + jx]
            np.maximum(src[:, : h - s], src[:, s:], out=dst[:, : h - s])
    return table


def _roi_pool_backward(grad_output, argmax, shape, rois, chunk=1 << 18):
    """grad[b_k, c].flat[argmax] += grad_output, a scatter-add (bins of overlapping RoIs may
    share their maximum).

    Each feature plane gets one extra slot in front, ``plane = [sink, pixel 0, pixel 1, ..]``,
    so the index ``plane_start + 1 + argmax`` sends argmax -1 (an empty bin) to the sink
    without a separate mask. RoI chunks keep the index array in cache.
    """
    n, c, h, w = shape
    hw = h * w
    grad = np.zeros((n * c, hw + 1), dtype=grad_output.dtype)
    k = grad_output.shape[0]
    if k and c:
        batch = np.zeros(k, np.int64) if rois is None else rois[:, 0].astype(np.int64)
        start = ((batch[:, None] * c + np.arange(c)) * (hw + 1) + 1)[:, :, None, None]
        flat = grad.reshape(-1)
        step = max(1, chunk // (c * grad_output.shape[2] * grad_output.shape[3]))
        for k0 in range(0, k, step):
            index = start[k0 : k0 + step] + argmax[k0 : k0 + step]
            np.add.at(flat, index.ravel(), grad_output[k0 : k0 + step].ravel())
    return np.ascontiguousarray(grad[:, 1:]).reshape(shape)


def _floor_log2(x):
    """floor(log2(x)) for positive int64 arrays, exactly (no float rounding)."""
    out = np.zeros_like(x)
    x = x.copy()
    while True:
        x >>= 1
        more = x > 0
        if not more.any():
            return out
        out += more


def _c_round(v):
    """C's round() (half away from zero) -> int64, without float tricks that misround."""
    whole = np.trunc(v)
    rounded = whole + np.where(np.abs(v - whole) >= 0.5, np.sign(v), 0)
    return np.clip(rounded, -(2.0**62), 2.0**62).astype(np.int64)
