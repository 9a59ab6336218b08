"""Optional: our layers agree with PyTorch's (skipped when torch is not installed)."""

import numpy as np
import pytest
from helpers import rand

from mrcnn_edu.nn import functional as F

torch = pytest.importorskip("torch")
tF = torch.nn.functional


@pytest.mark.parametrize(
    "k,s,p,d",
    [
        (3, 1, 1, 1),
        (3, 2, 1, 1),
        (1, 1, 0, 1),
        (1, 2, 0, 1),
        (3, 1, 2, 2),
        (3, 1, 3, 1),
        (7, 2, 3, 1),
    ],
)
def test_conv2d_forward_backward_match_torch(k, s, p, d):
    x, w, b = rand(2, 3, 11, 9, seed=1), rand(4, 3, k, k, seed=2), rand(4, seed=3)
    y, cache = F.conv2d_forward(x, w, b, s, p, d)
    g = rand(*y.shape, seed=4)
    dx, dw, db = F.conv2d_backward(g, cache)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = tF.conv2d(tx, tw, tb, s, p, d)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    for ours, theirs in ((dx, tx), (dw, tw), (db, tb)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k,s,p,op,d", [(2, 2, 0, 0, 1), (3, 2, 1, 1, 1), (3, 3, 1, 2, 2)])
def test_conv_transpose2d_match_torch(k, s, p, op, d):
    x, w, b = rand(2, 3, 5, 4, seed=1), rand(3, 2, k, k, seed=2), rand(2, seed=3)
    y, cache = F.conv_transpose2d_forward(x, w, b, s, p, op, d)
    g = rand(*y.shape, seed=4)
    dx, dw, db = F.conv_transpose2d_backward(g, cache)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = tF.conv_transpose2d(tx, tw, tb, s, p, op, 1, d)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    for ours, theirs in ((dx, tx), (dw, tw), (db, tb)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_max_pool_matches_torch_including_backward():
    x = rand(2, 3, 9, 8)
    y, cache = F.max_pool2d_forward(x, 3, 2, 1)
    g = rand(*y.shape, seed=1)
    tx = torch.tensor(x, requires_grad=True)
    ty = tF.max_pool2d(tx, 3, 2, 1)
    ty.backward(torch.tensor(g))
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_allclose(F.max_pool2d_backward(g, cache), tx.grad.numpy(), atol=1e-12)


@pytest.mark.parametrize(
    "src,dst", [((25, 34), (50, 68)), ((13, 17), (25, 34)), ((7, 7), (13, 10))]
)
def test_upsample_nearest_matches_torch(src, dst):
    x = rand(1, 2, *src).astype(np.float32)
    y, cache = F.upsample_nearest_forward(x, dst)
    ty = tF.interpolate(torch.tensor(x), size=dst, mode="nearest")
    np.testing.assert_array_equal(y, ty.numpy())


def test_group_norm_matches_torch():
    x, w, b = rand(2, 6, 4, 3), rand(6, seed=1), rand(6, seed=2)
    y, cache = F.group_norm_forward(x, 3, w, b)
    g = rand(*y.shape, seed=3)
    dx, dw, db = F.group_norm_backward(g, cache)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = tF.group_norm(tx, 3, tw, tb, 1e-5)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-9, atol=1e-10)
    for ours, theirs in ((dx, tx), (dw, tw), (db, tb)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-9, atol=1e-10)
