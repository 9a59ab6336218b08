"""Pure forward/backward pairs: ``op_forward(...) -> (out, cache)``, ``op_backward(dout, cache)``.

Layers in ``layers.py`` are thin wrappers around these; a stage that applies one set of weights
several times (the RPN head over FPN levels) calls the pairs directly and sums the gradients.
A cache of more than three parts is a ``NamedTuple`` (``ConvCache``, ``ConvTransposeCache``,
``MaxPoolCache``, ``GroupNormCache``) whose fields the backward reads by name.
Shapes are NCHW; weights follow PyTorch's layouts so checkpoints line up name by name.

Convolution is im2col + GEMM. For one image, the columns matrix holds every receptive field:

    cols[c, i, j, oy, ox] = x_pad[c, oy*s + i*d, ox*s + j*d]          (C*kh*kw, Ho*Wo)
    y[o, :] = W[o, :] @ cols + b[o]                                    W: (O, C*kh*kw)

and the backward is two GEMMs plus the adjoint of im2col (col2im, a scatter-add):

    dW = dy @ cols.T        dcols = W.T @ dy        dx = col2im(dcols)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import get_xp
from .utils import pair


class ConvCache(NamedTuple):
    """What :func:`conv2d_backward` needs from :func:`conv2d_forward`."""

    x_shape: tuple  # (N, C, H, W) of the input
    weight: object  # (O, C, kh, kw)
    has_bias: bool
    cols: object  # im2col columns (C*kh*kw, N*Ho*Wo), the GEMM operand of dW
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out_hw: tuple[int, int]  # (Ho, Wo)


class ConvTransposeCache(NamedTuple):
    """What :func:`conv_transpose2d_backward` needs from :func:`conv_transpose2d_forward`."""

    x_shape: tuple  # (N, Cin, H, W) of the input
    x_cm: object  # the input channel-major, (Cin, N*H*W), the GEMM operand of dW
    weight: object  # (Cin, Cout, kh, kw)
    has_bias: bool
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]
    dilation: tuple[int, int]
    full_hw: tuple[int, int]  # the uncropped output size, before padding and output_padding


class MaxPoolCache(NamedTuple):
    """What :func:`max_pool2d_backward` needs from :func:`max_pool2d_forward`."""

    x_shape: tuple  # (N, C, H, W) of the input
    argmax: object  # (N, C, Ho, Wo) int32: row-major offset i*kw + j of each window's maximum
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


class GroupNormCache(NamedTuple):
    """What :func:`group_norm_backward` needs from :func:`group_norm_forward`."""

    xhat: object  # (N, C, H, W), the normalised input before the affine transform
    inv_std: object  # (N, G, 1), 1 / sqrt(var + eps) per group
    num_groups: int
    weight: object  # (C,) or None without the affine transform


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


def _pad(x, ph: int, pw: int, value=0.0):
    if ph == 0 and pw == 0:
        return x
    xp = get_xp(x)
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _unpad(x, ph: int, pw: int):
    h, w = x.shape[2], x.shape[3]
    return x[:, :, ph : h - ph, pw : w - pw]


def _to_channel_major(a):
    """(N, C, H, W) -> (C, N*H*W), the GEMM operand layout (free when N == 1)."""
    xp = get_xp(a)
    n, c, h, w = a.shape
    return xp.ascontiguousarray(a.reshape(n, c, h * w).transpose(1, 0, 2)).reshape(c, n * h * w)


def _from_channel_major(a, n: int, h: int, w: int):
    """(C, N*H*W) -> (N, C, H, W), contiguous (free when N == 1)."""
    xp = get_xp(a)
    c = a.shape[0]
    return xp.ascontiguousarray(a.reshape(c, n, h, w).transpose(1, 0, 2, 3))


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


def conv2d_forward(x, w, b=None, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation, as in PyTorch).

    x: (N, C, H, W); w: (O, C, kh, kw); b: (O,) or None.
    Returns y: (N, O, Ho, Wo) and the cache for :func:`conv2d_backward`.
    """
    s, p, d, (ho, wo) = conv2d_geometry(x, w, stride, padding, dilation)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    if (kh, kw) == (1, 1) and s == (1, 1) and p == (0, 0):
        cols = _to_channel_major(x)  # a 1x1 convolution's columns are the pixels themselves
    else:
        x_cm = pad_channel_major(x, *p)
        cols = im2col(x_cm, kh, kw, s, d, (ho, wo)).reshape(c * kh * kw, n * ho * wo)
    y = w.reshape(o, c * kh * kw) @ cols  # (O, N*Ho*Wo): one GEMM for the whole batch
    if b is not None:
        y += b.reshape(o, 1)
    cache = ConvCache(x.shape, w, b is not None, cols, s, p, d, (ho, wo))
    return _from_channel_major(y, n, ho, wo), cache


