"""The keypoint branch (human pose): targets on the RoI grid, the loss over locations and its
gradient, bicubic decoding of heatmaps, the heads' backward, and the branch inside the model.
The comparisons with torchvision itself are in test_keypoints_torchvision.py."""

import numpy as np
import pytest
from helpers import rand
from test_roi_heads import LEVELS, small_heads

from mrcnn_edu.heads import KeypointRCNNHeads, KeypointRCNNPredictor
from mrcnn_edu.keypoints import (
    check_keypoints,
    cubic_taps,
    heatmaps_to_keypoints,
    keypointrcnn_loss,
    keypoints_to_heatmap,
    resize_bicubic,
)
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.nn.gradcheck import (
    assert_close_grad,
    check_module,
    check_params_sampled,
    numerical_gradient,
)
from mrcnn_edu.nn.losses import log_softmax
from mrcnn_edu.nn.module import Param
from mrcnn_edu.resample import upsample_bilinear_backward, upsample_bilinear_forward
from mrcnn_edu.roi_heads import RoIHeads
from mrcnn_edu.transform import prepare_inputs, resize_keypoints, to_original_size

# Keys' cubic kernel (a = -0.75) at the distances of a 2x upsampling, worked out by hand:
# W(d) = 1.25 d^3 - 2.25 d^2 + 1 (d <= 1), -0.75 d^3 + 3.75 d^2 - 6 d + 3 (1 < d < 2)
W_025, W_075, W_125, W_175 = 0.87890625, 0.26171875, -0.10546875, -0.03515625


# -- targets -------------------------------------------------------------------------------------
def test_keypoints_to_heatmap_floors_into_the_grid_with_torchvisions_edge_rule():
    """A 28 x 28 RoI at (10, 20) on a 56-cell grid: two cells per pixel."""
    roi = np.array([[10.0, 20.0, 38.0, 48.0]], np.float32)
    kp = np.array(
        [
            [
                [10.0, 20.0, 2],  # the top-left corner: cell (0, 0)
                [24.3, 20.9, 2],  # col floor(14.3 * 2) = 28, row floor(0.9 * 2) = 1
                [38.0, 48.0, 2],  # exactly on the far edges: the last cell, not outside
                [9.9, 30.0, 2],  # col floor(-0.2) = -1: left of the RoI
                [38.01, 30.0, 2],  # col floor(56.02) = 56: right of the RoI
                [20.0, 30.0, 0],  # inside but not labelled
                [20.0, 30.0, 1],  # inside, labelled but hidden: trained (COCO v = 1)
            ]
        ],
        np.float32,
    )
    index, valid = keypoints_to_heatmap(kp, roi, 56)
    assert valid.tolist() == [[True, True, True, False, False, False, True]]
    assert index.dtype == np.int64
    assert index[0, :3].tolist() == [0, 1 * 56 + 28, 55 * 56 + 55]
    assert index[0, 6] == 20 * 56 + 20
    assert index[0, 3:6].tolist() == [0, 0, 0]  # invalid entries point at cell 0


# -- the loss ------------------------------------------------------------------------------------
def loss_case():
    """Two images, three positive RoIs, K = 3 keypoints on a 4 x 4 grid (float64)."""
    rois = [np.array([[0.0, 0, 8, 8], [2, 2, 6, 10]]), np.array([[4.0, 4, 12, 8]])]
    gt = [
        np.array(
            [
                [[1.0, 1, 2], [7.9, 7.9, 2], [3, 3, 0]],  # GT 0: two visible, one unlabelled
                [[3.0, 9, 1], [50, 50, 2], [5.5, 2.5, 2]],  # GT 1: one far outside every RoI
            ]
        ),
        np.array([[[11.0, 7, 2], [4.5, 4.5, 2], [8, 6, 2]]]),
    ]
    matched = [np.array([0, 1]), np.array([0])]
    return rand(3, 3, 4, 4, seed=3), rois, gt, matched


