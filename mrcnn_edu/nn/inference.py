"""Forward-only kernels for eval mode: no caches, bounded temporaries, work done in place.

Training keeps, for every layer, what its backward will read (inputs, ReLU masks, the im2col
columns of a convolution whose batch is one block, ``conv.py``). Inference
differentiates nothing, so in eval mode (``model.eval()``) the layers call these kernels
instead, keep no cache, and a later ``backward`` raises (``Module.forward_cache``). They compute
the same functions as ``functional.py``, equal up to float32 rounding (the order of the sums in
a GEMM, a FrozenBN scale applied to the weights instead of the output):

**Convolution by blocks** (``conv.conv2d_blocks``, shared with training): the output positions
are cut into blocks (a band of output rows of one image, or a group of whole images such as the
mask head's RoIs) whose columns fit in ``conv.COLS_BUFFER_BYTES``; one buffer is reused for
every block, and each block's GEMM writes straight into its part of the output:

    y[:, P_blk] = W @ cols(P_blk) + b        W: (O, C*kh*kw), cols(P_blk): (C*kh*kw, |P_blk|)

Only the input rows a band reads are padded, so no padded copy of the whole input exists either.
Bounded blocks are faster, not only smaller: a block's columns are still in cache when its
GEMM reads them, and a buffer below the allocator's mmap threshold is reused instead of being
mapped afresh (a new multi-hundred-megabyte array pays a page fault per page on first touch).

**1x1 convolutions** need no columns: the pixels are the GEMM operand (``conv._conv1x1_forward``),
``y[n] = W @ x[n]`` per image on the NCHW layout, and a stride-s 1x1 conv reads
``x[:, :, ::s, ::s]``. A large batch of large products (the mask predictor on 100 RoIs) is ONE
GEMM after a transposing copy, not one GEMM per image: with several BLAS threads every call
ends on a barrier, and on a busy machine a hundred calls wait a hundred times for a descheduled
thread.

**FrozenBN folded into the conv.** ``bn(conv(x, W) + b) = conv(x, W * scale) + (b * scale +
shift)`` per output channel, with ``scale = weight / sqrt(var + eps)`` and ``shift = bias -
mean * scale``: one pass over the output less, and no BN output array.

**In place.** Bias, ReLU (``max(y, 0)``, NaN kept as ``functional.relu_forward`` keeps it) and
the residual and top-down additions write into the array that was just produced.
"""

from __future__ import annotations

from ..backend import get_xp
from . import conv as C
from . import functional as F
from .conv import relu_
from .utils import pair


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, relu: bool = False):
    """``functional.conv2d_forward(x, w, b, ...)[0]`` (then ReLU when ``relu``) without a cache.

    x: (N, C, H, W); w: (O, C, kh, kw); b: (O,) or None. Returns y: (N, O, Ho, Wo)."""
    s, p, d, out_hw = C.conv2d_geometry(x, w, stride, padding, dilation)
    if C.is_plain_1x1(w, p):
        y = C._conv1x1_forward(x, w, b, s, out_hw)[0]
        return relu_(y) if relu else y
    return C.conv2d_blocks(x, w, b, s, p, d, out_hw, relu=relu)[0]


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, dilation=1, relu=False):
    """``functional.conv_transpose2d_forward(...)[0]`` (then ReLU in place): the training
    forward, whose only cache is the channel-major input its GEMM reads anyway (for the mask
    predictor's 2x2, stride 2: one GEMM and one transposing copy, ``conv_transpose.py``)."""
    y, _ = F.conv_transpose2d_forward(x, w, b, stride, padding, output_padding, dilation)
    return relu_(y) if relu else y


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """``functional.max_pool2d_forward(...)[0]`` without the argmax: the running maximum of the
    kh*kw strided views, in place, each view cut to the output positions whose window offset
    lies inside the image (so no -inf padded copy is made). NaN propagates (as in PyTorch)."""
    xp = get_xp(x)
    k = pair(kernel_size, "kernel_size", minimum=1)
    s = pair(stride if stride is not None else kernel_size, "stride", minimum=1)
    p = pair(padding, "padding", minimum=0)
    if 2 * p[0] >= k[0] or 2 * p[1] >= k[1]:  # the centre tap could fall in the padding
        return F.max_pool2d_forward(x, kernel_size, stride, padding)[0]
    h, w = x.shape[2:]
    out_hw = (
        F.conv_output_size(h, k[0], s[0], p[0], 1),
        F.conv_output_size(w, k[1], s[1], p[1], 1),
    )
    y = _tap(x, p[0], p[1], s, p, out_hw)[1].copy()  # the centre tap reaches every output
    for i in range(k[0]):
        for j in range(k[1]):
            if (i, j) != (p[0], p[1]):
                (ys, xs), view = _tap(x, i, j, s, p, out_hw)
                out = y[:, :, ys, xs]
                xp.maximum(out, view, out=out)
    return y


