"""Bilinear resampling (``align_corners=False``), computed as torch's generic CPU kernel does.

Along an axis of ``n`` input pixels resampled to ``m``, output pixel ``i`` reads the input at
``s = (i + 0.5) * n / m - 0.5`` (clamped at 0), between input pixels ``floor(s)`` and the next
one, with weights ``1 - (s - floor(s))`` and ``s - floor(s)``. Bilinear interpolation is
separable, so an image is resized as ``Wy @ (image @ Wx.T)``, along x first, then y, where ``W``
(``interpolation_matrix``) has those two weights in each row. Stored densely, ``W`` would cost
``n`` multiply-adds per output pixel (27 billion for a 2000 x 3000 photo), so ``resize_image``
keeps only its two non-zeros per row (``linear_taps``): the same matrix product, two taps per
output pixel.

Two users: the model's input transform (``transform.py``: every image to the size of the
min_size/max_size rule) and torchvision's way of pasting masks (``postprocess.py``: a padded
28 x 28 mask to its box rounded to whole pixels). docs/conventions.md section 14 gives the
rounding rules.
"""

from __future__ import annotations

import numpy as np

from .backend import get_xp


def linear_taps(n_in: int, n_out: int, dtype=np.float32):
    """The two non-zeros of each row of the (n_out, n_in) bilinear interpolation matrix:
    ``(i0, i1, w0, w1)``, output pixel ``i`` = ``w0[i] * x[i0[i]] + w1[i] * x[i1[i]]``.

    Computed in ``dtype`` the way torchvision's CPU kernel does: the ratio ``n_in / n_out``
    rounded to ``dtype``, the source position ``ratio * (i + 0.5) - 0.5`` with one rounding (a
    fused multiply-add), ``w1 = s - floor(s)`` and ``w0 = 1 - w1``; at the last input pixel
    both taps read it. ``n_in == n_out`` is the identity (``w0 = 1``, ``w1 = 0``).
    """
    i = np.arange(n_out)
    if n_in == n_out:
        return i, i, np.ones(n_out, dtype), np.zeros(n_out, dtype)
    dtype = np.dtype(dtype)
    ratio = dtype.type(n_in) / dtype.type(n_out)
    src = _fma(np.full(n_out, ratio, dtype), (i + 0.5).astype(dtype), np.full(n_out, -0.5, dtype))
    src = np.maximum(src, dtype.type(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(dtype), 0, 1).astype(dtype)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (dtype.type(1) - w1).astype(dtype), w1


def interpolation_matrix(n_in: int, n_out: int, dtype=np.float32) -> np.ndarray:
    """The (n_out, n_in) bilinear interpolation matrix ``W``: resizing one axis of an image is
    ``W @ x``. Each row holds the two weights of :func:`linear_taps` and sums to 1."""
    i0, i1, w0, w1 = linear_taps(n_in, n_out, dtype)
    w = np.zeros((n_out, n_in), dtype)
    rows = np.arange(n_out)
    np.add.at(w, (rows, i0), w0)
    np.add.at(w, (rows, i1), w1)
    return w


def resize_image(image, size: tuple[int, int]):
    """Bilinear resize (``align_corners=False``) of a (C, H, W) float image to ``size`` (h, w):
    ``Wy @ (image @ Wx.T)``, along x first, each output a two-tap sum ``w0 * x0 + w1 * x1``.

    In float32 this is torchvision's generic CPU kernel bit for bit (its sums are fused
    multiply-adds, ``fma(x0, w0, x1 * w1)``, emulated here exactly); other dtypes are computed
    with plain rounding. One channel at a time, so the float64 temporaries of the emulation
    stay near the size of one output channel."""
    xp = get_xp(image)
    h, w = int(size[0]), int(size[1])
    if image.ndim != 3 or h < 1 or w < 1:
        raise ValueError(
            f"resize_image needs a (C, H, W) image and a positive size, got {image.shape} -> {size}"
        )
    cols = [xp.asarray(a) for a in linear_taps(image.shape[2], w, image.dtype)]
    rows = [xp.asarray(a) for a in linear_taps(image.shape[1], h, image.dtype)]
    out = xp.empty((image.shape[0], h, w), dtype=image.dtype)
    for c, plane in enumerate(image):
        if w != image.shape[2]:
            i0, i1, w0, w1 = cols
            plane = _fma(plane[:, i0], w0, plane[:, i1] * w1)
        if h != image.shape[1]:
            i0, i1, w0, w1 = rows
            plane = _fma(plane[i0, :], w0[:, None], plane[i1, :] * w1[:, None])
        out[c] = plane
    return out


def upsample_bilinear_forward(x, factor: int = 2):
    """(N, C, h, w) -> (N, C, factor * h, factor * w), bilinear with ``align_corners=False``:
    torch's ``interpolate(x, scale_factor=factor, mode="bilinear")``, the last stage of the
    keypoint predictor. Each plane is ``Y = Wy X Wxᵀ`` with the matrices of
    :func:`interpolation_matrix` (two non-zeros per row: source ``(i + 0.5) / factor - 0.5``,
    clamped at 0). Returns ``(y, cache)``; the cache is ``(Wy, Wx)``."""
    xp = get_xp(x)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    wy = xp.asarray(interpolation_matrix(h, factor * h, x.dtype))
    wx = xp.asarray(interpolation_matrix(w, factor * w, x.dtype))
    return xp.matmul(xp.matmul(wy, x), wx.T), (wy, wx)


def upsample_bilinear_backward(dy, cache):
    """The adjoint of :func:`upsample_bilinear_forward` (it is linear): ``dX = Wyᵀ dY Wx``,
    each input pixel collecting its share of every output pixel that read it."""
    wy, wx = cache
    xp = get_xp(dy)
    return xp.matmul(xp.matmul(wy.T, dy), wx)


def _fma(a, b, c):
    """``a * b + c`` elementwise with one rounding, as a fused multiply-add. For float32 the
    product is exact in float64, the sum is rounded there "to odd" (the last bit of an
    inexact result set), and the cast to float32 is then the correctly rounded fma; other
    dtypes use plain ``a * b + c``."""
    xp = get_xp(a, b, c)
    if a.dtype != np.float32:
        return a * b + c
    p = a.astype(np.float64) * xp.asarray(b, dtype=np.float64)
    q = xp.asarray(c, dtype=np.float64)
    s = p + q
    t = s - p  # Knuth's two-sum: err is exactly (p + q) - s
    err = (p - (s - t)) + (q - t)
    even = (s.view(np.int64) & 1) == 0
    fix = (err != 0) & even & xp.isfinite(err)
    s = xp.where(fix, xp.nextafter(s, xp.where(err > 0, xp.inf, -xp.inf)), s)
    return s.astype(np.float32)
