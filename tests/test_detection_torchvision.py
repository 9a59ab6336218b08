"""Line-by-line comparisons with torchvision (skipped when torch/torchvision are not installed).

Both sides run in the same process on the same inputs; no torchvision output is stored here.
"""

from collections import OrderedDict

import numpy as np
import pytest

from mrcnn_edu.anchors import AnchorGenerator
from mrcnn_edu.boxes import BoxCoder, box_iou, clip_boxes_to_image, remove_small_boxes
from mrcnn_edu.matching import Matcher
from mrcnn_edu.nms import batched_nms, nms
from mrcnn_edu.rpn import RPN, RPNConfig

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from helpers import clustered_boxes  # noqa: E402
from torchvision.models.detection import _utils as tv_utils  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.models.detection.rpn import RegionProposalNetwork  # noqa: E402
from torchvision.models.detection.rpn import RPNHead as TVRPNHead  # noqa: E402
from torchvision.ops import boxes as tv_boxes  # noqa: E402


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# -- boxes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_box_iou_and_area_match(dtype):
    rng = np.random.default_rng(0)
    a, _ = clustered_boxes(rng, 300, dtype=dtype)
    b, _ = clustered_boxes(rng, 200, dtype=dtype)
    np.testing.assert_array_equal(box_iou(a, b), tv_boxes.box_iou(t(a), t(b)).numpy())
    empty = np.zeros((0, 4), dtype)
    assert box_iou(empty, b).shape == tuple(tv_boxes.box_iou(t(empty), t(b)).shape)


def test_clip_and_remove_small_match():
    rng = np.random.default_rng(1)
    boxes, _ = clustered_boxes(rng, 500)
    boxes[::7, 2] = boxes[::7, 0] + rng.uniform(0, 2, boxes[::7].shape[0]).astype(np.float32)
    clipped = clip_boxes_to_image(boxes, (400, 500))
    np.testing.assert_array_equal(
        clipped, tv_boxes.clip_boxes_to_image(t(boxes), (400, 500)).numpy()
    )
    np.testing.assert_array_equal(
        remove_small_boxes(clipped, 1.0), tv_boxes.remove_small_boxes(t(clipped), 1.0).numpy()
    )


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches(weights):
    rng = np.random.default_rng(2)
    ref, _ = clustered_boxes(rng, 400)
    props, _ = clustered_boxes(rng, 400)
    ours, theirs = BoxCoder(weights), tv_utils.BoxCoder(weights)
    np.testing.assert_allclose(
        ours.encode(ref, props),
        theirs.encode_single(t(ref), t(props)).numpy(),
        rtol=1e-6,
        atol=1e-6,
    )
    codes = rng.normal(0, 1, (400, 8)).astype(np.float32)  # two classes, some dw clamped
    codes[::10, 2] = 9.0
    np.testing.assert_allclose(
        ours.decode(codes, props),
        theirs.decode_single(t(codes), t(props)).numpy(),
        rtol=1e-6,
        atol=1e-4,
    )


# -- anchors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image, shapes",
    [
        ((800, 1088), [(200, 272), (100, 136), (50, 68), (25, 34), (13, 17)]),
        ((83, 129), [(21, 33), (11, 17), (6, 9), (3, 5), (2, 3)]),  # non-divisible strides
    ],
)
def test_fpn_anchors_match(image, shapes):
    ours = AnchorGenerator()((image), shapes)
    gen = TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    images = ImageList(torch.zeros(2, 3, *image), [image, image])
    feats = [torch.zeros(2, 4, h, w) for h, w in shapes]
    theirs = gen(images, feats)
    for per_image in theirs:
        np.testing.assert_array_equal(ours, per_image.numpy())


def test_single_level_anchors_with_several_sizes_match():
    sizes, ratios = ((128, 256, 512),), ((0.5, 1.0, 2.0),)
    ours = AnchorGenerator(sizes, ratios)((600, 1000), [(38, 63)])
    images = ImageList(torch.zeros(1, 3, 600, 1000), [(600, 1000)])
    theirs = TVAnchorGenerator(sizes, ratios)(images, [torch.zeros(1, 4, 38, 63)])[0]
    np.testing.assert_array_equal(ours, theirs.numpy())


