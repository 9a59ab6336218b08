"""Convolution, forward and backward, by im2col + GEMM (the transposed convolution, built from
the same pieces, is in ``conv_transpose.py``).

``functional.py`` re-exports everything here (``F.conv2d_forward``, ``F.im2col`` ...), and the
eval-mode kernels of ``inference.py`` call the same blocked convolution. For one image, the
columns matrix holds every receptive field:

    cols[c, i, j, oy, ox] = x_pad[c, oy*s + i*d, ox*s + j*d]          (C*kh*kw, Ho*Wo)
    y[o, :] = W[o, :] @ cols + b[o]                                    W: (O, C*kh*kw)

and the backward is two GEMMs: ``dW = dy @ cols.T`` and the input gradient. How the copies
around those GEMMs are kept few:

- **Blocks.** The output positions are cut into blocks (a band of output rows of one image, or a
  group of whole images such as the mask head's RoIs) whose columns fit in
  ``COLS_BUFFER_BYTES``; each block's columns are built in one reused buffer and its GEMM
  writes straight into its part of the output (``conv2d_blocks``). When the whole batch is one
  block (every convolution of the shapes demo) training keeps those columns for ``dW``; when it
  is not (ResNet-50 at 800x1088: 125 MB of columns for one 3x3 conv on P2) the backward builds
  them again, block by block: writing and re-reading a columns matrix that large from memory
  costs more than a second im2col whose output is still in cache when its GEMM reads it.
- **Stride 1: no col2im.** ``dx`` is itself a convolution, of ``dy`` zero-padded by
  ``d*(k-1) - p`` with the kernel flipped in both axes and its in/out channels swapped
  (``_input_grad_by_conv``): slice *copies* and a GEMM of the size of ``W.T @ dy``, instead of
  col2im's strided additions (2-3x the cost of a copy). Other strides use ``dcols = W.T @ dy``
  and col2im, the adjoint of im2col.
- **1x1 without padding: no columns at all.** The pixels are the GEMM operand. On the
  ``(N, C, Ho*Wo)`` view of the (for stride s, ``[::s, ::s]``-sliced) input, ``W @ x`` is one
  GEMM per image whose output already is NCHW, so no layout copy is made either way
  (``_conv1x1_forward``). A large batch of large products is ONE GEMM on the channel-major
  layout instead: with several BLAS threads every call ends on a barrier, and on a busy machine
  a hundred calls wait a hundred times for a descheduled thread.

A cache of more than three parts is a ``NamedTuple`` whose fields the backward reads by name.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp
from .utils import pair


class ConvCache(NamedTuple):
    """What :func:`conv2d_backward` needs from :func:`conv2d_forward`."""

    x_shape: tuple  # (N, C, H, W) of the input
    weight: object  # (O, C, kh, kw)
    has_bias: bool
    # The GEMM operand of dW: im2col columns (C*kh*kw, N*Ho*Wo) when the batch was one block
    # (else None); for a 1x1 convolution without padding, the pixels it read, (N, C, Ho*Wo)
    # (a view of the input when the stride is 1) or channel-major (C, N*Ho*Wo).
    cols: object
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out_hw: tuple[int, int]  # (Ho, Wo)
    x: object = None  # the input, kept when cols is None: the backward rebuilds the columns


def conv_output_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a convolution along one axis: floor((size + 2p - d(k-1) - 1) / s) + 1."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# --------------------------------------------------------------------------------------------
# im2col / col2im
# --------------------------------------------------------------------------------------------
# The columns matrix is laid out channel-major, (C, kh, kw, N, Ho, Wo), so that a whole batch is
# ONE large GEMM with the weights, W (O, C*kh*kw) @ cols (C*kh*kw, N*Ho*Wo): many small images
# (the mask head runs on 128+ RoIs of 14x14) would otherwise be many small, slow GEMMs.
def im2col(x_cm, kh: int, kw: int, stride=(1, 1), dilation=(1, 1), out_hw=None, out=None):
    """Gather receptive fields of an already padded, channel-major ``x_cm: (C, N, Hp, Wp)``
    (see :func:`pad_channel_major`).

    Returns ``cols: (C, kh, kw, N, Ho, Wo)``, contiguous, so ``cols.reshape(C*kh*kw, N*Ho*Wo)``
    is free. One strided slice copy per kernel offset (kh*kw copies, each vectorised).
    ``out``: a contiguous buffer of exactly that many elements to fill instead of a new array.
    """
    xp = get_xp(x_cm)
    c, n, hp, wp = x_cm.shape
    sh, sw = stride
    dh, dw = dilation
    if out_hw is None:
        out_hw = (conv_output_size(hp, kh, sh, 0, dh), conv_output_size(wp, kw, sw, 0, dw))
    ho, wo = out_hw
    shape = (c, kh, kw, n, ho, wo)
    cols = xp.empty(shape, dtype=x_cm.dtype) if out is None else out.reshape(shape)
    for i in range(kh):
        y0 = i * dh
        for j in range(kw):
            x0 = j * dw
            cols[:, i, j] = x_cm[
                :, :, y0 : y0 + sh * (ho - 1) + 1 : sh, x0 : x0 + sw * (wo - 1) + 1 : sw
            ]
    return cols


def pad_channel_major(x, ph: int, pw: int, out_hw=None):
    """Zero-pad ``x: (N, C, H, W)`` by (ph, pw) and lay it out as ``(C, N, Hp, Wp)`` in one copy.

    im2col reads kh*kw shifted windows of this buffer; reading them from a contiguous
    channel-major array instead of a transposed NCHW view makes each slice copy cheaper.
    ``out_hw`` gives a larger frame than H + 2ph (extra rows/columns at the end stay zero).
    """
    xp = get_xp(x)
    n, c, h, w = x.shape
    hp, wp = out_hw if out_hw is not None else (h + 2 * ph, w + 2 * pw)
    out = xp.zeros((c, n, hp, wp), dtype=x.dtype)
    out[:, :, ph : ph + h, pw : pw + w] = x.transpose(1, 0, 2, 3)
    return out


def col2im(cols, padded_shape, stride=(1, 1), dilation=(1, 1)):
    """Adjoint of :func:`im2col`: scatter-add ``cols: (C, kh, kw, N, Ho, Wo)`` into a zero
    array of ``padded_shape = (N, C, Hp, Wp)``. Overlapping fields add up, which is exactly the
    chain rule for a pixel read by several output positions."""
    xp = get_xp(cols)
    c, kh, kw, n, ho, wo = cols.shape
    sh, sw = stride
    dh, dw = dilation
    out = xp.zeros((padded_shape[1], padded_shape[0]) + tuple(padded_shape[2:]), dtype=cols.dtype)
    for i in range(kh):
        y0 = i * dh
        for j in range(kw):
            x0 = j * dw
            out[:, :, y0 : y0 + sh * (ho - 1) + 1 : sh, x0 : x0 + sw * (wo - 1) + 1 : sw] += cols[
                :, i, j
            ]
    return out.transpose(1, 0, 2, 3)  # (N, C, Hp, Wp) view of the channel-major buffer


def _unpad(x, ph: int, pw: int):
    h, w = x.shape[2], x.shape[3]
    return x[:, :, ph : h - ph, pw : w - pw]


def _to_channel_major(a):
    """(N, C, H, W) -> (C, N*H*W), the GEMM operand layout (free when N == 1)."""
    xp = get_xp(a)
    n, c, h, w = a.shape
    return xp.ascontiguousarray(a.reshape(n, c, h * w).transpose(1, 0, 2)).reshape(c, n * h * w)


def _from_channel_major(a, n: int, h: int, w: int, bias=None):
    """(C, N*H*W) -> (N, C, H, W), contiguous (free when N == 1 and no bias); ``bias`` (C,) is
    added during that copy, so it costs no pass of its own."""
    xp = get_xp(a)
    c = a.shape[0]
    nchw = a.reshape(c, n, h, w).transpose(1, 0, 2, 3)
    if bias is None:
        return xp.ascontiguousarray(nchw)
    return xp.add(nchw, bias.reshape(1, c, 1, 1), out=xp.empty((n, c, h, w), dtype=a.dtype))


# --------------------------------------------------------------------------------------------
# Convolution by blocks of output positions
# --------------------------------------------------------------------------------------------
# Size of the one im2col buffer a blocked convolution reuses. Measured on 2 cores (AVX-512,
# OpenBLAS), 12-16 MiB was fastest for every conv of Mask R-CNN R50-FPN at 800x1088: the block's
# columns are still in cache when its GEMM reads them (64 MiB: 1.1-1.7x slower, 500 MiB, all at
# once: slower still). Under glibc's largest automatic mmap threshold (32 MiB), so the buffer
# comes from the heap and is reused across calls instead of being mapped afresh.
COLS_BUFFER_BYTES = 16 * 2**20


def relu_(y):
    """ReLU in place: ``y = max(y, 0)``; NaN stays NaN. Returns ``y``."""
    return get_xp(y).maximum(y, 0, out=y)


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
    padding on each side: the part of :func:`pad_channel_major` one block reads."""
    xp = get_xp(x)
    _, c, h, w = x.shape
    out = xp.zeros((c, n1 - n0, hi - lo, w + 2 * pw), dtype=x.dtype)
    a, z = max(lo, 0), min(hi, h)
    if z > a:
        out[:, :, a - lo : z - lo, pw : pw + w] = x[n0:n1, :, a:z].transpose(1, 0, 2, 3)
    return out