def test_keypoint_loss_is_a_softmax_over_locations_averaged_over_valid_keypoints():
    logits, rois, gt, matched = loss_case()
    loss, grad = keypointrcnn_loss(logits, rois, gt, matched)
    # by hand: each valid keypoint's cell on its RoI's 4 x 4 grid (row, col)
    cells = {
        (0, 0): (0, 0),  # RoI 0 (8 x 8, 2 px per cell), keypoint (1, 1)
        (0, 1): (3, 3),  # keypoint (7.9, 7.9)
        (1, 0): (3, 1),  # RoI 1 (4 x 8 px: 1 x 2 px cells), keypoint (3, 9): col 1, row 3
        (1, 2): (0, 3),  # keypoint (5.5, 2.5): col 3, row 0
        (2, 0): (3, 3),  # RoI 2 (8 x 4 px), keypoint (11, 7): col 3, row 3
        (2, 1): (0, 0),  # keypoint (4.5, 4.5)
        (2, 2): (2, 2),  # keypoint (8, 6): col 2, row 2
    }
    expected = np.mean(
        [-log_softmax(logits[p, k].ravel())[r * 4 + c] for (p, k), (r, c) in cells.items()]
    )
    assert loss == pytest.approx(expected, rel=1e-12)
    num = numerical_gradient(lambda: keypointrcnn_loss(logits, rois, gt, matched)[0], logits)
    assert_close_grad(grad, num, name="keypoint logits")


def test_invisible_and_outside_keypoints_get_exactly_zero_gradient():
    """The unlabelled keypoint (v = 0) and the one outside its RoI: not a single non-zero
    gradient entry, and any logits there leave the loss unchanged."""
    logits, rois, gt, matched = loss_case()
    loss, grad = keypointrcnn_loss(logits, rois, gt, matched)
    for p, k in ((0, 2), (1, 1)):
        assert np.count_nonzero(grad[p, k]) == 0
        changed = logits.copy()
        changed[p, k] = 1e3 * rand(4, 4, seed=p + k)
        assert keypointrcnn_loss(changed, rois, gt, matched)[0] == loss
    assert np.count_nonzero(grad[0, 0]) == 16  # a valid keypoint moves every location


def test_keypoint_loss_without_any_valid_keypoint_is_zero():
    logits, rois, gt, matched = loss_case()
    hidden = [g * np.array([1.0, 1.0, 0.0]) for g in gt]  # every visibility 0
    loss, grad = keypointrcnn_loss(logits, rois, hidden, matched)
    assert loss == 0.0 and grad.shape == logits.shape and not grad.any()
    empty = np.zeros((0, 3, 4, 4))
    loss, grad = keypointrcnn_loss(empty, [np.zeros((0, 4))], [gt[0]], [np.zeros(0, np.int64)])
    assert loss == 0.0 and grad.shape == (0, 3, 4, 4)


def test_keypoint_loss_refuses_mismatched_inputs():
    logits, rois, gt, matched = loss_case()
    with pytest.raises(ValueError, match="square"):
        keypointrcnn_loss(logits[..., :3], rois, gt, matched)
    with pytest.raises(ValueError, match="must match"):
        keypointrcnn_loss(logits[:2], rois, gt, matched)


# -- decoding ------------------------------------------------------------------------------------
def test_cubic_taps_of_a_2x_upsampling_are_keys_kernel_by_hand():
    """Output pixel i of a 2x upsampling reads s = i / 2 - 0.25: t = 0.75 for even i, 0.25 for
    odd ones; at the left border the taps -2, -1 are clamped to pixel 0."""
    index, weight = cubic_taps(4, 8)
    assert index[3].tolist() == [0, 1, 2, 3]  # s = 1.25: i0 = 1, t = 0.25
    assert weight[3].tolist() == [W_125, W_025, W_075, W_175]
    assert index[0].tolist() == [0, 0, 0, 1]  # s = -0.25: i0 = -1, t = 0.75
    assert weight[0].tolist() == [W_175, W_075, W_025, W_125]
    assert index[7].tolist() == [2, 3, 3, 3]  # s = 3.25: taps 4 and 5 clamped to 3
    np.testing.assert_allclose(cubic_taps(56, 23)[1].sum(axis=1), 1, rtol=0, atol=1e-6)


def test_resize_bicubic_identity_constant_and_separable():
    maps = rand(3, 7, 9).astype(np.float32)
    np.testing.assert_array_equal(resize_bicubic(maps, (7, 9)), maps)  # weights (0, 1, 0, 0)
    flat = np.full((2, 5, 6), 0.3, np.float32)
    np.testing.assert_allclose(resize_bicubic(flat, (13, 4)), 0.3, rtol=1e-6)
    u, v = rand(6, seed=1), rand(5, seed=2)
    out = resize_bicubic(np.outer(u, v), (11, 17))
    uu = resize_bicubic(u[:, None], (11, 1))[:, 0]
    vv = resize_bicubic(v[None, :], (1, 17))[0]
    np.testing.assert_allclose(out, np.outer(uu, vv), rtol=1e-12, atol=1e-12)