def conv2d_backward(dy, cache, need_dx: bool = True):
    """Gradients of :func:`conv2d_forward`: returns (dx, dw, db) (db is None without bias).

    dW = dY @ cols^T and dcols = W^T @ dY (two GEMMs), then dx = col2im(dcols).
    ``need_dx=False`` skips the input gradient (dx is None): the first layer of a network
    never needs the gradient of the image, and that GEMM plus col2im is a third of its cost."""
    w, s, p, d = cache.weight, cache.stride, cache.padding, cache.dilation
    n, c, h, wd = cache.x_shape
    o, _, kh, kw = w.shape
    ho, wo = cache.out_hw
    dy2 = _to_channel_major(dy)  # (O, N*Ho*Wo)
    db = dy2.sum(axis=1) if cache.has_bias else None
    # dW = dY cols^T, computed as (cols dY^T)^T: with few output channels and a long inner
    # dimension the transposed-B product is several times slower in OpenBLAS.
    dw = (cache.cols @ dy2.T).T.reshape(w.shape)
    if not need_dx:
        return None, dw, db
    dcols = w.reshape(o, c * kh * kw).T @ dy2
    if (kh, kw) == (1, 1) and s == (1, 1) and p == (0, 0):
        dx = _from_channel_major(dcols, n, h, wd)
    else:
        padded = (n, c, h + 2 * p[0], wd + 2 * p[1])
        dx = col2im(dcols.reshape(c, kh, kw, n, ho, wo), padded, s, d)
        dx = _unpad(dx, *p)
    return dx, dw, db


def conv_transpose2d_forward(x, w, b=None, stride=1, padding=0, output_padding=0, dilation=1):
    """Transposed convolution, the adjoint of conv2d with respect to its input (PyTorch layout).

    x: (N, Cin, H, W); w: (Cin, Cout, kh, kw); b: (Cout,) or None.
    Ho = (H - 1)*s - 2p + d*(kh - 1) + output_padding + 1.
    Every input pixel spreads ``x[n, ci, y, x] * w[ci, :, i, j]`` into output position
    (y*s + i*d - p, x*s + j*d - p): a GEMM to columns followed by col2im.
    """
    xp = get_xp(x)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(
            f"conv_transpose2d expects x (N,Cin,H,W), w (Cin,Cout,kh,kw), got {x.shape}, {w.shape}"
        )
    if x.shape[1] != w.shape[0]:
        raise ValueError(
            f"conv_transpose2d: x has {x.shape[1]} channels but weight expects {w.shape[0]}"
        )
    n, cin, h, wd = x.shape
    _, cout, kh, kw = w.shape
    s, p = pair(stride, "stride", minimum=1), pair(padding, "padding", minimum=0)
    op = pair(output_padding, "output_padding", minimum=0)
    d = pair(dilation, "dilation", minimum=1)
    if op[0] >= max(s[0], d[0]) or op[1] >= max(s[1], d[1]):
        raise ValueError("output_padding must be smaller than either stride or dilation")
    full_h = (h - 1) * s[0] + d[0] * (kh - 1) + 1
    full_w = (wd - 1) * s[1] + d[1] * (kw - 1) + 1
    ho, wo = full_h - 2 * p[0] + op[0], full_w - 2 * p[1] + op[1]
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv_transpose2d: padding {p} leaves no output for input {h}x{wd}")
    x_cm = _to_channel_major(x)  # (Cin, N*H*W)
    cols = w.reshape(cin, cout * kh * kw).T @ x_cm  # (Cout*kh*kw, N*H*W)
    # The full (uncropped) output plus room for output_padding rows/columns at the end.
    full = col2im(
        cols.reshape(cout, kh, kw, n, h, wd), (n, cout, full_h + op[0], full_w + op[1]), s, d
    )
    y = xp.ascontiguousarray(full[:, :, p[0] : p[0] + ho, p[1] : p[1] + wo])
    if b is not None:
        y += b.reshape(1, cout, 1, 1)
    cache = ConvTransposeCache(x.shape, x_cm, w, b is not None, s, p, op, d, (full_h, full_w))
    return y, cache


