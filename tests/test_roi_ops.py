"""roi_align / roi_pool / MultiScaleRoIAlign: validation, edge cases, fast form == definition.

The "why RoIAlign" comparisons live in test_roi_pooling_comparison.py; torchvision checks in
test_roi_ops_torchvision.py.
"""

import subprocess
import sys

import numpy as np
import pytest

from mrcnn_edu import roi_ops
from mrcnn_edu.nn.gradcheck import check_function
from mrcnn_edu.roi_ops import (
    LevelMapper,
    MultiScaleRoIAlign,
    boxes_to_rois,
    infer_scale,
    interpolation_matrices,
    roi_align,
    roi_align_backward,
    roi_align_backward_reference,
    roi_align_reference,
    roi_pool,
    roi_pool_backward,
    roi_pool_bins,
    roi_pool_reference,
)


def random_rois(rng, k, n_images, width, height, margin=0.0, max_size=None, dtype=np.float64):
    """(k, 5) random sub-pixel RoIs, corners in [-margin, size + margin] (image pixels)."""
    max_size = max_size or max(width, height)
    x1 = rng.uniform(-margin, width + margin, k)
    y1 = rng.uniform(-margin, height + margin, k)
    x2 = x1 + rng.uniform(0, max_size, k)
    y2 = y1 + rng.uniform(0, max_size, k)
    batch = rng.integers(0, n_images, k)
    return np.stack([batch, x1, y1, x2, y2], axis=1).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --------------------------------------------------------------------------------------------
# Validation: every bad input raises a ValueError that names the problem
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rois, match",
    [
        (np.zeros((3, 4)), r"\(K, 5\)"),
        (np.zeros((3, 5, 1)), r"\(K, 5\)"),
        (np.array([[2.0, 0, 0, 4, 4]]), "batch index"),
        (np.array([[-1.0, 0, 0, 4, 4]]), "batch index"),
        (np.array([[0.5, 0, 0, 4, 4]]), "whole batch indices"),
        (np.array([[0.0, 5, 0, 4, 4]]), "x2 >= x1"),
        (np.array([[0.0, 0, 5, 4, 4]]), "y2 >= y1"),
        (np.array([[0.0, np.nan, 0, 4, 4]]), "NaN or inf"),
        (np.array([[0.0, 0, 0, np.inf, 4]]), "NaN or inf"),
        (np.zeros((2, 5), np.float32), "cast them"),
        ([np.zeros((1, 4))], "one \\(K_i, 4\\) array per image"),
    ],
)
@pytest.mark.parametrize("op", ["align", "pool"])
def test_bad_rois_raise_value_error(op, rois, match):
    features = np.zeros((2, 3, 8, 8))
    fn = roi_align if op == "align" else roi_pool
    with pytest.raises(ValueError, match=match):
        fn(features, rois, 2)


