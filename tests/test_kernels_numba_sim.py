"""The Numba-CUDA kernels, run on the CPU by Numba's CUDA simulator, equal the NumPy reference.

The simulator is switched on by ``NUMBA_ENABLE_CUDASIM=1``, which Numba reads once, when
``numba.cuda`` is first imported. So the cases below never run in the pytest process (another
test may already have imported the real ``numba.cuda``): one child process with the variable set
runs every case and reports each result as JSON; each pytest test then checks its case.

The simulator runs every GPU thread as a Python thread, so the cases are small -- but they still
cross 64-box tile boundaries (NMS) and include every RoI edge case of the GPU tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import numpy as np
import pytest
from helpers import random_boxes

CASES = {}


def case(fn):
    """Register a simulator case; it raises AssertionError when a kernel disagrees."""
    CASES[fn.__name__] = fn
    return fn


# -- the cases (run in the child) ----------------------------------------------------------


@case
def simulator_and_numba_dispatch_are_active():
    from mrcnn_edu.kernels import numba_nms, numba_roi_align
    from numba.core import config

    from mrcnn_edu.backend import gpu_kernel

    assert config.ENABLE_CUDASIM, "NUMBA_ENABLE_CUDASIM did not reach numba"
    assert gpu_kernel("roi_align", "roi_align") is numba_roi_align.roi_align
    assert gpu_kernel("roi_align", "roi_align_backward") is numba_roi_align.roi_align_backward
    assert gpu_kernel("nms", "nms") is numba_nms.nms


@case
def nms_keeps_the_reference_boxes_across_tiles_with_tied_scores():
    from mrcnn_edu.kernels.numba_nms import nms as nms_numba

    from mrcnn_edu.nms import nms

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for n in (1, 2, 63, 64, 65, 150):  # tile boundaries at 64 and 128
            boxes = random_boxes(rng, n, dtype, size=60.0, wh=(1.0, 30.0))
            scores = rng.integers(0, 6, n).astype(dtype)  # many equal scores
            for threshold in (0.3, 0.7):
                got = nms_numba(boxes, scores, threshold)
                want = nms(boxes, scores, threshold)
                assert got.dtype == np.int64, got.dtype
                assert np.array_equal(got, want), (dtype, n, threshold, got, want)


@case
def nms_equal_scores_keep_the_lower_index():
    from mrcnn_edu.kernels.numba_nms import nms as nms_numba

    boxes = np.array([[0, 0, 10, 10]] * 3 + [[50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.9, 0.5], dtype=np.float32)
    # box 1 and 2 tie at 0.9 and coincide: 1 comes first and removes 2 and 0; 3 is far away
    assert nms_numba(boxes, scores, 0.5).tolist() == [1, 3]


@case
def nms_iou_exactly_at_the_threshold_survives():
    from mrcnn_edu.kernels.numba_nms import nms as nms_numba

    from mrcnn_edu.nms import nms

    # inter 2, union 4 + 2 - 2 = 4: IoU is exactly 0.5 in any precision
    boxes = np.array([[0, 0, 4, 1], [0, 0, 2, 1]])
    scores = np.array([0.9, 0.8])
    for dtype in (np.float32, np.float64):
        b, s = boxes.astype(dtype), scores.astype(dtype)
        assert nms_numba(b, s, 0.5).tolist() == [0, 1] == nms(b, s, 0.5).tolist()
        assert nms_numba(b, s, 0.4999).tolist() == [0] == nms(b, s, 0.4999).tolist()


@case
def nms_float32_iou_is_compared_with_the_threshold_in_double():
    from mrcnn_edu.kernels.numba_nms import nms as nms_numba

    from mrcnn_edu.nms import nms

    # inter 1, union 10: the float32 IoU is float32(0.1) = 0.10000000149..., which is > 0.1
    # as a double (suppressed) but == 0.1 if the threshold were rounded to float32 (kept).
    boxes = np.array([[0, 0, 10, 1], [0, 0, 1, 1]], dtype=np.float32)
    scores = np.array([0.9, 0.8], dtype=np.float32)
    assert nms_numba(boxes, scores, 0.1).tolist() == [0] == nms(boxes, scores, 0.1).tolist()
    # in float64 the IoU is exactly the double 0.1: not greater, so both survive
    b64, s64 = boxes.astype(np.float64), scores.astype(np.float64)
    assert nms_numba(b64, s64, 0.1).tolist() == [0, 1] == nms(b64, s64, 0.1).tolist()


@case
def nms_of_no_boxes_is_empty():
    from mrcnn_edu.kernels.numba_nms import batched_nms, nms

    empty = np.zeros((0, 4), dtype=np.float32)
    scores = np.zeros((0,), dtype=np.float32)
    assert nms(empty, scores, 0.5).shape == (0,)
    assert batched_nms(empty, scores, np.zeros((0,), dtype=np.int64), 0.5).shape == (0,)


@case
def batched_nms_never_suppresses_across_categories():
    from mrcnn_edu.kernels.numba_nms import batched_nms as batched_numba

    from mrcnn_edu.nms import batched_nms

    # two identical boxes of different categories both survive; same category: one does
    boxes = np.array([[0, 0, 10, 10]] * 3, dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    assert batched_numba(boxes, scores, np.array([0, 1, 0]), 0.5).tolist() == [0, 1]
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        boxes = random_boxes(rng, 90, dtype, size=60.0, wh=(1.0, 30.0))
        scores = rng.integers(0, 6, 90).astype(dtype)
        idxs = rng.integers(0, 4, 90)
        got = batched_numba(boxes, scores, idxs, 0.4)
        assert np.array_equal(got, batched_nms(boxes, scores, idxs, 0.4)), dtype


def _roi_cases(dtype):
    """A small feature map and RoIs covering the RoI edge cases listed in docs/conventions.md."""
    rng = np.random.default_rng(2)
    features = rng.standard_normal((2, 3, 9, 11)).astype(dtype)
    rois = np.array(
        [
            [0, 1.3, 2.2, 15.7, 14.1],  # ordinary box (scale 0.5: 0.65..7.85 on the map)
            [1, -6.0, -4.0, 8.0, 10.0],  # partly outside, top-left
            [1, 16.0, 14.0, 40.0, 30.0],  # partly outside, bottom-right
            [0, 50.0, 50.0, 60.0, 60.0],  # entirely outside the map
            [0, 6.0, 6.0, 6.0, 6.0],  # zero size
            [0, 0.0, 0.0, 21.0, 17.0],  # the whole map
        ],
        dtype=dtype,
    )
    return features, rois, rng


@case
def roi_align_forward_and_backward_match_the_reference():
    from mrcnn_edu.kernels import numba_roi_align as numba_ops

    from mrcnn_edu.roi_ops import roi_align, roi_align_backward

    for dtype, tol in ((np.float64, 1e-12), (np.float32, 2e-5)):
        features, rois, rng = _roi_cases(dtype)
        for aligned in (False, True):
            for sampling_ratio in (-1, 2):
                args = ((3, 2), 0.5, sampling_ratio, aligned)
                got = numba_ops.roi_align(features, rois, *args)
                want = roi_align(features, rois, *args)
                assert got.dtype == want.dtype == dtype and got.shape == want.shape
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=str(args))

                grad = rng.standard_normal(want.shape).astype(dtype)
                got = numba_ops.roi_align_backward(grad, rois, features.shape, *args)
                want = roi_align_backward(grad, rois, features.shape, *args)
                assert got.dtype == dtype and got.shape == features.shape
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=str(args))


@case
def roi_align_with_no_rois_gives_empty_output_and_zero_gradient():
    from mrcnn_edu.kernels import numba_roi_align as numba_ops

    features = np.ones((1, 2, 5, 5), dtype=np.float32)
    rois = np.zeros((0, 5), dtype=np.float32)
    out = numba_ops.roi_align(features, rois, 7, 1.0, 2, False)
    assert out.shape == (0, 2, 7, 7) and out.dtype == np.float32
    grad = numba_ops.roi_align_backward(out, rois, features.shape, 7, 1.0, 2, False)
    assert grad.shape == features.shape and not grad.any()


@case
def roi_pool_forward_and_backward_match_the_reference():
    from mrcnn_edu.kernels import numba_roi_align as numba_ops

    from mrcnn_edu.roi_ops import roi_pool, roi_pool_backward

    for dtype in (np.float32, np.float64):
        features, rois, rng = _roi_cases(dtype)
        got, got_argmax = numba_ops.roi_pool(features, rois, (3, 2), 0.5)
        want, want_argmax = roi_pool(features, rois, (3, 2), 0.5)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_argmax, want_argmax)
        assert (want_argmax == -1).any() and (want_argmax >= 0).any()  # both kinds of bin

        grad = rng.standard_normal(want.shape).astype(dtype)
        got = numba_ops.roi_pool_backward(grad, got_argmax, features.shape, rois)
        want = roi_pool_backward(grad, want_argmax, features.shape, rois)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@case
def roi_pool_bins_start_at_minus_flt_max_like_torchvision():
    from mrcnn_edu.kernels import numba_roi_align as numba_ops

    from mrcnn_edu.roi_ops import roi_pool

    # float64 values below -FLT_MAX never beat the start value: output -FLT_MAX, argmax -1
    features = np.full((1, 1, 4, 4), -1e300)
    features[0, 0, 3, 3] = 2.0
    rois = np.array([[0, 0.0, 0.0, 3.0, 3.0]])
    got, got_argmax = numba_ops.roi_pool(features, rois, 2, 1.0)
    want, want_argmax = roi_pool(features, rois, 2, 1.0)
    flt_max = float(np.finfo(np.float32).max)
    assert got[0, 0].tolist() == [[-flt_max, -flt_max], [-flt_max, 2.0]], got
    assert got_argmax[0, 0].tolist() == [[-1, -1], [-1, 15]], got_argmax
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_argmax, want_argmax)


# -- the pytest side (after the cases: parametrize reads CASES) ---------------------------
@pytest.fixture(scope="module")
def simulator_results():
    pytest.importorskip("numba")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", MRCNN_EDU_KERNELS="numba")
    proc = subprocess.run(
        [sys.executable, __file__, *CASES],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"simulator child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_numba_kernel_under_simulator(name, simulator_results):
    result = simulator_results[name]
    if result != "ok":
        pytest.fail(f"{name} failed under the CUDA simulator:\n{result}", pytrace=False)


# -- the child process ---------------------------------------------------------------------
def _child(names: list[str]) -> None:
    results = {}
    for name in names:
        try:
            CASES[name]()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    _child(sys.argv[1:])
