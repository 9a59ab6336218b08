"""The keypoint branch against torchvision (skipped without torch/torchvision): targets, loss and
its gradient, heatmap decoding, the heads, and a whole ``keypointrcnn_resnet50_fpn`` with random
weights converted by our reader. Both sides run in the same process; nothing is pasted."""

import dataclasses

import numpy as np
import pytest
from test_parity_torchvision import (
    BOX_TOL,
    compare_detections,
    compare_features,
    compare_proposals,
    converted,
    make_images,
    pair_up,
    record,
    run_both,
    torchvision_model,
)

from mrcnn_edu import convert, heads
from mrcnn_edu import keypoints as kp_ops
from mrcnn_edu.mask_rcnn import MaskRCNNConfig

torchvision = pytest.importorskip("torchvision")  # (test_parity_torchvision needs torch too)
torch = pytest.importorskip("torch")
from torchvision.models.detection import keypoint_rcnn, roi_heads  # noqa: E402

# torch's compiled bicubic kernel may fuse one multiply-add of the cubic weights, which we
# evaluate with plain float32 rounding (keypoints.cubic_taps): the resized maps agree to a few
# ulp, well inside these tolerances, and the argmax is the same.
MAP_RTOL = 2e-6  # of the map's largest magnitude
KEYPOINT_ATOL = 1e-4  # pixels
HEATMAP_RTOL = 1e-4  # whole model: keypoint logits, of their largest magnitude


def random_case(rng, images=3, k=5):
    """Positive RoIs, their matched GT keypoints and logits, as the RoI heads hand them over:
    keypoints inside and outside their RoI, on its far edges, unlabelled and hidden."""
    rois, gt, matched = [], [], []
    for _ in range(images):
        p, g = int(rng.integers(0, 6)), int(rng.integers(1, 4))
        xy = rng.uniform(0, 200, (p, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 120, (p, 2))], 1).astype(np.float32)
        kp = np.concatenate(
            [rng.uniform(-20, 340, (g, k, 2)), rng.integers(0, 3, (g, k, 1))], axis=2
        ).astype(np.float32)
        idx = rng.integers(0, g, p)
        for i, j in enumerate(idx):  # some keypoints exactly on the far edge of their RoI
            kp[j, i % k, 0], kp[j, (i + 1) % k, 1] = boxes[i, 2], boxes[i, 3]
        rois.append(boxes)
        gt.append(kp)
        matched.append(idx)
    total = sum(len(b) for b in rois)
    logits = (rng.standard_normal((total, k, 56, 56)) * 3).astype(np.float32)
    return logits, rois, gt, matched


@pytest.mark.parametrize("seed", range(4))
def test_heatmap_targets_loss_and_gradient_equal_torchvisions(seed):
    rng = np.random.default_rng(seed)
    logits, rois, gt, matched = random_case(rng)
    for boxes, kp, idx in zip(rois, gt, matched):
        ours = kp_ops.keypoints_to_heatmap(kp[idx], boxes, 56)
        theirs = roi_heads.keypoints_to_heatmap(
            torch.from_numpy(kp[idx]), torch.from_numpy(boxes), 56
        )
        np.testing.assert_array_equal(ours[0], theirs[0].numpy())
        np.testing.assert_array_equal(ours[1], theirs[1].numpy().astype(bool))
    loss, grad = kp_ops.keypointrcnn_loss(logits, rois, gt, matched)
    t_logits = torch.from_numpy(logits).requires_grad_()
    t_loss = roi_heads.keypointrcnn_loss(
        t_logits,
        [torch.from_numpy(b) for b in rois],
        [torch.from_numpy(k) for k in gt],
        [torch.from_numpy(i) for i in matched],
    )
    t_loss.backward()
    assert loss == pytest.approx(float(t_loss.detach()), rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-5, atol=1e-9)


def test_the_empty_cases_give_zero_as_torchvisions():
    rng = np.random.default_rng(0)
    logits, rois, gt, matched = random_case(rng)
    hidden = [k * np.array([1, 1, 0], np.float32) for k in gt]
    t_loss = roi_heads.keypointrcnn_loss(
        torch.from_numpy(logits),
        [torch.from_numpy(b) for b in rois],
        [torch.from_numpy(k) for k in hidden],
        [torch.from_numpy(i) for i in matched],
    )
    assert float(t_loss) == 0.0 == kp_ops.keypointrcnn_loss(logits, rois, hidden, matched)[0]


@pytest.mark.parametrize("size", [(1, 1), (7, 190), (56, 56), (113, 61), (300, 241)])
def test_bicubic_resize_equals_torch_interpolate(size):
    maps = (np.random.default_rng(1).standard_normal((4, 56, 56)) * 3).astype(np.float32)
    ours = kp_ops.resize_bicubic(maps, size)
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(maps)[:, None], size=size, mode="bicubic", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=MAP_RTOL * np.abs(theirs).max())


@pytest.mark.parametrize("seed", range(3))
def test_heatmaps_to_keypoints_equals_torchvisions(seed):
    rng = np.random.default_rng(seed)
    maps = (rng.standard_normal((12, 17, 56, 56)) * 3).astype(np.float32)
    xy = rng.uniform(-5, 300, (12, 2))
    rois = np.concatenate([xy, xy + np.exp(rng.uniform(-1, 5.5, (12, 2)))], 1)
    rois = rois.astype(np.float32)
    kp, scores = kp_ops.heatmaps_to_keypoints(maps, rois)
    t_kp, t_scores = roi_heads.heatmaps_to_keypoints(torch.from_numpy(maps), torch.from_numpy(rois))
    np.testing.assert_allclose(kp, t_kp.numpy(), rtol=0, atol=KEYPOINT_ATOL)
    t_scores = t_scores.numpy()
    np.testing.assert_allclose(scores, t_scores, rtol=0, atol=MAP_RTOL * np.abs(t_scores).max())


