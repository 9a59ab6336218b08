"""RPN: head shapes and layout, softmax = sigmoid objectness, losses by hand, float64 gradcheck,
proposal filtering."""

import math

import numpy as np
import pytest

from mrcnn_edu.boxes import BoxCoder, clip_boxes_to_image
from mrcnn_edu.nn.gradcheck import assert_close_grad, numerical_gradient
from mrcnn_edu.nn.losses import binary_cross_entropy_with_logits, softmax_cross_entropy
from mrcnn_edu.rpn import RPN, RPNConfig, RPNHead, _flatten_level, _unflatten_levels

IMAGE = (16, 16)
GT = [{"boxes": np.array([[2.0, 2.0, 10.0, 9.0], [6.0, 4.0, 15.0, 15.0]])}]


def small_config(**kw):
    """Two levels (strides 4 and 8), 3 anchors per position, a 12-anchor sample."""
    base = dict(
        anchor_sizes=((8,), (16,)),
        aspect_ratios=((0.5, 1.0, 2.0),) * 2,
        batch_size_per_image=12,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.3,
        pre_nms_top_n_train=20,
        post_nms_top_n_train=10,
        pre_nms_top_n_test=20,
        post_nms_top_n_test=10,
    )
    base.update(kw)
    return RPNConfig(**base)


def small_features(rng, channels=2, batch=1, dtype=np.float64):
    return [
        rng.standard_normal((batch, channels, 4, 4)).astype(dtype),
        rng.standard_normal((batch, channels, 2, 2)).astype(dtype),
    ]


def randomise(rpn, rng, std=0.3):
    """Replace the 0.01-std init by larger weights so every loss term matters in a gradcheck."""
    for _, p in rpn.named_parameters():
        p.data[...] = rng.normal(0.0, std, p.shape)


def run(rpn, feats, targets=GT, seed=7, **kw):
    rpn.sampler.rng = np.random.default_rng(seed)  # the same sampled anchors on every call
    return rpn(feats, [IMAGE] * feats[0].shape[0], targets, **kw)


# -- head ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_head_output_shapes_per_level(k):
    head = RPNHead(4, 3, logits_per_anchor=k, rng=0)
    feats = [np.zeros((2, 4, 8, 6), np.float32), np.zeros((2, 4, 4, 3), np.float32)]
    logits, deltas = head(feats)
    assert [x.shape for x in logits] == [(2, 3 * k, 8, 6), (2, 3 * k, 4, 3)]
    assert [x.shape for x in deltas] == [(2, 12, 8, 6), (2, 12, 4, 3)]
    assert logits[0].dtype == np.float32


def test_head_init_is_normal_001_with_zero_bias():
    head = RPNHead(64, 3, rng=0)
    assert abs(head.conv.weight.data.std() - 0.01) < 0.001
    assert np.all(head.conv.bias.data == 0) and np.all(head.bbox_pred.bias.data == 0)


def test_flatten_order_is_location_then_anchor_then_logit():
    x = np.random.default_rng(0).standard_normal((2, 3 * 2, 4, 5))  # A=3, k=2
    flat = _flatten_level(x, 3)
    assert flat.shape == (2, 4 * 5 * 3, 2)
    n, y, col, a, c = 1, 2, 3, 1, 1
    assert flat[n, (y * 5 + col) * 3 + a, c] == x[n, a * 2 + c, y, col]
    (back,) = _unflatten_levels(flat, [x], 3)
    np.testing.assert_array_equal(back, x)


# -- softmax and sigmoid objectness are the same model ---------------------------------------------
def test_two_way_softmax_over_zero_and_z_is_the_sigmoid_loss():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 50)
    y = rng.integers(0, 2, 50)
    loss_bce, g_bce = binary_cross_entropy_with_logits(z, y.astype(float))
    loss_ce, g_ce = softmax_cross_entropy(np.stack([np.zeros(50), z], axis=1), y)
    assert loss_ce == pytest.approx(loss_bce, rel=1e-12)
    np.testing.assert_allclose(g_ce[:, 1], g_bce, rtol=1e-10, atol=1e-15)  # same gradient wrt z
    np.testing.assert_allclose(g_ce[:, 0], -g_bce, rtol=1e-10, atol=1e-15)


