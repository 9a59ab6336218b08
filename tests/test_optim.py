"""SGD and the warm-up + multi-step schedule: hand-derived updates, exclusions, exact resume."""

import numpy as np
import pytest

from mrcnn_edu import weights
from mrcnn_edu.nn.module import Param
from mrcnn_edu.nn.optim import SGD, WarmupMultiStepLR


def _param(values, no_weight_decay=False, dtype=np.float64):
    return Param(np.array(values, dtype=dtype), no_weight_decay=no_weight_decay)


def _steps(opt, params, grads_per_step, scheduler=None):
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad[...] = g
        opt.step()
        if scheduler is not None:
            scheduler.step()


# -- SGD -----------------------------------------------------------------------------------------


def test_sgd_three_steps_with_momentum_and_weight_decay_match_hand_derivation():
    # p = 1, grad = 1 every step, lr 0.1, momentum 0.5, weight decay 0.1 (decayed param) or
    # excluded (no_weight_decay param):
    #   decayed:  g1 = 1 + 0.1*1     = 1.1,     buf1 = 1.1,                    p1 = 0.89
    #             g2 = 1 + 0.1*0.89  = 1.089,   buf2 = 0.55 + 1.089 = 1.639,   p2 = 0.7261
    #             g3 = 1 + 0.07261   = 1.07261, buf3 = 0.8195 + 1.07261,       p3 = 0.536889
    #   excluded: buf = 1, 1.5, 1.75;  p = 0.9, 0.75, 0.575
    decayed, excluded = _param([1.0]), _param([1.0], no_weight_decay=True)
    opt = SGD([decayed, excluded], lr=0.1, momentum=0.5, weight_decay=0.1)
    expected = [(0.89, 0.9), (0.7261, 0.75), (0.536889, 0.575)]
    for want_decayed, want_excluded in expected:
        _steps(opt, [decayed, excluded], [([1.0], [1.0])])
        np.testing.assert_allclose(decayed.data, [want_decayed], rtol=1e-12)
        np.testing.assert_allclose(excluded.data, [want_excluded], rtol=1e-12)
    assert opt.step_count == 3


def test_sgd_decays_every_param_when_exclusion_is_off():
    p = _param([1.0], no_weight_decay=True)
    opt = SGD([p], lr=0.1, momentum=0.5, weight_decay=0.1, exclude_no_weight_decay=False)
    _steps(opt, [p], [([1.0],)] * 2)
    np.testing.assert_allclose(p.data, [0.7261], rtol=1e-12)


def test_sgd_without_momentum_is_plain_gradient_descent():
    p = _param([2.0, -4.0])
    opt = SGD([p], lr=0.5, momentum=0.0, weight_decay=0.25)
    _steps(opt, [p], [([1.0, 1.0],)])
    # p - lr * (g + wd p) = [2 - 0.5*(1 + 0.5), -4 - 0.5*(1 - 1)]
    np.testing.assert_allclose(p.data, [1.25, -4.0])
    assert opt.state_dict()["momentum_buffers"] == {}


def test_sgd_updates_in_place_keeps_dtype_and_skips_frozen_params():
    p = _param([[1.0, 2.0]], dtype=np.float32)
    frozen = Param(np.ones(2), requires_grad=False)
    frozen.grad[...] = 5.0
    array_before = p.data
    opt = SGD([p, frozen], lr=0.1)
    _steps(opt, [p, frozen], [([[1.0, 1.0]], [5.0, 5.0])])
    assert p.data is array_before and p.data.dtype == np.float32
    np.testing.assert_allclose(p.data, [[0.9, 1.9]], rtol=1e-6)
    np.testing.assert_array_equal(frozen.data, [1.0, 1.0])


def test_sgd_lr_attribute_is_read_at_each_step():
    p = _param([0.0])
    opt = SGD([p], lr=1.0, momentum=0.0)
    _steps(opt, [p], [([1.0],)])
    opt.lr = 0.25
    _steps(opt, [p], [([1.0],)])
    np.testing.assert_allclose(p.data, [-1.25])