def conv_transpose2d_backward(dy, cache):
    """Gradients of :func:`conv_transpose2d_forward`: (dx, dw, db).

    The adjoint of col2im is im2col, so dx is an ordinary convolution of dy with w."""
    w, s, p, d = cache.weight, cache.stride, cache.padding, cache.dilation
    op, (full_h, full_w) = cache.output_padding, cache.full_hw
    n, cin, h, wd = cache.x_shape
    _, cout, kh, kw = w.shape
    db = dy.sum(axis=(0, 2, 3)) if cache.has_bias else None
    # Undo the crop: place dy back into the full output frame (zeros where the crop cut).
    dfull = pad_channel_major(dy, p[0], p[1], (full_h + op[0], full_w + op[1]))
    dcols = im2col(dfull, kh, kw, s, d, (h, wd)).reshape(cout * kh * kw, n * h * wd)
    dx = _from_channel_major(w.reshape(cin, cout * kh * kw) @ dcols, n, h, wd)
    dw = (dcols @ cache.x_cm.T).T.reshape(w.shape)  # = x_cm dcols^T (see conv2d_backward)
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# Linear, ReLU
# --------------------------------------------------------------------------------------------
def linear_forward(x, w, b=None):
    """x: (N, in); w: (out, in); b: (out,). y = x @ w.T + b."""
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear expects x (N, {w.shape[1]}), got {x.shape}")
    y = x @ w.T
    if b is not None:
        y += b
    return y, (x, w, b is not None)


def linear_backward(dy, cache):
    x, w, has_bias = cache
    return dy @ w, dy.T @ x, (dy.sum(axis=0) if has_bias else None)


def relu_forward(x):
    """max(x, 0) that keeps NaN (as PyTorch): only ``x <= 0`` becomes 0, so a NaN input is not
    hidden behind a finite output. Returns ``(y, mask)``, mask True where the gradient passes."""
    xp = get_xp(x)
    mask = ~(x <= 0)
    return xp.where(mask, x, xp.zeros((), dtype=x.dtype)), mask


def relu_backward(dy, mask):
    return dy * mask


# --------------------------------------------------------------------------------------------
# Max pooling
# --------------------------------------------------------------------------------------------
def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """Max pooling with -inf padding (as PyTorch). Ties: the first maximum in row-major
    window order wins (a later element must be strictly greater), so the backward is
    deterministic. Returns y: (N, C, Ho, Wo) and a cache holding the argmax offsets."""
    xp = get_xp(x)
    k = pair(kernel_size, "kernel_size", minimum=1)
    s = pair(stride if stride is not None else kernel_size, "stride", minimum=1)
    p = pair(padding, "padding", minimum=0)
    if p[0] * 2 > k[0] or p[1] * 2 > k[1]:
        raise ValueError(f"max_pool2d: padding {p} must be at most half the kernel {k}")
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, k[0], s[0], p[0], 1), conv_output_size(w, k[1], s[1], p[1], 1)
    xpad = _pad(x, *p, value=-np.inf)
    y = None
    arg = xp.zeros((n, c, ho, wo), dtype=np.int32)
    for i in range(k[0]):
        for j in range(k[1]):
            v = xpad[:, :, i : i + s[0] * (ho - 1) + 1 : s[0], j : j + s[1] * (wo - 1) + 1 : s[1]]
            if y is None:
                y = v.copy()
                continue
            better = v > y
            y = xp.where(better, v, y)
            arg = xp.where(better, i * k[1] + j, arg)
    return y, MaxPoolCache(x.shape, arg, k, s, p)


def max_pool2d_backward(dy, cache):
    """Each window's gradient goes to its argmax (the first maximum, as in the forward)."""
    arg, k, s, p = cache.argmax, cache.kernel_size, cache.stride, cache.padding
    xp = get_xp(dy)
    n, c, h, w = cache.x_shape
    ho, wo = dy.shape[2], dy.shape[3]
    dpad = xp.zeros((n, c, h + 2 * p[0], w + 2 * p[1]), dtype=dy.dtype)
    for i in range(k[0]):
        for j in range(k[1]):
            contrib = xp.where(arg == i * k[1] + j, dy, 0)
            dpad[:, :, i : i + s[0] * (ho - 1) + 1 : s[0], j : j + s[1] * (wo - 1) + 1 : s[1]] += (
                contrib
            )
    return _unpad(dpad, *p)


