"""RoIAlign and RoIPool on the GPU: CUDA C kernels compiled by CuPy.

Read next to ``mrcnn_edu/roi_ops/``, the NumPy reference these kernels must reproduce (the tests
compare them). The functions have the reference's signatures and take/return CuPy arrays.

Thread mapping, the same for all four kernels: one thread per element of the pooled output
``(K, C, PH, PW)``. Thread ``index`` unravels to ``(k, c, ph, pw)``; consecutive threads take
consecutive ``pw`` (then ``ph``, then ``c``), so neighbouring threads read neighbouring pixels of
the same feature plane and their loads coalesce.

- ``roi_align_forward``: the thread averages ``grid_h x grid_w`` bilinear samples of its bin.
- ``roi_align_backward``: the thread spreads ``grad / count`` over the same samples' four
  neighbours with ``atomicAdd`` -- bins of overlapping RoIs (and samples of one bin) hit the same
  pixels, so plain stores would lose updates.
- ``roi_pool_forward``: the thread scans its bin for the maximum and records where it was.
- ``roi_pool_backward``: the thread adds its gradient at that recorded position (``atomicAdd``
  again: several bins can pick the same pixel).

The CUDA source is a template over ``T`` (float or double) and is compiled by NVRTC on the first
call, so importing this module needs neither a GPU nor cupy.
"""

from __future__ import annotations

import numpy as np

from mrcnn_edu.backend import require_cupy

from ._common import (
    CupyKernels,
    blocks_for,
    check_float,
    check_input_shape,
    check_int32_sizes,
    pair,
    prepare_grad,
    prepare_rois,
)

THREADS = 256  # per block; the kernels use few registers, so occupancy is not the limit


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """RoIAlign forward, the same numbers as ``mrcnn_edu.roi_ops.roi_align``.

    input: (N, C, H, W) float32/float64 CuPy array; rois: (K, 5) ``(batch_idx, x1, y1, x2, y2)``
    in input-image coordinates (multiplied by ``spatial_scale``); output_size: int or (PH, PW);
    sampling_ratio: samples per bin side, ``<= 0`` for adaptive ``ceil(roi_size / PH)``;
    aligned: shift by -0.5 pixel (the pixel-centre model of Detectron2).
    Returns (K, C, PH, PW) in input's dtype.
    """
    cp = require_cupy()
    input, rois = prepare_rois(cp, input, rois)
    ph, pw = pair(output_size)
    n, c, h, w = input.shape
    check_int32_sizes(rois.shape[0] * c * ph * pw)
    out = cp.zeros((rois.shape[0], c, ph, pw), dtype=input.dtype)
    if out.size == 0 or h == 0 or w == 0:
        return out  # nothing to sample: zeros (K = 0, or an empty feature map)
    T = input.dtype.type
    _launch(
        "roi_align_forward",
        input.dtype,
        out.size,
        (input, rois, out, np.int32(out.size), np.int32(n), np.int32(c), np.int32(h), np.int32(w))
        + (np.int32(ph), np.int32(pw), T(spatial_scale), np.int32(sampling_ratio))
        + (np.int32(bool(aligned)),),
    )
    return out


def roi_align_backward(
    grad_output, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned
):
    """RoIAlign backward: the gradient with respect to the input feature map.

    grad_output: (K, C, PH, PW) CuPy array; rois: (K, 5); input_shape: (N, C, H, W).
    Returns grad_input: (N, C, H, W) in grad_output's dtype, accumulated with atomicAdd.
    """
    cp = require_cupy()
    n, c, h, w = check_input_shape(input_shape)
    ph, pw = pair(output_size)
    grad_output, rois = prepare_grad(cp, grad_output, rois, (c, ph, pw))
    check_int32_sizes(n * c * h * w, grad_output.size)
    grad_input = cp.zeros((n, c, h, w), dtype=grad_output.dtype)
    if grad_output.size == 0 or grad_input.size == 0:
        return grad_input
    T = grad_output.dtype.type
    _launch(
        "roi_align_backward",
        grad_output.dtype,
        grad_output.size,
        (grad_output, rois, grad_input, np.int32(grad_output.size), np.int32(n), np.int32(c))
        + (np.int32(h), np.int32(w), np.int32(ph), np.int32(pw), T(spatial_scale))
        + (np.int32(sampling_ratio), np.int32(bool(aligned))),
    )
    return grad_input


