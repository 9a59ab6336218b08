"""RoIAlign and RoIPool on the GPU with Numba-CUDA: the kernels of ``cupy_roi_align.py`` in Python.

Read ``cupy_roi_align.py`` first; the thread mapping is the same -- one thread per element of the
pooled output ``(K, C, PH, PW)`` -- and so is the math, line for line. What differs is how types
are handled: Numba compiles one version per argument type, and Python float literals are float64,
so a ``0.5`` in a float32 kernel would silently promote the arithmetic to double. Every constant
is therefore built with ``T = np.float32`` or ``np.float64`` (the input's dtype) in
``_kernels(dtype)``, which builds and caches one set of kernels per dtype.

Arrays: on a real GPU the wrappers take CuPy arrays and pass them straight to the kernels (Numba
reads them through the CUDA array interface, no copy). Under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) they take NumPy arrays and the kernels run as Python threads on the
CPU, which is how the test suite checks this file without a GPU.
"""

from __future__ import annotations

import functools
import math

import numpy as np

try:
    from numba import cuda
except ImportError as err:  # a clear message instead of a bare ModuleNotFoundError
    raise ImportError(
        f"{__name__} needs numba (pip install 'mrcnn-edu[gpu]' for a GPU, or 'mrcnn-edu[test]' "
        "for the CUDA simulator)"
    ) from err

from ._common import (
    blocks_for,
    check_float,
    check_input_shape,
    check_int32_sizes,
    pair,
    prepare_grad,
    prepare_rois,
)

THREADS = 256


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """RoIAlign forward, the same numbers as ``mrcnn_edu.roi_ops.roi_align``.

    input: (N, C, H, W) float32/float64; rois: (K, 5) ``(batch_idx, x1, y1, x2, y2)``;
    output_size: int or (PH, PW). CuPy arrays on a GPU, NumPy arrays under the simulator.
    Returns (K, C, PH, PW) in input's dtype (same array library).
    """
    xp = _xp(input)
    input, rois = prepare_rois(xp, input, rois)
    ph, pw = pair(output_size)
    c, h, w = input.shape[1:]
    check_int32_sizes(rois.shape[0] * c * ph * pw)
    out = xp.zeros((rois.shape[0], c, ph, pw), dtype=input.dtype)
    if out.size == 0 or h == 0 or w == 0:
        return out
    T = input.dtype.type
    kernel = _kernels(np.dtype(input.dtype)).align_forward
    kernel[blocks_for(out.size, THREADS), THREADS](
        input, rois, out, T(spatial_scale), int(sampling_ratio), bool(aligned)
    )
    return out


def roi_align_backward(
    grad_output, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned
):
    """RoIAlign backward. grad_output: (K, C, PH, PW); rois: (K, 5); input_shape: (N, C, H, W).

    Returns grad_input (N, C, H, W) in grad_output's dtype, accumulated with atomic adds.
    """
    xp = _xp(grad_output)
    n, c, h, w = check_input_shape(input_shape)
    ph, pw = pair(output_size)
    grad_output, rois = prepare_grad(xp, grad_output, rois, (c, ph, pw))
    check_int32_sizes(n * c * h * w, grad_output.size)
    grad_input = xp.zeros((n, c, h, w), dtype=grad_output.dtype)
    if grad_output.size == 0 or grad_input.size == 0:
        return grad_input
    T = grad_output.dtype.type
    kernel = _kernels(np.dtype(grad_output.dtype)).align_backward
    kernel[blocks_for(grad_output.size, THREADS), THREADS](
        grad_output, rois, grad_input, T(spatial_scale), int(sampling_ratio), bool(aligned)
    )
    return grad_input


