"""Param/Module bookkeeping: names, state dicts with clear errors, train/eval, zero_grad."""

import numpy as np
import pytest

from mrcnn_edu.nn import layers as L
from mrcnn_edu.nn.module import Module, Param


class Block(Module):
    def __init__(self):
        self.conv = L.Conv2d(2, 3, 3, padding=1, rng=0)
        self.bn = L.FrozenBatchNorm2d(3)
        self.heads = [L.Linear(3, 2, rng=1), L.Linear(3, 1, rng=2)]
        self.scale = Param(np.ones(1, np.float32))


def test_named_parameters_walk_attributes_in_definition_order():
    names = [n for n, _ in Block().named_parameters()]
    assert names == [
        "scale",
        "conv.weight",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "heads.0.weight",
        "heads.0.bias",
        "heads.1.weight",
        "heads.1.bias",
    ]


def test_parameters_skip_frozen_buffers():
    params = Block().parameters()
    assert len(params) == 7
    assert all(p.requires_grad for p in params)


def test_state_dict_round_trip_copies_values():
    a, b = Block(), Block()
    for p in b.parameters():
        p.data += 1.0
    a.load_state_dict({k: v.copy() for k, v in b.state_dict().items()})
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        np.testing.assert_array_equal(pa.data, pb.data)
    assert a.conv.weight.data is not b.conv.weight.data


def test_load_state_dict_reports_missing_unexpected_and_shape_mismatch():
    m = Block()
    state = dict(m.state_dict())
    del state["conv.bias"]
    state["conv.extra"] = np.zeros(3)
    state["heads.0.weight"] = np.zeros((5, 5))
    with pytest.raises(ValueError) as err:
        m.load_state_dict(state)
    msg = str(err.value)
    assert "missing keys: ['conv.bias']" in msg
    assert "unexpected keys: ['conv.extra']" in msg
    assert "shape mismatch for 'heads.0.weight'" in msg and "(2, 3)" in msg


def test_load_state_dict_non_strict_ignores_missing_but_not_shapes():
    m = Block()
    m.load_state_dict({"scale": np.full(1, 3.0)}, strict=False)
    assert m.scale.data[0] == 3.0
    with pytest.raises(ValueError, match="shape mismatch"):
        m.load_state_dict({"scale": np.zeros(2)}, strict=False)


def test_load_state_dict_keeps_dtype():
    m = Block()
    m.load_state_dict({k: v.astype(np.float64) for k, v in m.state_dict().items()})
    assert m.conv.weight.data.dtype == np.float32


def test_train_eval_propagate_and_zero_grad():
    m = Block()
    m.eval()
    assert not any(x.training for x in m.modules())
    m.train()
    assert all(x.training for x in m.modules())
    m.conv.weight.grad += 1.0
    m.zero_grad()
    assert not m.conv.weight.grad.any()


def test_astype_casts_params_and_grads():
    m = Block().astype(np.float64)
    assert all(
        p.data.dtype == np.float64 and p.grad.dtype == np.float64 for _, p in m.named_parameters()
    )