# --------------------------------------------------------------------------------------------
# Nearest upsampling to a target size
# --------------------------------------------------------------------------------------------
def nearest_indices(in_size: int, out_size: int):
    """Source index of every output index, as PyTorch's 'nearest' mode computes it:
    floor(dst * (in/out)) with the scale in float32, clamped to in - 1."""
    if out_size == in_size:
        return np.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def upsample_nearest_forward(x, size):
    """Nearest-neighbour resize of x: (N, C, H, W) to ``size = (Ho, Wo)`` (any sizes, e.g. the
    odd feature maps of FPN's top-down path)."""
    xp = get_xp(x)
    ho, wo = pair(size, "size", minimum=0)
    iy = xp.asarray(nearest_indices(x.shape[2], ho))
    ix = xp.asarray(nearest_indices(x.shape[3], wo))
    return x[:, :, iy[:, None], ix[None, :]], (x.shape, iy, ix)


def upsample_nearest_backward(dy, cache):
    """Every input pixel receives the sum of the gradients of the outputs that copied it."""
    x_shape, iy, ix = cache
    xp = get_xp(dy)
    n, c, h, w = x_shape
    # Sum over output columns first (into input columns), then over rows; index_add style.
    dx_cols = xp.zeros((n, c, dy.shape[2], w), dtype=dy.dtype)
    xp.add.at(dx_cols, (slice(None), slice(None), slice(None), ix), dy)
    dx = xp.zeros((n, c, h, w), dtype=dy.dtype)
    xp.add.at(dx, (slice(None), slice(None), iy), dx_cols)
    return dx


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
def frozen_batch_norm_forward(x, weight, bias, running_mean, running_var, eps=1e-5):
    """BatchNorm with fixed statistics and affine parameters (how pre-trained backbones are
    fine-tuned with small batches): y = x * scale + shift per channel."""
    scale, shift = frozen_batch_norm_scale_shift(weight, bias, running_mean, running_var, eps)
    c = x.shape[1]
    return x * scale.reshape(1, c, 1, 1) + shift.reshape(1, c, 1, 1), scale


def frozen_batch_norm_scale_shift(weight, bias, running_mean, running_var, eps=1e-5):
    """FrozenBN as a per-channel affine map ``y = x * scale + shift``:
    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``."""
    xp = get_xp(weight)
    scale = weight * (1.0 / xp.sqrt(running_var + eps))
    return scale, bias - running_mean * scale


def frozen_batch_norm_backward(dy, scale):
    return dy * scale.reshape(1, -1, 1, 1)


def group_norm_forward(x, num_groups: int, weight=None, bias=None, eps=1e-5):
    """Group Normalization (Wu & He, 2018): normalise over (C/G, H, W) within each group.

    x: (N, C, H, W); weight, bias: (C,) or None."""
    xp = get_xp(x)
    n, c, h, w = x.shape
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels are not divisible by {num_groups} groups")
    xg = x.reshape(n, num_groups, -1)
    mean = xg.mean(axis=2, keepdims=True)
    var = xg.var(axis=2, keepdims=True)
    inv_std = 1.0 / xp.sqrt(var + eps)
    xhat = ((xg - mean) * inv_std).reshape(n, c, h, w)
    y = xhat
    if weight is not None:
        y = y * weight.reshape(1, c, 1, 1) + bias.reshape(1, c, 1, 1)
    return y, GroupNormCache(xhat, inv_std, num_groups, weight)


def group_norm_backward(dy, cache):
    """Returns (dx, dweight, dbias). With xhat = (x - mu) * r per group of m elements:
    dx = r * (g - mean(g) - xhat * mean(g * xhat)), where g = dy * weight."""
    xhat, inv_std, num_groups, weight = cache.xhat, cache.inv_std, cache.num_groups, cache.weight
    n, c, h, w = xhat.shape
    if weight is not None:
        dweight = (dy * xhat).sum(axis=(0, 2, 3))
        dbias = dy.sum(axis=(0, 2, 3))
        g = dy * weight.reshape(1, c, 1, 1)
    else:
        dweight = dbias = None
        g = dy
    gg = g.reshape(n, num_groups, -1)
    xg = xhat.reshape(n, num_groups, -1)
    dx = inv_std * (
        gg - gg.mean(axis=2, keepdims=True) - xg * (gg * xg).mean(axis=2, keepdims=True)
    )
    return dx.reshape(n, c, h, w), dweight, dbias