def roi_pool(input, rois, output_size, spatial_scale=1.0):
    """RoIPool forward. Returns (output (K, C, PH, PW), argmax (K, C, PH, PW) int64).

    argmax: the flat index ``h * W + w`` of each maximum in its feature plane, -1 for an empty
    bin (whose output is 0).
    """
    xp = _xp(input)
    input, rois = prepare_rois(xp, input, rois)
    ph, pw = pair(output_size)
    c = input.shape[1]
    check_int32_sizes(rois.shape[0] * c * ph * pw)
    out = xp.zeros((rois.shape[0], c, ph, pw), dtype=input.dtype)
    argmax = xp.full(out.shape, -1, dtype=xp.int64)
    if out.size == 0:
        return out, argmax
    T = input.dtype.type
    kernel = _kernels(np.dtype(input.dtype)).pool_forward
    kernel[blocks_for(out.size, THREADS), THREADS](input, rois, out, argmax, T(spatial_scale))
    return out, argmax


def roi_pool_backward(grad_output, argmax, input_shape, rois=None):
    """RoIPool backward: each output gradient goes, whole, to its argmax pixel.

    grad_output: (K, C, PH, PW); argmax: (K, C, PH, PW) integer plane indices (-1: none);
    input_shape: (N, C, H, W); rois: the forward's (K, 5), for the batch index (None if N == 1).
    Returns grad_input (N, C, H, W) in grad_output's dtype.
    """
    xp = _xp(grad_output)
    n, c, h, w = check_input_shape(input_shape)
    if grad_output.ndim != 4 or grad_output.shape[1] != c:
        raise ValueError(
            f"grad_output must be (K, {c}, PH, PW), got shape {tuple(grad_output.shape)}"
        )
    if tuple(argmax.shape) != tuple(grad_output.shape):
        raise ValueError(
            f"argmax must have grad_output's shape {tuple(grad_output.shape)}, "
            f"got {tuple(argmax.shape)}"
        )
    if rois is None and n != 1 and grad_output.shape[0] > 0:
        raise ValueError(f"rois are needed to find each RoI's image when N = {n} > 1")
    check_float(grad_output, "grad_output")
    check_int32_sizes(n * c * h * w, grad_output.size)
    grad_output = xp.ascontiguousarray(grad_output)
    grad_input = xp.zeros((n, c, h, w), dtype=grad_output.dtype)
    if grad_output.size == 0 or grad_input.size == 0:
        return grad_input
    has_rois = rois is not None
    # without rois every RoI is from image 0; a (1, 5) dummy keeps one kernel signature
    rois = (
        xp.ascontiguousarray(rois, dtype=grad_output.dtype)
        if has_rois
        else xp.zeros((1, 5), grad_output.dtype)
    )
    kernel = _kernels(np.dtype(grad_output.dtype)).pool_backward
    kernel[blocks_for(grad_output.size, THREADS), THREADS](
        grad_output, xp.ascontiguousarray(argmax, dtype=xp.int64), rois, has_rois, grad_input
    )
    return grad_input


# -- implementation ------------------------------------------------------------------------
def _xp(a):
    from mrcnn_edu.backend import get_xp

    return get_xp(a)


class _Kernels:
    """The compiled kernels for one dtype (attributes set by ``_kernels``)."""


