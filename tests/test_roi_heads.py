"""RoIHeads, the second stage as one module: sampling, the box and mask branches, their losses,
the feature gradients it hands back to the backbone, and the inference path."""

import numpy as np
import pytest

from mrcnn_edu.config_checks import ConfigError
from mrcnn_edu.mask_rcnn import MaskRCNN
from mrcnn_edu.roi_heads import RoIHeads, RoIHeadsConfig, maskrcnn_loss

LEVELS = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
IMAGE = (64, 64)


def small_heads(dtype=np.float64, **overrides):
    cfg = dict(
        batch_size_per_image=12,
        representation_size=6,
        mask_channels=3,
        mask_num_convs=1,
        box_pool_size=3,
        mask_pool_size=4,
        mask_size=8,
        score_thresh=0.0,
    )
    cfg.update(overrides)
    heads = RoIHeads(2, 2, RoIHeadsConfig(**cfg), list(LEVELS), list(LEVELS.values()), rng=0)
    return heads.astype(dtype)


def features(rng, n=1, c=2, dtype=np.float64):
    return {
        name: rng.standard_normal((n, c, IMAGE[0] // s, IMAGE[1] // s)).astype(dtype)
        for name, s in LEVELS.items()
    }


def one_target(dtype=np.float64):
    masks = np.zeros((2, *IMAGE), np.uint8)
    masks[0, 8:30, 10:40] = 1
    masks[1, 30:60, 20:50] = 1
    boxes = np.array([[10, 8, 40, 30], [20, 30, 50, 60]], dtype)
    return {"boxes": boxes, "labels": np.array([1, 2]), "masks": masks}


def proposals_near(target, rng, count=10):
    """Jittered copies of the GT boxes: a mix of positive and negative RoIs."""
    gt = target["boxes"][rng.integers(0, len(target["boxes"]), count)]
    props = gt + rng.uniform(-12, 12, gt.shape)
    props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 2)
    return np.clip(props, 0, IMAGE[0])


def test_training_forward_gives_the_three_losses_and_backward_the_pooled_levels():
    rng = np.random.default_rng(0)
    heads, feats, target = small_heads(), features(rng), one_target()
    detections, losses = heads(feats, [proposals_near(target, rng)], [IMAGE], [target])
    assert detections == []
    assert list(losses) == ["loss_classifier", "loss_box_reg", "loss_mask"]
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    grads = heads.backward()
    assert list(grads) == list(LEVELS)
    for name, g in grads.items():
        assert g.shape == feats[name].shape
    with pytest.raises(RuntimeError, match="training forward"):
        heads.backward()  # the gradients were handed out once


@pytest.mark.parametrize("mask_cap", [None, 1])
def test_feature_gradients_match_finite_differences(mask_cap):
    """``backward()`` returns d(classifier + box + mask loss)/d(features) of every pooled level,
    the mask and box branches summed (same sampled RoIs on every evaluation). A small and a
    large object put RoIs on P2 and on P3; no RoI reaches P4 or P5, whose gradient is zero.
    With ``mask_positives_per_image`` = 1 the mask branch trains on one positive RoI."""
    rng = np.random.default_rng(1)
    size = (128, 128)
    heads = small_heads(mask_positives_per_image=mask_cap)
    feats = {
        name: rng.standard_normal((1, 2, size[0] // s, size[1] // s)) for name, s in LEVELS.items()
    }
    masks = np.zeros((2, *size), np.uint8)
    masks[0, 10:30, 12:34] = 1
    masks[1, 4:124, 6:120] = 1
    target = {
        "boxes": np.array([[12.0, 10, 34, 30], [6, 4, 120, 124]]),
        "labels": np.array([1, 2]),
        "masks": masks,
    }
    props = [target["boxes"] + rng.uniform(-3, 3, (2, 4)) for _ in range(4)]
    props = [np.clip(np.concatenate(props), 0, 128)]

    def loss():
        heads.fg_bg_sampler.rng = np.random.default_rng(7)
        return sum(heads(feats, props, [size], [target])[1].values())

    loss()
    grads = heads.backward()
    assert not grads["p4"].any() and not grads["p5"].any()
    for name in ("p2", "p3"):
        g, x = grads[name].reshape(-1), feats[name].reshape(-1)
        largest = np.argsort(-np.abs(g))[:4]
        assert np.abs(g[largest]).min() > 0
        for k in [*largest, *rng.choice(x.size, 4, replace=False)]:
            old = x[k]
            x[k] = old + 1e-6
            up = loss()
            x[k] = old - 1e-6
            down = loss()
            x[k] = old
            np.testing.assert_allclose(g[k], (up - down) / 2e-6, rtol=1e-5, atol=1e-8)


def test_sampling_keeps_gt_boxes_and_caps_positives():
    rng = np.random.default_rng(2)
    heads, target = small_heads(), one_target()
    sampled = heads.select_training_samples([proposals_near(target, rng, 40)], [target])
    labels, rois = sampled.labels[0], sampled.rois[0]
    assert len(labels) <= 12 and (labels > 0).sum() <= 3  # 25% of 12
    assert set(np.unique(labels)) <= {0, 1, 2}
    # every positive's regression target decodes back to its matched GT box
    pos = labels > 0
    decoded = heads.box_coder.decode(sampled.regression_targets[0][pos], rois[pos])
    np.testing.assert_allclose(decoded, target["boxes"][sampled.matched_idxs[0][pos]], atol=1e-6)


def test_mask_branch_trains_on_a_random_subset_of_positives_when_capped():
    """``mask_positives_per_image`` = 2: the mask loss is the BCE of 2 of the sampled positive
    RoIs of each image, drawn at random (another generator state, other RoIs), while the box
    branch still sees every sampled RoI."""
    rng = np.random.default_rng(5)
    target = one_target()
    props = [proposals_near(target, rng, 60), proposals_near(target, rng, 60)]
    feats = features(rng, n=2)
    heads = small_heads(batch_size_per_image=40, mask_positives_per_image=2)
    seen = []
    real_targets = heads.mask_targets

    def spy(pos_rois, pos_matched, targets):
        seen.append((pos_rois, pos_matched))
        return real_targets(pos_rois, pos_matched, targets)

    heads.mask_targets = spy
    chosen = []
    for seed in (0, 1):
        heads.fg_bg_sampler.rng = np.random.default_rng(seed)
        sampled = heads.select_training_samples(props, [target, target])
        heads.fg_bg_sampler.rng = np.random.default_rng(seed)
        _, losses = heads(feats, props, [IMAGE, IMAGE], [target, target])
        pos_rois, pos_matched = seen[-1]
        for i in range(2):
            positives = sampled.rois[i][sampled.labels[i] > 0]
            assert len(positives) > 2 and len(pos_rois[i]) == 2
            # each chosen RoI is one of this image's sampled positives
            assert all((np.abs(positives - r).max(axis=1) == 0).any() for r in pos_rois[i])
        logits = heads.mask_predictor(
            heads.mask_head(heads.mask_roi_pool(feats, pos_rois, [IMAGE] * 2))
        )
        labels = np.concatenate([target["labels"][m] for m in pos_matched])
        expected, _ = maskrcnn_loss(
            logits, labels, real_targets(pos_rois, pos_matched, [target] * 2)
        )
        np.testing.assert_allclose(losses["loss_mask"], expected, rtol=1e-12)
        chosen.append(np.concatenate(pos_rois))
    assert not np.array_equal(chosen[0], chosen[1])


def test_mask_positives_cap_must_be_positive():
    with pytest.raises(ConfigError, match="mask_positives_per_image"):
        RoIHeadsConfig(mask_positives_per_image=0)


def test_inference_gives_mask_probabilities_of_the_predicted_class():
    rng = np.random.default_rng(3)
    heads, feats, target = small_heads().eval(), features(rng), one_target()
    detections, losses = heads(feats, [proposals_near(target, rng)], [IMAGE])
    assert losses == {}
    (det,) = detections
    d = len(det["boxes"])
    assert d > 0 and det["mask_probs"].shape == (d, 8, 8)
    assert np.all((det["mask_probs"] > 0) & (det["mask_probs"] < 1))
    assert np.all((det["labels"] >= 1) & (det["labels"] <= 2))
    assert np.all(np.diff(det["scores"]) <= 0)  # best first


def test_pooler_refuses_levels_that_contradict_the_declared_strides():
    rng = np.random.default_rng(4)
    heads, target = small_heads(), one_target()
    feats = features(rng)
    feats["p3"] = feats["p4"]  # a 4x4 map where the stride-8 level (8x8) belongs
    with pytest.raises(ValueError, match="p3"):
        heads(feats, [proposals_near(target, rng)], [IMAGE], [target])


def test_checkpoints_from_before_roi_heads_still_load():
    """Runs saved when the heads were attributes of MaskRCNN (``box_head.fc6.weight``) keep
    loading: their keys are mapped to ``roi_heads.box_head.fc6.weight``."""
    from mrcnn_edu.mask_rcnn import MaskRCNNConfig

    cfg = MaskRCNNConfig.small(3)
    saved = {k: v + 1 for k, v in MaskRCNN(cfg, rng=0).state_dict().items()}
    legacy = {k.removeprefix("roi_heads."): v for k, v in saved.items()}
    assert "box_head.fc6.weight" in legacy
    model = MaskRCNN(cfg, rng=1)
    model.load_state_dict(legacy)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, saved[k])