def test_sgd_zero_grad():
    p = _param([1.0, 2.0])
    p.grad[...] = 3.0
    SGD([p], lr=0.1).zero_grad()
    np.testing.assert_array_equal(p.grad, 0.0)


@pytest.mark.parametrize(
    "make_params, kwargs, match",
    [
        (lambda: [], {}, "empty"),
        (lambda: [np.zeros(2)], {}, "not a Param"),
        (lambda: [_param([1.0])] * 2, {}, "twice"),
        (lambda: [_param([1.0])], {"lr": -0.1}, "lr"),
        (lambda: [_param([1.0])], {"momentum": -0.9}, "momentum"),
        (lambda: [_param([1.0])], {"weight_decay": float("nan")}, "weight_decay"),
    ],
)
def test_sgd_rejects_bad_arguments(make_params, kwargs, match):
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        SGD(make_params(), **kwargs)


def _make_run(seed=0):
    rng = np.random.default_rng(seed)
    params = [
        Param(rng.standard_normal((3, 2)).astype(np.float32)),
        Param(rng.standard_normal(2).astype(np.float32), no_weight_decay=True),
    ]
    opt = SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    sched = WarmupMultiStepLR(opt, 0.02, milestones=[3, 4], warmup_iters=2)
    return params, opt, sched


def test_sgd_and_schedule_resume_from_a_saved_file_continue_identically(tmp_path):
    rng = np.random.default_rng(1)
    grads = [
        (rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(2).astype(np.float32))
        for _ in range(6)
    ]
    params, opt, sched = _make_run()
    _steps(opt, params, grads, sched)

    params_a, opt_a, sched_a = _make_run()
    _steps(opt_a, params_a, grads[:3], sched_a)
    path = tmp_path / "ckpt.npz"
    weights.save(
        path,
        {
            "model": {str(i): p.data for i, p in enumerate(params_a)},
            "optimizer": opt_a.state_dict(),
            "scheduler": sched_a.state_dict(),
        },
    )
    # a fresh process: different initial values, then everything comes from the file
    params_b, opt_b, sched_b = _make_run(seed=99)
    state = weights.load(path, nested=True)
    for i, p in enumerate(params_b):
        p.data[...] = state["model"][str(i)]
    opt_b.load_state_dict(state["optimizer"])
    sched_b.load_state_dict(state["scheduler"])
    assert opt_b.step_count == 3 and sched_b.iteration == 3 and opt_b.lr == opt_a.lr
    _steps(opt_b, params_b, grads[3:], sched_b)
    for p, q in zip(params, params_b, strict=True):
        np.testing.assert_array_equal(p.data, q.data)  # bit for bit


def test_sgd_state_dict_is_a_copy():
    p = _param([1.0])
    opt = SGD([p], lr=0.1)
    _steps(opt, [p], [([1.0],)])
    state = opt.state_dict()
    _steps(opt, [p], [([1.0],)])
    np.testing.assert_array_equal(state["momentum_buffers"]["0"], [1.0])


def test_sgd_load_state_dict_rejects_mismatched_state():
    p = _param([1.0, 2.0])
    opt = SGD([p], lr=0.1)
    _steps(opt, [p], [([1.0, 1.0],)])
    state = opt.state_dict()

    two = SGD([_param([1.0, 2.0]), _param([3.0])], lr=0.1)
    with pytest.raises(ValueError, match="state is for 1 params but this optimizer has 2"):
        two.load_state_dict(state)
    with pytest.raises(ValueError, match=r"shape mismatch.*\(3,\).*\(2,\)"):
        SGD([_param([1.0, 2.0, 3.0])], lr=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="nested=True"):
        SGD([_param([1.0, 2.0])], lr=0.1).load_state_dict({"momentum_buffers/0": np.ones(2)})
    incomplete = {k: v for k, v in state.items() if k != "momentum_buffers"}
    with pytest.raises(ValueError, match="no momentum buffers"):
        SGD([_param([1.0, 2.0])], lr=0.1).load_state_dict(incomplete)