def _per_block(k: int, itemsize: int, wo: int) -> int:
    """Output positions per block: as many as ``COLS_BUFFER_BYTES`` of columns hold, at least
    one output row."""
    return max(COLS_BUFFER_BYTES // (k * itemsize), wo)


def _column_blocks(x, kh: int, kw: int, s, p, d, out_hw, buffer=True):
    """``(n0, n1, r0, r1, cols)`` for every block (:func:`_blocks`): ``cols`` are the im2col
    columns ``(C*kh*kw, images*rows*Wo)`` of images [n0, n1) and output rows [r0, r1), all in
    one reused buffer (``buffer=False``: a new array each, for a caller that keeps them)."""
    xp = get_xp(x)
    n, c = x.shape[:2]
    ho, wo = out_hw
    k = c * kh * kw
    per_block = _per_block(k, x.dtype.itemsize, wo)
    store = xp.empty(min(per_block, n * ho * wo) * k, dtype=x.dtype) if buffer else None
    for n0, n1, r0, r1 in _blocks(n, ho, wo, per_block):
        lo = r0 * s[0] - p[0]
        x_blk = _padded_rows(x, n0, n1, lo, lo + (r1 - r0 - 1) * s[0] + (kh - 1) * d[0] + 1, p[1])
        m = (n1 - n0) * (r1 - r0) * wo
        out = store[: k * m] if buffer else None
        yield n0, n1, r0, r1, im2col(x_blk, kh, kw, s, d, (r1 - r0, wo), out=out).reshape(k, m)


def conv2d_blocks(x, w, b, s, p, d, out_hw, relu: bool = False, keep_cols: bool = False):
    """``y = conv(x, w) + b`` (then ReLU in place when ``relu``) block by block (module
    docstring). ``s, p, d, out_hw``: pairs, as :func:`conv2d_geometry` returns them.

    Returns ``(y, cols)``: ``cols`` is the whole columns matrix ``(C*kh*kw, N*Ho*Wo)`` when
    ``keep_cols`` and the batch was one block, else None."""
    xp = get_xp(x, w)
    n, c = x.shape[:2]
    o, _, kh, kw = w.shape
    ho, wo = out_hw
    w2 = w.reshape(o, c * kh * kw)
    keep = keep_cols and n * ho * wo <= _per_block(c * kh * kw, x.dtype.itemsize, wo)
    y = xp.empty((n, o, ho, wo), dtype=x.dtype)
    cols = None
    for n0, n1, r0, r1, cols in _column_blocks(x, kh, kw, s, p, d, out_hw, buffer=not keep):
        if n1 - n0 == 1:  # a band of rows of one image: its columns of y are contiguous
            out = y[n0].reshape(o, ho * wo)[:, r0 * wo : r1 * wo]
            xp.matmul(w2, cols, out=out)
            _bias_relu(out, b, relu)
        else:  # whole images: (O, images*Ho*Wo) back to (images, O, Ho, Wo), bias on the way
            y[n0:n1] = _from_channel_major(w2 @ cols, n1 - n0, ho, wo, bias=b)
            if relu:
                relu_(y[n0:n1])
    return y, (cols if keep else None)


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------
def conv2d_geometry(x, w, stride=1, padding=0, dilation=1):
    """Check a convolution's shapes: ``(stride, padding, dilation, (Ho, Wo))`` as pairs of ints,
    or a ValueError naming what does not fit."""
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d expects x (N,C,H,W) and w (O,C,kh,kw), got {x.shape}, {w.shape}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"conv2d: x has {x.shape[1]} channels but weight expects {w.shape[1]}")
    h, wd = x.shape[2:]
    kh, kw = w.shape[2:]
    s, p = pair(stride, "stride", minimum=1), pair(padding, "padding", minimum=0)
    d = pair(dilation, "dilation", minimum=1)
    ho = conv_output_size(h, kh, s[0], p[0], d[0])
    wo = conv_output_size(wd, kw, s[1], p[1], d[1])
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv2d: input {h}x{wd} too small for kernel {kh}x{kw} with padding {p}")
    return s, p, d, (ho, wo)