@pytest.mark.parametrize(
    "features, match",
    [
        (np.zeros((3, 8, 8)), r"\(N, C, H, W\)"),
        (np.zeros((1, 3, 8, 8), np.int64), "float32 or float64"),
        (np.zeros((1, 3, 8, 8), np.float16), "float32 or float64"),
        (np.zeros((1, 3, 0, 8)), "empty spatial size"),
        ([[[[0.0]]]], "NumPy"),
    ],
)
@pytest.mark.parametrize("op", ["align", "pool"])
def test_bad_features_raise_value_error(op, features, match):
    fn = roi_align if op == "align" else roi_pool
    with pytest.raises(ValueError, match=match):
        fn(features, np.zeros((0, 5)), 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(output_size=0), "positive"),
        (dict(output_size=(7,)), "int or a pair"),
        (dict(output_size="7"), "int or a pair"),
        (dict(output_size=2.0), "int or a pair"),
        (dict(output_size=2, spatial_scale=0.0), "spatial_scale"),
        (dict(output_size=2, spatial_scale=float("nan")), "spatial_scale"),
        (dict(output_size=2, sampling_ratio=2.0), "sampling_ratio"),
        (dict(output_size=2, aligned="yes"), "aligned"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        roi_align(np.zeros((1, 1, 4, 4)), np.array([[0.0, 0, 0, 2, 2]]), **kwargs)


def test_non_finite_features_are_refused():
    features = np.zeros((1, 1, 4, 4))
    features[0, 0, 3, 3] = np.nan
    rois = np.array([[0.0, 0, 0, 1, 1]])
    with pytest.raises(ValueError, match="NaN or inf"):
        roi_align(features, rois, 1)
    with pytest.raises(ValueError, match="NaN"):
        roi_pool(features, rois, 1)


def test_backward_checks_shapes_against_the_forward_arguments():
    rois = np.array([[0.0, 0, 0, 2, 2]])
    with pytest.raises(ValueError, match="grad_output has shape"):
        roi_align_backward(np.zeros((1, 3, 2, 2)), rois, (1, 3, 4, 4), 3)
    with pytest.raises(ValueError, match="input_shape"):
        roi_align_backward(np.zeros((1, 3, 2, 2)), rois, (1, 3, 4), 2)
    argmax = np.zeros((1, 3, 2, 2), np.int64)
    with pytest.raises(ValueError, match="argmax has shape"):
        roi_pool_backward(np.zeros((1, 3, 2, 2)), argmax[:, :, :1], (1, 3, 4, 4))
    with pytest.raises(ValueError, match="plane indices"):
        roi_pool_backward(np.zeros((1, 3, 2, 2)), argmax + 16, (1, 3, 4, 4))
    with pytest.raises(ValueError, match="integer"):
        roi_pool_backward(np.zeros((1, 3, 2, 2)), argmax.astype(float), (1, 3, 4, 4))
    with pytest.raises(ValueError, match="needs the forward's rois"):
        roi_pool_backward(np.zeros((1, 3, 2, 2)), argmax, (2, 3, 4, 4))


# --------------------------------------------------------------------------------------------
# Shapes: K = 0, output_size as int or pair, RoIs as per-image box lists
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_rois_give_empty_outputs_and_zero_gradients(dtype):
    features = np.ones((2, 3, 5, 6), dtype)
    rois = np.zeros((0, 5), dtype)
    out = roi_align(features, rois, (2, 4))
    assert out.shape == (0, 3, 2, 4) and out.dtype == dtype
    grad = roi_align_backward(out, rois, features.shape, (2, 4))
    assert grad.shape == features.shape and not grad.any()
    pooled, argmax = roi_pool(features, rois, 3)
    assert pooled.shape == (0, 3, 3, 3) and argmax.shape == (0, 3, 3, 3)
    assert argmax.dtype == np.int64
    grad = roi_pool_backward(pooled, argmax, features.shape, rois)
    assert grad.shape == features.shape and not grad.any()


def test_output_size_int_is_the_square_pair(rng):
    features = rng.standard_normal((1, 2, 10, 12))
    rois = random_rois(rng, 5, 1, 12, 10)
    np.testing.assert_array_equal(roi_align(features, rois, 3), roi_align(features, rois, (3, 3)))
    np.testing.assert_array_equal(
        roi_pool(features, rois, 3)[0], roi_pool(features, rois, [3, 3])[0]
    )
    assert roi_align(features, rois, (2, 5)).shape == (5, 2, 2, 5)
    assert roi_pool(features, rois, (4, 1))[0].shape == (5, 2, 4, 1)


def test_rois_as_a_list_of_boxes_per_image(rng):
    features = rng.standard_normal((2, 2, 8, 8))
    boxes = [np.array([[1.0, 1, 5, 6]]), np.array([[0.5, 2, 7, 7.5], [2.0, 2, 3, 3]])]
    rois = boxes_to_rois(boxes)
    np.testing.assert_array_equal(rois[:, 0], [0, 1, 1])
    np.testing.assert_array_equal(roi_align(features, boxes, 2), roi_align(features, rois, 2))
    np.testing.assert_array_equal(roi_pool(features, boxes, 2)[1], roi_pool(features, rois, 2)[1])


# --------------------------------------------------------------------------------------------
# RoIAlign: sampling ratio, samples outside the map, fast form == per-sample definition
# --------------------------------------------------------------------------------------------
def test_adaptive_sampling_ratio_is_ceil_of_roi_size_over_output_size(rng):
    features = rng.standard_normal((1, 2, 16, 16))
    # RoIs 4.2 .. 5.9 pixels for 3 bins: ceil(size / 3) = 2 samples per bin side.
    x1, y1 = rng.uniform(0, 8, 6), rng.uniform(0, 8, 6)
    size = rng.uniform(4.2, 5.9, (2, 6))
    rois = np.stack([np.zeros(6), x1, y1, x1 + size[0], y1 + size[1]], axis=1)
    adaptive = roi_align(features, rois, 3, sampling_ratio=-1)
    np.testing.assert_allclose(adaptive, roi_align(features, rois, 3, sampling_ratio=2), atol=1e-14)
    assert np.abs(adaptive - roi_align(features, rois, 3, sampling_ratio=1)).max() > 1e-3
    # A larger RoI gets more samples: 9.5 pixels / 3 bins -> 4 per side.
    big = np.array([[0.0, 1.25, 2.5, 10.75, 12.0]])
    np.testing.assert_allclose(
        roi_align(features, big, 3, sampling_ratio=0), roi_align(features, big, 3, sampling_ratio=4)
    )


def test_samples_outside_the_map_follow_torchvisions_border_rule():
    """One sample per bin (1x1 output, sampling_ratio 1) at the RoI centre."""
    features = np.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # row y holds 4y+1 .. 4y+4

    def at(cy, cx):
        roi = np.array([[0.0, cx - 0.5, cy - 0.5, cx + 0.5, cy + 0.5]])
        return roi_align(features, roi, 1, sampling_ratio=1)[0, 0, 0, 0]

    assert at(1.5, 1.5) == pytest.approx((6 + 7 + 10 + 11) / 4)
    # Within one pixel above the map the sample is clamped onto row 0 ...
    assert at(-0.5, 1.0) == pytest.approx(features[0, 0, 0, 1])
    assert at(-1.0, 2.0) == pytest.approx(features[0, 0, 0, 2])
    # ... and between the last row and H it reads row H-1 only.
    assert at(3.6, 0.0) == pytest.approx(features[0, 0, 3, 0])
    assert at(4.0, 0.0) == pytest.approx(features[0, 0, 3, 0])
    # More than one pixel outside: 0.
    assert at(-1.01, 2.0) == 0.0
    assert at(4.01, 2.0) == 0.0
    assert at(2.0, 4.5) == 0.0
    # A RoI entirely outside pools zeros (and gets no gradient).
    far = np.array([[0.0, 10, 10, 20, 20]])
    assert not roi_align(features, far, 2).any()
    assert not roi_align_backward(np.ones((1, 1, 2, 2)), far, features.shape, 2).any()


def test_out_of_map_samples_still_count_in_the_bin_average():
    features = np.ones((1, 1, 4, 4))
    # 1 bin, 2x2 samples at x in {-1.5, 0.5}, y in {0.5, 1.5}: the two at x=-1.5 are 0.
    roi = np.array([[0.0, -2.5, 0.0, 1.5, 2.0]])
    assert roi_align(features, roi, 1, sampling_ratio=2)[0, 0, 0, 0] == pytest.approx(0.5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fast_roi_align_equals_the_per_sample_definition(rng, aligned, sampling_ratio, dtype):
    features = rng.standard_normal((2, 3, 7, 9)).astype(dtype)
    # Image 4x the map (scale 1/4); corners up to 10 pixels outside, sizes 0..40 pixels.
    rois = random_rois(rng, 12, 2, 36, 28, margin=10, max_size=40, dtype=dtype)
    rois[0, 3] = rois[0, 1]  # a zero-width RoI
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    fast = roi_align(features, rois, (3, 2), 0.25, sampling_ratio, aligned)
    ref = roi_align_reference(features, rois, (3, 2), 0.25, sampling_ratio, aligned)
    assert fast.dtype == dtype
    np.testing.assert_allclose(fast, ref, **tol)
    grad = rng.standard_normal(fast.shape).astype(dtype)
    fast_g = roi_align_backward(grad, rois, features.shape, (3, 2), 0.25, sampling_ratio, aligned)
    ref_g = roi_align_backward_reference(
        grad, rois, features.shape, (3, 2), 0.25, sampling_ratio, aligned
    )
    assert fast_g.dtype == dtype
    np.testing.assert_allclose(fast_g, ref_g, **tol)


def test_interpolation_matrices_are_a_partition_of_unity_inside_the_map(rng):
    # Inside a 16 x 20 map: corners in [0, 13] x [0, 9], sizes up to 6 pixels.
    x1, y1 = rng.uniform(0, 13, 10), rng.uniform(0, 9, 10)
    x2, y2 = x1 + rng.uniform(0, 6, 10), y1 + rng.uniform(0, 6, 10)
    rois = np.stack([np.zeros(10), x1, y1, x2, y2], axis=1)
    ay, ax = interpolation_matrices(rois, 16, 20, (4, 3), 1.0, 2, aligned=True)
    assert ay.shape == (10, 4, 16) and ax.shape == (10, 3, 20)
    np.testing.assert_allclose(ay.sum(axis=2), 1.0)
    np.testing.assert_allclose(ax.sum(axis=2), 1.0)
    # and the separable product is RoIAlign itself
    features = rng.standard_normal((1, 2, 16, 20))
    sep = np.einsum("kph,chw,kqw->kcpq", ay, features[0], ax)
    np.testing.assert_allclose(sep, roi_align(features, rois, (4, 3), 1.0, 2, True), atol=1e-12)


def test_roi_align_gradcheck_with_adaptive_sampling_and_partly_outside_rois(rng):
    features = rng.standard_normal((2, 2, 5, 6))
    rois = random_rois(rng, 4, 2, 12, 10, margin=3, max_size=8)

    def forward(f):
        return roi_align(f, rois, (2, 3), 0.5, -1, True)

    def backward(g):
        return roi_align_backward(g, rois, features.shape, (2, 3), 0.5, -1, True)

    check_function(forward, backward, [features])


# --------------------------------------------------------------------------------------------
# RoIPool: bins, ties, empty bins, -inf, fast form == definition
# --------------------------------------------------------------------------------------------
def test_roi_pool_bins_round_corners_and_floor_ceil_edges():
    # x: round(0.4)=0 .. round(9.5)=10 (half away from zero) -> 11 pixels in 3 bins of 11/3:
    # [floor(0), ceil(3.67)) = [0, 4), [floor(3.67), ceil(7.33)) = [3, 8), [7, 11) -> clamp 10.
    rois = np.array([[0.0, 0.4, -2.6, 9.5, 1.4]])
    hstart, hend, wstart, wend = roi_pool_bins(rois, (2, 3), 1.0, 8, 10)
    np.testing.assert_array_equal(wstart, [[0, 3, 7]])
    np.testing.assert_array_equal(wend, [[4, 8, 10]])
    # y: round(-2.6) = -3 .. round(1.4) = 1 -> 5 pixels in 2 bins of 2.5: [-3, 0) and [-1, 2),
    # clamped to the map: the first bin is empty.
    np.testing.assert_array_equal(hstart, [[0, 0]])
    np.testing.assert_array_equal(hend, [[0, 2]])


def test_roi_pool_rounds_half_away_from_zero():
    rois = np.array([[0.0, 0.5, 1.5, 2.5, 2.49999]], np.float32)
    hstart, hend, wstart, wend = roi_pool_bins(rois, 1, 1.0, 8, 8)
    assert wstart[0, 0] == 1 and wend[0, 0] == 4  # round(0.5)=1, round(2.5)=3 -> [1, 4)
    assert hstart[0, 0] == 2 and hend[0, 0] == 3  # round(1.5)=2, round(2.49999)=2 -> [2, 3)


def test_roi_pool_empty_bins_give_zero_and_argmax_minus_one():
    features = np.full((1, 1, 4, 4), 5.0)
    rois = np.array([[0.0, 6, 6, 9, 9]])  # entirely right/below the map
    out, argmax = roi_pool(features, rois, 2)
    assert not out.any() and (argmax == -1).all()
    grad = roi_pool_backward(np.ones_like(out), argmax, features.shape)
    assert not grad.any()


def test_roi_pool_ties_go_to_the_first_element_in_row_major_order():
    features = np.zeros((1, 2, 4, 4))
    features[0, 0, 1, 2] = features[0, 0, 2, 1] = 3.0  # row 1 comes first
    features[0, 1] = -1.0  # all equal: the bin's first element
    out, argmax = roi_pool(features, np.array([[0.0, 0, 0, 3, 3]]), 1)
    assert out[0, 0, 0, 0] == 3.0 and argmax[0, 0, 0, 0] == 1 * 4 + 2
    assert out[0, 1, 0, 0] == -1.0 and argmax[0, 1, 0, 0] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roi_pool_minus_inf_is_never_taken_as_in_torchvision(dtype):
    features = np.full((1, 1, 3, 3), -np.inf, dtype)
    features[0, 0, 2, 2] = -1.0
    out, argmax = roi_pool(features, np.array([[0.0, 0, 0, 2, 2]], dtype), 2)
    # Bins holding only -inf output -FLT_MAX with argmax -1; the last one finds -1.0.
    flt_max = np.finfo(np.float32).max
    np.testing.assert_array_equal(
        out[0, 0], np.array([[-flt_max, -flt_max], [-flt_max, -1.0]], dtype)
    )
    np.testing.assert_array_equal(argmax[0, 0], [[-1, -1], [-1, 8]])


def test_roi_pool_negative_zero_ties_with_zero():
    features = np.array([[[[-0.0, 0.0]]]], np.float32)
    _, argmax = roi_pool(features, np.array([[0.0, 0, 0, 1, 0]], np.float32), 1)
    assert argmax[0, 0, 0, 0] == 0  # 0.0 is not > -0.0: the first one stays


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_roi_pool_equals_the_bin_by_bin_definition(rng, dtype):
    # Few distinct values, so that many bins have ties.
    features = rng.integers(-3, 4, (2, 3, 9, 11)).astype(dtype)
    rois = random_rois(rng, 15, 2, 22, 18, margin=6, max_size=24, dtype=dtype)
    for size in [(3, 2), 5, (1, 7)]:
        out, argmax = roi_pool(features, rois, size, 0.5)
        ref, ref_argmax = roi_pool_reference(features, rois, size, 0.5)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(argmax, ref_argmax)


def test_roi_pool_works_in_small_channel_and_roi_chunks(rng):
    """The table memory budget splits channels, the chunk size RoIs: results stay the same."""
    features = rng.standard_normal((1, 5, 12, 10)).astype(np.float32)
    rois = random_rois(rng, 9, 1, 10, 12, margin=2, dtype=np.float32)
    whole = roi_ops.pool._roi_pool_forward(features, rois, 3, 3, 1.0)
    tiny = roi_ops.pool._roi_pool_forward(features, rois, 3, 3, 1.0, table_budget=1, chunk=1)
    np.testing.assert_array_equal(whole[0], tiny[0])
    np.testing.assert_array_equal(whole[1], tiny[1])


def test_roi_pool_backward_sends_each_gradient_to_its_argmax(rng):
    features = rng.standard_normal((2, 2, 6, 6))
    rois = np.array([[1.0, 0, 0, 5, 5], [0.0, 1, 1, 3, 3], [1.0, 0, 0, 5, 5]])
    out, argmax = roi_pool(features, rois, 2)
    grad_out = rng.standard_normal(out.shape)
    grad = roi_pool_backward(grad_out, argmax, features.shape, rois)
    want = np.zeros_like(features)
    for k, b in enumerate(rois[:, 0].astype(int)):
        for c in range(2):
            for p in range(2):
                for q in range(2):
                    h, w = divmod(int(argmax[k, c, p, q]), 6)
                    want[b, c, h, w] += grad_out[k, c, p, q]
    np.testing.assert_allclose(grad, want)
    # RoIs 0 and 2 are identical: their gradients add up on the same pixels.
    assert np.abs(grad[1]).sum() > 0 and np.abs(grad[0]).sum() > 0


# --------------------------------------------------------------------------------------------
# MultiScaleRoIAlign
# --------------------------------------------------------------------------------------------
def fpn_features(rng, n=1, c=2, image_hw=(256, 320), dtype=np.float64, strides=(4, 8, 16, 32)):
    h, w = image_hw
    return {
        f"p{i + 2}": rng.standard_normal((n, c, h // s, w // s)).astype(dtype)
        for i, s in enumerate(strides)
    }


def test_level_mapper_by_hand():
    mapper = LevelMapper(2, 5)  # P2 .. P5, canonical 224 -> level 4
    boxes = np.array(
        [
            [0, 0, 224, 224],  # k = 4 + log2(1) = 4
            [10, 10, 122, 122],  # 112: 4 - 1 = 3
            [0, 0, 448, 448],  # 448: 5
            [0, 0, 223.9, 223.9],  # just under 224: floor(3.9993..) = 3
            [0, 0, 112, 448],  # sqrt(112 * 448) = 224: 4
            [0, 0, 1000, 1000],  # 4 + 2.16 = 6 -> clamped to 5
            [0, 0, 10, 10],  # 4 - 4.49 = -0.49 -> clamped to 2
        ]
    )
    np.testing.assert_array_equal(mapper(boxes), np.array([4, 3, 5, 3, 4, 5, 2]) - 2)
    # canonical scale / level are parameters of the mapping
    np.testing.assert_array_equal(LevelMapper(2, 5, 224, 3)(boxes[:3]), [3 - 2, 2 - 2, 4 - 2])
    np.testing.assert_array_equal(LevelMapper(2, 5, 448, 4)(boxes[:3]), [3 - 2, 2 - 2, 4 - 2])
    # the +1e-6 keeps a box on a boundary on the upper level even when rounding puts its size
    # a hair below it (224 - 2 ulp: 223.99999999999994 in float64, 223.99997 in float32)
    for dtype in (np.float64, np.float32):
        hair = np.nextafter(np.nextafter(dtype(224), dtype(0)), dtype(0))
        box = np.array([[0, 0, hair, hair]], dtype)
        assert LevelMapper(2, 5)(box)[0] == 4 - 2
        assert LevelMapper(2, 5, eps=0.0)(box)[0] == 3 - 2


def test_infer_scale_is_a_power_of_two_from_the_height_ratio():
    assert infer_scale((50, 68), (800, 1088)) == 1 / 16
    assert infer_scale((200, 272), (800, 1088)) == 1 / 4
    assert infer_scale((13, 17), (800, 1088)) == 1 / 64  # 13/800: log2 = -5.94 -> -6


def test_multiscale_pools_each_box_from_its_level(rng):
    feats = fpn_features(rng, n=2)
    feats["pool"] = rng.standard_normal((2, 2, 4, 5))  # not listed: ignored
    boxes = [
        # sqrt(area) 34.6: floor(4 + log2(34.6 / 224)) = 1 -> P2;  460 (past the image): P5
        np.array([[10.0, 20, 40, 60], [-60, -60, 400, 400]]),
        # 129.6: floor(3.21) = 3 -> P3;  92.5: floor(2.72) = 2 -> P2
        np.array([[30.0, 30, 150, 170], [5, 5, 100, 95]]),
    ]
    pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], (3, 4), 2)
    out = pooler(feats, boxes, [(256, 320), (250, 300)])
    assert out.shape == (4, 2, 3, 4)
    want_levels = [0, 3, 1, 0]
    np.testing.assert_array_equal(pooler.cache.levels, want_levels)
    rois = boxes_to_rois(boxes)
    for i, lvl in enumerate(want_levels):
        name, scale = f"p{lvl + 2}", 1 / 4 / 2**lvl
        np.testing.assert_allclose(
            out[i], roi_align(feats[name], rois[i : i + 1], (3, 4), scale, 2)[0]
        )


def test_multiscale_single_level_uses_that_map_for_all_boxes(rng):
    feats = {"p4": rng.standard_normal((1, 3, 16, 20))}
    boxes = [np.array([[0.0, 0, 10, 10], [0, 0, 250, 250]])]
    out = MultiScaleRoIAlign(["p4"], 2, 2, aligned=True)(feats, boxes, [(256, 320)])
    np.testing.assert_allclose(out, roi_align(feats["p4"], boxes, 2, 1 / 16, 2, True))


def test_multiscale_forward_backward_gradcheck(rng):
    feats = fpn_features(rng, n=2, image_hw=(64, 64), strides=(4, 8, 16))
    names = ["p2", "p3", "p4"]
    boxes = [
        # level = floor(3 + log2(sqrt(area) / 56)): 14.3 -> 1 -> P2;  59.2 -> 3 -> P3
        np.array([[3.0, 5, 20, 17], [1.5, 2, 60, 62]]),
        # 120 -> 4 -> P4;  34.3 -> 2 -> P2
        np.array([[-30.0, -25, 90, 95], [10, 12, 41, 50]]),
    ]
    pooler = MultiScaleRoIAlign(names, 2, 2, canonical_scale=56, canonical_level=3)
    shapes = [(64, 64), (60, 64)]
    assert sorted(set(pooler(feats, boxes, shapes).shape)) == [2, 4]
    assert set(pooler.cache.levels.tolist()) == {0, 1, 2}

    def forward(*maps):
        return pooler(dict(zip(names, maps)), boxes, shapes)

    def backward(g):
        grads = pooler.backward(g)
        return tuple(grads[name] for name in names)

    check_function(forward, backward, [feats[name] for name in names], names=names)


def test_multiscale_with_no_boxes(rng):
    feats = fpn_features(rng)
    pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    out = pooler(feats, [np.zeros((0, 4))], [(256, 320)])
    assert out.shape == (0, 2, 7, 7)
    grads = pooler.backward(out)
    assert set(grads) == {"p2", "p3", "p4", "p5"}
    assert all(grads[k].shape == feats[k].shape and not grads[k].any() for k in grads)


def test_multiscale_declared_strides_equal_inferred_scales(rng):
    """strides=(4, 8, 16, 32) pools with the scales inference finds: the same output, levels
    and gradients, and the level range comes from log2 of the first and last stride."""
    feats = fpn_features(rng, n=2)
    boxes = [
        np.array([[10.0, 20, 40, 60], [-60, -60, 400, 400], [0, 0, 112, 112]]),
        np.array([[30.0, 30, 150, 170], [5, 5, 100, 95]]),
    ]
    shapes = [(256, 320), (250, 300)]
    names = ["p2", "p3", "p4", "p5"]
    inferred = MultiScaleRoIAlign(names, (3, 4), 2)
    declared = MultiScaleRoIAlign(names, (3, 4), 2, strides=(4, 8, 16, 32))
    out = declared(feats, boxes, shapes)
    np.testing.assert_array_equal(out, inferred(feats, boxes, shapes))
    np.testing.assert_array_equal(declared.cache.levels, inferred.cache.levels)
    assert declared.cache.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    grad = rng.standard_normal(out.shape)
    want = inferred.backward(grad)
    for name, g in declared.backward(grad).items():
        np.testing.assert_array_equal(g, want[name])
    # one level: the stride alone gives the scale
    single = MultiScaleRoIAlign(["p4"], 2, 2, strides=[16])(feats, boxes, shapes)
    np.testing.assert_array_equal(single, roi_align(feats["p4"], boxes, 2, 1 / 16, 2))


def test_multiscale_declared_strides_are_checked_against_the_maps(rng):
    feats = fpn_features(rng)  # p2 .. p5 at strides 4 .. 32 of a 256 x 320 image
    box = [np.array([[0.0, 0, 10, 10]])]
    names = ["p2", "p3", "p4", "p5"]
    p5_wrong = MultiScaleRoIAlign(names, 7, 2, strides=(4, 8, 16, 64))
    with pytest.raises(
        ValueError,
        match=r"features\['p5'\] has shape \(1, 2, 8, 10\).*stride 32.*"
        r"\(256, 320\).*declares stride 64",
    ):
        p5_wrong(feats, box, [(256, 320)])
    all_wrong = MultiScaleRoIAlign(names, 7, 2, strides=(8, 16, 32, 64))
    with pytest.raises(ValueError, match=r"features\['p2'\] has shape \(1, 2, 64, 80\)"):
        all_wrong(feats, box, [(256, 320)])
    # maps that match their strides but skip a level would send boxes to the wrong map
    gap = MultiScaleRoIAlign(["p2", "p3", "p5"], 7, 2, strides=(4, 8, 32))
    with pytest.raises(ValueError, match=r"features\['p5'\] has stride 32 right after stride 8"):
        gap(feats, box, [(256, 320)])


def test_multiscale_strides_argument_validation():
    names = ["p2", "p3", "p4", "p5"]
    with pytest.raises(ValueError, match="3 entries for the 4 maps"):
        MultiScaleRoIAlign(names, 7, 2, strides=(4, 8, 16))
    with pytest.raises(ValueError, match="5 entries for the 4 maps"):
        MultiScaleRoIAlign(names, 7, 2, strides=(4, 8, 16, 32, 64))
    with pytest.raises(ValueError, match="sequence of ints"):
        MultiScaleRoIAlign(names, 7, 2, strides=(4.0, 8, 16, 32))
    with pytest.raises(ValueError, match="sequence of ints"):
        MultiScaleRoIAlign(names, 7, 2, strides=16)
    with pytest.raises(ValueError, match="powers of two"):
        MultiScaleRoIAlign(names[:1], 7, 2, strides=(12,))
    with pytest.raises(ValueError, match="finest first"):
        MultiScaleRoIAlign(names, 7, 2, strides=(32, 16, 8, 4))
    assert "strides=(4, 8, 16, 32)" in repr(MultiScaleRoIAlign(names, 7, 2, strides=[4, 8, 16, 32]))


def test_multiscale_validation(rng):
    feats = fpn_features(rng)
    pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    box = [np.array([[0.0, 0, 10, 10]])]
    with pytest.raises(ValueError, match="no map named"):
        MultiScaleRoIAlign(["p2", "p9"], 7, 2)(feats, box, [(256, 320)])
    with pytest.raises(ValueError, match="one \\(K_i, 4\\) array per image"):
        pooler(feats, box * 2, [(256, 320)])
    with pytest.raises(ValueError, match="image_shapes"):
        pooler(feats, box, [(256, 320), (256, 320)])
    with pytest.raises(ValueError, match="cast the boxes"):
        pooler(feats, [box[0].astype(np.float32)], [(256, 320)])
    with pytest.raises(ValueError, match="featmap_names"):
        MultiScaleRoIAlign("p2", 7, 2)
    with pytest.raises(RuntimeError, match="forward first"):
        MultiScaleRoIAlign(["p2"], 7, 2).backward(np.zeros((0, 2, 7, 7)))


# --------------------------------------------------------------------------------------------
# GPU dispatch: CuPy arrays go to mrcnn_edu.kernels, after validation; NumPy never imports cupy
# --------------------------------------------------------------------------------------------
class FakeCupyArray(np.ndarray):
    """An ndarray whose type claims to live in cupy: is_cupy_array() is True for it."""


FakeCupyArray.__module__ = "cupy._fake"


def test_cupy_inputs_dispatch_to_the_gpu_kernels_after_validation(monkeypatch):
    calls = []

    def fake_device_kernel(array, family, name):
        def kernel(*args):
            calls.append((family, name, args))
            return "from the kernel"

        return kernel

    for module in (roi_ops.align, roi_ops.pool):  # the modules that dispatch to kernels
        monkeypatch.setattr(module, "device_kernel", fake_device_kernel)
    monkeypatch.setitem(sys.modules, "cupy", np)  # get_xp() on the fake arrays returns numpy
    features = np.zeros((1, 2, 4, 4)).view(FakeCupyArray)
    rois = np.array([[0.0, 0, 0, 2, 2]]).view(FakeCupyArray)
    grad = np.zeros((1, 2, 3, 3)).view(FakeCupyArray)
    argmax = np.zeros((1, 2, 3, 3), np.int64).view(FakeCupyArray)
    assert roi_align(features, rois, 3, 0.5, 2, True) == "from the kernel"
    assert roi_align_backward(grad, rois, (1, 2, 4, 4), 3, 0.5, 2, True) == "from the kernel"
    assert roi_pool(features, rois, 3, 0.5) == "from the kernel"
    assert roi_pool_backward(grad, argmax, (1, 2, 4, 4), rois) == "from the kernel"
    names = [(family, name) for family, name, _ in calls]
    assert names == [
        ("roi_align", "roi_align"),
        ("roi_align", "roi_align_backward"),
        ("roi_align", "roi_pool"),
        ("roi_align", "roi_pool_backward"),
    ]
    assert calls[0][2][2:] == ((3, 3), 0.5, 2, True)
    assert calls[1][2][2:] == ((1, 2, 4, 4), (3, 3), 0.5, 2, True)
    # validation runs first: a bad RoI never reaches the kernel
    bad = np.array([[3.0, 0, 0, 2, 2]]).view(FakeCupyArray)
    with pytest.raises(ValueError, match="batch index"):
        roi_align(features, bad, 3)
    assert len(calls) == 4


def test_numpy_path_never_imports_cupy():
    code = (
        "import sys, numpy as np\n"
        "from mrcnn_edu import roi_ops as r\n"
        "f = np.ones((1, 2, 5, 5)); rois = np.array([[0.0, 0, 0, 3, 3]])\n"
        "o = r.roi_align(f, rois, 2); r.roi_align_backward(o, rois, f.shape, 2)\n"
        "p, a = r.roi_pool(f, rois, 2); r.roi_pool_backward(p, a, f.shape)\n"
        "r.MultiScaleRoIAlign(['a'], 2, 2)({'a': f}, [rois[:, 1:]], [(5, 5)])\n"
        "assert 'cupy' not in sys.modules and 'mrcnn_edu.kernels' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