def roi_pool(input, rois, output_size, spatial_scale=1.0):
    """RoIPool forward (max over integer bins), the same as ``mrcnn_edu.roi_ops.roi_pool``.

    input: (N, C, H, W) float CuPy array; rois: (K, 5); output_size: int or (PH, PW).
    Returns (output (K, C, PH, PW) in input's dtype, argmax (K, C, PH, PW) int64): the flat
    index ``h * W + w`` of each maximum inside its feature plane; an empty bin gives 0 and -1.
    """
    cp = require_cupy()
    input, rois = prepare_rois(cp, input, rois)
    ph, pw = pair(output_size)
    n, c, h, w = input.shape
    check_int32_sizes(rois.shape[0] * c * ph * pw)
    out = cp.zeros((rois.shape[0], c, ph, pw), dtype=input.dtype)
    argmax = cp.full(out.shape, -1, dtype=cp.int64)
    if out.size == 0:
        return out, argmax
    T = input.dtype.type
    _launch(
        "roi_pool_forward",
        input.dtype,
        out.size,
        (input, rois, out, argmax, np.int32(out.size), np.int32(n), np.int32(c), np.int32(h))
        + (np.int32(w), np.int32(ph), np.int32(pw), T(spatial_scale)),
    )
    return out, argmax


def roi_pool_backward(grad_output, argmax, input_shape, rois=None):
    """RoIPool backward: each output gradient goes, whole, to its argmax pixel.

    grad_output: (K, C, PH, PW) float CuPy array; argmax: (K, C, PH, PW) integer plane indices
    from ``roi_pool`` (-1: no gradient); input_shape: (N, C, H, W); rois: the forward's (K, 5)
    rois, for their batch index (may be None when N == 1).
    Returns grad_input (N, C, H, W) in grad_output's dtype, accumulated with atomicAdd.
    """
    cp = require_cupy()
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
    grad_output = cp.ascontiguousarray(grad_output)
    grad_input = cp.zeros((n, c, h, w), dtype=grad_output.dtype)
    if grad_output.size == 0 or grad_input.size == 0:
        return grad_input
    argmax = cp.ascontiguousarray(argmax, dtype=cp.int64)
    has_rois = rois is not None
    # Without rois every RoI is from image 0; any pointer of the right type fills the slot.
    rois = cp.ascontiguousarray(rois, dtype=grad_output.dtype) if has_rois else grad_output
    ph, pw = grad_output.shape[2:]
    _launch(
        "roi_pool_backward",
        grad_output.dtype,
        grad_output.size,
        (grad_output, argmax, rois, grad_input, np.int32(grad_output.size), np.int32(n))
        + (np.int32(c), np.int32(h * w), np.int32(ph), np.int32(pw), np.int32(has_rois)),
    )
    return grad_input


# -- implementation ------------------------------------------------------------------------
def _launch(name: str, dtype, total: int, args: tuple) -> None:
    kernel = _KERNELS.get(name, dtype)
    kernel((blocks_for(total, THREADS),), (THREADS,), args)


