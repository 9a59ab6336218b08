"""RoIAlign (Mask R-CNN, section 3): forward, backward and the separable fast form.

RoIAlign rounds nothing. A RoI ``(x1, y1, x2, y2)`` in image pixels is scaled onto the feature
grid (``* spatial_scale``; ``aligned=True`` also subtracts half a pixel, Detectron2's pixel
model) and cut into ``PH x PW`` bins; each bin averages ``grid_h x grid_w`` bilinear samples
taken at the bin's sub-pixel positions

    y = y1 * scale - offset + p * bin_h + (i + 0.5) * bin_h / grid_h,   i = 0 .. grid_h - 1

(and the same for x), where ``grid = sampling_ratio``, or ``ceil(bin size)`` when it is ``<= 0``.
A sample more than a pixel outside the map weighs 0; one within a pixel is clamped onto it.

**The fast form.** A bin average of bilinear samples weights rows and columns independently, so
for one RoI and channel ``out[c] = Ay @ F[c] @ Ax.T`` with small interpolation matrices
``Ay (PH, H)`` and ``Ax (PW, W)`` (``interpolation_matrices``): two BLAS products on the window
of the map the RoI touches. RoIAlign is linear in the features, so the backward is the
transpose, ``grad[c] += Ay.T @ G[c] @ Ax``; there is no gradient with respect to the RoIs.
``reference.py`` holds the sample-by-sample definition the tests compare this form with;
``docs/roi_pooling.md`` derives both, ``docs/conventions.md`` states torchvision's exact rules.
"""

from __future__ import annotations

import numpy as np

from ..backend import device_kernel, is_device_array
from ..nn.utils import pair
from ._checks import (
    check_adaptive_extent,
    check_align_args,
    check_align_grad,
    check_finite_features,
    check_grad_shape,
    check_input_shape,
    check_pool_args,
)


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """RoIAlign forward (torchvision ``roi_align``).

    input: (N, C, H, W) float32/float64 feature map.
    rois: (K, 5) rows ``(batch_index, x1, y1, x2, y2)`` in image pixels, same dtype as input
        (or a list of N arrays (K_i, 4) of boxes, one per image).
    output_size: ``PH`` or ``(PH, PW)``.
    spatial_scale: feature pixels per image pixel (1/16 for a stride-16 map).
    sampling_ratio: bilinear samples per bin side; ``<= 0`` means adaptive,
        ``ceil(roi_size / output_size)`` per RoI and axis (then a RoI over 4x the map's size
        is refused: its samples, memory and time would grow with it).
    aligned: subtract half a pixel from the scaled RoI (Detectron2's pixel model). When False
        (torchvision's default) RoIs are also at least 1 feature pixel wide and high.
    Returns (K, C, PH, PW) in input's dtype.
    """
    input, rois, (ph, pw) = check_pool_args(input, rois, output_size, spatial_scale)
    sampling_ratio, aligned = check_align_args(sampling_ratio, aligned)
    check_adaptive_extent(rois, input.shape, spatial_scale, sampling_ratio)
    check_finite_features(input)
    if is_device_array(input):
        fn = device_kernel(input, "roi_align", "roi_align")
        return fn(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)
    return _roi_align_forward(input, rois, ph, pw, spatial_scale, sampling_ratio, aligned)


def roi_align_backward(
    grad_output, rois, input_shape, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False
):
    """RoIAlign backward: the gradient with respect to the feature map.

    grad_output: (K, C, PH, PW) float32/float64, the gradient of the loss w.r.t. roi_align's
    output; rois, output_size, spatial_scale, sampling_ratio, aligned: as given to the forward;
    input_shape: (N, C, H, W) of the forward's input. Returns (N, C, H, W) in grad_output's dtype.

    RoIAlign is linear in the features, ``out = A F``, so the backward is ``A.T G``: every sample
    hands ``grad / count`` back to its four bilinear neighbours (per RoI: ``Ay.T @ G[c] @ Ax``).
    There is no gradient with respect to the RoI coordinates (as in torchvision).
    """
    shape = check_input_shape(input_shape)
    grad_output, rois, (ph, pw) = check_align_grad(
        grad_output, rois, shape, output_size, spatial_scale
    )
    sampling_ratio, aligned = check_align_args(sampling_ratio, aligned)
    check_adaptive_extent(rois, shape, spatial_scale, sampling_ratio)
    check_grad_shape(grad_output, (rois.shape[0], shape[1], ph, pw))
    if is_device_array(grad_output):
        fn = device_kernel(grad_output, "roi_align", "roi_align_backward")
        return fn(grad_output, rois, shape, (ph, pw), spatial_scale, sampling_ratio, aligned)
    return _roi_align_backward(
        grad_output, rois, shape, ph, pw, spatial_scale, sampling_ratio, aligned
    )


