"""Why Mask R-CNN replaced RoIPool by RoIAlign, as tests that print their numbers (pytest -s).

Each test would fail if the op under test were wrong: RoIAlign must reproduce a linear ramp
exactly, move continuously with the RoI, keep masks aligned, and have correct gradients;
RoIPool must show the quantisation the paper describes.
"""

import numpy as np
import pytest

from mrcnn_edu.nn.gradcheck import check_function
from mrcnn_edu.roi_ops import (
    roi_align,
    roi_align_backward,
    roi_pool,
    roi_pool_backward,
)

# A 4x4 map with no structure, for hand-computed cases.
F4 = np.array(
    [
        [1.0, 2.0, 0.0, 4.0],
        [3.0, 8.0, 5.0, 1.0],
        [0.0, 2.0, 7.0, 6.0],
        [9.0, 4.0, 1.0, 3.0],
    ]
)[None, None]


def ramp(height, width, coefs):
    """(1, C, H, W) map F[c](y, x) = a x + b y + c0 for each (a, b, c0) in coefs."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([a * x + b * y + c0 for a, b, c0 in coefs])[None]


def bin_centres(start, size, bins):
    """Feature coordinates of the bin centres of an axis starting at ``start``."""
    return start + (np.arange(bins) + 0.5) * size / bins


# --------------------------------------------------------------------------------------------
# 1. A linear ramp: RoIAlign returns its value at each bin centre, RoIPool does not
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, -1])
def test_roi_align_reproduces_a_linear_ramp_at_the_bin_centres(aligned, sampling_ratio):
    rng = np.random.default_rng(1)
    height, width, stride, ph, pw = 24, 32, 8, 5, 7
    coefs = [(0.7, 0.3, 2.0), (-1.25, 2.5, -4.0)]
    features = ramp(height, width, coefs)
    offset = 0.5 if aligned else 0.0
    align_err, pool_err = [], []
    for _ in range(20):
        # A sub-pixel RoI (feature coordinates) whose samples all lie inside [0, H-1] x [0, W-1]
        # (beyond the last pixel bilinear interpolation clamps, and a ramp is not reproduced).
        size_x, size_y = rng.uniform(1.0, 20.0), rng.uniform(1.0, 15.0)
        start_x = rng.uniform(0.0, width - 1 - size_x)
        start_y = rng.uniform(0.0, height - 1 - size_y)
        roi = np.array(
            [[0.0, start_x, start_y, start_x + size_x, start_y + size_y]]
        )  # feature coords
        roi[:, 1:] = (roi[:, 1:] + offset) * stride  # -> image pixels
        out = roi_align(features, roi, (ph, pw), 1 / stride, sampling_ratio, aligned)[0]
        yc = bin_centres(start_y, size_y, ph)[:, None]
        xc = bin_centres(start_x, size_x, pw)[None, :]
        truth = np.stack([a * xc + b * yc + c0 for a, b, c0 in coefs])
        align_err.append(np.abs(out - truth).max())
        pooled, _ = roi_pool(features, roi, (ph, pw), 1 / stride)
        pool_err.append(np.abs(pooled[0] - truth).mean())
    print(
        f"\nramp, aligned={aligned}, sampling_ratio={sampling_ratio}: RoIAlign max error "
        f"{max(align_err):.1e}, RoIPool mean error {np.mean(pool_err):.3f} (feature units)"
    )
    assert max(align_err) < 1e-10
    assert np.mean(pool_err) > 0.5  # the max of a bin sits at its corner, on a rounded grid


# --------------------------------------------------------------------------------------------
# 2. Sub-pixel shifts: RoIAlign moves continuously, RoIPool freezes then jumps
# --------------------------------------------------------------------------------------------
def shifted_outputs(features, base_roi, stride, deltas, size=7):
    align, pool = [], []
    for d in deltas:
        roi = base_roi.copy()
        roi[:, [1, 3]] += d * stride  # shift right by d feature pixels
        align.append(roi_align(features, roi, size, 1 / stride, 2, True))
        pool.append(roi_pool(features, roi, size, 1 / stride)[0])
    return np.array(align), np.array(pool)


def test_subpixel_shift_moves_roi_align_continuously_and_roi_pool_in_jumps():
    stride = 16
    deltas = np.linspace(0.0, 1.0, 21)  # feature pixels, steps of 0.05
    base = np.array([[0.0, 100.3, 50.2, 260.7, 180.9]])  # x1*s = 6.27, x2*s = 16.29
    features = ramp(20, 30, [(1.0, 0.0, 0.0)])  # F = x: the output is the sampled x itself
    align, pool = shifted_outputs(features, base, stride, deltas)
    align_mean = align.mean(axis=(1, 2, 3, 4))
    pool_mean = pool.mean(axis=(1, 2, 3, 4))
    print("\n delta  RoIAlign mean  RoIPool mean   (F = x, stride 16, 7x7)")
    for d, a, p in zip(deltas, align_mean, pool_mean):
        print(f" {d:5.2f}  {a:13.4f}  {p:12.4f}")
    step = deltas[1] - deltas[0]
    align_slope = np.abs(np.diff(align, axis=0)).max(axis=(1, 2, 3, 4)) / step
    pool_slope = np.abs(np.diff(pool, axis=0)).max(axis=(1, 2, 3, 4)) / step
    print(f" largest |change| / delta: RoIAlign {align_slope.max():.3f}, ", end="")
    print(f"RoIPool {pool_slope.max():.1f}")
    # RoIAlign: every bin follows the shift exactly (slope 1 = the ramp's slope): Lipschitz.
    np.testing.assert_allclose(align_slope, 1.0, atol=1e-9)
    # RoIPool: frozen for most steps (the rounded RoI does not move) ...
    frozen = int((pool_slope == 0).sum())
    assert frozen >= 15, f"RoIPool changed at {20 - frozen} of 20 steps"
    # ... and it moves by a whole pixel in a single 0.05 step: 20x RoIAlign's Lipschitz bound.
    assert pool_slope.max() >= 1.0 / step - 1e-9


def test_subpixel_shift_on_a_smooth_map_respects_the_lipschitz_bound():
    rng = np.random.default_rng(2)
    y, x = np.mgrid[0:20, 0:30]
    features = np.stack([np.sin(0.3 * x + p) * np.cos(0.2 * y - p) for p in rng.uniform(0, 6, 4)])
    features = features[None]
    deltas = np.linspace(0.0, 1.0, 21)
    align, pool = shifted_outputs(
        features, np.array([[0.0, 100.3, 50.2, 260.7, 180.9]]), 16, deltas
    )
    step = deltas[1] - deltas[0]
    # Bilinear interpolation is piecewise linear in x with slopes F[w+1] - F[w]; bin averages
    # keep that bound, so |d out / d delta| <= max |F[w+1] - F[w]|.
    lipschitz = np.abs(np.diff(features, axis=3)).max()
    align_slope = np.abs(np.diff(align, axis=0)).max(axis=(1, 2, 3, 4)) / step
    pool_change = np.abs(np.diff(pool, axis=0)).max(axis=(1, 2, 3, 4))
    print(
        f"\nsmooth map: Lipschitz bound {lipschitz:.3f}; RoIAlign max slope "
        f"{align_slope.max():.3f}, changes at {int((align_slope > 0).sum())}/20 steps; "
        f"RoIPool changes at {int((pool_change > 0).sum())}/20 steps, max jump "
        f"{pool_change.max():.3f} in one step ({pool_change.max() / step:.1f} per pixel)"
    )
    assert align_slope.max() <= lipschitz + 1e-9
    assert (align_slope > 0).all()  # it follows every sub-pixel move
    assert (pool_change > 0).sum() <= 5  # RoIPool mostly cannot see them
    assert pool_change.max() / step > lipschitz  # and when it moves it jumps


# --------------------------------------------------------------------------------------------
# 3. Mask misalignment: pool a rendered mask, paste it back, measure IoU against the truth
# --------------------------------------------------------------------------------------------
IMAGE = 320
MASK = 28


def render_ellipse(rng):
    """A rotated ellipse (mask at pixel centres) and its exact, sub-pixel bounding box."""
    cx, cy = rng.uniform(100, IMAGE - 100, 2)
    a, b = rng.uniform(30, 75, 2)
    theta = rng.uniform(0, np.pi)
    v, u = np.mgrid[0:IMAGE, 0:IMAGE] + 0.5
    c, s = np.cos(theta), np.sin(theta)
    xr, yr = (u - cx) * c + (v - cy) * s, -(u - cx) * s + (v - cy) * c
    mask = (xr / a) ** 2 + (yr / b) ** 2 <= 1.0
    hx, hy = np.hypot(a * c, b * s), np.hypot(a * s, b * c)
    return mask, np.array([cx - hx, cy - hy, cx + hx, cy + hy])


def paste(pooled, box):
    """Resize a (M, M) soft mask into its box (bilinear, pixel centres), threshold at 0.5."""
    x1, y1, x2, y2 = box
    v, u = np.mgrid[0:IMAGE, 0:IMAGE] + 0.5
    # bin q of the pooled grid is centred at x1 + (q + 0.5) * (x2 - x1) / M
    gx = np.clip((u - x1) / (x2 - x1) * MASK - 0.5, 0, MASK - 1)
    gy = np.clip((v - y1) / (y2 - y1) * MASK - 0.5, 0, MASK - 1)
    x0 = np.minimum(gx.astype(int), MASK - 2)
    y0 = np.minimum(gy.astype(int), MASK - 2)
    fx, fy = gx - x0, gy - y0
    value = (
        pooled[y0, x0] * (1 - fx) * (1 - fy)
        + pooled[y0, x0 + 1] * fx * (1 - fy)
        + pooled[y0 + 1, x0] * (1 - fx) * fy
        + pooled[y0 + 1, x0 + 1] * fx * fy
    )
    inside = (u >= x1) & (u <= x2) & (v >= y1) & (v <= y2)
    return inside & (value >= 0.5)


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_mask_iou_after_pooling_and_pasting_back():
    rng = np.random.default_rng(3)
    table = {}
    for stride in (4, 8, 16, 32):
        scores = {"RoIAlign aligned": [], "RoIAlign": [], "RoIPool": []}
        for _ in range(25):
            mask, box = render_ellipse(rng)
            # The "feature map": the mask averaged over stride x stride cells, so feature pixel
            # j covers image pixels [s j, s (j + 1)) and is centred at s (j + 0.5).
            n = IMAGE // stride
            features = mask.reshape(n, stride, n, stride).mean(axis=(1, 3))[None, None]
            roi = np.concatenate([[0.0], box])[None]
            pooled = {
                "RoIAlign aligned": roi_align(features, roi, MASK, 1 / stride, 2, True),
                "RoIAlign": roi_align(features, roi, MASK, 1 / stride, 2, False),
                "RoIPool": roi_pool(features, roi, MASK, 1 / stride)[0],
            }
            for name, p in pooled.items():
                scores[name].append(iou(paste(p[0, 0], box), mask))
        table[stride] = {name: float(np.mean(s)) for name, s in scores.items()}
    print("\nmean mask IoU after pool + paste (25 random ellipses per stride, 28x28 masks)")
    print(f" stride  {'RoIAlign aligned':>16s}  {'RoIAlign':>8s}  {'RoIPool':>7s}")
    for stride, row in table.items():
        print(
            f" {stride:6d}  {row['RoIAlign aligned']:16.3f}  {row['RoIAlign']:8.3f}  "
            f"{row['RoIPool']:7.3f}"
        )
    for stride, row in table.items():
        # the exact pixel model wins at every stride, by more as the stride grows
        assert row["RoIAlign aligned"] > row["RoIPool"] + 0.05, stride
        assert row["RoIAlign aligned"] > 0.85, stride
    mean = {name: np.mean([row[name] for row in table.values()]) for name in table[4]}
    assert mean["RoIAlign"] > mean["RoIPool"]  # even without the half-pixel correction


# --------------------------------------------------------------------------------------------
# 4. Gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_gradcheck(aligned):
    rng = np.random.default_rng(4)
    features = rng.standard_normal((2, 3, 6, 7))
    # Sub-pixel RoIs, some crossing the border. (RoIAlign is linear in the features, so its
    # input gradient exists everywhere; the kinks at pixel grid lines are in the RoI
    # coordinates, which get no gradient.)
    rois = np.array(
        [[0, 1.3, 2.7, 9.1, 8.4], [1, -3.2, 0.6, 6.3, 14.9], [1, 4.05, 3.35, 6.15, 5.45]]
    )

    def forward(f):
        return roi_align(f, rois, (3, 2), 0.5, 2, aligned)

    def backward(g):
        return roi_align_backward(g, rois, features.shape, (3, 2), 0.5, 2, aligned)

    check_function(forward, backward, [features])


def test_roi_pool_gradcheck_away_from_ties():
    rng = np.random.default_rng(5)
    # Distinct values 0.1 apart: a 1e-6 perturbation never changes which element is the max.
    features = (rng.permutation(2 * 3 * 7 * 8) * 0.1).reshape(2, 3, 7, 8).astype(np.float64)
    rois = np.array([[0, 0.4, 1.2, 6.6, 5.3], [1, 2.2, 0.1, 7.9, 6.7], [0, -2.0, -1.0, 3.0, 3.5]])
    argmax = {}

    def forward(f):
        out, argmax["a"] = roi_pool(f, rois, (3, 2))
        return out

    def backward(g):
        return roi_pool_backward(g, argmax["a"], features.shape, rois)

    check_function(forward, backward, [features])


@pytest.mark.parametrize(
    "sampling_ratio, aligned, scale", [(2, False, 0.25), (-1, True, 0.125), (3, True, 1.0)]
)
def test_roi_align_backward_is_the_adjoint_of_the_forward(sampling_ratio, aligned, scale):
    """<roi_align(F), G> = <F, roi_align_backward(G)>: the backward is exactly A^T."""
    rng = np.random.default_rng(6)
    features = rng.standard_normal((3, 4, 11, 13))
    k = 40
    xy = rng.uniform(-10, 14 / scale, (k, 2))
    wh = rng.uniform(0, 10 / scale, (k, 2))
    rois = np.concatenate([rng.integers(0, 3, (k, 1)), xy, xy + wh], axis=1)
    out = roi_align(features, rois, (5, 4), scale, sampling_ratio, aligned)
    g = rng.standard_normal(out.shape)
    back = roi_align_backward(g, rois, features.shape, (5, 4), scale, sampling_ratio, aligned)
    lhs, rhs = np.vdot(out, g), np.vdot(features, back)
    print(f"\nadjointness: <A F, G> = {lhs:.15f}, <F, A^T G> = {rhs:.15f}")
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


def test_roi_pool_backward_is_the_adjoint_of_the_selection():
    rng = np.random.default_rng(7)
    features = rng.standard_normal((2, 3, 9, 9))
    rois = np.array(
        [[0, 0.4, 1.2, 16.6, 15.3], [1, 2.2, 0.1, 17.9, 16.7], [1, 2.2, 0.1, 17.9, 16.7]]
    )
    out, argmax = roi_pool(features, rois, 4, 0.5)
    g = rng.standard_normal(out.shape)
    back = roi_pool_backward(g, argmax, features.shape, rois)
    assert abs(np.vdot(out, g) - np.vdot(features, back)) <= 1e-10


# --------------------------------------------------------------------------------------------
# 5. Hand-computed cases on the 4x4 map F4
# --------------------------------------------------------------------------------------------
def test_roi_align_by_hand():
    # RoI x 0.25 .. 2.25, y 0.5 .. 1.5, one bin, 2 x 2 samples, aligned=False, scale 1.
    # Samples: x = 0.25 + (0.5, 1.5) * 2 / 2 = 0.75, 1.75
    #          y = 0.5 + (0.5, 1.5) * 1 / 2 = 0.75, 1.25
    # Bilinear weights (rows y_low, y_low + 1; columns x_low, x_low + 1):
    #   (0.75, 0.75): y 0|1 with 0.25|0.75, x 0|1 with 0.25|0.75 -> 1/16, 3/16, 3/16, 9/16
    #     = (1*1 + 2*3 + 3*3 + 8*9) / 16 = 88/16
    #   (0.75, 1.75): x 1|2 -> F[0,1]=2, F[0,2]=0, F[1,1]=8, F[1,2]=5
    #     -> (2 + 0 + 24 + 45)/16 = 71/16
    #   (1.25, 0.75): y 1|2 with 0.75|0.25 -> weights 3/16, 9/16, 1/16, 3/16
    #     F[1,0]=3, F[1,1]=8, F[2,0]=0, F[2,1]=2 -> (9 + 72 + 0 + 6)/16 = 87/16
    #   (1.25, 1.75): F[1,1]=8, F[1,2]=5, F[2,1]=2, F[2,2]=7 -> (24 + 45 + 2 + 21)/16 = 92/16
    # Average of the four samples: (88 + 71 + 87 + 92) / 64 = 338/64
    roi = np.array([[0.0, 0.25, 0.5, 2.25, 1.5]])
    assert roi_align(F4, roi, 1, 1.0, 2, False)[0, 0, 0, 0] == pytest.approx(338 / 64, abs=1e-14)
    # The same samples with aligned=True: the RoI shifted by +0.5 pixel.
    shifted = np.array([[0.0, 0.75, 1.0, 2.75, 2.0]])
    assert roi_align(F4, shifted, 1, 1.0, 2, True)[0, 0, 0, 0] == pytest.approx(338 / 64, abs=1e-14)
    # Backward of a unit gradient: each sample gives weight/4 to its neighbours, e.g. F[1,1]
    # gets (9/16 + 3/16 + 9/16 + 3/16) / 4 = 24/64 and F[0,0] gets 1/64.
    grad = roi_align_backward(np.ones((1, 1, 1, 1)), roi, F4.shape, 1, 1.0, 2, False)[0, 0]
    assert grad[1, 1] == pytest.approx(24 / 64) and grad[0, 0] == pytest.approx(1 / 64)
    assert grad.sum() == pytest.approx(1.0) and grad[3].sum() == 0.0


def test_roi_align_adaptive_sampling_by_hand():
    # RoI 0 .. 2 in x, 0 .. 3 in y, 1 x 1 output, adaptive: ceil(3/1) = 3 rows, ceil(2/1) = 2
    # columns of samples at y = 0.5, 1.5, 2.5 and x = 0.5, 1.5; each is the mean of a 2x2 block.
    roi = np.array([[0.0, 0.0, 0.0, 2.0, 3.0]])
    f = F4[0, 0]
    blocks = [f[r : r + 2, c : c + 2].mean() for r in (0, 1, 2) for c in (0, 1)]
    assert roi_align(F4, roi, 1, 1.0, -1)[0, 0, 0, 0] == pytest.approx(np.mean(blocks))


def test_roi_pool_by_hand():
    # RoI (0.4, 0.6, 2.6, 3.4), 2x2 bins, scale 1:
    #   x: round(0.4) = 0 .. round(2.6) = 3 -> 4 pixels, bin 2: columns [0, 2) and [2, 4)
    #   y: round(0.6) = 1 .. round(3.4) = 3 -> 3 pixels, bin 1.5: rows 1 + [0, 2) = [1, 3)
    #      and 1 + [floor(1.5), ceil(3)) = [2, 4)
    #   bin (0,0): rows 1-2, cols 0-1: {3, 8, 0, 2} -> 8 at (1, 1) = index 5
    #   bin (0,1): rows 1-2, cols 2-3: {5, 1, 7, 6} -> 7 at (2, 2) = index 10
    #   bin (1,0): rows 2-3, cols 0-1: {0, 2, 9, 4} -> 9 at (3, 0) = index 12
    #   bin (1,1): rows 2-3, cols 2-3: {7, 6, 1, 3} -> 7 at (2, 2) = index 10 (shared)
    out, argmax = roi_pool(F4, np.array([[0.0, 0.4, 0.6, 2.6, 3.4]]), 2)
    np.testing.assert_array_equal(out[0, 0], [[8, 7], [9, 7]])
    np.testing.assert_array_equal(argmax[0, 0], [[5, 10], [12, 10]])
    grad = roi_pool_backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]), argmax, F4.shape)[0, 0]
    want = np.zeros((4, 4))
    want[1, 1], want[2, 2], want[3, 0] = 1.0, 2.0 + 4.0, 3.0
    np.testing.assert_array_equal(grad, want)


# --------------------------------------------------------------------------------------------
# 6. aligned=True is exactly a half-pixel shift
# --------------------------------------------------------------------------------------------
def test_aligned_true_is_the_same_as_shifting_the_roi_by_half_a_pixel():
    rng = np.random.default_rng(8)
    features = rng.standard_normal((2, 3, 12, 15))
    scale = 0.25
    k = 30
    xy = rng.uniform(-8, 50, (k, 2))
    wh = rng.uniform(4 / scale * 0.3, 40, (k, 2))  # >= 1 feature pixel: no size clamp
    rois = np.concatenate([rng.integers(0, 2, (k, 1)), xy, xy + wh], axis=1)
    half = 0.5 / scale  # half a feature pixel in image pixels
    shifted = rois + np.array([0, half, half, half, half])
    for sampling_ratio in (2, -1):
        plain = roi_align(features, rois, (4, 3), scale, sampling_ratio, False)
        np.testing.assert_allclose(
            roi_align(features, shifted, (4, 3), scale, sampling_ratio, True), plain, atol=1e-12
        )
        assert (
            np.abs(roi_align(features, rois, (4, 3), scale, sampling_ratio, True) - plain).max()
            > 0.05
        )


def test_aligned_difference_on_a_ramp_is_half_a_pixel_of_slope():
    a, b = 0.8, -1.5
    features = ramp(16, 16, [(a, b, 3.0)])
    rois = np.array([[0.0, 10.0, 12.0, 40.0, 44.0], [0.0, 7.3, 9.9, 51.1, 47.6]])  # scale 1/4
    diff = roi_align(features, rois, 4, 0.25, 2, False) - roi_align(
        features, rois, 4, 0.25, 2, True
    )
    # aligned=True samples half a pixel up and left: F(x, y) - F(x - 0.5, y - 0.5) = (a + b) / 2
    np.testing.assert_allclose(diff, 0.5 * (a + b), atol=1e-12)