_SOURCE = r"""
// RoIAlign / RoIPool, torchvision semantics (see docs/conventions.md). T is float or double.
// Every index fits in int: the Python wrapper checks the array sizes.
#define NEG_FLT_MAX (-3.402823466e+38f)

// Where output element `index` of a (K, C, PH, PW) array sits.
struct BinIndex { int k, c, ph, pw; };

__device__ __forceinline__ BinIndex unravel(int index, int channels, int pooled_h, int pooled_w) {
  BinIndex b;
  b.pw = index % pooled_w;
  b.ph = (index / pooled_w) % pooled_h;
  b.c = (index / (pooled_w * pooled_h)) % channels;
  b.k = index / (pooled_w * pooled_h * channels);
  return b;
}

// The sampling grid of one RoI: start corner, bin size, samples per bin side.
template <typename T>
struct AlignGrid { T start_y, start_x, bin_h, bin_w; int grid_h, grid_w; T count; };

template <typename T>
__device__ AlignGrid<T> align_grid(const T* roi, int pooled_h, int pooled_w, T spatial_scale,
                                   int sampling_ratio, bool aligned) {
  AlignGrid<T> g;
  // aligned: pixel (i, j) covers [j, j+1) so its centre is j + 0.5; shifting by half a pixel
  // makes a box sample the centres it covers (Detectron2's fix of the original RoIAlign).
  const T offset = aligned ? (T)0.5 : (T)0;
  g.start_x = roi[1] * spatial_scale - offset;
  g.start_y = roi[2] * spatial_scale - offset;
  T roi_w = roi[3] * spatial_scale - offset - g.start_x;
  T roi_h = roi[4] * spatial_scale - offset - g.start_y;
  if (!aligned) {  // the legacy behaviour: a RoI is never thinner than one pixel
    roi_w = max(roi_w, (T)1);
    roi_h = max(roi_h, (T)1);
  }
  g.bin_h = roi_h / (T)pooled_h;
  g.bin_w = roi_w / (T)pooled_w;
  // sampling_ratio <= 0: adaptive, about one sample per input pixel of the bin.
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : (int)ceil(roi_h / (T)pooled_h);
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : (int)ceil(roi_w / (T)pooled_w);
  g.count = (T)max(g.grid_h * g.grid_w, 1);
  return g;
}

// Bilinear interpolation at (y, x) as four (offset, weight) pairs into a (height, width) plane.
// Returns false for a sample more than one pixel outside the map: it reads 0 and gets no
// gradient, but still counts in the bin's average.
template <typename T>
__device__ bool bilinear_corners(int height, int width, T y, T x, int* offsets, T* weights) {
  if (y < (T)-1 || y > (T)height || x < (T)-1 || x > (T)width) return false;
  y = max(y, (T)0);
  x = max(x, (T)0);
  int y_low = (int)y;  // floor, since y >= 0
  int x_low = (int)x;
  int y_high, x_high;
  if (y_low >= height - 1) {  // on or past the last row: both rows are the last row
    y_low = y_high = height - 1;
    y = (T)y_low;
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= width - 1) {
    x_low = x_high = width - 1;
    x = (T)x_low;
  } else {
    x_high = x_low + 1;
  }
  const T ly = y - (T)y_low, lx = x - (T)x_low;
  const T hy = (T)1 - ly, hx = (T)1 - lx;
  offsets[0] = y_low * width + x_low;   weights[0] = hy * hx;
  offsets[1] = y_low * width + x_high;  weights[1] = hy * lx;
  offsets[2] = y_high * width + x_low;  weights[2] = ly * hx;
  offsets[3] = y_high * width + x_high; weights[3] = ly * lx;
  return true;
}

template <typename T>
__global__ void roi_align_forward(const T* __restrict__ input, const T* __restrict__ rois,
                                  T* __restrict__ output, int total, int batch, int channels,
                                  int height, int width, int pooled_h, int pooled_w,
                                  T spatial_scale, int sampling_ratio, int aligned) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const BinIndex b = unravel(index, channels, pooled_h, pooled_w);
  const T* roi = rois + b.k * 5;
  const int n = (int)roi[0];
  // A bad batch index leaves the output at 0 instead of reading out of bounds (the public
  // roi_ops.roi_align rejects such RoIs before they get here).
  if (n < 0 || n >= batch) return;
  const AlignGrid<T> g = align_grid(roi, pooled_h, pooled_w, spatial_scale, sampling_ratio,
                                    aligned != 0);
  const T* plane = input + (n * channels + b.c) * height * width;

  T sum = 0;
  int offsets[4];
  T weights[4];
  for (int iy = 0; iy < g.grid_h; ++iy) {
    // sample centres split the bin into grid_h equal parts
    const T y = g.start_y + (T)b.ph * g.bin_h + ((T)iy + (T)0.5) * g.bin_h / (T)g.grid_h;
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const T x = g.start_x + (T)b.pw * g.bin_w + ((T)ix + (T)0.5) * g.bin_w / (T)g.grid_w;
      if (!bilinear_corners(height, width, y, x, offsets, weights)) continue;
      sum += weights[0] * plane[offsets[0]] + weights[1] * plane[offsets[1]] +
             weights[2] * plane[offsets[2]] + weights[3] * plane[offsets[3]];
    }
  }
  output[index] = sum / g.count;
}

template <typename T>
__global__ void roi_align_backward(const T* __restrict__ grad_output, const T* __restrict__ rois,
                                   T* __restrict__ grad_input, int total, int batch, int channels,
                                   int height, int width, int pooled_h, int pooled_w,
                                   T spatial_scale, int sampling_ratio, int aligned) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const BinIndex b = unravel(index, channels, pooled_h, pooled_w);
  const T* roi = rois + b.k * 5;
  const int n = (int)roi[0];
  if (n < 0 || n >= batch) return;
  const AlignGrid<T> g = align_grid(roi, pooled_h, pooled_w, spatial_scale, sampling_ratio,
                                    aligned != 0);
  // output = sum(w * x) / count, so d output / d x = w / count for every sample's corners.
  const T grad = grad_output[index] / g.count;
  if (grad == (T)0) return;  // nothing to add; saves the atomics of zero-gradient bins
  T* grad_plane = grad_input + (n * channels + b.c) * height * width;

  int offsets[4];
  T weights[4];
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const T y = g.start_y + (T)b.ph * g.bin_h + ((T)iy + (T)0.5) * g.bin_h / (T)g.grid_h;
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const T x = g.start_x + (T)b.pw * g.bin_w + ((T)ix + (T)0.5) * g.bin_w / (T)g.grid_w;
      if (!bilinear_corners(height, width, y, x, offsets, weights)) continue;
      // Other threads (other bins, other RoIs) may add to the same pixels concurrently.
      for (int corner = 0; corner < 4; ++corner)
        atomicAdd(grad_plane + offsets[corner], grad * weights[corner]);
    }
  }
}

template <typename T>
__global__ void roi_pool_forward(const T* __restrict__ input, const T* __restrict__ rois,
                                 T* __restrict__ output, long long* __restrict__ argmax, int total,
                                 int batch, int channels, int height, int width, int pooled_h,
                                 int pooled_w, T spatial_scale) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const BinIndex b = unravel(index, channels, pooled_h, pooled_w);
  const T* roi = rois + b.k * 5;
  const int n = (int)roi[0];
  if (n < 0 || n >= batch) return;  // output 0, argmax -1 (set by the wrapper)
  // RoIPool snaps the box to whole pixels (C round: half away from zero) and includes both
  // end pixels, hence the + 1.
  const int start_x = (int)round(roi[1] * spatial_scale);
  const int start_y = (int)round(roi[2] * spatial_scale);
  const int end_x = (int)round(roi[3] * spatial_scale);
  const int end_y = (int)round(roi[4] * spatial_scale);
  const int roi_w = max(end_x - start_x + 1, 1);
  const int roi_h = max(end_y - start_y + 1, 1);
  const T bin_h = (T)roi_h / (T)pooled_h;
  const T bin_w = (T)roi_w / (T)pooled_w;
  // Bin rows [hstart, hend): floor / ceil so that bins together cover the RoI, clamped to map.
  const int hstart = min(max((int)floor((T)b.ph * bin_h) + start_y, 0), height);
  const int hend = min(max((int)ceil((T)(b.ph + 1) * bin_h) + start_y, 0), height);
  const int wstart = min(max((int)floor((T)b.pw * bin_w) + start_x, 0), width);
  const int wend = min(max((int)ceil((T)(b.pw + 1) * bin_w) + start_x, 0), width);
  if (hend <= hstart || wend <= wstart) return;  // empty bin: output 0, argmax -1 (wrapper)

  const T* plane = input + (n * channels + b.c) * height * width;
  // torchvision starts at -FLT_MAX (for double too): a bin whose elements are all <= -FLT_MAX
  // outputs -FLT_MAX with argmax -1.
  T best_value = (T)NEG_FLT_MAX;
  int best = -1;
  for (int y = hstart; y < hend; ++y) {
    for (int x = wstart; x < wend; ++x) {
      const int offset = y * width + x;
      if (plane[offset] > best_value) {  // strictly greater: the first maximum wins
        best_value = plane[offset];
        best = offset;
      }
    }
  }
  output[index] = best_value;
  argmax[index] = best;
}

// One thread per grad_output element: its whole gradient goes to the recorded maximum.
template <typename T>
__global__ void roi_pool_backward(const T* __restrict__ grad_output,
                                  const long long* __restrict__ argmax, const T* __restrict__ rois,
                                  T* __restrict__ grad_input, int total, int batch, int channels,
                                  int plane_size, int pooled_h, int pooled_w, int has_rois) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const long long where = argmax[index];
  if (where < 0 || where >= plane_size) return;  // empty bin: no gradient
  const BinIndex b = unravel(index, channels, pooled_h, pooled_w);
  const int n = has_rois ? (int)rois[b.k * 5] : 0;
  if (n < 0 || n >= batch) return;
  // Several bins (of one or several RoIs) can pick the same pixel.
  atomicAdd(grad_input + (n * channels + b.c) * plane_size + (int)where, grad_output[index]);
}
"""

_TEMPLATED = ("roi_align_forward", "roi_align_backward", "roi_pool_forward", "roi_pool_backward")
_CTYPES = CupyKernels.CTYPES
_OPTIONS = ("--std=c++17",)


_KERNELS = CupyKernels(_SOURCE, _TEMPLATED, _OPTIONS)
