"""Forward-only kernels for eval mode: no caches, bounded temporaries, work done in place.

Training keeps, for every layer, what its backward will read (inputs, ReLU masks, the im2col
columns of every convolution: 500 MB for one 3x3 conv of FPN's P2 at 800x1088). Inference
differentiates nothing, so in eval mode (``model.eval()``) the layers call these kernels
instead, keep no cache, and a later ``backward`` raises (``Module.forward_cache``). They compute
the same functions as ``functional.py``, equal up to float32 rounding (the order of the sums in
a GEMM, a FrozenBN scale applied to the weights instead of the output):

**Convolution by blocks.** ``functional.conv2d_forward`` builds all the columns at once,
``cols (C*kh*kw, N*Ho*Wo)``, then one GEMM. Here the output positions are cut into blocks (a
band of output rows of one image, or a group of whole images such as the mask head's RoIs) whose
columns fit in ``COLS_BUFFER_BYTES``; one buffer is reused for every block, and each block's
GEMM writes straight into its part of the output:

    y[:, P_blk] = W @ cols(P_blk) + b        W: (O, C*kh*kw), cols(P_blk): (C*kh*kw, |P_blk|)

Only the input rows a band reads are padded, so no padded copy of the whole input exists either.
Bounded blocks are faster, not only smaller: a block's columns are still in cache when its
GEMM reads them, and a buffer below the allocator's mmap threshold is reused instead of being
mapped afresh (a new multi-hundred-megabyte array pays a page fault per page on first touch).

**1x1 convolutions** need no columns: the pixels are the GEMM operand, ``y = W @ x`` on the
channel-major layout ``(C, N*H*W)`` (free for one image), and a stride-s 1x1 conv reads
``x[:, :, ::s, ::s]``. A batch (the mask head's RoIs) is ONE GEMM after a transposing copy, not
one small GEMM per image: with several BLAS threads every call ends on a barrier, and on a busy
machine a hundred small calls wait a hundred times for a descheduled thread.

**FrozenBN folded into the conv.** ``bn(conv(x, W) + b) = conv(x, W * scale) + (b * scale +
shift)`` per output channel, with ``scale = weight / sqrt(var + eps)`` and ``shift = bias -
mean * scale``: one pass over the output less, and no BN output array.

**In place.** Bias, ReLU (``max(y, 0)``, NaN kept as ``functional.relu_forward`` keeps it) and
the residual and top-down additions write into the array that was just produced.
"""

from __future__ import annotations

from ..backend import get_xp
from . import functional as F
from .utils import pair

# Size of the one im2col buffer a blocked convolution reuses. Measured on 2 cores (AVX-512,
# OpenBLAS), 12-16 MiB was fastest for every conv of Mask R-CNN R50-FPN at 800x1088: the block's
# columns are still in cache when its GEMM reads them (64 MiB: 1.1-1.7x slower, 500 MiB, all at
# once: slower still). Under glibc's largest automatic mmap threshold (32 MiB), so the buffer
# comes from the heap and is reused across calls instead of being mapped afresh.
COLS_BUFFER_BYTES = 16 * 2**20