@functools.cache
def _kernels(dtype: np.dtype) -> _Kernels:
    """Build the kernels for float32 or float64; Numba compiles each on its first launch.

    ``cuda`` must stay a module global: the simulator swaps it for its fake module by scanning
    the kernel functions' globals.
    """
    T = dtype.type
    zero, half, one = T(0), T(0.5), T(1)
    neg_flt_max = T(-float(np.finfo(np.float32).max))

    @cuda.jit(device=True, inline="always")
    def unravel(index, channels, pooled_h, pooled_w):
        # output is (K, C, PH, PW): consecutive threads take consecutive pw
        pw = index % pooled_w
        ph = (index // pooled_w) % pooled_h
        c = (index // (pooled_w * pooled_h)) % channels
        k = index // (pooled_w * pooled_h * channels)
        return k, c, ph, pw

    @cuda.jit(device=True, inline="always")
    def align_grid(rois, k, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
        # aligned shifts by half a pixel so a box samples the pixel centres it covers
        offset = half if aligned else zero
        start_x = rois[k, 1] * spatial_scale - offset
        start_y = rois[k, 2] * spatial_scale - offset
        roi_w = rois[k, 3] * spatial_scale - offset - start_x
        roi_h = rois[k, 4] * spatial_scale - offset - start_y
        if not aligned:  # legacy: never thinner than one pixel
            roi_w = max(roi_w, one)
            roi_h = max(roi_h, one)
        bin_h = roi_h / T(pooled_h)
        bin_w = roi_w / T(pooled_w)
        # sampling_ratio <= 0: adaptive, about one sample per input pixel of the bin. (int():
        # on the GPU math.ceil and math.floor return floats, in Python and the simulator ints.)
        grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_h / T(pooled_h)))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_w / T(pooled_w)))
        count = T(max(grid_h * grid_w, 1))
        return start_y, start_x, bin_h, bin_w, grid_h, grid_w, count

    @cuda.jit(device=True, inline="always")
    def bilinear_corners(height, width, y, x):
        """(inside, y_low, x_low, y_high, x_high, ly, lx) of a bilinear sample at (y, x).

        A sample more than one pixel outside the map is not inside: it reads 0 and gets no
        gradient, but still counts in the bin's average.
        """
        if y < -one or y > T(height) or x < -one or x > T(width):
            return False, 0, 0, 0, 0, zero, zero
        y = max(y, zero)
        x = max(x, zero)
        y_low = int(y)  # floor, since y >= 0
        x_low = int(x)
        if y_low >= height - 1:  # on or past the last row: both rows are the last row
            y_low = height - 1
            y_high = height - 1
            y = T(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_low = width - 1
            x_high = width - 1
            x = T(x_low)
        else:
            x_high = x_low + 1
        return True, y_low, x_low, y_high, x_high, y - T(y_low), x - T(x_low)

    @cuda.jit
    def align_forward(input, rois, output, spatial_scale, sampling_ratio, aligned):
        batch, channels, height, width = input.shape
        pooled_h, pooled_w = output.shape[2], output.shape[3]
        index = cuda.grid(1)
        if index >= output.size:
            return
        k, c, ph, pw = unravel(index, channels, pooled_h, pooled_w)
        n = int(rois[k, 0])
        if n < 0 or n >= batch:  # rejected by roi_ops before this point; never read outside
            return
        start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = align_grid(
            rois, k, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
        )
        total = zero
        for iy in range(grid_h):
            y = start_y + T(ph) * bin_h + (T(iy) + half) * bin_h / T(grid_h)
            for ix in range(grid_w):
                x = start_x + T(pw) * bin_w + (T(ix) + half) * bin_w / T(grid_w)
                inside, y0, x0, y1, x1, ly, lx = bilinear_corners(height, width, y, x)
                if not inside:
                    continue
                hy = one - ly
                hx = one - lx
                total += (
                    hy * hx * input[n, c, y0, x0]
                    + hy * lx * input[n, c, y0, x1]
                    + ly * hx * input[n, c, y1, x0]
                    + ly * lx * input[n, c, y1, x1]
                )
        output[k, c, ph, pw] = total / count

    @cuda.jit
    def align_backward(grad_output, rois, grad_input, spatial_scale, sampling_ratio, aligned):
        batch, channels, height, width = grad_input.shape
        pooled_h, pooled_w = grad_output.shape[2], grad_output.shape[3]
        index = cuda.grid(1)
        if index >= grad_output.size:
            return
        k, c, ph, pw = unravel(index, channels, pooled_h, pooled_w)
        n = int(rois[k, 0])
        if n < 0 or n >= batch:
            return
        start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = align_grid(
            rois, k, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
        )
        # output = sum(weight * pixel) / count: each corner's gradient is weight * grad / count
        grad = grad_output[k, c, ph, pw] / count
        if grad == zero:
            return
        for iy in range(grid_h):
            y = start_y + T(ph) * bin_h + (T(iy) + half) * bin_h / T(grid_h)
            for ix in range(grid_w):
                x = start_x + T(pw) * bin_w + (T(ix) + half) * bin_w / T(grid_w)
                inside, y0, x0, y1, x1, ly, lx = bilinear_corners(height, width, y, x)
                if not inside:
                    continue
                hy = one - ly
                hx = one - lx
                # other bins and RoIs may add to the same pixels at the same time
                cuda.atomic.add(grad_input, (n, c, y0, x0), grad * hy * hx)
                cuda.atomic.add(grad_input, (n, c, y0, x1), grad * hy * lx)
                cuda.atomic.add(grad_input, (n, c, y1, x0), grad * ly * hx)
                cuda.atomic.add(grad_input, (n, c, y1, x1), grad * ly * lx)

    @cuda.jit(device=True, inline="always")
    def round_half_away(v):
        # C's round(); Python's round() (and Numba's) rounds half to even
        r = int(v)  # truncates toward zero
        if abs(v - T(r)) >= half:
            r += 1 if v > zero else -1
        return int(r)

    @cuda.jit
    def pool_forward(input, rois, output, argmax, spatial_scale):
        batch, channels, height, width = input.shape
        pooled_h, pooled_w = output.shape[2], output.shape[3]
        index = cuda.grid(1)
        if index >= output.size:
            return
        k, c, ph, pw = unravel(index, channels, pooled_h, pooled_w)
        n = int(rois[k, 0])
        if n < 0 or n >= batch:
            return
        # snap to whole pixels; both end pixels are included, hence the + 1
        start_x = round_half_away(rois[k, 1] * spatial_scale)
        start_y = round_half_away(rois[k, 2] * spatial_scale)
        end_x = round_half_away(rois[k, 3] * spatial_scale)
        end_y = round_half_away(rois[k, 4] * spatial_scale)
        bin_h = T(max(end_y - start_y + 1, 1)) / T(pooled_h)
        bin_w = T(max(end_x - start_x + 1, 1)) / T(pooled_w)
        hstart = min(max(int(math.floor(T(ph) * bin_h)) + start_y, 0), height)
        hend = min(max(int(math.ceil(T(ph + 1) * bin_h)) + start_y, 0), height)
        wstart = min(max(int(math.floor(T(pw) * bin_w)) + start_x, 0), width)
        wend = min(max(int(math.ceil(T(pw + 1) * bin_w)) + start_x, 0), width)
        if hend <= hstart or wend <= wstart:
            return  # empty bin: output 0, argmax -1 (set by the wrapper)
        # torchvision starts at -FLT_MAX (for float64 too): a bin whose elements are all
        # <= -FLT_MAX outputs -FLT_MAX with argmax -1
        best = neg_flt_max
        best_at = -1
        for y in range(hstart, hend):
            for x in range(wstart, wend):
                if input[n, c, y, x] > best:  # strictly greater: the first maximum wins
                    best = input[n, c, y, x]
                    best_at = y * width + x
        output[k, c, ph, pw] = best
        argmax[k, c, ph, pw] = best_at

    @cuda.jit
    def pool_backward(grad_output, argmax, rois, has_rois, grad_input):
        batch, channels, height, width = grad_input.shape
        pooled_h, pooled_w = grad_output.shape[2], grad_output.shape[3]
        index = cuda.grid(1)
        if index >= grad_output.size:
            return
        k, c, ph, pw = unravel(index, channels, pooled_h, pooled_w)
        where = argmax[k, c, ph, pw]
        if where < 0 or where >= height * width:
            return  # empty bin: no gradient
        n = int(rois[k, 0]) if has_rois else 0
        if n < 0 or n >= batch:
            return
        # the whole gradient goes to the maximum; several bins can pick the same pixel
        cuda.atomic.add(
            grad_input, (n, c, where // width, where % width), grad_output[k, c, ph, pw]
        )

    kernels = _Kernels()
    kernels.align_forward = align_forward
    kernels.align_backward = align_backward
    kernels.pool_forward = pool_forward
    kernels.pool_backward = pool_backward
    return kernels
