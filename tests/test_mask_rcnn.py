"""The whole model: losses, a float64 gradcheck through every stage, prediction, bad input."""

import numpy as np
import pytest
from helpers import tiny_resnet

from mrcnn_edu.backbone import BackboneConfig
from mrcnn_edu.data.shapes import ShapesDataset
from mrcnn_edu.mask_rcnn import LOSS_NAMES, MaskRCNN, MaskRCNNConfig
from mrcnn_edu.nn.gradcheck import check_params_sampled
from mrcnn_edu.roi_heads import RoIHeadsConfig
from mrcnn_edu.rpn import RPNConfig


def tiny_config(num_classes=2):
    return MaskRCNNConfig(
        num_classes=num_classes,
        backbone=BackboneConfig(
            resnet=tiny_resnet(),
            fpn_channels=4,
        ),
        rpn=RPNConfig(
            anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
            batch_size_per_image=32,
            pre_nms_top_n_train=50,
            post_nms_top_n_train=20,
            pre_nms_top_n_test=50,
            post_nms_top_n_test=20,
        ),
        roi_heads=RoIHeadsConfig(
            batch_size_per_image=16,
            representation_size=8,
            mask_channels=4,
            mask_num_convs=2,
            box_pool_size=3,
            mask_pool_size=4,
            mask_size=8,
        ),
    )


def batch(n=2, size=(64, 64), seed=0, min_objects=1):
    ds = ShapesDataset(
        n,
        image_size=size,
        classes=("circle", "square"),
        seed=seed,
        min_objects=min_objects,
        max_objects=3,
    )
    items = [ds[i] for i in range(n)]
    images = [it["image"] for it in items]
    targets = [{k: it[k] for k in ("boxes", "labels", "masks")} for it in items]
    return images, targets


def test_forward_returns_the_five_losses():
    model = MaskRCNN(tiny_config(), rng=0)
    images, targets = batch()
    losses = model.forward(images, targets)
    assert set(losses) == set(LOSS_NAMES)
    assert all(np.isfinite(v) and v >= 0 for v in losses.values())
    # untrained: objectness near log 2, classifier near log(K+1)
    assert abs(losses["loss_objectness"] - np.log(2)) < 0.1
    assert abs(losses["loss_classifier"] - np.log(3)) < 0.2


def test_whole_model_gradcheck_float64():
    """A few random entries of every parameter of every stage (backbone, FPN, RPN head, box
    head, mask head) against central differences of the total loss. Proposals are held fixed:
    they carry no gradient by design (approximate joint training)."""
    model = MaskRCNN(tiny_config(), rng=0).astype(np.float64)
    rng = np.random.default_rng(5)
    for _, p in model.named_parameters():  # wake up zero-initialised GN scales and biases
        p.data[...] += rng.uniform(-0.05, 0.05, p.shape)
    images, targets = batch()
    images = [im.astype(np.float64) for im in images]
    model.rng = np.random.default_rng(0)
    model.forward(images, targets)
    proposals = model.rpn.forward(
        model.backbone(model.transform(images)[0]), [(64, 64)] * 2, None, (64, 64)
    )[0]

    def total_loss():
        model.rng = np.random.default_rng(0)  # the same sampled anchors and RoIs every time
        return sum(model.forward(images, targets, proposals=proposals).values())

    total_loss()
    model.zero_grad()
    model.backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.any()
    n = check_params_sampled(
        total_loss, model.named_parameters(), num_entries=2, rtol=1e-4, atol=1e-7
    )
    assert n >= 2 * len(model.parameters()) - 5


def test_mask_loss_gradient_reaches_only_gt_class_logit_weights():
    """The 1x1 mask-logit conv has one output channel per class: with every positive RoI of
    class 1, class 2's filter receives exactly zero gradient from the mask loss."""
    model = MaskRCNN(tiny_config(), rng=0)
    images, targets = batch()
    for t in targets:
        t["labels"] = np.ones_like(t["labels"])
    model.forward(images, targets)
    model.zero_grad()
    model.backward()
    g = model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad
    assert np.all(g[1] == 0) and np.any(g[0] != 0)