def test_heatmaps_to_keypoints_on_hand_built_maps():
    """One peak of 1 at (row 5, column 40) of a 56 x 56 map. A 112 x 112 box doubles the map:
    outputs 2c and 2c + 1 both read the peak with weight W(0.25), a tie the first maximum
    wins, so the keypoint is the centre of resized pixel (10, 80) and the score W(0.25)^2."""
    maps = np.zeros((3, 2, 56, 56), np.float32)
    maps[:, 0, 5, 40] = 1
    maps[:, 1, 50, 3] = 2
    rois = np.array([[10, 20, 122, 132], [10, 20, 121.2, 131.2], [7, 9, 7.4, 9.25]], np.float32)
    kp, scores = heatmaps_to_keypoints(maps, rois)
    assert kp.shape == (3, 2, 3) and scores.shape == (3, 2) and kp.dtype == np.float32
    np.testing.assert_array_equal(kp[0], [[80.5 + 10, 10.5 + 20, 1], [6.5 + 10, 100.5 + 20, 1]])
    assert scores[0].tolist() == [W_025**2, 2 * W_025**2]
    # a box of 111.2 px is resized to ceil = 112 and the position stretched back by 111.2 / 112
    corr = np.float32(111.2) / np.float32(112)
    np.testing.assert_allclose(kp[1, 0, :2], [80.5 * corr + 10, 10.5 * corr + 20], rtol=1e-6)
    # a box under a pixel counts as one (torchvision clamps the size at 1): its centre pixel
    np.testing.assert_allclose(kp[2, :, :2], [[7.5, 9.5]] * 2, rtol=1e-6)
    empty = heatmaps_to_keypoints(np.zeros((0, 2, 56, 56), np.float32), np.zeros((0, 4)))
    assert empty[0].shape == (0, 2, 3) and empty[1].shape == (0, 2)


def test_a_target_cell_decodes_back_into_its_cell():
    """keypoints_to_heatmap then a one-hot heatmap decoded on a box of 56 * 3 px: the
    keypoint comes back to the centre region of its own cell."""
    rng = np.random.default_rng(0)
    roi = np.array([[5.0, 7.0, 5 + 168, 7 + 168]], np.float32)
    kp = np.concatenate([rng.uniform(8, 172, (1, 9, 2)), np.full((1, 9, 1), 2)], axis=2)
    index, valid = keypoints_to_heatmap(kp.astype(np.float32), roi, 56)
    assert valid.all()
    maps = np.zeros((1, 9, 56 * 56), np.float32)
    maps[0, np.arange(9), index[0]] = 5.0
    decoded, _ = heatmaps_to_keypoints(maps.reshape(1, 9, 56, 56), roi)
    assert np.all(np.abs(decoded[0, :, :2] - kp[0, :, :2]) < 3.0)  # within the 3 px cell


# -- the heads -----------------------------------------------------------------------------------
def test_bilinear_upsampling_by_hand_and_its_adjoint():
    x = np.array([[[[1.0, 3.0]]]])  # one row: [a, b] -> [a, a/4 + 3b/4 ...]
    y, cache = upsample_bilinear_forward(x)
    np.testing.assert_allclose(y[0, 0, 0], [1.0, 1.5, 2.5, 3.0])
    np.testing.assert_allclose(y[0, 0, 1], y[0, 0, 0])  # one input row: both rows copy it
    x, dy = rand(2, 3, 4, 5), rand(2, 3, 8, 10, seed=1)
    y, cache = upsample_bilinear_forward(x)
    assert np.sum(y * dy) == pytest.approx(np.sum(x * upsample_bilinear_backward(dy, cache)))


def test_keypoint_head_and_predictor_gradcheck_and_names():
    head = KeypointRCNNHeads(3, (4, 5), rng=0).astype(np.float64)
    names = [n for n, _ in head.named_parameters()]
    assert names == ["conv_fcn1.weight", "conv_fcn1.bias", "conv_fcn2.weight", "conv_fcn2.bias"]
    check_module(head, rand(2, 3, 5, 5))
    pred = KeypointRCNNPredictor(5, 3, rng=0).astype(np.float64)
    x = rand(2, 5, 4, 4)
    assert pred(x).shape == (2, 3, 16, 16)  # deconv 2x, bilinear 2x: 14 -> 56 in the model
    check_module(pred, x)
    pred.eval()
    np.testing.assert_allclose(pred(x), pred.train()(x), rtol=1e-12)  # eval path, no cache
    assert [n for n, _ in pred.named_parameters()] == [
        "kps_score_lowres.weight",
        "kps_score_lowres.bias",
    ]