def test_heads_equal_torchvisions_with_converted_names():
    """torchvision's KeypointRCNNHeads and KeypointRCNNPredictor (small widths), their
    weights renamed by the converter's rules, give the same heatmaps."""
    torch.manual_seed(0)
    t_head = keypoint_rcnn.KeypointRCNNHeads(6, (8, 8, 8))
    t_pred = keypoint_rcnn.KeypointRCNNPredictor(8, 5)
    head = heads.KeypointRCNNHeads(6, (8, 8, 8), rng=0)
    pred = heads.KeypointRCNNPredictor(8, 5, rng=0)
    for ours, theirs, prefix in ((head, t_head, "head"), (pred, t_pred, "predictor")):
        state = {
            convert.torchvision_to_ours(f"roi_heads.keypoint_{prefix}.{k}"): v.detach().numpy()
            for k, v in theirs.state_dict().items()
        }
        ours.load_state_dict({k.split(".", 2)[2]: v for k, v in state.items()})
    x = np.random.default_rng(0).standard_normal((3, 6, 14, 14)).astype(np.float32)
    with torch.no_grad():
        theirs = t_pred(t_head(torch.from_numpy(x))).numpy()
    for mode in (True, False):  # the training path (caches) and the eval path
        ours = pred.train(mode)(head.train(mode)(x))
        assert ours.shape == theirs.shape == (3, 5, 56, 56)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


# -- the whole model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tv_model = torchvision_model(
            builder=keypoint_rcnn.keypointrcnn_resnet50_fpn,
            min_size=320,
            max_size=512,
            rpn_post_nms_top_n_test=300,
            box_score_thresh=0.01,
            box_detections_per_img=8,
        )
        base = MaskRCNNConfig.keypointrcnn_resnet50_fpn()
        config = dataclasses.replace(
            base,
            min_size=320,
            max_size=512,
            rpn=dataclasses.replace(base.rpn, post_nms_top_n_test=300),
            roi_heads=dataclasses.replace(base.roi_heads, score_thresh=0.01, detections_per_img=8),
        )
        model = converted(tv_model, tmp_path_factory.mktemp("keypoints"), config)
        heatmaps = {}
        record(tv_model.roi_heads.keypoint_predictor, "forward", heatmaps, "theirs")
        record(model.roi_heads.keypoint_predictor, "forward", heatmaps, "ours")
        ours, theirs = run_both(tv_model, model, make_images())
    finally:
        torch.set_num_threads(threads)
    state = {k: v.numpy() for k, v in tv_model.state_dict().items()}
    return {"ours": ours, "theirs": theirs, "heatmaps": heatmaps, "state": state}


def test_whole_keypointrcnn_gives_the_same_detections_and_keypoints(whole):
    """Converted ``keypointrcnn_resnet50_fpn`` with random weights, two images at 320/512:
    features, proposals and detections as in the Mask R-CNN parity test; then, detection by
    detection, the same 17 keypoints (to 1e-2 px, the box tolerance) and their scores.
    Measured: keypoints 1.7e-3 px apart, heatmap logits 3.2e-5 of their range."""
    ours, theirs = whole["ours"], whole["theirs"]
    compare_features(ours["features"], theirs["features"])
    compare_proposals(ours["proposals"], theirs["proposals"])
    compare_detections(ours["detections"], theirs["detections"])
    compared = 0
    for a, b in zip(ours["detections"], theirs["detections"], strict=True):
        assert "masks" not in a and a["keypoints"].shape == (len(a["boxes"]), 17, 3)
        mine, tv, _, _ = pair_up(a, b, BOX_TOL)
        spread = np.ptp(b["keypoints"][tv, :, :2], axis=1).min(axis=1)
        assert np.all(spread > 2)  # not trivial: each person's keypoints spread over its box
        np.testing.assert_allclose(a["keypoints"][mine], b["keypoints"][tv], atol=BOX_TOL[0])
        scores = b["keypoints_scores"][tv]  # logits: to HEATMAP_RTOL of the largest
        atol = HEATMAP_RTOL * np.abs(scores).max()
        np.testing.assert_allclose(a["keypoints_scores"][mine], scores, rtol=0, atol=atol)
        compared += len(mine)
    assert compared >= 12


def test_whole_keypointrcnn_heatmaps_agree(whole):
    """The 56 x 56 heatmap logits of the final boxes (the last keypoint-head call of each
    side, both images together), matched detection by detection."""
    ours, theirs = whole["heatmaps"]["ours"], whole["heatmaps"]["theirs"].numpy()
    start = [0, 0]
    for a, b in zip(whole["ours"]["detections"], whole["theirs"]["detections"], strict=True):
        mine, tv, _, _ = pair_up(a, b, BOX_TOL)
        p, q = ours[start[0] + mine], theirs[start[1] + tv]
        np.testing.assert_allclose(p, q, rtol=0, atol=HEATMAP_RTOL * np.abs(q).max())
        start = [start[0] + len(a["boxes"]), start[1] + len(b["boxes"])]


def test_the_converter_picks_the_keypoint_preset(whole):
    config = convert.default_config(whole["state"])
    assert config == MaskRCNNConfig.keypointrcnn_resnet50_fpn(17, 1)
    assert config.num_keypoints == 17 and not config.roi_heads.mask_branch
