"""ResNet + FPN: shapes, strides, torchvision names, frozen stages, and a float64 gradcheck."""

import numpy as np
import pytest
from helpers import tiny_resnet

from mrcnn_edu.backbone import FPN, BackboneConfig, ResNet, ResNetConfig, ResNetFPN
from mrcnn_edu.nn.gradcheck import assert_close_grad, check_params_sampled, numerical_gradient


def tiny_cfg(**kw):
    """Two blocks in res3 and uneven widths: exercises projections and stage boundaries."""
    return tiny_resnet(blocks=(1, 2, 1, 1), widths=(2, 3, 2, 2), **kw)


def projected_loss(outs, gs):
    return sum(float(np.sum(o * g)) for o, g in zip(outs, gs))


def test_resnet50_names_and_shapes_follow_torchvision():
    net = ResNet(ResNetConfig(depth=50))
    names = [n for n, _ in net.named_parameters()]
    assert "layer1.0.downsample.0.weight" in names
    assert "layer3.5.conv3.weight" in names and "layer3.6.conv3.weight" not in names
    assert "layer4.2.bn3.running_var" in names
    assert net.layer2[0].conv2.stride == 2 and net.layer2[0].conv1.stride == 1
    n_trainable = sum(int(np.prod(p.shape)) for p in net.parameters())
    # ResNet-50 has 23.5M conv weights (without the fc layer); BN is frozen.
    assert 23_400_000 < n_trainable < 23_600_000


def test_feature_strides_and_channels():
    cfg = BackboneConfig(resnet=tiny_cfg(), fpn_channels=5)
    net = ResNetFPN(cfg, rng=0)
    outs = net(np.zeros((2, 3, 64, 96), np.float32))
    assert list(outs) == ["p2", "p3", "p4", "p5", "p6"] == list(net.strides)
    for name, o in outs.items():  # every level is the image divided by its declared stride
        assert o.shape[2:] == (-(-64 // net.strides[name]), -(-96 // net.strides[name]))
    assert [o.shape for o in outs.values()] == [
        (2, 5, 16, 24),
        (2, 5, 8, 12),
        (2, 5, 4, 6),
        (2, 5, 2, 3),
        (2, 5, 1, 2),
    ]
    assert all(o.dtype == np.float32 for o in outs.values())
    assert net.roi_levels == ("p2", "p3", "p4", "p5")


def test_backbone_rejects_unpadded_images():
    net = ResNetFPN(
        BackboneConfig(resnet=tiny_cfg(), fpn_channels=4),
        rng=0,
    )
    with pytest.raises(ValueError, match="multiple of 32"):
        net(np.zeros((1, 3, 50, 64), np.float32))
    with pytest.raises(ValueError, match="depth"):
        ResNetConfig(depth=34)


def test_fpn_top_down_definition():
    """P_i = conv3x3(lateral_i(C_i) + nearest_up(inner_{i+1})): check the coarsest two levels."""
    rng = np.random.default_rng(0)
    fpn = FPN([3, 4], out_channels=2, extra_p6=False, rng=0).astype(np.float64)
    c4, c5 = rng.standard_normal((1, 3, 6, 5)), rng.standard_normal((1, 4, 3, 3))
    p4, p5 = fpn([c4, c5])
    inner5 = fpn.inner_blocks[1](c5)
    np.testing.assert_allclose(p5, fpn.layer_blocks[1](inner5))
    up = inner5[:, :, [0, 0, 1, 1, 2, 2], :][:, :, :, [0, 0, 1, 1, 2]]  # nearest 3x3 -> 6x5
    np.testing.assert_allclose(p4, fpn.layer_blocks[0](fpn.inner_blocks[0](c4) + up))


def test_fpn_gradcheck_inputs_and_params():
    rng = np.random.default_rng(1)
    fpn = FPN([3, 4, 2], out_channels=2, rng=0).astype(np.float64)
    feats = [rng.standard_normal(s) for s in [(1, 3, 8, 7), (1, 4, 4, 4), (1, 2, 2, 2)]]
    gs = [rng.standard_normal(o.shape) for o in fpn(feats)]
    fpn.zero_grad()
    dfeats = fpn.backward(gs)
    loss = lambda: projected_loss(fpn(feats), gs)  # noqa: E731
    for x, dx in zip(feats, dfeats):
        assert_close_grad(dx, numerical_gradient(loss, x))
    fpn(feats)
    fpn.zero_grad()
    fpn.backward(gs)
    assert check_params_sampled(loss, fpn.named_parameters(), num_entries=4) > 0


@pytest.mark.parametrize("norm", ["gn", "frozen_bn"])
def test_resnet_fpn_gradcheck_every_stage(norm):
    rng = np.random.default_rng(2)
    net = ResNetFPN(
        BackboneConfig(resnet=tiny_cfg(norm=norm), fpn_channels=3),
        rng=0,
    )
    net.astype(np.float64)
    if norm == "gn":  # un-zero the last GN scales so every branch carries gradient
        for _, p in net.named_parameters():
            p.data[...] += rng.uniform(0.1, 0.3, p.shape)
    x = rng.standard_normal((1, 3, 64, 64))
    gs = {name: rng.standard_normal(o.shape) for name, o in net(x).items()}
    net.zero_grad()
    assert net.backward(gs) is None  # no image gradient unless asked for
    loss = lambda: projected_loss(net(x).values(), gs.values())  # noqa: E731
    n = check_params_sampled(loss, net.named_parameters(), num_entries=2, rtol=1e-4, atol=1e-6)
    assert n >= 2 * len(net.parameters()) - 10


def test_frozen_stages_get_no_gradient_and_no_training():
    net = ResNetFPN(
        BackboneConfig(
            resnet=tiny_cfg(frozen_stages=2, norm="frozen_bn"),
            fpn_channels=3,
        ),
        rng=0,
    )
    trainable = {id(p) for p in net.parameters()}
    assert id(net.body.conv1.weight) not in trainable
    assert id(net.body.layer1[0].conv1.weight) not in trainable
    assert id(net.body.layer2[0].conv1.weight) in trainable
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    outs = net(x)
    net.zero_grad()
    net.backward({name: np.ones_like(o) for name, o in outs.items()})
    assert not net.body.conv1.weight.grad.any()
    assert net.body.layer2[0].conv1.weight.grad.any()


@pytest.mark.parametrize("frozen", [0, 2])
def test_image_gradient_on_request_matches_finite_differences(frozen):
    """``backward(..., need_input_grad=True)`` returns d(loss)/d(images), frozen stages too."""
    rng = np.random.default_rng(3)
    cfg = tiny_cfg(
        frozen_stages=frozen,
        norm="frozen_bn" if frozen else "gn",
    )
    net = ResNetFPN(BackboneConfig(resnet=cfg, fpn_channels=2), rng=0).astype(np.float64)
    x = rng.standard_normal((1, 3, 32, 32))
    gs = {name: rng.standard_normal(o.shape) for name, o in net(x).items()}
    dx = net.backward(gs, need_input_grad=True)
    num = numerical_gradient(lambda: projected_loss(net(x).values(), gs.values()), x)
    assert dx.shape == x.shape
    assert_close_grad(dx, num)


def test_backward_refuses_unknown_level_names():
    net = ResNetFPN(
        BackboneConfig(resnet=tiny_cfg(), fpn_channels=2),
        rng=0,
    )
    outs = net(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="unknown feature level"):
        net.backward({"P2": np.ones_like(outs["p2"])})