def interpolation_matrices(
    rois, height: int, width: int, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False
):
    """RoIAlign's separable weights: ``Ay (K, PH, H)`` and ``Ax (K, PW, W)`` in rois' dtype.

    ``Ay[k, p, h]`` is the weight of feature row ``h`` in bin row ``p`` of RoI ``k``: the average,
    over the bin's ``grid_h`` sample rows, of their 1-D linear interpolation weights (0 for a
    sample row outside ``[-1, H]``). Then for every channel
    ``roi_align(F)[k, c] = Ay[k] @ F[b_k, c] @ Ax[k].T``.
    The rows of ``Ay[k]`` sum to 1 when all samples fall inside the map.
    """
    rois = np.asarray(rois)
    ph, pw = pair(output_size, "output_size", minimum=1)
    dt = rois.dtype.type
    (y0, bin_h, grid_h), (x0, bin_w, grid_w) = _align_geometry(
        rois, ph, pw, spatial_scale, sampling_ratio, aligned
    )
    ay = _axis_interpolation(y0, bin_h, grid_h, ph, height, dt)
    ax = _axis_interpolation(x0, bin_w, grid_w, pw, width, dt)
    return ay, ax


# ============================================================================================
# The fast NumPy forms
# ============================================================================================
def _roi_align_forward(input, rois, ph, pw, spatial_scale, sampling_ratio, aligned):
    """out[k, c] = Ay[k] @ F[b_k, c] @ Ax[k].T, on the window of the map the RoI touches.

    The map is moved to channels-last (N, H, W, C) once, so that every column of a window is a
    contiguous (h, C) matrix. Per RoI, two batched matrix products:
    rows ``t[w] = Ay @ window[:, w]`` -> (w, PH, C), then columns ``out[:, p] = t[:, p].T @ Ax.T``
    written straight into the (C, PH, PW) output. Every product is small (PH x h x C), which
    BLAS runs on one thread: larger products made multi-threaded BLAS stall badly whenever
    another process shares the cores. A loop over RoIs only: batching padded windows, or
    contracting whole maps, measured slower (docs/roi_pooling.md, "Speed").
    """
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = np.zeros((k, c, ph, pw), dtype=input.dtype)
    if k == 0 or c == 0:
        return out
    ay, ax = interpolation_matrices(rois, h, w, (ph, pw), spatial_scale, sampling_ratio, aligned)
    rows = _support(ay)
    cols = _support(ax)
    feat = np.ascontiguousarray(input.transpose(0, 2, 3, 1))
    batch = rois[:, 0].astype(np.int64).tolist()
    for i, (b, r0, r1, c0, c1) in enumerate(zip(batch, *rows, *cols)):
        if r1 <= r0 or c1 <= c0:
            continue  # every sample fell outside the map: zeros
        window = feat[b, r0:r1, c0:c1]  # (h, w, C), a view
        t = np.matmul(ay[i, :, r0:r1], window.transpose(1, 0, 2))  # (w, PH, C)
        # (PH, C, w) @ (w, PW) -> (PH, C, PW), i.e. out[i] (C, PH, PW) seen with PH first.
        np.matmul(t.transpose(1, 2, 0), ax[i, :, c0:c1].T, out=out[i].transpose(1, 0, 2))
    return out


