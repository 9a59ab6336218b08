"""The whole model on a device: every layer, loss, sampler, RoI op, head and post-processing step
through the ``xp`` seam, ``Module.to(device)``, SGD state and checkpoints that follow.

There is no GPU here, so the device is the strict fake one of ``tests/fake_device.py``: NumPy
underneath (so a step on it must equal the host step bit for bit), CuPy's rules on top (a host
array meeting a device array raises TypeError; every host sync is counted; every ``xp`` name,
keyword and ndarray method used is recorded and checked against CuPy's API). Tests marked
``gpu`` run the same on a real CUDA device and skip cleanly without one.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import Counter, namedtuple

import numpy as np
import pytest
from fake_device import FakeArray, fake_device, to_fake
from helpers import tiny_resnet
from test_mask_rcnn import tiny_config

from mrcnn_edu import backend, weights
from mrcnn_edu.backbone import BackboneConfig
from mrcnn_edu.backend import (
    check_device,
    deferred_checks,
    device_of,
    raise_if,
    to_device,
    to_host,
)
from mrcnn_edu.data.shapes import ShapesDataset
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.nn.optim import SGD
from mrcnn_edu.roi_ops import roi_pool, roi_pool_backward


# ----------------------------------------------------------------------------------------------
# Data, models, one step
# ----------------------------------------------------------------------------------------------
def shapes_batch(n=2, size=(128, 128), seed=0, classes=("circle", "square", "triangle")):
    ds = ShapesDataset(n, image_size=size, classes=classes, seed=seed, min_objects=1)
    items = [ds[i] for i in range(n)]
    targets = [{k: it[k] for k in ("boxes", "labels", "masks")} for it in items]
    return [it["image"] for it in items], targets


def wide_config() -> MaskRCNNConfig:
    """``test_mask_rcnn``'s tiny model down the other paths of the code: FrozenBN with a frozen
    stem (inference's folded BN in predict), sigmoid objectness, two resize sizes (scale jitter,
    image resize), torchvision's mask paste, every detection kept."""
    base = tiny_config()
    return dataclasses.replace(
        base,
        backbone=BackboneConfig(
            resnet=tiny_resnet(norm="frozen_bn", frozen_stages=1), fpn_channels=4
        ),
        rpn=dataclasses.replace(base.rpn, objectness_loss="sigmoid"),
        roi_heads=dataclasses.replace(base.roi_heads, mask_paste="torchvision", score_thresh=0.0),
        min_size=(48, 64),
        max_size=100,
    )


def model_on(device, config=None, seed=0):
    model = MaskRCNN(config or MaskRCNNConfig.small(3), rng=seed)
    model.rng = np.random.default_rng(seed + 1)
    return model.to(device)


def train_step(model, optimizer, images, targets) -> dict:
    model.zero_grad()
    losses = model.forward(images, targets)
    model.backward()
    optimizer.step()
    return losses


def host_params(model) -> dict:
    return {name: to_host(p.data).copy() for name, p in model.named_parameters()}


def sgd(model):
    return SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)


def places(log) -> Counter:
    """``"get at poolers.py:218"`` entries counted by ``(kind, file)``: line numbers move as
    the code is edited, the file that syncs does not."""
    return Counter(tuple(entry.rsplit(":", 1)[0].split(" at ")) for entry in log)


@pytest.fixture(scope="module")
def step_record():
    """One training step and one predict of the small preset on the host and on the fake
    device (after one step on each, so the momentum buffers exist), and two steps and a predict
    of ``wide_config``; the fake device's record of the first step and of everything."""
    images, targets = shapes_batch()
    host = model_on("cpu")
    host_opt = sgd(host)
    host_losses = [train_step(host, host_opt, images, targets) for _ in range(2)]
    host_pred = host.predict(images)
    wide_images, wide_targets = shapes_batch(2, (70, 90), seed=3, classes=("circle", "square"))
    wide_host = model_on("cpu", wide_config())
    wide_host_opt = sgd(wide_host)
    for _ in range(2):
        train_step(wide_host, wide_host_opt, wide_images, wide_targets)
    with fake_device() as dev:
        model = model_on("fake")
        opt = sgd(model)
        losses = [train_step(model, opt, images, targets)]
        dev.reset_counts()  # count the second step: the first creates the momentum buffers
        losses.append(train_step(model, opt, images, targets))
        step_syncs, step_shape_syncs = list(dev.sync_log), list(dev.shape_sync_log)
        step_kernels = Counter(dev.kernel_calls)
        buffers_on_device = all(isinstance(b, FakeArray) for b in opt.momentum_buffers)
        pred = model.predict(images)
        wide = model_on("fake", wide_config())
        wide_opt = sgd(wide)
        for _ in range(2):
            train_step(wide, wide_opt, wide_images, wide_targets)
        wide_pred = wide.predict(wide_images)
        fake_params, wide_params = host_params(model), host_params(wide)
    return {
        "dev": dev,
        "host": (host_losses, host_params(host), host_pred),
        "fake": (losses, fake_params, pred),
        "wide": (host_params(wide_host), wide_params, wide_host.predict(wide_images), wide_pred),
        "step": (step_syncs, step_shape_syncs, step_kernels),
        "buffers_on_device": buffers_on_device,
    }