# -- matcher ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("allow_low", [False, True])
def test_matcher_matches(allow_low):
    rng = np.random.default_rng(3)
    gen = AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    anchors = gen((128, 128), [(32, 32), (16, 16)])
    for trial in range(5):
        gt, _ = clustered_boxes(rng, 6, objects=6)
        gt = gt / 5  # inside the 128 x 128 image
        iou = box_iou(gt, anchors)
        if trial == 0:
            iou[:, 10] = iou[:, 11] = iou.max(axis=1)  # explicit ties for the low-quality rule
        theirs = tv_utils.Matcher(0.7, 0.3, allow_low)(t(iou)).numpy()
        np.testing.assert_array_equal(Matcher(0.7, 0.3, allow_low)(iou), theirs)


# -- nms -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [50, 1000, 3000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nms_matches_on_clustered_boxes(n, dtype):
    rng = np.random.default_rng(n)
    boxes, scores = clustered_boxes(rng, n, dtype=dtype)
    for threshold in (0.3, 0.5, 0.7):
        np.testing.assert_array_equal(
            nms(boxes, scores, threshold), tv_boxes.nms(t(boxes), t(scores), threshold).numpy()
        )


def test_nms_matches_on_ties_and_exact_thresholds():
    rng = np.random.default_rng(5)
    boxes, scores = clustered_boxes(rng, 1500, objects=10)
    scores = np.round(scores * 3) / 3  # 4 distinct values: heavy ties, torchvision sorts stably
    for threshold in (0.3, 0.5, 0.7):
        np.testing.assert_array_equal(
            nms(boxes, scores, threshold), tv_boxes.nms(t(boxes), t(scores), threshold).numpy()
        )
    # IoUs exactly 0.5 and 0.3 (float32 rounds 0.3 up: compared in double on both sides)
    grid = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 3], [0, 0, 10, 10]], np.float32)
    s = np.array([1.0, 0.9, 0.9, 1.0], np.float32)
    for threshold in (0.3, 0.5, 0.29999999):
        np.testing.assert_array_equal(
            nms(grid, s, threshold), tv_boxes.nms(t(grid), t(s), threshold).numpy()
        )


@pytest.mark.parametrize("n", [300, 2000])  # torchvision: coordinate trick below 1000 boxes
def test_batched_nms_matches(n):
    rng = np.random.default_rng(n)
    boxes, scores = clustered_boxes(rng, n)
    idxs = rng.integers(0, 7, n)
    np.testing.assert_array_equal(
        batched_nms(boxes, scores, idxs, 0.5),
        tv_boxes.batched_nms(t(boxes), t(scores), t(idxs), 0.5).numpy(),
    )


# -- rpn -------------------------------------------------------------------------------------------
def _twin_rpns(sample_everything: bool):
    """Our sigmoid RPN and torchvision's with the same weights. With ``sample_everything`` the
    sampler takes every labelled anchor, so the two random samplers pick the same set."""
    sizes, ratios = ((16,), (32,)), ((0.5, 1.0, 2.0),) * 2
    batch = 100_000 if sample_everything else 256
    fraction = 1.0 if sample_everything else 0.5
    cfg = RPNConfig(
        anchor_sizes=sizes,
        aspect_ratios=ratios,
        objectness_loss="sigmoid",
        batch_size_per_image=batch,
        positive_fraction=fraction,
        pre_nms_top_n_train=300,
        post_nms_top_n_train=100,
        pre_nms_top_n_test=150,
        post_nms_top_n_test=60,
    )
    ours = RPN(8, cfg, rng=0)
    rng = np.random.default_rng(1)
    for _, p in ours.named_parameters():
        p.data[...] = rng.normal(0, 0.2, p.shape)
    head = TVRPNHead(8, 3)
    with torch.no_grad():
        for mine, theirs in [
            (ours.head.conv, head.conv[0][0]),
            (ours.head.cls_logits, head.cls_logits),
            (ours.head.bbox_pred, head.bbox_pred),
        ]:
            theirs.weight.copy_(t(mine.weight.data))
            theirs.bias.copy_(t(mine.bias.data))
    tv = RegionProposalNetwork(
        TVAnchorGenerator(sizes, ratios),
        head,
        0.7,
        0.3,
        batch,
        fraction,
        dict(training=300, testing=150),
        dict(training=100, testing=60),
        0.7,
    )
    return ours, tv


def _inputs():
    rng = np.random.default_rng(2)
    feats = [
        rng.standard_normal((2, 8, 16, 16)).astype(np.float32),
        rng.standard_normal((2, 8, 8, 8)).astype(np.float32),
    ]
    sizes = [(64, 60), (50, 64)]
    targets = [
        {"boxes": np.array([[5, 5, 30, 40], [20, 10, 60, 30]], np.float32)},
        {"boxes": np.array([[0, 0, 20, 20]], np.float32)},
    ]
    return feats, sizes, targets


