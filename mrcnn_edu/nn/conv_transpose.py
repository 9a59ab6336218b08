"""Transposed convolution (PyTorch's ``conv_transpose2d``), forward and backward.

The adjoint of ``conv.py``'s convolution with respect to its input: a GEMM to columns, then
col2im (forward); im2col, then two GEMMs (backward). ``functional.py`` re-exports both pairs.

**Windows that do not overlap.** When the kernel equals the stride, without padding, output
padding or dilation (the mask predictor's 2x2, stride 2), every input pixel writes its own
kh x kw patch of the output,

    y[n, o, y*kh + i, x*kw + j] = sum_c w[c, o, i, j] x[n, c, y, x] + b[o],

so col2im adds nothing up: the columns are moved into place by kh*kw strided copies (the bias
added on the way), and in the backward the columns of dy are ONE transposing copy, instead of
kh*kw strided slice additions into a zeroed array and a padded copy plus kh*kw slice copies
(``_patches_to_image``, ``_image_to_patches``).
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp
from .conv import _from_channel_major, _to_channel_major, col2im, im2col, pad_channel_major
from .utils import pair


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


def _no_overlap(kernel_hw, s, p, op, d) -> bool:
    """Kernel == stride, no padding, output padding or dilation: disjoint output windows."""
    return s == tuple(kernel_hw) and p == (0, 0) and op == (0, 0) and d == (1, 1)


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
    cache = ConvTransposeCache(x.shape, x_cm, w, b is not None, s, p, op, d, (full_h, full_w))
    if _no_overlap((kh, kw), s, p, op, d):
        return _patches_to_image(cols, b, n, h, wd, kh, kw), cache
    # The full (uncropped) output plus room for output_padding rows/columns at the end.
    full = col2im(
        cols.reshape(cout, kh, kw, n, h, wd), (n, cout, full_h + op[0], full_w + op[1]), s, d
    )
    y = xp.ascontiguousarray(full[:, :, p[0] : p[0] + ho, p[1] : p[1] + wo])
    if b is not None:
        y += b.reshape(1, cout, 1, 1)
    return y, cache


def _patches_to_image(cols, b, n: int, h: int, wd: int, kh: int, kw: int):
    """``cols (Cout*kh*kw, N*H*W)`` of disjoint windows -> ``y (N, Cout, H*kh, W*kw)``,
    ``y[n, o, y*kh + i, x*kw + j] = cols[(o, i, j), (n, y, x)] + b[o]``: one strided copy per
    kernel offset, the bias added on the way (a single 6-D transposing copy, whose innermost
    loop is kw long, measured 1-2x slower)."""
    xp = get_xp(cols)
    cout = cols.shape[0] // (kh * kw)
    y = xp.empty((n, cout, h, kh, wd, kw), dtype=cols.dtype)
    taps = cols.reshape(cout, kh, kw, n, h, wd)
    for i in range(kh):
        for j in range(kw):
            tap = taps[:, i, j].transpose(1, 0, 2, 3)  # (N, Cout, H, W)
            if b is None:
                y[:, :, :, i, :, j] = tap
            else:
                xp.add(tap, b.reshape(1, cout, 1, 1), out=y[:, :, :, i, :, j])
    return y.reshape(n, cout, h * kh, wd * kw)


def _image_to_patches(dy, kh: int, kw: int):
    """The adjoint of :func:`_patches_to_image` (without the bias): ``dy (N, Cout, H*kh,
    W*kw)`` -> ``dcols (Cout*kh*kw, N*H*W)``, one transposing copy."""
    xp = get_xp(dy)
    n, cout, hk, wk = dy.shape
    h, wd = hk // kh, wk // kw
    dcols = xp.empty((cout, kh, kw, n, h, wd), dtype=dy.dtype)
    dcols[...] = dy.reshape(n, cout, h, kh, wd, kw).transpose(1, 3, 5, 0, 2, 4)
    return dcols.reshape(cout * kh * kw, n * h * wd)


def conv_transpose2d_backward(dy, cache):
    """Gradients of :func:`conv_transpose2d_forward`: (dx, dw, db).

    The adjoint of col2im is im2col, so dx is an ordinary convolution of dy with w."""
    w, s, p, d = cache.weight, cache.stride, cache.padding, cache.dilation
    op, (full_h, full_w) = cache.output_padding, cache.full_hw
    n, cin, h, wd = cache.x_shape
    _, cout, kh, kw = w.shape
    db = dy.sum(axis=(0, 2, 3)) if cache.has_bias else None
    if _no_overlap((kh, kw), s, p, op, d):
        dcols = _image_to_patches(dy, kh, kw)
    else:
        # Undo the crop: place dy back into the full output frame (zeros where the crop cut).
        dfull = pad_channel_major(dy, p[0], p[1], (full_h + op[0], full_w + op[1]))
        dcols = im2col(dfull, kh, kw, s, d, (h, wd)).reshape(cout * kh * kw, n * h * wd)
    dx = _from_channel_major(w.reshape(cin, cout * kh * kw) @ dcols, n, h, wd)
    dw = (dcols @ cache.x_cm.T).T.reshape(w.shape)  # = x_cm dcols^T (see conv._weight_grad)
    return dx, dw, db