def test_softmax_rpn_with_zero_background_logit_equals_sigmoid_rpn():
    rng = np.random.default_rng(1)
    sig = RPN(2, small_config(objectness_loss="sigmoid"), rng=0, dtype=np.float64)
    randomise(sig, rng)
    soft = RPN(2, small_config(objectness_loss="softmax"), rng=0, dtype=np.float64)
    for name in ("conv", "bbox_pred"):
        for p in ("weight", "bias"):
            getattr(getattr(soft.head, name), p).data[...] = getattr(
                getattr(sig.head, name), p
            ).data
    soft.head.cls_logits.weight.data[...] = 0
    soft.head.cls_logits.bias.data[...] = 0
    soft.head.cls_logits.weight.data[1::2] = sig.head.cls_logits.weight.data  # channel 2a + 1
    soft.head.cls_logits.bias.data[1::2] = sig.head.cls_logits.bias.data

    feats = small_features(rng)
    props_sig, losses_sig = run(sig, feats)
    props_soft, losses_soft = run(soft, feats)
    for key in losses_sig:
        assert losses_soft[key] == pytest.approx(losses_sig[key], rel=1e-12)
    np.testing.assert_array_equal(props_soft[0], props_sig[0])

    sig.zero_grad(), soft.zero_grad()
    g_feat_sig, g_feat_soft = sig.backward(), soft.backward()
    for a, b in zip(g_feat_sig, g_feat_soft):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-14)
    g_sig, g_soft = sig.head.cls_logits.weight.grad, soft.head.cls_logits.weight.grad
    np.testing.assert_allclose(g_soft[1::2], g_sig, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(g_soft[0::2], -g_sig, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(soft.head.conv.weight.grad, sig.head.conv.weight.grad, rtol=1e-10)


# -- losses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_zero_head_gives_log2_objectness_loss(mode):
    rpn = RPN(2, small_config(objectness_loss=mode), rng=0, dtype=np.float64)
    rpn.zero_grad()
    for _, p in rpn.named_parameters():
        p.data[...] = 0
    _, losses = run(rpn, small_features(np.random.default_rng(0)))
    # every logit is 0: p(object) = 1/2 for every sampled anchor, loss -log(1/2)
    assert losses["loss_objectness"] == pytest.approx(math.log(2), rel=1e-12)


def test_box_loss_is_smooth_l1_on_positives_over_all_sampled_anchors():
    # one GT equal to an anchor, fg threshold 0.99: that anchor is the only positive and its
    # regression target is 0; a constant delta d from the bias gives smooth_l1(d) summed / S
    cfg = small_config(objectness_loss="sigmoid", fg_iou_thresh=0.99, batch_size_per_image=1000)
    rpn = RPN(2, cfg, rng=0, dtype=np.float64)
    for _, p in rpn.named_parameters():
        p.data[...] = 0
    d = np.array([0.05, -0.2, 0.1, 0.0])
    rpn.head.bbox_pred.bias.data[...] = np.tile(d, 3)
    anchors = rpn.anchor_generator(IMAGE, [(4, 4), (2, 2)], np.float64)
    target = [{"boxes": anchors[17:18].copy()}]  # an anchor fully inside the image
    _, losses = run(rpn, small_features(np.random.default_rng(0)), target)

    labels, _ = rpn.assign_targets_to_anchors(anchors, target)
    assert (labels[0] == 1).sum() == 1
    num_sampled = int((labels[0] >= 0).sum())  # batch_size 1000 > 60 anchors: all sampled
    beta = 1 / 9
    per_coord = np.where(np.abs(d) < beta, 0.5 * d**2 / beta, np.abs(d) - 0.5 * beta)
    assert losses["loss_rpn_box_reg"] == pytest.approx(per_coord.sum() / num_sampled, rel=1e-12)


def test_image_without_ground_truth_has_only_negatives():
    rpn = RPN(2, small_config(), rng=0, dtype=np.float64)
    _, losses = run(rpn, small_features(np.random.default_rng(0)), [{"boxes": np.zeros((0, 4))}])
    assert losses["loss_rpn_box_reg"] == 0.0 and losses["loss_objectness"] > 0
    rpn.zero_grad()
    grads = rpn.backward()
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(rpn.head.bbox_pred.weight.grad == 0)  # no positives, no box gradient


def test_assign_targets_labels_and_encoded_targets():
    rpn = RPN(2, small_config(), rng=0)
    anchors = rpn.anchor_generator(IMAGE, [(4, 4), (2, 2)])
    gt = GT[0]["boxes"].astype(np.float32)
    labels, reg = rpn.assign_targets_to_anchors(anchors, [{"boxes": gt}])
    from mrcnn_edu.boxes import box_iou

    best = box_iou(gt, anchors).max(axis=0)
    positive = labels[0] == 1
    assert positive.any() and np.all((best >= 0.5) <= positive)  # >= fg is always positive
    assert np.all(labels[0][best < 0.3][~positive[best < 0.3]] == 0)
    assert np.all(labels[0][(best >= 0.3) & (best < 0.5) & ~positive] == -1)
    # decoding a positive's target from its anchor gives back its GT box
    which = box_iou(gt, anchors).argmax(axis=0)
    back = BoxCoder((1, 1, 1, 1)).decode(reg[0][positive], anchors[positive])
    np.testing.assert_allclose(back, gt[which[positive]], atol=1e-4)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_gradcheck_head_and_losses_float64(mode):
    rng = np.random.default_rng(2)
    rpn = RPN(2, small_config(objectness_loss=mode), rng=0, dtype=np.float64)
    randomise(rpn, rng)
    feats = small_features(rng)

    def total_loss() -> float:
        _, losses = run(rpn, feats)
        return losses["loss_objectness"] + losses["loss_rpn_box_reg"]

    total_loss()
    rpn.zero_grad()
    grad_feats = rpn.backward()
    labels, _ = rpn.assign_targets_to_anchors(rpn.anchor_generator(IMAGE, [(4, 4), (2, 2)]), GT)
    assert (labels[0] >= 0).sum() > 12  # the sampler really subsamples: its seed must be pinned
    for i, (x, g) in enumerate(zip(feats, grad_feats)):
        assert_close_grad(g, numerical_gradient(total_loss, x), name=f"features[{i}]")
    for name, p in rpn.named_parameters():
        assert_close_grad(p.grad, numerical_gradient(total_loss, p.data), name=name)


def test_backward_weights_scale_each_loss():
    rng = np.random.default_rng(3)
    rpn = RPN(2, small_config(), rng=0, dtype=np.float64)
    randomise(rpn, rng)
    feats = small_features(rng)
    run(rpn, feats)
    rpn.zero_grad()
    both = rpn.backward()[0]
    obj_only = rpn.backward(1.0, 0.0)[0]
    box_only = rpn.backward(0.0, 1.0)[0]
    np.testing.assert_allclose(obj_only + box_only, both, rtol=1e-12, atol=1e-15)


def test_backward_without_targets_raises():
    rpn = RPN(2, small_config(), rng=0)
    _, losses = rpn(small_features(np.random.default_rng(0), dtype=np.float32), [IMAGE])
    assert losses == {}
    with pytest.raises(RuntimeError, match="targets"):
        rpn.backward()


# -- proposals -------------------------------------------------------------------------------------
def test_proposals_are_clipped_sorted_and_capped():
    rng = np.random.default_rng(4)
    rpn = RPN(2, small_config(), rng=0)
    randomise(rpn, rng, std=0.5)
    feats = small_features(rng, batch=2, dtype=np.float32)
    rpn.eval()
    props, _ = rpn(feats, [(16, 16), (12, 9)])
    for boxes, scores, (h, w) in zip(props, rpn.proposal_scores, [(16, 16), (12, 9)]):
        assert 0 < len(boxes) <= 10 and boxes.dtype == np.float32
        assert np.all(boxes[:, [0, 2]] <= w) and np.all(boxes[:, [1, 3]] <= h)
        assert np.all(boxes >= 0)
        assert np.all(np.diff(scores) <= 0) and np.all((scores > 0) & (scores < 1))


def test_without_nms_proposals_are_all_decoded_anchors_by_score():
    cfg = small_config(nms_thresh=1.0, pre_nms_top_n_test=1000, post_nms_top_n_test=1000)
    rng = np.random.default_rng(5)
    rpn = RPN(2, cfg, rng=0, dtype=np.float64).eval()
    randomise(rpn, rng, std=0.2)
    feats = small_features(rng)
    props, _ = rpn(feats, [IMAGE])

    logits, deltas = rpn.head(feats)
    flat_logit = np.concatenate([_flatten_level(o, 3) for o in logits], 1)[0]
    flat_delta = np.concatenate([_flatten_level(d, 3) for d in deltas], 1)[0]
    anchors = rpn.anchor_generator(IMAGE, [(4, 4), (2, 2)], np.float64)
    expected = clip_boxes_to_image(BoxCoder((1, 1, 1, 1)).decode(flat_delta, anchors), IMAGE)
    z = flat_logit[:, 1] - flat_logit[:, 0]  # softmax: rank by the object log-odds
    expected = expected[np.argsort(-z, kind="stable")]
    np.testing.assert_array_equal(props[0], expected)


def test_top_n_depends_on_training_mode():
    cfg = small_config(post_nms_top_n_train=5, post_nms_top_n_test=2, nms_thresh=1.0)
    rpn = RPN(2, cfg, rng=0)
    feats = small_features(np.random.default_rng(0), dtype=np.float32)
    assert len(rpn.train()(feats, [IMAGE])[0][0]) == 5
    assert len(rpn.eval()(feats, [IMAGE])[0][0]) == 2


def test_batch_shape_sets_the_anchor_strides():
    rpn = RPN(2, small_config(), rng=0)
    feats = small_features(np.random.default_rng(0), dtype=np.float32)
    rpn(feats, [(15, 13)], batch_shape=(16, 16))  # padded to 16: strides 4 and 8
    assert rpn.anchor_generator.strides((16, 16), [(4, 4), (2, 2)]) == [(4, 4), (8, 8)]
    with pytest.raises(ValueError, match="levels"):
        rpn(feats[:1], [IMAGE])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_sizes=[IMAGE, IMAGE]), "image_sizes"),
        (dict(targets=[]), "targets has 0"),
        (dict(targets=[{"labels": []}]), "'boxes'"),
        (dict(targets=[{"boxes": np.array([[5.0, 5, 1, 1]])}]), "x2 < x1"),
    ],
)
def test_forward_validates_inputs(kwargs, match):
    rpn = RPN(2, small_config(), rng=0)
    feats = small_features(np.random.default_rng(0), dtype=np.float32)
    args = dict(image_sizes=[IMAGE], targets=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rpn(feats, args["image_sizes"], args["targets"])


def test_config_validates():
    with pytest.raises(ValueError, match="objectness_loss"):
        RPNConfig(objectness_loss="focal")
    with pytest.raises(ValueError, match="bg_iou_thresh"):
        RPNConfig(fg_iou_thresh=0.3, bg_iou_thresh=0.7)
