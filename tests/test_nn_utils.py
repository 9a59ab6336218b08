"""The small shared helpers of ``mrcnn_edu.nn.utils``."""

import numpy as np
import pytest

from mrcnn_edu.nn import layers as L
from mrcnn_edu.nn.utils import add_param_grads, as_generator, check_float_array, pair


@pytest.mark.parametrize(
    "value, want",
    [(3, (3, 3)), (np.int64(2), (2, 2)), (np.int32(4), (4, 4)), ((7, 5), (7, 5)), ([1, 2], (1, 2))],
)
def test_pair_accepts_ints_and_pairs(value, want):
    got = pair(value, "kernel_size")
    assert got == want
    assert all(type(v) is int for v in got)


@pytest.mark.parametrize("value", [2.0, True, np.bool_(False), (1, 2, 3), (1,), "3", (1.0, 2)])
def test_pair_rejects_non_ints_naming_the_argument(value):
    with pytest.raises(ValueError, match="stride"):
        pair(value, "stride")


def test_pair_minimum():
    assert pair(0, "padding", minimum=0) == (0, 0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        pair((1, -1), "padding", minimum=0)
    with pytest.raises(ValueError, match="stride must be positive"):
        pair(0, "stride", minimum=1)


def test_as_generator_passes_a_generator_through_and_seeds_otherwise():
    g = np.random.default_rng(5)
    assert as_generator(g) is g
    a, b = as_generator(7), as_generator(7)
    assert isinstance(a, np.random.Generator) and a is not b
    np.testing.assert_array_equal(a.standard_normal(4), b.standard_normal(4))
    assert isinstance(as_generator(None), np.random.Generator)


def test_check_float_array():
    check_float_array(np.zeros(2, np.float32), "x")
    check_float_array(np.zeros(2, np.float64), "x")
    with pytest.raises(ValueError, match="features must be float32 or float64"):
        check_float_array(np.zeros(2, np.int64), "features")
    with pytest.raises(ValueError, match="features must be a NumPy"):
        check_float_array([0.0, 1.0], "features")


def test_add_param_grads_accumulates_and_handles_no_bias():
    lin = L.Linear(3, 2, rng=0)
    dw, db = np.ones((2, 3), np.float32), np.full(2, 2.0, np.float32)
    add_param_grads(lin, dw, db)
    add_param_grads(lin, dw, db)
    np.testing.assert_array_equal(lin.weight.grad, 2 * dw)
    np.testing.assert_array_equal(lin.bias.grad, 2 * db)

    no_bias = L.Conv2d(1, 2, 1, bias=False, rng=0)
    assert no_bias.bias is None
    add_param_grads(no_bias, np.ones((2, 1, 1, 1), np.float32), None)
    add_param_grads(no_bias, np.ones((2, 1, 1, 1), np.float32), None)
    np.testing.assert_array_equal(no_bias.weight.grad, np.full((2, 1, 1, 1), 2.0))