# ----------------------------------------------------------------------------------------------
# The model on the device
# ----------------------------------------------------------------------------------------------
def test_a_training_step_on_the_device_equals_the_host_step(step_record):
    """Forward, backward and SGD step of the small preset on the fake device: the same losses
    and parameters as on NumPy, bit for bit (the fake computes with NumPy, so any difference
    is a device-path bug: a dropped update, a lost gradient, a wrong transfer)."""
    host_losses, host_p, _ = step_record["host"]
    losses, params, _ = step_record["fake"]
    assert losses == host_losses
    assert all(type(v) is float for step in losses for v in step.values())
    assert set(params) == set(host_p)
    for name in host_p:
        np.testing.assert_array_equal(params[name], host_p[name], err_msg=name)
    assert step_record["buffers_on_device"]  # the momentum buffers live with the params
    host_wide, fake_wide, _, _ = step_record["wide"]
    for name in host_wide:
        np.testing.assert_array_equal(fake_wide[name], host_wide[name], err_msg=name)


def test_predict_on_the_device_returns_the_host_results_as_numpy(step_record):
    _, _, host_pred = step_record["host"]
    _, _, pred = step_record["fake"]
    _, _, wide_host_pred, wide_pred = step_record["wide"]
    for want_list, got_list in ((host_pred, pred), (wide_host_pred, wide_pred)):
        assert len(got_list) == len(want_list) == 2
        for want, got in zip(want_list, got_list):
            assert set(got) == set(want) == {"boxes", "labels", "scores", "masks"}
            for key in want:
                assert type(got[key]) is np.ndarray, key  # host NumPy, not a device array
                assert got[key].dtype == want[key].dtype
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert sum(len(d["scores"]) for d in wide_pred) > 0  # the mask paste really ran


def test_one_training_step_syncs_the_host_four_times(step_record):
    """Every explicit device-to-host transfer of a training step, by place:

    - mask_rcnn.py, twice: the forward's five loss scalars together with every value check the
      forward queued (``backend.raise_if``: finite boxes, RoI batch indices, label ranges ...),
      in one transfer; and the backward's queued checks (roi_align_backward re-validates its
      RoIs) at its end;
    - poolers.py, twice: the RoI count per FPN level of the box and of the mask pooler
      (``split_by_level``: one transfer per pooler instead of one per level).
    The SGD step syncs nothing.

    CuPy also synchronises inside ops whose output size depends on the data (counted apart):
    the sampler's positives and negatives (matching.py, 2 per image and sampler call), the small
    and low-score proposals dropped (boxes.py, rpn.py), the positive anchors and sampled
    anchors (rpn.py), the sampled RoIs and positives (roi_heads.py). On a GPU each NMS kernel
    adds one (its kept indices); the fake device runs NMS on the host and does not count it.
    """
    syncs, shape_syncs, kernels = step_record["step"]
    assert len(syncs) == 4, syncs
    assert places(syncs) == Counter({("get", "mask_rcnn.py"): 2, ("get", "poolers.py"): 2})
    assert len(shape_syncs) == 21, shape_syncs
    assert places(shape_syncs) == Counter(
        {
            ("flatnonzero", "matching.py"): 8,
            ("flatnonzero", "boxes.py"): 2,
            ("flatnonzero", "rpn.py"): 6,
            ("flatnonzero", "roi_heads.py"): 5,
        }
    )
    # the GPU kernels a CuPy run dispatches to: RoIAlign per image for the mask targets and
    # per non-empty level for each pooler, its backward on all 4 levels of both poolers, the
    # RPN's NMS per image
    assert kernels["roi_align.roi_align_backward"] == 8 and kernels["nms.batched_nms"] == 2
    assert 2 + 2 <= kernels["roi_align.roi_align"] <= 2 + 8