def relu_(y):
    """ReLU in place: ``y = max(y, 0)``; NaN stays NaN. Returns ``y``."""
    return get_xp(y).maximum(y, 0, out=y)


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, relu: bool = False):
    """``functional.conv2d_forward(x, w, b, ...)[0]`` (then ReLU when ``relu``) without a cache.

    x: (N, C, H, W); w: (O, C, kh, kw); b: (O,) or None. Returns y: (N, O, Ho, Wo)."""
    s, p, d, (ho, wo) = F.conv2d_geometry(x, w, stride, padding, dilation)
    xp = get_xp(x, w)
    n, c = x.shape[:2]
    o, _, kh, kw = w.shape
    w2 = w.reshape(o, c * kh * kw)
    if (kh, kw) == (1, 1) and p == (0, 0):
        if s != (1, 1):
            x = x[:, :, : s[0] * (ho - 1) + 1 : s[0], : s[1] * (wo - 1) + 1 : s[1]]
        y = w2 @ F._to_channel_major(x)  # (O, N*Ho*Wo): one GEMM, see the module docstring
        _bias_relu(y, b, relu)
        return F._from_channel_major(y, n, ho, wo)
    y = xp.empty((n, o, ho, wo), dtype=x.dtype)
    k = c * kh * kw
    per_block = max(COLS_BUFFER_BYTES // (k * x.dtype.itemsize), wo)
    buffer = xp.empty(min(per_block, n * ho * wo) * k, dtype=x.dtype)
    for n0, n1, r0, r1 in _blocks(n, ho, wo, per_block):
        x_blk = _padded_rows(
            x, n0, n1, r0 * s[0] - p[0], (r1 - 1) * s[0] - p[0] + (kh - 1) * d[0] + 1, p[1]
        )
        cols = F.im2col(
            x_blk, kh, kw, s, d, (r1 - r0, wo), out=buffer[: k * (n1 - n0) * (r1 - r0) * wo]
        )
        cols = cols.reshape(k, -1)
        if n1 - n0 == 1:  # a band of rows of one image: its columns of y are contiguous
            out = y[n0].reshape(o, ho * wo)[:, r0 * wo : r1 * wo]
            xp.matmul(w2, cols, out=out)
            _bias_relu(out, b, relu)
        else:  # whole images: (O, images*Ho*Wo) back to (images, O, Ho, Wo)
            out = w2 @ cols
            _bias_relu(out, b, relu)
            y[n0:n1] = out.reshape(o, n1 - n0, ho, wo).transpose(1, 0, 2, 3)
    return y


def _bias_relu(y, b, relu: bool) -> None:
    """``y += b`` per output channel (axis -2 of y) and ReLU, both in place."""
    if b is not None:
        y += b.reshape(-1, 1)
    if relu:
        relu_(y)


def _blocks(n: int, ho: int, wo: int, per_block: int):
    """``(n0, n1, r0, r1)``: images [n0, n1) and output rows [r0, r1) of each block, at most
    ``per_block`` output positions each (at least one row): whole images when several fit."""
    images = per_block // (ho * wo)
    if images >= 1:
        for n0 in range(0, n, images):
            yield n0, min(n0 + images, n), 0, ho
        return
    rows = max(per_block // wo, 1)
    for n0 in range(n):
        for r0 in range(0, ho, rows):
            yield n0, n0 + 1, r0, min(r0 + rows, ho)


def _padded_rows(x, n0: int, n1: int, lo: int, hi: int, pw: int):
    """Input rows [lo, hi) of images [n0, n1), channel-major ``(C, images, hi - lo, W + 2 pw)``,
    zero where a row lies outside the image (lo < 0, hi > H) and in the ``pw`` columns of
    padding on each side: the part of ``functional.pad_channel_major(x)`` one block reads."""
    xp = get_xp(x)
    _, c, h, w = x.shape
    out = xp.zeros((c, n1 - n0, hi - lo, w + 2 * pw), dtype=x.dtype)
    a, z = max(lo, 0), min(hi, h)
    if z > a:
        out[:, :, a - lo : z - lo, pw : pw + w] = x[n0:n1, :, a:z].transpose(1, 0, 2, 3)
    return out


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, dilation=1, relu=False):
    """``functional.conv_transpose2d_forward(...)[0]`` (then ReLU) without a cache.

    When the kernel equals the stride with no padding or dilation (the mask predictor's 2x2,
    stride 2) the output windows do not overlap: every input pixel writes its own kh x kw
    patch, ``y[n, o, y*kh + i, x*kw + j] = sum_c w[c, o, i, j] x[n, c, y, x] + b[o]``: one GEMM
    and a strided copy, with no col2im sum. Other settings use the functional path."""
    kh, kw = w.shape[2:]
    s, p = pair(stride, "stride", minimum=1), pair(padding, "padding", minimum=0)
    plain = (
        s == (kh, kw)
        and p == (0, 0)
        and pair(output_padding, "output_padding", minimum=0) == (0, 0)
        and pair(dilation, "dilation", minimum=1) == (1, 1)
        and x.ndim == 4
        and w.ndim == 4
        and x.shape[1] == w.shape[0]
    )
    if not plain:
        y, _ = F.conv_transpose2d_forward(x, w, b, stride, padding, output_padding, dilation)
        return relu_(y) if relu else y
    xp = get_xp(x, w)
    n, cin, h, wd = x.shape
    cout = w.shape[1]
    # (Cout*kh*kw, Cin) @ (Cin, N*H*W): one GEMM for the batch, on the channel-major layout
    patches = w.reshape(cin, cout * kh * kw).T @ F._to_channel_major(x)
    y = xp.empty((n, cout, h, kh, wd, kw), dtype=x.dtype)
    y[...] = patches.reshape(cout, kh, kw, n, h, wd).transpose(3, 0, 4, 1, 5, 2)
    y = y.reshape(n, cout, h * kh * wd * kw)
    _bias_relu(y, b, relu)
    return y.reshape(n, cout, h * kh, wd * kw)


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