def test_images_of_different_sizes_and_without_objects():
    model = MaskRCNN(tiny_config(), rng=0)
    a_img, a_tgt = batch(1, (64, 64), seed=1)
    b_img, b_tgt = batch(1, (50, 70), seed=2, min_objects=0)
    b_tgt[0] = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "masks": np.zeros((0, 50, 70), np.uint8),
    }
    losses = model.forward(a_img + b_img, a_tgt + b_tgt)
    assert all(np.isfinite(v) for v in losses.values())
    model.backward()
    batch_arr, sizes = model.transform(a_img + b_img)
    assert batch_arr.shape == (2, 3, 64, 96) and sizes == [(64, 64), (50, 70)]


def test_predict_output_format():
    model = MaskRCNN(tiny_config(), rng=0)
    model.config.roi_heads.score_thresh = 0.0  # untrained: keep low-confidence detections
    images, _ = batch(2, (64, 64))
    preds = model.predict(images)
    assert len(preds) == 2
    for p in preds:
        d = p["boxes"].shape[0]
        assert 0 < d <= model.config.roi_heads.detections_per_img
        assert p["masks"].shape == (d, 64, 64) and p["masks"].dtype == np.uint8
        assert p["labels"].min() >= 1 and p["labels"].max() <= 2
        assert np.all(np.diff(p["scores"]) <= 1e-7)
        assert np.all(p["boxes"][:, 2:] >= p["boxes"][:, :2])
    assert model.training  # predict restores the mode


def test_bad_input_is_named():
    model = MaskRCNN(tiny_config(), rng=0)
    images, targets = batch(1)
    with pytest.raises(ValueError, match="divide uint8"):
        model.forward([(images[0] * 255).astype(np.uint8)], targets)
    with pytest.raises(ValueError, match="divide uint8"):
        model.forward([images[0] * 255], targets)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model.forward([images[0][0]], targets)
    bad = [dict(targets[0], labels=targets[0]["labels"] * 0)]
    with pytest.raises(ValueError, match="0 is background"):
        model.forward(images, bad)
    bad = [dict(targets[0], masks=targets[0]["masks"][:, :10])]
    with pytest.raises(ValueError, match="masks"):
        model.forward(images, bad)
    with pytest.raises(ValueError, match="one target dict per image"):
        model.forward(images, None)
    with pytest.raises(RuntimeError, match="forward first"):
        MaskRCNN(tiny_config(), rng=0).backward()


def test_config_round_trip_and_unknown_keys():
    cfg = MaskRCNNConfig.small(3)
    again = MaskRCNNConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown key.*'nms'"):
        MaskRCNNConfig.from_dict({"rpn": {"nms": 0.5}})
    with pytest.raises(ValueError, match="mask_size"):
        RoIHeadsConfig(mask_size=20)


def test_mask_targets_pasted_back_reproduce_the_gt_masks():
    """Targets (GT mask RoIAligned onto the GT box) pasted back with the inference paste land
    on the original mask: the two use the same pixel-centre convention (no half-pixel shift)."""
    from mrcnn_edu.postprocess import paste_masks_in_image

    model = MaskRCNN(tiny_config(), rng=0)
    model.config.roi_heads.mask_size = 28
    ds = ShapesDataset(6, image_size=(96, 96), seed=3)
    ious = []
    for i in range(len(ds)):
        it = ds[i]
        g = len(it["labels"])
        targets = model.roi_heads.mask_targets([it["boxes"]], [np.arange(g)], [it])
        pasted = paste_masks_in_image(targets, it["boxes"], (96, 96))
        for p, m in zip(pasted.astype(bool), it["masks"].astype(bool)):
            ious.append((p & m).sum() / (p | m).sum())
    assert np.mean(ious) > 0.97 and min(ious) > 0.9