def test_every_device_call_goes_through_xp(step_record):
    """No NumPy function met a device array (``np.concatenate(device_arrays)`` would dispatch
    through ``__array_function__``): all array code asks ``get_xp`` for its module."""
    assert step_record["dev"].dispatched == set()


def test_every_xp_name_the_model_uses_exists_in_cupy(step_record):
    """Every ``xp.<name>`` (with ``linalg.`` / ``random.`` sub-names and ufunc methods), every
    keyword passed to one, and every ndarray attribute used on a device array in the training
    steps and predictions above exists in CuPy's API. CuPy imports without a GPU (only
    allocating needs one)."""
    cupy = pytest.importorskip("cupy", reason="cupy is not installed (pip install cupy-cuda12x)")
    dev = step_record["dev"]
    assert {"matmul", "where", "flatnonzero", "concatenate", "argsort"} <= dev.xp_names
    missing = []
    for name in sorted(dev.xp_names):
        obj = cupy
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(name)
            continue
        accepted = _keywords_of(obj)
        unknown = set() if accepted is None else dev.keywords.get(name, set()) - accepted
        if unknown:
            missing.append(f"{name}({', '.join(sorted(unknown))}=...)")
    missing += [f"ndarray.{m}" for m in sorted(dev.methods) if not hasattr(cupy.ndarray, m)]
    assert not missing, f"not in CuPy: {missing}"


def _keywords_of(obj) -> set | None:
    """The keyword names ``obj`` accepts; None (any) when it takes ``**kwargs`` or its
    signature cannot be read (CuPy's ufuncs are compiled)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def test_roi_pool_and_its_backward_dispatch_to_the_device_kernels():
    rng = np.random.default_rng(0)
    features = rng.random((2, 3, 8, 8)).astype(np.float32)
    rois = np.array([[0, 1, 1, 6, 6], [1, 0, 2, 7, 5]], np.float32)
    want_y, want_arg = roi_pool(features, rois, 3, 1.0)
    want_g = roi_pool_backward(want_y, want_arg, features.shape, rois)
    with fake_device() as dev:
        y, arg = roi_pool(to_fake(features), to_fake(rois), 3, 1.0)
        g = roi_pool_backward(y, arg, features.shape, to_fake(rois))
        assert all(isinstance(a, FakeArray) for a in (y, arg, g))
        assert dev.kernel_calls == Counter(
            {"roi_align.roi_pool": 1, "roi_align.roi_pool_backward": 1}
        )
        # called on their own (not inside a model step) the ops read their value checks at
        # once; the kernels themselves sync nothing
        assert dev.syncs > 0 and all(s.startswith(("bool ", "int ")) for s in dev.sync_log)
        np.testing.assert_array_equal(to_host(g), want_g)
        np.testing.assert_array_equal(to_host(y), want_y)


def test_a_value_check_on_the_device_raises_at_the_step_fetch_with_the_host_message():
    """A NaN box coordinate in a target passes the host-side target checks (x2 > x1 is False
    for NaN) and is caught on the device by the RPN's box validation, queued (no sync) and
    raised when the losses are fetched: the same ValueError as on the host."""
    images, targets = shapes_batch()
    targets[1]["boxes"] = targets[1]["boxes"].copy()
    targets[1]["boxes"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN") as on_host:
        model_on("cpu").forward(images, targets)
    with fake_device() as dev:
        with pytest.raises(ValueError, match="NaN") as on_device:
            model_on("fake").forward(images, targets)
        assert dev.syncs >= 1
    assert str(on_device.value) == str(on_host.value)


def test_raise_if_queues_device_checks_only_inside_deferred_checks():
    with fake_device() as dev:
        bad = to_fake(np.array(True))
        with pytest.raises(ValueError, match="now"):
            raise_if(bad, lambda: ValueError("now"))  # no open block: read at once
        assert dev.syncs == 1
        with pytest.raises(ValueError, match="later"):
            with deferred_checks() as checks:
                raise_if(bad, lambda: ValueError("later"))
                raise_if(~bad, lambda: ValueError("never"))
                assert dev.syncs == 1  # queued, not read
                values = checks.fetch({"loss": to_fake(np.float32(0.25))})
        assert dev.syncs == 2  # one transfer for the flags and the loss together
        with deferred_checks() as checks:
            raise_if(~bad, lambda: ValueError("never"))
            values = checks.fetch({"loss": to_fake(np.float32(0.25)), "host": 1})
        assert values == {"loss": 0.25, "host": 1.0} and dev.syncs == 3
    with pytest.raises(ValueError, match="host"):  # NumPy flags raise at once, also in a block
        with deferred_checks():
            raise_if(np.bool_(True), lambda: ValueError("host"))


# ----------------------------------------------------------------------------------------------
# Module.to, SGD state, checkpoints
# ----------------------------------------------------------------------------------------------
def test_module_to_round_trip_keeps_every_bit_and_returns_self():
    model = MaskRCNN(wide_config(), rng=0)
    rng = np.random.default_rng(1)
    for _, p in model.named_parameters():
        p.grad[...] = rng.standard_normal(p.shape)
    before = {n: (p.data.copy(), p.grad.copy()) for n, p in model.named_parameters()}
    with fake_device():
        assert model.to("fake") is model
        assert model.device == "fake"
        for name, p in model.named_parameters():
            assert device_of(p.data) == device_of(p.grad) == "fake", name
        images, targets = shapes_batch(2, (70, 90), classes=("circle", "square"))
        model.forward(images, targets)  # caches and cached anchors now live on the device
        assert model.rpn.anchor_generator._device_cache
        assert model.to("cpu") is model
    assert model.device == "cpu" and not model.rpn.anchor_generator._device_cache
    for name, p in model.named_parameters():
        assert type(p.data) is np.ndarray and type(p.grad) is np.ndarray, name
        np.testing.assert_array_equal(p.data, before[name][0], err_msg=name)
        np.testing.assert_array_equal(p.grad, before[name][1], err_msg=name)
        assert p.data.dtype == before[name][0].dtype
    for m in model.modules():  # no device array left anywhere (caches, proposal scores ...)
        for name, value in vars(m).items():
            assert _fake_arrays(value) == 0, f"{type(m).__name__}.{name}"


def _fake_arrays(value) -> int:
    """How many FakeArrays ``value`` holds, also inside lists, tuples and dicts."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(map(_fake_arrays, value))
    return int(isinstance(value, FakeArray))