# -- the branch in the RoI heads and the model ---------------------------------------------------
def keypoint_heads(**overrides):
    """test_roi_heads' small RoI heads (float64) with a keypoint branch of K = 4."""
    config = small_heads(
        keypoint_pool_size=3, keypoint_channels=3, keypoint_num_convs=2, **overrides
    ).config
    return RoIHeads(2, 2, config, list(LEVELS), list(LEVELS.values()), 0, 4).astype(np.float64)


def pose_target(size=(128, 128)):
    masks = np.zeros((2, *size), np.uint8)
    masks[0, 10:30, 12:34] = 1
    masks[1, 4:124, 6:120] = 1
    keypoints = np.array(
        [
            [[14, 12, 2], [30, 28, 2], [20, 20, 0], [33, 11, 1]],
            [[10, 10, 2], [100, 110, 2], [60, 60, 2], [0, 0, 0]],
        ],
        np.float64,
    )
    return {
        "boxes": np.array([[12.0, 10, 34, 30], [6, 4, 120, 124]]),
        "labels": np.array([1, 2]),
        "masks": masks,
        "keypoints": keypoints,
    }


def test_keypoint_branch_feature_gradients_match_finite_differences():
    """With num_keypoints > 0 the RoI heads add loss_keypoint, and ``backward()`` returns the
    gradient of all four losses with respect to the pooled levels (P2 and P3 here)."""
    rng = np.random.default_rng(1)
    heads, target = keypoint_heads(), pose_target()
    feats = {name: rng.standard_normal((1, 2, 128 // s, 128 // s)) for name, s in LEVELS.items()}
    props = [target["boxes"] + rng.uniform(-3, 3, (2, 4)) for _ in range(4)]
    props = [np.clip(np.concatenate(props), 0, 128)]

    def loss(only_keypoints=False):
        heads.fg_bg_sampler.rng = np.random.default_rng(7)
        losses = heads(feats, props, [(128, 128)], [target])[1]
        return losses["loss_keypoint"] if only_keypoints else sum(losses.values())

    assert loss(True) > 0
    loss()
    grads = heads.backward()
    levels = []  # the two levels the RoIs read, as Params (same arrays) holding the gradient
    for name in ("p2", "p3"):
        assert np.abs(grads[name]).max() > 0
        levels.append((name, Param(feats[name])))
        levels[-1][1].grad = grads[name]
    assert check_params_sampled(loss, levels, num_entries=6, rtol=1e-5, atol=1e-8) == 12
    # and the keypoint head's parameters got the gradient of loss_keypoint
    heads.zero_grad()
    loss()
    heads.backward()
    w = heads.keypoint_predictor.kps_score_lowres.weight
    numeric = numerical_gradient(lambda: loss(True), w.data)
    assert_close_grad(w.grad, numeric, name="kps_score_lowres.weight")


def test_keypoint_branch_at_inference_and_without_the_mask_branch():
    rng = np.random.default_rng(3)
    heads, target = keypoint_heads(mask_branch=False), pose_target()
    assert heads.mask_head is None and not any("mask" in n for n, _ in heads.named_parameters())
    feats = {name: rng.standard_normal((1, 2, 128 // s, 128 // s)) for name, s in LEVELS.items()}
    props = [np.clip(np.tile(target["boxes"], (3, 1)) + rng.uniform(-8, 8, (6, 4)), 0, 128)]
    _, losses = heads(feats, props, [(128, 128)], [target])
    assert list(losses) == ["loss_classifier", "loss_box_reg", "loss_keypoint"]
    heads.backward()
    (det,) = heads.eval()(feats, props, [(128, 128)])[0]
    d = len(det["boxes"])
    assert d > 0 and "mask_probs" not in det
    assert det["keypoints"].shape == (d, 4, 3) and det["keypoints_scores"].shape == (d, 4)
    x, y = det["keypoints"][..., 0], det["keypoints"][..., 1]
    boxes = det["boxes"][:, None]
    assert np.all(
        (x > boxes[..., 0]) & (x < boxes[..., 2]) & (y > boxes[..., 1]) & (y < boxes[..., 3])
    )
    assert np.all(det["keypoints"][..., 2] == 1)


def test_model_trains_and_predicts_keypoints_in_the_pixels_of_the_given_images():
    """small_pose with a resize (min_size 96): the targets' keypoints are scaled with their
    image, and predicted keypoints come back in the pixels of the image as given."""
    cfg = MaskRCNNConfig.small_pose(num_keypoints=4, num_classes=2)
    assert cfg.num_keypoints == 4 and cfg.roi_heads.keypoint_num_convs == 4
    cfg = MaskRCNNConfig.from_dict({**cfg.to_dict(), "min_size": 96, "max_size": 200})
    model = MaskRCNN(cfg, rng=0)
    image = np.random.default_rng(0).random((3, 128, 128)).astype(np.float32)
    losses = model.forward([image], [pose_target()])
    assert set(losses) == {
        *MaskRCNN(MaskRCNNConfig.small(2), rng=0).forward([image], [pose_target()]),
        "loss_keypoint",
    }
    model.backward()
    assert model.roi_heads.keypoint_head.conv_fcn1.weight.grad.any()
    inputs = prepare_inputs([image], cfg, np.float32, [pose_target()])
    np.testing.assert_allclose(
        inputs.targets[0]["keypoints"], pose_target()["keypoints"] * [0.75, 0.75, 1], rtol=1e-6
    )
    (pred,) = model.predict([image])
    d = len(pred["boxes"])
    assert pred["keypoints"].shape == (d, 4, 3) and pred["masks"].shape == (d, 128, 128)
    x, boxes = pred["keypoints"][..., 0], pred["boxes"][:, None]
    assert np.all((x >= boxes[..., 0]) & (x <= boxes[..., 2]))  # both mapped back alike


def test_keypoints_are_scaled_like_boxes_and_kept_at_zero_when_unlabelled():
    kp = np.array([[[10.0, 20.0, 2], [0, 0, 0]]], np.float32)
    out = resize_keypoints(kp, (100, 200), (50, 400))  # x times 2, y times 0.5
    np.testing.assert_array_equal(out, [[[20, 10, 2], [0, 0, 0]]])
    det = {
        "boxes": np.array([[2.0, 4, 6, 8]]),
        "keypoints": kp,
        "keypoints_scores": np.ones((1, 2)),
    }
    (back,) = to_original_size([det], [(50, 400)], [(100, 200)])
    np.testing.assert_array_equal(back["keypoints"], [[[5, 40, 2], [0, 0, 0]]])
    assert "masks" not in back  # no mask branch, nothing pasted


def test_default_models_have_no_keypoint_branch():
    cfg = MaskRCNNConfig.small(3)
    assert cfg.num_keypoints == 0 and MaskRCNNConfig().num_keypoints == 0
    names = [n for n, _ in MaskRCNN(cfg, rng=0).named_parameters()]
    assert not any("keypoint" in n for n in names)


@pytest.mark.parametrize(
    "keypoints, problem",
    [
        (None, "missing"),
        (np.zeros((2, 3, 3)), "shape"),
        (np.full((2, 4, 3), 3.0), "visibility"),
        (np.full((2, 4, 3), np.nan), "NaN"),
        (np.array([["a"] * 3] * 8).reshape(2, 4, 3), "numbers"),
    ],
)
def test_bad_keypoint_targets_are_refused_with_the_reason(keypoints, problem):
    with pytest.raises(ValueError, match=problem):
        check_keypoints(keypoints, 2, 4, "targets[0]['keypoints']", np.float32)
    target = {**pose_target(), "keypoints": keypoints}
    model = MaskRCNN(MaskRCNNConfig.small_pose(num_keypoints=4, num_classes=2), rng=0)
    image = np.zeros((3, 128, 128), np.float32)
    with pytest.raises(ValueError, match=problem):
        model.forward([image], [target])


def test_converter_names_and_preset_for_torchvisions_keypoint_model():
    from mrcnn_edu.convert import CLASS_LOGITS, KEYPOINT_LOGITS, default_config, torchvision_to_ours

    assert torchvision_to_ours("roi_heads.keypoint_head.0.weight") == (
        "roi_heads.keypoint_head.conv_fcn1.weight"
    )
    assert torchvision_to_ours("roi_heads.keypoint_head.14.bias") == (
        "roi_heads.keypoint_head.conv_fcn8.bias"
    )
    odd = "roi_heads.keypoint_head.3.weight"  # a ReLU's index: no parameter, reported unknown
    assert torchvision_to_ours(odd) == odd
    state = {CLASS_LOGITS: np.zeros((2, 1024)), KEYPOINT_LOGITS: np.zeros((512, 17, 4, 4))}
    config = default_config(state)
    assert (config.num_keypoints, config.num_classes, config.roi_heads.mask_branch) == (
        17,
        1,
        False,
    )
    assert config.min_size == (640, 672, 704, 736, 768, 800) and config.max_size == 1333
    del state[KEYPOINT_LOGITS]
    assert default_config(state) == MaskRCNNConfig.resnet50_fpn(1)
