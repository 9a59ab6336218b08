"""Eval mode: the forward-only kernels of nn/inference.py compute the training forward's
function, keep no cache, and a backward after an eval-mode forward raises."""

import numpy as np
import pytest
from helpers import rand
from test_layers import CONV_CASES, conv2d_definition, conv_transpose2d_definition

from mrcnn_edu.backbone import Bottleneck, ResNetFPN
from mrcnn_edu.heads import MaskHead, MaskRCNNPredictor, RPNHead
from mrcnn_edu.mask_rcnn import MaskRCNN
from mrcnn_edu.nn import conv as C
from mrcnn_edu.nn import functional as F
from mrcnn_edu.nn import inference as I
from mrcnn_edu.nn import layers as L


@pytest.fixture
def tiny_buffer(monkeypatch):
    """A columns buffer of 2 KiB: convolutions run in many blocks (rows, or groups of images)."""
    monkeypatch.setattr(C, "COLS_BUFFER_BYTES", 2048)


def randomise_frozen_bn(module, seed=0):
    """Statistics and affine parameters that are not the identity."""
    rng = np.random.default_rng(seed)
    for m in module.modules():
        if isinstance(m, L.FrozenBatchNorm2d):
            c = m.weight.shape[0]
            m.weight.data[:] = rng.uniform(0.5, 1.5, c)
            m.bias.data[:] = rng.normal(0, 0.2, c)
            m.running_mean.data[:] = rng.normal(0, 0.2, c)
            m.running_var.data[:] = rng.uniform(0.5, 2.0, c)
    return module


# -- kernels -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k,s,p,d", CONV_CASES)
@pytest.mark.parametrize("blocks", [False, True])
def test_conv2d_equals_definition_in_one_block_or_many(k, s, p, d, blocks, monkeypatch):
    if blocks:
        monkeypatch.setattr(C, "COLS_BUFFER_BYTES", 2048)
    x, w, b = rand(3, 3, 9, 8, seed=1), rand(4, 3, *k, seed=2), rand(4, seed=3)
    expected = conv2d_definition(x, w, b, s, p, d)
    np.testing.assert_allclose(I.conv2d(x, w, b, s, p, d), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        I.conv2d(x, w, None, s, p, d, relu=True),
        np.maximum(conv2d_definition(x, w, None, s, p, d), 0),
        rtol=1e-12,
        atol=1e-12,
    )