def test_sgd_state_follows_its_params_and_checkpoints_are_host_numpy(tmp_path):
    """Train on the device, checkpoint (host .npz), resume on the host: the next step equals the
    device's next step bit for bit. The momentum buffers move with ``model.to``."""
    images, targets = shapes_batch()
    with fake_device():
        model = model_on("fake")
        opt = sgd(model)
        train_step(model, opt, images, targets)
        state, opt_state = model.state_dict(), opt.state_dict()
        assert all(type(v) is np.ndarray for v in state.values())
        assert all(type(v) is np.ndarray for v in opt_state["momentum_buffers"].values())
        path = tmp_path / "ckpt.npz"
        weights.save(path, {"model": state, "optimizer": opt_state})
        rng_state = model.rng.bit_generator.state
        train_step(model, opt, images, targets)
        device_next = host_params(model)
        # back to the host mid-run: the buffers follow at the next step
        model.to("cpu")
        train_step(model, opt, images, targets)
        assert all(type(b) is np.ndarray for b in opt.momentum_buffers)
    loaded = weights.load(path, nested=True)
    resumed = model_on("cpu")
    resumed.load_state_dict(loaded["model"])
    resumed.rng.bit_generator.state = rng_state
    resumed_opt = sgd(resumed)
    resumed_opt.load_state_dict(loaded["optimizer"])
    train_step(resumed, resumed_opt, images, targets)
    for name, value in host_params(resumed).items():
        np.testing.assert_array_equal(value, device_next[name], err_msg=name)
    # and a host checkpoint onto the device: the buffers are put where the params live
    with fake_device():
        again = model_on("fake")
        again_opt = sgd(again)
        again_opt.load_state_dict(loaded["optimizer"])
        assert all(isinstance(b, FakeArray) for b in again_opt.momentum_buffers)