def is_plain_1x1(w, p) -> bool:
    """A 1x1 convolution without padding: its pixels are the GEMM operand (no im2col)."""
    return w.shape[2:] == (1, 1) and p == (0, 0)


def conv2d_forward(x, w, b=None, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation, as in PyTorch).

    x: (N, C, H, W); w: (O, C, kh, kw); b: (O,) or None.
    Returns y: (N, O, Ho, Wo) and the cache for :func:`conv2d_backward`.
    """
    s, p, d, out_hw = conv2d_geometry(x, w, stride, padding, dilation)
    if is_plain_1x1(w, p):
        y, cols = _conv1x1_forward(x, w, b, s, out_hw)
    else:
        y, cols = conv2d_blocks(x, w, b, s, p, d, out_hw, keep_cols=True)
    # Without kept columns the backward rebuilds them from x, block by block.
    return y, ConvCache(
        x.shape, w, b is not None, cols, s, p, d, out_hw, x if cols is None else None
    )


# Up to this many images, a 1x1 convolution is one GEMM per image on the NCHW layout; a larger
# batch only when each image's product has at most this many multiply-adds: OpenBLAS runs a GEMM
# of up to 65536 * GEMM_MULTITHREAD_THRESHOLD (4 by default) of them on one thread, so there is
# no barrier to wait on. (Measured, 19 RoIs of 64 -> 3 channels at 28x28, one thread: forward
# and backward take 0.7 ms with a GEMM per image, 1.8 ms as one channel-major GEMM.)
_PER_IMAGE_GEMMS_MAX_IMAGES = 8
_PER_IMAGE_GEMM_MAX_MACS = 2**18


def _conv1x1_forward(x, w, b, s, out_hw):
    """A 1x1 convolution without padding on the pixels it reads (``x[:, :, ::s, ::s]``):
    ``y[n] = W @ x[n]`` per image on the ``(N, C, Ho*Wo)`` view, written straight into the NCHW
    output, or for a large batch of large products one GEMM on the channel-major layout
    ``(C, N*Ho*Wo)``. Returns ``(y, pixels)``; the pixels (either layout) are the cache's GEMM
    operand of dW."""
    n, c = x.shape[:2]
    o = w.shape[0]
    ho, wo = out_hw
    if s != (1, 1):
        x = x[:, :, : s[0] * (ho - 1) + 1 : s[0], : s[1] * (wo - 1) + 1 : s[1]]
    if n <= _PER_IMAGE_GEMMS_MAX_IMAGES or o * c * ho * wo <= _PER_IMAGE_GEMM_MAX_MACS:
        pixels = x.reshape(n, c, ho * wo)  # a view for a contiguous stride-1 input, else a copy
        y = w.reshape(o, c) @ pixels  # (N, O, Ho*Wo)
        if b is not None:
            y += b.reshape(o, 1)
        return y.reshape(n, o, ho, wo), pixels
    pixels = _to_channel_major(x)  # (C, N*Ho*Wo)
    return _from_channel_major(w.reshape(o, c) @ pixels, n, ho, wo, bias=b), pixels


def conv2d_backward(dy, cache, need_dx: bool = True):
    """Gradients of :func:`conv2d_forward`: returns (dx, dw, db) (db is None without bias).

    dW = dY @ cols^T, then the input gradient (module docstring: a convolution of dY at
    stride 1, else dcols = W^T @ dY and col2im). ``need_dx=False`` skips the input gradient
    (dx is None): the first layer of a network never needs the gradient of the image, and
    that GEMM is a third of its cost."""
    w, s, p, d = cache.weight, cache.stride, cache.padding, cache.dilation
    n, c, h, wd = cache.x_shape
    o, _, kh, kw = w.shape
    if is_plain_1x1(w, p):
        return _conv1x1_backward(dy, cache, need_dx)
    ho, wo = cache.out_hw
    dy2 = _to_channel_major(dy)  # (O, N*Ho*Wo)
    db = dy2.sum(axis=1) if cache.has_bias else None
    dw = _weight_grad(dy2, cache)
    if not need_dx:
        return None, dw, db
    if s == (1, 1) and p[0] <= d[0] * (kh - 1) and p[1] <= d[1] * (kw - 1):
        return _input_grad_by_conv(dy, w, p, d, (h, wd)), dw, db
    dcols = w.reshape(o, c * kh * kw).T @ dy2
    padded = (n, c, h + 2 * p[0], wd + 2 * p[1])
    dx = col2im(dcols.reshape(c, kh, kw, n, ho, wo), padded, s, d)
    return _unpad(dx, *p), dw, db


def _weight_grad(dy2, cache):
    """dW = dY cols^T for ``dy2: (O, N*Ho*Wo)``, computed as (cols dY^T)^T: with few output
    channels and a long inner dimension the transposed-B product is several times slower in
    OpenBLAS. Without kept columns, the sum of that product over the blocks of columns rebuilt
    from the input."""
    w = cache.weight
    if cache.cols is not None:
        return (cache.cols @ dy2.T).T.reshape(w.shape)
    kh, kw = w.shape[2:]
    ho, wo = cache.out_hw
    dwt = get_xp(dy2).zeros((w[0].size, w.shape[0]), dtype=dy2.dtype)  # (C*kh*kw, O)
    blocks = _column_blocks(cache.x, kh, kw, cache.stride, cache.padding, cache.dilation, (ho, wo))
    for n0, _, r0, _, cols in blocks:
        q0 = (n0 * ho + r0) * wo  # the block's first output position
        dwt += cols @ dy2[:, q0 : q0 + cols.shape[1]].T
    return dwt.T.reshape(w.shape)


def _input_grad_by_conv(dy, w, p, d, hw):
    """dx of a stride-1 convolution, as a convolution of dy (no col2im).

    With ``q = d*(k-1) - p`` and ``dy_pad`` dy zero-padded by q on each side,
    ``dx[n, c, y, x] = sum_{o,i,j} dy_pad[n, o, y + i*d, x + j*d] * w[o, c, k-1-i, k-1-j]``:
    substitute ``i -> k-1-i`` in ``dx[y] = sum_i dy[y + p - i*d] w[i]``. Needs ``q >= 0``."""
    kh, kw = w.shape[2:]
    w_flip = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # (C, O, kh, kw), a view
    q = (d[0] * (kh - 1) - p[0], d[1] * (kw - 1) - p[1])
    return conv2d_blocks(dy, w_flip, None, (1, 1), q, d, hw)[0]


def _conv1x1_backward(dy, cache, need_dx: bool):
    """Gradients of :func:`_conv1x1_forward`, in the layout its pixels were kept in: per image
    on NCHW (no copies: ``dW = sum_n (x[n] dy[n]^T)^T``, ``dx[n] = W^T dy[n]``), or
    channel-major. Zeros between the pixels read when the stride is > 1."""
    xp = get_xp(dy)
    w, s, pixels = cache.weight, cache.stride, cache.cols
    n, c, h, wd = cache.x_shape
    o = w.shape[0]
    ho, wo = cache.out_hw
    if pixels.ndim == 3:  # (N, C, Ho*Wo)
        dy3 = dy.reshape(n, o, ho * wo)
        db = dy3.sum(axis=(0, 2)) if cache.has_bias else None
        # (N, C, O) summed over images, transposed for the reason given in _weight_grad
        dw = xp.matmul(pixels, dy3.transpose(0, 2, 1)).sum(axis=0).T.reshape(w.shape)
        dx = (w.reshape(o, c).T @ dy3).reshape(n, c, ho, wo) if need_dx else None
    else:  # (C, N*Ho*Wo)
        dy2 = _to_channel_major(dy)
        db = dy2.sum(axis=1) if cache.has_bias else None
        dw = (pixels @ dy2.T).T.reshape(w.shape)
        dx = _from_channel_major(w.reshape(o, c).T @ dy2, n, ho, wo) if need_dx else None
    if dx is not None and s != (1, 1):
        full = xp.zeros((n, c, h, wd), dtype=dx.dtype)
        full[:, :, : s[0] * (ho - 1) + 1 : s[0], : s[1] * (wo - 1) + 1 : s[1]] = dx
        dx = full
    return dx, dw, db