def test_conv2d_blocks_of_rows_and_of_images_cover_every_output(tiny_buffer):
    # one image: bands of rows (the last one shorter); many small images: groups of images
    for shape in [(1, 5, 23, 17), (7, 5, 6, 5)]:
        x, w, b = rand(*shape, seed=4), rand(6, 5, 3, 3, seed=5), rand(6, seed=6)
        blocks = list(C._blocks(shape[0], shape[2], shape[3], 2048 // (45 * 8)))
        assert len(blocks) > 1
        np.testing.assert_allclose(
            I.conv2d(x, w, b, 1, 1), F.conv2d_forward(x, w, b, 1, 1)[0], rtol=1e-12, atol=1e-12
        )


def test_conv2d_keeps_float32_and_refuses_bad_shapes():
    x = rand(1, 3, 8, 8).astype(np.float32)
    assert I.conv2d(x, rand(2, 3, 3, 3).astype(np.float32), None, 1, 1).dtype == np.float32
    with pytest.raises(ValueError, match="channels"):
        I.conv2d(x, rand(2, 4, 3, 3))


@pytest.mark.parametrize(
    "k,s,p,op,d",
    [((2, 2), (2, 2), (0, 0), (0, 0), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1), (1, 1))],
)
def test_conv_transpose2d_equals_definition(k, s, p, op, d):
    # the first case takes the non-overlapping fast path, the second the functional one
    x, w, b = rand(3, 4, 5, 6, seed=7), rand(4, 3, *k, seed=8), rand(3, seed=9)
    expected = conv_transpose2d_definition(x, w, b, s, p, op, d)
    np.testing.assert_allclose(I.conv_transpose2d(x, w, b, s, p, op, d), expected, rtol=1e-12)
    np.testing.assert_allclose(
        I.conv_transpose2d(x, w, b, s, p, op, d, relu=True), np.maximum(expected, 0), rtol=1e-12
    )


@pytest.mark.parametrize(
    "k,s,p", [(3, 2, 1), (1, 2, 0), (2, 2, 0), (3, 1, 1), (2, 1, 1), (3, 3, 0)]
)
@pytest.mark.parametrize("size", [(9, 8), (8, 11)])
def test_max_pool2d_equals_functional(k, s, p, size):
    x = rand(2, 3, *size, seed=10)
    np.testing.assert_array_equal(I.max_pool2d(x, k, s, p), F.max_pool2d_forward(x, k, s, p)[0])


def test_folded_frozen_bn_equals_conv_then_bn():
    conv = L.Conv2d(3, 5, 3, padding=1, rng=0).astype(np.float64)
    bn = randomise_frozen_bn(L.FrozenBatchNorm2d(5).astype(np.float64))
    x = rand(2, 3, 7, 6, seed=11)
    expected = np.maximum(bn(conv(x)), 0)
    np.testing.assert_allclose(I.conv_norm_relu(x, conv, bn, relu=True), expected, rtol=1e-12)


@pytest.mark.parametrize("small,big", [((3, 4), (6, 8)), ((3, 4), (7, 9))])
def test_add_upsampled_in_place_equals_lateral_plus_upsample(small, big):
    x, y = rand(2, 3, *small, seed=12), rand(2, 3, *big, seed=13)
    expected = y + F.upsample_nearest_forward(x, big)[0]
    out = I.add_upsampled_(y, x)
    assert out is y
    np.testing.assert_array_equal(y, expected)


def test_relu_in_place_keeps_nan():
    y = np.array([-1.0, 0.0, 2.0, np.nan])
    assert I.relu_(y) is y
    np.testing.assert_array_equal(y, [0.0, 0.0, 2.0, np.nan])


# -- modules: same function in eval mode, no cache -------------------------------------------
def test_resnet50_fpn_eval_equals_training_forward(tiny_buffer):
    # real ResNet-50 widths, FrozenBN with random statistics, on a small image, in float64
    net = randomise_frozen_bn(ResNetFPN(rng=0).astype(np.float64))
    x = rand(1, 3, 64, 96, seed=14)
    trained = net(x)
    net.eval()
    evaluated = net(x)
    for name in trained:
        np.testing.assert_allclose(evaluated[name], trained[name], rtol=1e-10, atol=1e-10)
    assert all(getattr(m, "cache", None) is None for m in net.modules())


def test_heads_eval_equal_training_forward():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((3, 4, 6, 6))
    for head in (MaskHead(4, 5, 2, rng=0), MaskRCNNPredictor(4, 5, 3, rng=0)):
        head.astype(np.float64)
        expected = head(x)
        np.testing.assert_allclose(head.eval()(x), expected, rtol=1e-12, atol=1e-12)
    rpn_head = RPNHead(4, 3, 1, rng=0).astype(np.float64)
    levels = [rng.standard_normal((1, 4, 8, 8)), rng.standard_normal((1, 4, 4, 4))]
    expected = rpn_head(levels)
    got = rpn_head.eval()(levels)
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_gn_bottleneck_eval_equals_training_forward():
    block = Bottleneck(4, 2, 6, 2, "gn", 2, np.random.default_rng(0)).astype(np.float64)
    block.bn3.weight.data[:] = 1.0  # zero-initialised for training from scratch
    x = rand(2, 4, 9, 7, seed=16)
    expected = block(x)
    np.testing.assert_allclose(block.eval()(x), expected, rtol=1e-12, atol=1e-12)


# -- backward after eval ------------------------------------------------------------------------
def test_backward_after_an_eval_forward_raises():
    conv = L.Conv2d(2, 3, 3, padding=1, rng=0)
    x = rand(1, 2, 5, 5).astype(np.float32)
    y = conv(x)
    conv.eval()  # also drops the training forward's cache
    with pytest.raises(RuntimeError, match="model.train"):
        conv.backward(np.ones_like(y))
    conv(x)
    with pytest.raises(RuntimeError, match="Conv2d.backward: no forward cache"):
        conv.backward(np.ones_like(y))
    conv.train()
    conv(x)
    assert conv.backward(np.ones_like(y)).shape == x.shape


def test_model_backward_after_eval_forward_raises():
    from test_mask_rcnn import batch, tiny_config

    model = MaskRCNN(tiny_config(), rng=0)
    images, targets = batch()
    model.forward(images, targets)
    model.eval()
    assert all(getattr(m, "cache", None) is None for m in model.modules())
    model.forward(images, targets)  # losses in eval mode: nothing kept to differentiate
    with pytest.raises(RuntimeError, match="Eval mode"):
        model.backward()


def test_params_grads_are_zero_and_shaped():
    conv = L.Conv2d(2, 3, 3, rng=0)
    assert conv.weight.grad.shape == conv.weight.shape and not conv.weight.grad.any()
    assert conv.weight.grad.dtype == conv.weight.data.dtype


def test_kernels_leave_their_input_unchanged():
    x = rand(2, 3, 8, 8, seed=17)
    before = x.copy()
    I.max_pool2d(x, 3, 1, 1)
    I.max_pool2d(x, 1, 1, 0)
    I.conv2d(x, rand(3, 3, 1, 1), rand(3), relu=True)
    I.conv2d(x, rand(4, 3, 3, 3), rand(4), 1, 1, relu=True)
    I.conv_transpose2d(x, rand(3, 2, 2, 2), rand(2), 2, relu=True)
    np.testing.assert_array_equal(x, before)