# ----------------------------------------------------------------------------------------------
# Device names and transfers
# ----------------------------------------------------------------------------------------------
def test_check_device_names_the_missing_piece():
    assert check_device(" CPU ") == "cpu"
    for bad in ("tpu", "cuda:x", "gpu0", 0, None):
        with pytest.raises(ValueError, match="device"):
            check_device(bad)
    if backend.gpu_available():
        pytest.skip("a CUDA device is present: nothing is missing")
    with pytest.raises(ValueError) as err:
        check_device("cuda")
    message = str(err.value)
    try:
        import cupy  # noqa: F401
    except Exception:
        assert "pip install 'mrcnn-edu[gpu]'" in message
    else:
        assert "no CUDA device" in message and "--device cpu" in message
    with pytest.raises(ValueError):
        check_device("cuda:1")


def test_to_device_and_to_host_keep_containers_and_leave_non_arrays():
    Pair = namedtuple("Pair", "a b")
    data = {"x": np.arange(3.0), "rest": [np.ones(2, np.int64), (np.zeros(1), "text")], "n": 4}
    data["pair"] = Pair(np.arange(2), None)
    with fake_device():
        assert check_device("fake") == "fake"
        on = to_device(data, "fake")
        assert isinstance(on["x"], FakeArray) and isinstance(on["rest"][1][0], FakeArray)
        assert isinstance(on["pair"], Pair) and isinstance(on["pair"].a, FakeArray)
        assert on["rest"][1][1] == "text" and on["n"] == 4 and on["pair"].b is None
        assert device_of(on["x"]) == "fake" and device_of(data["x"]) == "cpu"
        data["x"][0] = 99.0  # a transfer copies: the device array keeps its value
        assert to_host(on["x"])[0] == 0.0
        back = to_device(on, "cpu")
    assert type(back["x"]) is np.ndarray and isinstance(back["pair"], Pair)
    np.testing.assert_array_equal(back["rest"][0], np.ones(2, np.int64))
    assert to_device(data, "cpu")["x"] is data["x"]  # already there: not copied


# ----------------------------------------------------------------------------------------------
# The fake device itself: strict where CuPy is
# ----------------------------------------------------------------------------------------------
def test_the_fake_device_refuses_what_cupy_refuses_and_counts_syncs():
    with fake_device() as dev:
        xp = backend.get_xp(to_fake(np.zeros(1)))
        a = to_fake(np.arange(4.0))
        host = np.ones(4)
        for mixed in (lambda: a + host, lambda: xp.maximum(host, 0), lambda: xp.stack([a, host])):
            with pytest.raises(TypeError, match="host NumPy array"):
                mixed()
        with pytest.raises(TypeError, match="Implicit conversion"):
            np.asarray(a)
        with pytest.raises(TypeError, match="host NumPy array"):
            a[:2] = host[:2]
        total = a.sum()
        assert isinstance(total, FakeArray) and total.ndim == 0  # CuPy: a 0-d device array
        assert dev.syncs == 0
        assert float(total) == 6.0 and int(a[1]) == 1 and bool(a[2])
        assert [s.split(" at ")[0] for s in dev.sync_log] == ["float", "int", "bool"]
        a[xp.asarray(host > 0)]  # boolean-mask indexing sizes its result from the data
        assert dev.shape_syncs == 1
        assert {"maximum", "stack", "asarray"} <= dev.xp_names


# ----------------------------------------------------------------------------------------------
# A real GPU (skipped without one)
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_a_training_step_on_cuda_matches_the_host():
    images, targets = shapes_batch()
    host = model_on("cpu")
    host_losses = train_step(host, sgd(host), images, targets)
    gpu = model_on("cuda")
    assert gpu.device.startswith("cuda:")
    gpu_losses = train_step(gpu, sgd(gpu), images, targets)
    for name, value in host_losses.items():
        assert gpu_losses[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    gpu_params = host_params(gpu)
    for name, value in host_params(host).items():
        np.testing.assert_allclose(gpu_params[name], value, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.gpu
def test_predict_on_cuda_returns_host_arrays_like_the_host():
    images, _ = shapes_batch()
    config = MaskRCNNConfig.small(3)
    config.roi_heads.score_thresh = 0.0
    host = model_on("cpu", config)
    want = host.predict(images)
    got = model_on("cuda", config).predict(images)
    for w, g in zip(want, got):
        assert set(g) == set(w)
        assert all(type(v) is np.ndarray for v in g.values())
        # sorted scores compare even where near-ties order the detections differently
        np.testing.assert_allclose(np.sort(g["scores"]), np.sort(w["scores"]), atol=1e-4)