def test_sgd_matches_torch_with_param_groups_for_weight_decay():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    w0, b0 = rng.standard_normal((4, 3)), rng.standard_normal(4)
    grads = [(rng.standard_normal((4, 3)), rng.standard_normal(4)) for _ in range(5)]
    lrs = [0.1, 0.05, 0.05, 0.01, 0.2]

    w, b = Param(w0.copy()), Param(b0.copy(), no_weight_decay=True)
    opt = SGD([w, b], lr=lrs[0], momentum=0.9, weight_decay=1e-2)
    tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    topt = torch.optim.SGD(
        [{"params": [tw]}, {"params": [tb], "weight_decay": 0.0}],
        lr=lrs[0],
        momentum=0.9,
        weight_decay=1e-2,
    )
    for lr, (gw, gb) in zip(lrs, grads, strict=True):
        opt.lr = lr
        for group in topt.param_groups:
            group["lr"] = lr
        w.grad[...], b.grad[...] = gw, gb
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        opt.step()
        topt.step()
    np.testing.assert_allclose(w.data, tw.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.data, tb.detach().numpy(), rtol=1e-12, atol=1e-14)


# -- WarmupMultiStepLR -----------------------------------------------------------------------------


def _schedule(**kwargs):
    kwargs = {"milestones": [10, 20], "warmup_iters": 5, "warmup_factor": 0.001, **kwargs}
    return WarmupMultiStepLR(SGD([_param([0.0])], lr=1.0), 0.02, **kwargs)


@pytest.mark.parametrize(
    "iteration, expected",
    [
        (0, 0.02 * 0.001),  # warm-up starts at warmup_factor * base_lr
        (1, 0.02 * (0.001 * 0.8 + 0.2)),  # alpha = 1/5
        (4, 0.02 * (0.001 * 0.2 + 0.8)),
        (5, 0.02),  # warm-up over
        (9, 0.02),
        (10, 0.002),  # first milestone: the drop applies at the milestone itself
        (19, 0.002),
        (20, 0.0002),
        (1000, 0.0002),
    ],
)
def test_schedule_values_at_hand_picked_iterations(iteration, expected):
    assert _schedule().lr_at(iteration) == pytest.approx(expected, rel=1e-12)


def test_constant_warmup_and_milestone_inside_warmup():
    constant = _schedule(warmup_method="constant")
    assert constant.lr_at(3) == pytest.approx(0.02 * 0.001)
    assert constant.lr_at(5) == pytest.approx(0.02)
    # detectron2 multiplies the warm-up factor and the decay, so both apply at iteration 3
    early = _schedule(milestones=[2])
    assert early.lr_at(3) == pytest.approx(0.02 * (0.001 * 0.4 + 0.6) * 0.1)
    assert _schedule(warmup_iters=0).lr_at(0) == pytest.approx(0.02)


def test_schedule_sets_optimizer_lr_at_construction_and_each_step():
    sched = _schedule()
    opt = sched.optimizer
    seen = [opt.lr]
    for _ in range(24):
        sched.step()
        seen.append(opt.lr)
    assert seen == [sched.lr_at(i) for i in range(25)]
    assert sched.iteration == 24


def test_schedule_state_round_trip():
    sched = _schedule()
    for _ in range(7):
        sched.step()
    other = WarmupMultiStepLR(SGD([_param([0.0])], lr=1.0), 1.0, milestones=[1])
    other.load_state_dict(sched.state_dict())
    assert other.iteration == 7 and other.milestones == [10, 20]
    assert other.optimizer.lr == sched.optimizer.lr
    assert [other.lr_at(i) for i in range(30)] == [sched.lr_at(i) for i in range(30)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"milestones": [20, 10]}, "increasing"),
        ({"milestones": [10, 10]}, "increasing"),
        ({"warmup_method": "cosine"}, "warmup_method"),
        ({"warmup_iters": -1}, "warmup_iters"),
        ({"gamma": -0.1}, "gamma"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _schedule(**kwargs)
    with pytest.raises(ValueError, match="iteration"):
        _schedule().lr_at(-1)