def _tv_call(tv, feats, sizes, targets=None):
    images = ImageList(torch.zeros(2, 3, 64, 64), sizes)
    features = OrderedDict((str(i), t(f)) for i, f in enumerate(feats))
    tv_targets = None if targets is None else [{"boxes": t(x["boxes"])} for x in targets]
    with torch.no_grad():
        return tv(images, features, tv_targets)


def test_rpn_proposals_match_in_eval():
    ours, tv = _twin_rpns(sample_everything=False)
    feats, sizes, _ = _inputs()
    ours.eval(), tv.eval()
    props, _ = ours(feats, sizes, batch_shape=(64, 64))
    theirs, _ = _tv_call(tv, feats, sizes)
    for a, b in zip(props, theirs):
        assert a.shape == tuple(b.shape)
        np.testing.assert_allclose(a, b.numpy(), atol=1e-3)  # conv rounding differs slightly


def test_rpn_filter_proposals_matches_exactly():
    ours, tv = _twin_rpns(sample_everything=False)
    rng = np.random.default_rng(3)
    counts = [16 * 16 * 3, 8 * 8 * 3]
    anchors = ours.anchor_generator((64, 64), [(16, 16), (8, 8)])
    deltas = rng.normal(0, 0.3, (2, sum(counts), 4)).astype(np.float32)
    proposals = np.stack([ours.box_coder.decode(d, anchors) for d in deltas])
    logits = rng.normal(0, 2, (2, sum(counts))).astype(np.float32)
    sizes = [(64, 60), (50, 64)]
    for training in (True, False):
        ours.train(training), tv.train(training)
        boxes, scores = ours.filter_proposals(proposals, logits, sizes, counts)
        tv_boxes_, tv_scores = tv.filter_proposals(t(proposals), t(logits), sizes, counts)
        for a, b, sa, sb in zip(boxes, tv_boxes_, scores, tv_scores):
            np.testing.assert_array_equal(a, b.numpy())
            np.testing.assert_allclose(sa, sb.numpy(), rtol=1e-6)  # sigmoid: 1 ulp apart


def test_rpn_losses_match_when_every_anchor_is_sampled():
    ours, tv = _twin_rpns(sample_everything=True)
    feats, sizes, targets = _inputs()
    ours.train(), tv.train()
    _, losses = ours(feats, sizes, targets, batch_shape=(64, 64))
    _, tv_losses = _tv_call(tv, feats, sizes, targets)
    for key in ("loss_objectness", "loss_rpn_box_reg"):
        assert losses[key] == pytest.approx(float(tv_losses[key]), rel=1e-5)


def test_rpn_head_gradients_match_torch_autograd():
    ours, tv = _twin_rpns(sample_everything=True)
    feats, sizes, targets = _inputs()
    ours.train(), tv.train()
    ours(feats, sizes, targets, batch_shape=(64, 64))
    ours.zero_grad()
    grad_feats = ours.backward()

    images = ImageList(torch.zeros(2, 3, 64, 64), sizes)
    tensors = [t(f).requires_grad_(True) for f in feats]
    features = OrderedDict((str(i), x) for i, x in enumerate(tensors))
    _, tv_losses = tv(images, features, [{"boxes": t(x["boxes"])} for x in targets])
    (tv_losses["loss_objectness"] + tv_losses["loss_rpn_box_reg"]).backward()
    for g, x in zip(grad_feats, tensors):
        np.testing.assert_allclose(g, x.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        ours.head.conv.weight.grad, tv.head.conv[0][0].weight.grad.numpy(), rtol=1e-4, atol=1e-6
    )


def test_batched_nms_with_equal_scores_across_categories():
    # torchvision sorts the merged result with an unstable sort, so equal-score boxes from
    # different categories may be listed in another order; we list them in index order.
    rng = np.random.default_rng(9)
    boxes, scores = clustered_boxes(rng, 2500)
    scores = np.round(scores * 50) / 50
    idxs = rng.integers(0, 5, 2500)
    ours = batched_nms(boxes, scores, idxs, 0.5)
    theirs = tv_boxes.batched_nms(t(boxes), t(scores), t(idxs), 0.5).numpy()
    assert set(ours.tolist()) == set(theirs.tolist())
    np.testing.assert_array_equal(scores[ours], scores[theirs])
    for s in np.unique(scores[ours]):
        tied = ours[scores[ours] == s]
        assert np.all(np.diff(tied) > 0)