def _roi_align_backward(grad_output, rois, shape, ph, pw, spatial_scale, sampling_ratio, aligned):
    """grad[b_k, c] += Ay[k].T @ G[k, c] @ Ax[k], accumulated into each RoI's window.

    The transpose of the forward, with the same small batched products:
    ``u[q] = Ay.T @ G[:, :, q].T`` -> (PW, h, C), then ``window[h] += Ax.T @ u[:, h]``.
    """
    n, c, h, w = shape
    grad = np.zeros((n, h, w, c), dtype=grad_output.dtype)  # channels-last, as the forward
    k = rois.shape[0]
    if k and c:
        ay, ax = interpolation_matrices(
            rois, h, w, (ph, pw), spatial_scale, sampling_ratio, aligned
        )
        rows = _support(ay)
        cols = _support(ax)
        g = np.empty((pw, ph, c), dtype=grad_output.dtype)
        batch = rois[:, 0].astype(np.int64).tolist()
        for i, (b, r0, r1, c0, c1) in enumerate(zip(batch, *rows, *cols)):
            if r1 <= r0 or c1 <= c0:
                continue
            g[...] = grad_output[i].transpose(2, 1, 0)  # (PW, PH, C), contiguous
            u = np.matmul(ay[i, :, r0:r1].T, g)  # (PW, h, C)
            grad[b, r0:r1, c0:c1] += np.matmul(ax[i, :, c0:c1].T, u.transpose(1, 0, 2))
    return np.ascontiguousarray(grad.transpose(0, 3, 1, 2))


def _align_geometry(rois, ph, pw, spatial_scale, sampling_ratio, aligned):
    """Per RoI and axis: (start, bin size, samples per bin), as torchvision computes them.

    Arithmetic in the rois' dtype and in torchvision's order, so float32 results match its
    float32 kernels.
    """
    dt = rois.dtype.type
    offset = dt(0.5 if aligned else 0.0)
    scale = dt(spatial_scale)

    def axis(lo, hi, pooled):
        start = lo * scale - offset
        size = (hi * scale - offset) - start
        if not aligned:
            size = np.maximum(size, dt(1.0))
        bin_size = size / dt(pooled)
        if sampling_ratio > 0:
            grid = np.full(rois.shape[0], sampling_ratio, dtype=np.int64)
        else:
            grid = np.ceil(bin_size).astype(np.int64)
        return start, bin_size, grid

    return axis(rois[:, 2], rois[:, 4], ph), axis(rois[:, 1], rois[:, 3], pw)


def _axis_interpolation(start, bin_size, grid, pooled, length, dt):
    """(K, pooled, length) matrix: bin p's average of its samples' 1-D interpolation weights."""
    k = start.shape[0]
    gmax = int(grid.max()) if k else 0
    i = np.arange(gmax)
    p = np.arange(pooled, dtype=start.dtype)[None, :, None]
    g = np.maximum(grid, 1).astype(start.dtype)[:, None, None]
    b = bin_size[:, None, None]
    # sample = start + p * bin + (i + 0.5) * bin / grid   (torchvision's expression)
    coord = start[:, None, None] + p * b + (i + dt(0.5)).astype(start.dtype) * b / g
    # Samples beyond the grid of this RoI (gmax pads) and samples outside [-1, length] weigh 0.
    used = (i < grid[:, None, None]) & (coord >= -1) & (coord <= length)
    coord = np.maximum(coord, dt(0))
    low = np.floor(coord)
    at_end = low >= length - 1  # the last row/column: clamp, no neighbour beyond
    frac = np.where(at_end, dt(0), coord - low)
    low = np.where(at_end, length - 1, low).astype(np.int64)
    high = np.where(at_end, length - 1, low + 1)
    weight = used / g  # 1/grid per sample: the bin average along this axis
    base = (np.arange(k)[:, None, None] * pooled + np.arange(pooled)[None, :, None]) * length
    index = np.concatenate([(base + low).ravel(), (base + high).ravel()])
    value = np.concatenate([(weight * (1 - frac)).ravel(), (weight * frac).ravel()])
    mat = np.bincount(index, value, minlength=k * pooled * length)
    return mat.reshape(k, pooled, length).astype(start.dtype)


def _support(mat):
    """First and one-past-last index with a nonzero weight, per RoI: the window to read."""
    nonzero = mat.any(axis=1)  # (K, length)
    length = nonzero.shape[1]
    first = nonzero.argmax(axis=1)
    last = length - nonzero[:, ::-1].argmax(axis=1)
    last = np.where(nonzero.any(axis=1), last, first)  # no support: empty window
    return first.tolist(), last.tolist()