def _tap(x, i: int, j: int, s, p, out_hw):
    """Window offset (i, j): the output positions whose input pixel ``(oy*s + i - p, ox*s +
    j - p)`` lies inside the image, as slices of the output, and the view of ``x`` they read."""
    h, w = x.shape[2:]
    ys, iy = _tap_axis(i, s[0], p[0], out_hw[0], h)
    xs, ix = _tap_axis(j, s[1], p[1], out_hw[1], w)
    return (ys, xs), x[:, :, iy, ix]


def _tap_axis(off: int, stride: int, pad: int, out_n: int, n: int):
    """Along one axis: output o reads input ``o*stride + off - pad``, valid for o in
    [ceil((pad - off) / stride), floor((n - 1 + pad - off) / stride)]."""
    first = max(0, -(-(pad - off) // stride))
    last = min(out_n, (n - 1 + pad - off) // stride + 1)
    if last <= first:
        return slice(0, 0), slice(0, 0)
    start = first * stride + off - pad
    return slice(first, last), slice(start, start + stride * (last - first - 1) + 1, stride)


def fold_frozen_bn(w, b, bn):
    """Weights and bias of ``conv`` followed by the FrozenBatchNorm2d ``bn`` as ONE conv:
    ``(w * scale[o], b * scale + shift)`` (``b`` None means a conv without bias)."""
    scale, shift = F.frozen_batch_norm_scale_shift(
        bn.weight.data, bn.bias.data, bn.running_mean.data, bn.running_var.data, bn.eps
    )
    bias = shift if b is None else b * scale + shift
    return w * scale.reshape(-1, 1, 1, 1), bias


def conv_norm_relu(x, conv, norm=None, relu: bool = False):
    """Eval-mode ``relu(norm(conv(x)))`` for a ``Conv2d`` and an optional norm layer: a
    FrozenBatchNorm2d is folded into the conv; another norm (GroupNorm) runs its own eval
    forward on the conv output. The ReLU is applied in place."""
    from .layers import FrozenBatchNorm2d

    if isinstance(norm, FrozenBatchNorm2d):
        b = conv.bias.data if conv.bias is not None else None
        w, b = fold_frozen_bn(conv.weight.data, b, norm)
        return conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, relu=relu)
    y = conv.infer(x, relu=relu and norm is None)
    if norm is not None:
        y = norm(y)
        if relu:
            relu_(y)
    return y


def add_upsampled_(y, x):
    """``y += upsample_nearest(x, size=y.shape[-2:])`` in place (FPN's top-down addition).

    When y is exactly twice x's size, nearest upsampling reads ``x[i // 2, j // 2]``
    (``functional.nearest_indices``), so x is added through a broadcast view of y as
    (N, C, H, 2, W, 2) without building the upsampled map; other sizes gather it first."""
    n, c, h, w = x.shape
    if y.shape[2:] == (2 * h, 2 * w) and y.flags.c_contiguous:
        y.reshape(n, c, h, 2, w, 2)[...] += x[:, :, :, None, :, None]
    else:
        y += F.upsample_nearest_forward(x, y.shape[2:])[0]
    return y
