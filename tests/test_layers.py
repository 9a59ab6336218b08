"""Layers: forward equals the textbook definition; every backward passes a float64 gradcheck."""

import numpy as np
import pytest
from helpers import rand

from mrcnn_edu.nn import conv as C
from mrcnn_edu.nn import functional as F
from mrcnn_edu.nn import layers as L
from mrcnn_edu.nn.gradcheck import check_function, check_module


# ---------------------------------------------------------------------------------------------
# Definitions by nested loops (slow, obviously right)
# ---------------------------------------------------------------------------------------------
def conv2d_definition(x, w, b, stride, padding, dilation):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, o, ho, wo))
    for ni in range(n):
        for oi in range(o):
            for yo in range(ho):
                for xo in range(wo):
                    acc = b[oi] if b is not None else 0.0
                    for ci in range(c):
                        for i in range(kh):
                            for j in range(kw):
                                yy = yo * sh - ph + i * dh
                                xx = xo * sw - pw + j * dw
                                if 0 <= yy < h and 0 <= xx < wd:
                                    acc += x[ni, ci, yy, xx] * w[oi, ci, i, j]
                    y[ni, oi, yo, xo] = acc
    return y


def conv_transpose2d_definition(x, w, b, stride, padding, output_padding, dilation):
    """Every input pixel scatters x * w into the output (the adjoint of conv2d)."""
    n, cin, h, wd = x.shape
    _, cout, kh, kw = w.shape
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = stride, padding, output_padding, dilation
    ho = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    wo = (wd - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    y = np.zeros((n, cout, ho, wo))
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    for ni in range(n):
        for ci in range(cin):
            for yi in range(h):
                for xi in range(wd):
                    for co in range(cout):
                        for i in range(kh):
                            for j in range(kw):
                                yy = yi * sh - ph + i * dh
                                xx = xi * sw - pw + j * dw
                                if 0 <= yy < ho and 0 <= xx < wo:
                                    y[ni, co, yy, xx] += x[ni, ci, yi, xi] * w[ci, co, i, j]
    return y


CONV_CASES = [
    # kernel, stride, padding, dilation
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((1, 1), (2, 2), (0, 0), (1, 1)),
    ((3, 2), (1, 2), (2, 0), (2, 1)),
    ((7, 7), (2, 2), (3, 3), (1, 1)),
    # stride 1: dx by a convolution of dy (dilated, non-square), unless the padding exceeds
    # d*(k-1) (then col2im, as for every stride > 1)
    ((3, 2), (1, 1), (2, 1), (2, 1)),
    ((3, 3), (1, 1), (3, 2), (1, 1)),
    ((1, 1), (1, 1), (1, 0), (1, 1)),
    ((1, 1), (2, 3), (0, 0), (1, 1)),  # 1x1 without padding: per-image GEMMs, strided read
]


@pytest.mark.parametrize("k,s,p,d", CONV_CASES)
def test_conv2d_forward_equals_nested_loop_definition(k, s, p, d):
    x, w, b = rand(2, 3, 9, 8, seed=1), rand(4, 3, *k, seed=2), rand(4, seed=3)
    y, _ = F.conv2d_forward(x, w, b, s, p, d)
    np.testing.assert_allclose(y, conv2d_definition(x, w, b, s, p, d), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,p,d", CONV_CASES)
@pytest.mark.parametrize("layout", ["one block", "many blocks", "channel-major 1x1"])
def test_conv2d_gradcheck_input_weight_bias(k, s, p, d, layout, monkeypatch):
    """Every way the columns are handled: kept from the forward (one block); rebuilt by the
    backward, in bands of rows and groups of images (a 2 KiB buffer); and a 1x1 convolution as
    one channel-major GEMM instead of one GEMM per image."""
    if layout == "many blocks":
        monkeypatch.setattr(C, "COLS_BUFFER_BYTES", 2048)
    if layout == "channel-major 1x1":
        monkeypatch.setattr(C, "_PER_IMAGE_GEMMS_MAX_IMAGES", 0)
        monkeypatch.setattr(C, "_PER_IMAGE_GEMM_MAX_MACS", 0)
    conv = L.Conv2d(3, 4, k, stride=s, padding=p, dilation=d, rng=0, dtype=np.float64)
    x = rand(2, 3, 9, 8)
    _, cache = F.conv2d_forward(x, conv.weight.data, None, s, p, d)
    if k == (1, 1) and p == (0, 0):  # the pixels themselves, per image or channel-major
        assert cache.cols.ndim == (2 if layout == "channel-major 1x1" else 3)
    else:  # columns kept only when they fit in one block; else the input, to rebuild them
        assert (cache.cols is None) == (layout == "many blocks")
        assert (cache.x is x) == (layout == "many blocks")
    check_module(conv, x)


def test_conv2d_weight_gradient_from_columns_rebuilt_over_groups_of_images(monkeypatch):
    """7 images of 4x4 in blocks of 2 images (the last holds 1): the columns the backward
    rebuilds give the gradients of the columns the forward keeps when all fit in one block."""
    x, w, b = rand(7, 2, 4, 4, seed=1), rand(3, 2, 3, 3, seed=2), rand(3, seed=3)
    y, kept = F.conv2d_forward(x, w, b, 1, 1)
    g = rand(*y.shape, seed=4)
    monkeypatch.setattr(C, "COLS_BUFFER_BYTES", 18 * 8 * 32)  # 18 float64 rows x 32 positions
    blocks = [blk[:2] for blk in C._blocks(7, 4, 4, C._per_block(18, 8, 4))]
    assert blocks == [(0, 2), (2, 4), (4, 6), (6, 7)]
    y2, rebuilt = F.conv2d_forward(x, w, b, 1, 1)
    assert kept.cols is not None and rebuilt.cols is None
    np.testing.assert_allclose(y2, y, rtol=1e-12, atol=1e-12)
    for ours, expected in zip(F.conv2d_backward(g, rebuilt), F.conv2d_backward(g, kept)):
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_conv2d_without_bias_has_no_bias_param():
    conv = L.Conv2d(3, 4, 3, bias=False, rng=0, dtype=np.float64)
    assert [n for n, _ in conv.named_parameters()] == ["weight"]
    check_module(conv, rand(1, 3, 5, 5))


CONVT_CASES = [
    # kernel, stride, padding, output_padding, dilation
    ((2, 2), (2, 2), (0, 0), (0, 0), (1, 1)),  # the mask head's 14 -> 28 upsampling
    ((3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (0, 0), (0, 0), (1, 1)),
    ((3, 2), (2, 3), (1, 0), (0, 2), (2, 1)),
]


@pytest.mark.parametrize("k,s,p,op,d", CONVT_CASES)
def test_conv_transpose2d_forward_equals_scatter_definition(k, s, p, op, d):
    x, w, b = rand(2, 3, 4, 5, seed=4), rand(3, 2, *k, seed=5), rand(2, seed=6)
    y, _ = F.conv_transpose2d_forward(x, w, b, s, p, op, d)
    ref = conv_transpose2d_definition(x, w, b, s, p, op, d)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,p,op,d", CONVT_CASES)
def test_conv_transpose2d_gradcheck(k, s, p, op, d):
    layer = L.ConvTranspose2d(3, 2, k, s, p, op, d, rng=0, dtype=np.float64)
    check_module(layer, rand(2, 3, 4, 5))


def test_conv_transpose_is_adjoint_of_conv():
    """<conv(x), y> == <x, conv_transpose(y)> for the same weights, no bias."""
    x, w = rand(2, 3, 8, 8, seed=7), rand(4, 3, 3, 3, seed=8)
    cx, _ = F.conv2d_forward(x, w, None, 2, 1, 1)
    y = rand(*cx.shape, seed=9)
    ty, _ = F.conv_transpose2d_forward(y, w, None, 2, 1, output_padding=1)
    assert ty.shape == x.shape
    assert np.isclose(np.sum(cx * y), np.sum(x * ty), rtol=1e-12)


def test_conv_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="channels"):
        F.conv2d_forward(rand(1, 2, 5, 5), rand(4, 3, 3, 3))
    with pytest.raises(ValueError, match="too small"):
        F.conv2d_forward(rand(1, 3, 2, 2), rand(4, 3, 5, 5))
    with pytest.raises(ValueError, match="output_padding"):
        F.conv_transpose2d_forward(rand(1, 3, 2, 2), rand(3, 2, 2, 2), stride=2, output_padding=2)


def test_conv_keeps_float32():
    conv = L.Conv2d(3, 4, 3, padding=1, rng=0)
    y = conv(rand(1, 3, 6, 6).astype(np.float32))
    assert y.dtype == np.float32
    assert conv.backward(np.ones_like(y)).dtype == np.float32
    assert conv.weight.grad.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Linear, ReLU, Flatten, Sequential
# ---------------------------------------------------------------------------------------------
def test_linear_forward_and_gradcheck():
    lin = L.Linear(5, 3, rng=0, dtype=np.float64)
    x = rand(4, 5)
    np.testing.assert_allclose(lin(x), x @ lin.weight.data.T + lin.bias.data)
    check_module(lin, x)


def test_relu_gradcheck_away_from_zero():
    x = rand(3, 4)
    x[np.abs(x) < 1e-3] = 0.5  # finite differences are invalid at the kink
    check_module(L.ReLU(), x)
    assert np.all(L.ReLU()(x) == np.maximum(x, 0))


def test_relu_keeps_nan_and_passes_its_gradient():
    """NaN stays NaN (not hidden behind a 0), as in PyTorch; only x <= 0 blocks the gradient."""
    x = np.array([[np.nan, -1.0, 0.0, 2.0]])
    y, mask = F.relu_forward(x)
    np.testing.assert_array_equal(y, [[np.nan, 0.0, 0.0, 2.0]])
    np.testing.assert_array_equal(mask, [[True, False, False, True]])


def test_sequential_gradcheck_and_state_names():
    net = L.Sequential(
        L.Conv2d(2, 3, 3, padding=1, rng=0, dtype=np.float64),
        L.ReLU(),
        L.MaxPool2d(2),
        L.Flatten(),
        L.Linear(3 * 2 * 2, 2, rng=1, dtype=np.float64),
    )
    assert list(net.state_dict()) == ["0.weight", "0.bias", "4.weight", "4.bias"]
    check_module(net, rand(2, 2, 4, 4, seed=3))


# ---------------------------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------------------------
def test_max_pool_definition_and_gradcheck():
    x = rand(2, 3, 7, 6, seed=11)
    y, _ = F.max_pool2d_forward(x, 3, 2, 1)
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            np.testing.assert_array_equal(
                y[:, :, i, j], xpad[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(2, 3))
            )
    check_module(L.MaxPool2d(3, 2, 1), x)


def test_max_pool_ties_go_to_first_element_in_row_major_order():
    x = np.ones((1, 1, 2, 2))
    y, cache = F.max_pool2d_forward(x, 2, 2)
    dx = F.max_pool2d_backward(np.ones_like(y), cache)
    np.testing.assert_array_equal(dx[0, 0], [[1.0, 0.0], [0.0, 0.0]])
    # Overlapping windows with a shared maximum: each window sends its gradient to it.
    x = np.array([[[[0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])
    y, cache = F.max_pool2d_forward(x, 2, 1)
    dx = F.max_pool2d_backward(np.ones_like(y), cache)
    assert dx[0, 0, 0, 1] == 2.0 and dx.sum() == 4.0


def test_max_pool_propagates_nan_from_any_window_position():
    """As PyTorch: a NaN anywhere in a window makes that window's maximum NaN."""
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 1] = np.nan  # the last element of the first 2x2 window
    x[0, 0, 2, 3] = 7.0
    y, _ = F.max_pool2d_forward(x, 2, 2)
    np.testing.assert_array_equal(y[0, 0], [[np.nan, 0.0], [0.0, 7.0]])


def test_max_pool_1x1_stride2_is_subsampling():
    """FPN's P6 is max_pool(k=1, s=2) of P5: plain subsampling."""
    x = rand(1, 2, 5, 6)
    y, _ = F.max_pool2d_forward(x, 1, 2, 0)
    np.testing.assert_array_equal(y, x[:, :, ::2, ::2])


# ---------------------------------------------------------------------------------------------
# Nearest upsampling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [((4, 5), (8, 10)), ((13, 17), (25, 34)), ((3, 3), (7, 5))])
def test_upsample_nearest_matches_floor_definition(src, dst):
    x = rand(1, 2, *src)
    y, _ = F.upsample_nearest_forward(x, dst)
    for oy in range(dst[0]):
        for ox in range(dst[1]):
            iy = min(oy * src[0] // dst[0], src[0] - 1)
            ix = min(ox * src[1] // dst[1], src[1] - 1)
            np.testing.assert_array_equal(y[:, :, oy, ox], x[:, :, iy, ix])


@pytest.mark.parametrize(
    "dst",
    [
        (7, 9),  # odd sizes: scattered with add.at
        (6, 8),  # 2x (FPN): sums over 2 x 2 blocks
        (9, 4),  # 3x and 1x
        (6, 9),  # 2x rows, odd columns: add.at
    ],
)
def test_upsample_gradcheck(dst):
    up = L.Upsample()
    x = rand(2, 2, 3, 4)
    g = rand(2, 2, *dst, seed=5)
    y = up(x, size=dst)
    dx = up.backward(g)
    from mrcnn_edu.nn.gradcheck import assert_close_grad, numerical_gradient

    num = numerical_gradient(lambda: np.sum(up(x, size=dst) * g), x)
    assert_close_grad(dx, num)
    assert y.shape == (2, 2, *dst)


def test_upsample_needs_a_size():
    with pytest.raises(ValueError, match="target size"):
        L.Upsample()(rand(1, 1, 2, 2))


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------
def test_frozen_batch_norm_definition_and_no_trainable_params():
    bn = L.FrozenBatchNorm2d(3, dtype=np.float64)
    bn.weight.data[:] = [1.0, 2.0, 3.0]
    bn.bias.data[:] = [0.1, 0.2, 0.3]
    bn.running_mean.data[:] = [0.5, -0.5, 1.0]
    bn.running_var.data[:] = [4.0, 1.0, 0.25]
    x = rand(2, 3, 4, 4)
    m = bn.running_mean.data.reshape(1, 3, 1, 1)
    v = bn.running_var.data.reshape(1, 3, 1, 1)
    ref = (x - m) / np.sqrt(v + 1e-5) * bn.weight.data.reshape(1, 3, 1, 1) + bn.bias.data.reshape(
        1, 3, 1, 1
    )
    np.testing.assert_allclose(bn(x), ref, rtol=1e-12)
    assert bn.parameters() == []
    assert len(bn.state_dict()) == 4
    check_module(bn, x)


def test_group_norm_normalises_each_group_and_gradchecks():
    gn = L.GroupNorm(2, 4, dtype=np.float64)
    gn.weight.data[:] = rand(4, seed=1)
    gn.bias.data[:] = rand(4, seed=2)
    x = rand(2, 4, 3, 3) * 3 + 1
    y_plain, _ = F.group_norm_forward(x, 2)
    groups = y_plain.reshape(2, 2, -1)
    np.testing.assert_allclose(groups.mean(axis=2), 0, atol=1e-12)
    np.testing.assert_allclose(groups.var(axis=2), 1, rtol=1e-4)
    check_module(gn, x)
    with pytest.raises(ValueError, match="divisible"):
        L.GroupNorm(3, 4)


def test_group_norm_without_affine_gradcheck():
    x = rand(2, 6, 2, 3)
    y, cache = F.group_norm_forward(x, 3)
    check_function(
        lambda a: F.group_norm_forward(a, 3)[0],
        lambda g: F.group_norm_backward(g, F.group_norm_forward(x, 3)[1])[0],
        [x],
    )
    assert y.shape == x.shape


def test_empty_batch_passes_through_conv_and_transposed_conv():
    x = np.zeros((0, 4, 14, 14), np.float32)
    assert L.Conv2d(4, 3, 3, padding=1, rng=0)(x).shape == (0, 3, 14, 14)
    assert L.ConvTranspose2d(4, 3, 2, stride=2, rng=0)(x).shape == (0, 3, 28, 28)
