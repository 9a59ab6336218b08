"""Our RoI ops against torchvision's (optional: skipped when torch/torchvision are missing).

Forward outputs, argmax and input gradients are compared on random cases; no number printed by
torchvision is stored anywhere.
"""

import numpy as np
import pytest

from mrcnn_edu.roi_ops import (
    MultiScaleRoIAlign,
    roi_align,
    roi_align_backward,
    roi_pool,
    roi_pool_backward,
)

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision import ops as tv_ops  # noqa: E402

TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def random_case(rng, dtype, n=2, c=3, h=11, w=14, k=25, scale=0.5):
    features = rng.standard_normal((n, c, h, w)).astype(dtype)
    # RoIs partly (or entirely) outside the map, tiny and large ones.
    xy = rng.uniform(-8 / scale, (w + 4) / scale, (k, 2))
    wh = rng.uniform(0, 12 / scale, (k, 2)) * rng.choice([0.05, 1.0], (k, 1))
    rois = np.concatenate([rng.integers(0, n, (k, 1)), xy, xy + wh], axis=1).astype(dtype)
    return features, rois


def torch_grad(op, features, grad):
    x = torch.from_numpy(features).requires_grad_(True)
    out = op(x)
    out.backward(torch.from_numpy(grad))
    return out.detach().numpy(), x.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 4])
@pytest.mark.parametrize("output_size", [7, (3, 5)])
def test_roi_align_matches_torchvision(dtype, aligned, sampling_ratio, output_size):
    rng = np.random.default_rng(sampling_ratio + 1 + 10 * aligned)
    features, rois = random_case(rng, dtype)
    ours = roi_align(features, rois, output_size, 0.5, sampling_ratio, aligned)
    grad = rng.standard_normal(ours.shape).astype(dtype)
    theirs, theirs_grad = torch_grad(
        lambda x: tv_ops.roi_align(
            x, torch.from_numpy(rois), output_size, 0.5, sampling_ratio, aligned
        ),
        features,
        grad,
    )
    np.testing.assert_allclose(ours, theirs, **TOL[dtype])
    ours_grad = roi_align_backward(
        grad, rois, features.shape, output_size, 0.5, sampling_ratio, aligned
    )
    np.testing.assert_allclose(ours_grad, theirs_grad, **TOL[dtype])


def test_roi_align_matches_torchvision_with_box_lists():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 4, 20, 24)).astype(np.float32)
    boxes = [
        np.array([[1.5, 2.5, 30.0, 22.0]], np.float32),
        np.array([[0, 0, 47.9, 39.9], [5, 6, 7, 8]], np.float32),
    ]
    theirs = tv_ops.roi_align(
        torch.from_numpy(features), [torch.from_numpy(b) for b in boxes], 5, 0.5, 2, True
    ).numpy()
    np.testing.assert_allclose(
        roi_align(features, boxes, 5, 0.5, 2, True), theirs, **TOL[np.float32]
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("output_size", [1, 4, (2, 7), 14])
def test_roi_pool_matches_torchvision(dtype, output_size):
    rng = np.random.default_rng(3)
    features, rois = random_case(rng, dtype)
    features[0, 0, :4, :4] = 1.0  # ties: the first element in row-major order wins
    rois[::3, 1:] = np.round(rois[::3, 1:] * 2) / 2  # corners at .5: the C rounding rule
    ours, argmax = roi_pool(features, rois, output_size, 0.5)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    theirs, theirs_argmax = torch.ops.torchvision.roi_pool(
        torch.from_numpy(features), torch.from_numpy(rois), 0.5, ph, pw
    )
    np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(argmax, theirs_argmax.numpy())
    grad = rng.standard_normal(ours.shape).astype(dtype)
    _, theirs_grad = torch_grad(
        lambda x: tv_ops.roi_pool(x, torch.from_numpy(rois), output_size, 0.5), features, grad
    )
    np.testing.assert_allclose(
        roi_pool_backward(grad, argmax, features.shape, rois), theirs_grad, **TOL[dtype]
    )


def test_roi_pool_matches_torchvision_at_stride_16_with_many_rois():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((1, 8, 50, 68)).astype(np.float32)
    xy = rng.uniform(0, 1000, (200, 2))
    wh = np.exp(rng.uniform(np.log(8), np.log(600), (200, 2)))
    rois = np.concatenate([np.zeros((200, 1)), xy, xy + wh], axis=1).astype(np.float32)
    for size in (7, 14):
        ours, argmax = roi_pool(features, rois, size, 1 / 16)
        theirs, theirs_argmax = torch.ops.torchvision.roi_pool(
            torch.from_numpy(features), torch.from_numpy(rois), 1 / 16, size, size
        )
        np.testing.assert_array_equal(ours, theirs.numpy())
        np.testing.assert_array_equal(argmax, theirs_argmax.numpy())


@pytest.mark.parametrize("aligned", [False, True])
def test_multiscale_roi_align_matches_torchvision(aligned):
    rng = np.random.default_rng(5)
    image_shapes = [(200, 264), (192, 256)]  # the padded batch is 200 x 264 -> scales 1/4 .. 1/32
    names = ["p2", "p3", "p4", "p5"]
    features = {
        name: rng.standard_normal((2, 3, -(-200 // s), -(-264 // s)))
        for name, s in zip(names, (4, 8, 16, 32))
    }
    features["pool"] = rng.standard_normal((2, 3, 4, 5))  # present but not pooled
    boxes = []
    for count in (9, 6):
        xy = rng.uniform(-20, 240, (count, 2))
        wh = np.exp(rng.uniform(np.log(4), np.log(500), (count, 2)))
        boxes.append(np.concatenate([xy, xy + wh], axis=1))
    pooler = MultiScaleRoIAlign(names, (7, 5), 2, aligned=aligned)
    ours = pooler(features, boxes, image_shapes)
    assert len(set(pooler.cache.levels.tolist())) >= 3  # several levels are exercised

    if aligned:
        # torchvision's pooler has no `aligned` argument: compare per level with roi_align.
        levels = pooler.cache.levels
        rois = np.concatenate([np.c_[np.full(len(b), i), b] for i, b in enumerate(boxes)])
        for i, level in enumerate(levels.tolist()):
            feat = torch.from_numpy(features[names[level]])
            want = tv_ops.roi_align(
                feat, torch.from_numpy(rois[i : i + 1]), (7, 5), 1 / 4 / 2**level, 2, True
            )
            np.testing.assert_allclose(ours[i : i + 1], want.numpy(), rtol=1e-10, atol=1e-12)
        return
    theirs_pooler = tv_ops.MultiScaleRoIAlign(names, (7, 5), 2)
    tfeatures = {k: torch.from_numpy(v).requires_grad_(True) for k, v in features.items()}
    theirs = theirs_pooler(tfeatures, [torch.from_numpy(b) for b in boxes], image_shapes)
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)
    grad = rng.standard_normal(ours.shape)
    theirs.backward(torch.from_numpy(grad))
    ours_grads = pooler.backward(grad)
    for name in names:
        np.testing.assert_allclose(
            ours_grads[name], tfeatures[name].grad.numpy(), rtol=1e-10, atol=1e-12
        )
    assert tfeatures["pool"].grad is None and "pool" not in ours_grads
