"""Our MaskRCNN against torchvision's ``maskrcnn_resnet50_fpn``, stage by stage (skipped without
torch/torchvision).

One torchvision model with random weights (fixed seed) is made non-trivial where a trained one
is: BatchNorm statistics measured on a calibration batch, random affine parameters, every
BatchNorm frozen (FrozenBatchNorm2d, as in the published model), and each head's output layer
scaled on that batch so that objectness, class scores, box deltas and mask logits spread like a
trained model's (not saturated, not all alike). Its state dict is written with ``torch.save``
and read back by our own reader (``mrcnn_edu.convert.from_torchvision``); both models then see
the same images (a landscape and a portrait one, sizes not multiples of 32, one upsampled and
one downsampled) and must agree:

- backbone/FPN features P2..P6 to 1e-4 of each level's range;
- RPN proposals: the same boxes in the same order, to 1e-3 px (2e-5 of the box's size for
  boxes over 50 px), objectness to 1e-4;
- detections: the same labels in the same order, boxes to 1e-2 px (1e-5 of the size over
  1000 px), scores to 1e-4;
- masks: pasted probabilities to 5e-4, binary masks (> 0.5) with IoU >= 0.999 each.

Both sides compute in float32 with different summation orders, so two entries whose scores lie
within 1e-4 of each other may be ranked either way, and a pixel within 5e-4 of 0.5 may land on
either side; ``compare_ranked`` and ``compare_masks`` allow exactly that and nothing more.

The fast tests run at min_size 320 / max_size 512 with fewer proposals and detections (set on
both models); the slow one at the preset's 800 / 1333 with every other setting as published.
Nothing torchvision prints is stored here: both sides run in the same process.
"""

import dataclasses

import numpy as np
import pytest

from mrcnn_edu.boxes import clip_boxes_to_image
from mrcnn_edu.convert import from_torchvision
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.postprocess import paste_masks_in_image, torchvision_paste_boxes
from mrcnn_edu.transform import to_original_size

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import maskrcnn_resnet50_fpn  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

FEATURE_RTOL = 1e-4  # of the level's largest magnitude
# Box coordinates: (pixels, fraction of the box's longer side), whichever is larger. Through
# ResNet-50 in float32 each side's features are ~5e-6 of their range off a float64 run
# (summation order; ours and torchvision's alike), and a box's error grows with its size:
# torchvision's own float32 proposals are up to 1.6e-3 px off its float64 ones here.
PROPOSAL_TOL = (1e-3, 2e-5)
BOX_TOL = (1e-2, 1e-5)
SCORE_ATOL = 1e-4
MASK_PROB_ATOL = 5e-4
MASK_MIN_IOU = 0.999
# The spread each head's output layer is scaled to (std over a calibration batch), as in a
# trained model: objectness logits neither saturated nor all alike, class logits giving top
# scores of 0.6-0.99 (centred per class, so that no class wins everywhere), box deltas well
# inside the decoder's clamp, mask logits with both sides of 0.5.
HEAD_SPREAD = {
    "rpn.head.cls_logits": 2.5,
    "rpn.head.bbox_pred": 0.2,
    "roi_heads.box_predictor.cls_score": 3.5,
    "roi_heads.box_predictor.bbox_pred": 0.6,
    "roi_heads.mask_predictor.mask_fcn_logits": 4.0,
    "roi_heads.keypoint_predictor.kps_score_lowres": 3.0,  # keypointrcnn_resnet50_fpn only
}


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's generic bilinear kernel (docs/conventions.md section 14)
    yield
    torch.set_num_threads(threads)


# -- the two models ----------------------------------------------------------------------------
def torchvision_model(seed: int = 0, builder=maskrcnn_resnet50_fpn, **settings):
    """``builder(weights=None, weights_backbone=None, **settings)`` (``maskrcnn_resnet50_fpn``
    or ``keypointrcnn_resnet50_fpn``), in eval mode, with BN statistics measured on a
    calibration batch, random BN affine parameters, every BatchNorm2d frozen
    (FrozenBatchNorm2d, as in the published model), heads scaled to HEAD_SPREAD on the same
    batch."""
    torch.manual_seed(seed)
    model = builder(weights=None, weights_backbone=None, **settings)
    gen = torch.Generator().manual_seed(seed + 1)
    mean = torch.tensor(model.transform.image_mean)[:, None, None]
    std = torch.tensor(model.transform.image_std)[:, None, None]
    batch = (torch.from_numpy(np.stack(make_images([(224, 288)] * 2, seed + 10))) - mean) / std
    body = model.backbone.body
    for m in body.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one batch sets the statistics
            m.reset_running_stats()
    with torch.no_grad():
        body.train()
        body(batch)
        for m in body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
        _freeze_batch_norms(body)
        model.eval()
        _spread_heads(model, batch, gen)
    return model


def _spread_heads(model, batch, gen) -> None:
    """Scale each output layer of HEAD_SPREAD (weight and bias, so its output scales) to its
    spread on ``batch``, pooling 64 random boxes per image for the RoI heads."""
    layers = dict(model.named_modules())
    features = model.backbone(batch)
    objectness, deltas = model.rpn.head(list(features.values()))
    outputs = {
        "rpn.head.cls_logits": torch.cat([o.flatten() for o in objectness]),
        "rpn.head.bbox_pred": torch.cat([d.flatten() for d in deltas]),
    }
    sizes = [tuple(batch.shape[-2:])] * len(batch)
    corners = torch.rand(len(batch), 64, 2, 2, generator=gen) * torch.tensor(sizes[0][::-1])
    boxes = [torch.cat([c.min(1).values, c.max(1).values], 1) for c in corners]
    heads = model.roi_heads
    rep = heads.box_head(heads.box_roi_pool(features, boxes, sizes))
    logits = heads.box_predictor.cls_score(rep)
    heads.box_predictor.cls_score.bias -= logits.mean(0)  # no class ahead on average
    outputs["roi_heads.box_predictor.cls_score"] = logits - logits.mean(0)
    outputs["roi_heads.box_predictor.bbox_pred"] = heads.box_predictor.bbox_pred(rep)
    for kind, count in (("mask", 64), ("keypoint", 16)):  # the branches this model has
        if getattr(heads, f"{kind}_predictor", None) is not None:
            # (the keypoint head, 8 convs of 512 channels, measured on fewer boxes)
            pooled = getattr(heads, f"{kind}_roi_pool")(features, [b[:count] for b in boxes], sizes)
            out = getattr(heads, f"{kind}_predictor")(getattr(heads, f"{kind}_head")(pooled))
            name = next(k for k in HEAD_SPREAD if k.startswith(f"roi_heads.{kind}_"))
            outputs[name] = out
    for name, spread in HEAD_SPREAD.items():
        if name not in outputs:
            continue
        factor = spread / float(outputs[name].std())
        layers[name].weight.mul_(factor)
        layers[name].bias.mul_(factor)


def _freeze_batch_norms(module) -> None:
    """Every BatchNorm2d below ``module`` replaced by a FrozenBatchNorm2d with its four arrays,
    as torchvision builds the model it publishes weights for."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key))
            setattr(module, name, frozen)
        else:
            _freeze_batch_norms(child)


def settings(min_size, max_size, post_nms_top_n, score_thresh, detections) -> tuple[dict, object]:
    """The same settings for both: torchvision's keyword arguments and our config (the
    ``resnet50_fpn`` preset, everything else as published)."""
    tv_kwargs = dict(
        min_size=min_size,
        max_size=max_size,
        rpn_post_nms_top_n_test=post_nms_top_n,
        box_score_thresh=score_thresh,
        box_detections_per_img=detections,
    )
    base = MaskRCNNConfig.resnet50_fpn(num_classes=90)
    config = dataclasses.replace(
        base,
        min_size=min_size,
        max_size=max_size,
        rpn=dataclasses.replace(base.rpn, post_nms_top_n_test=post_nms_top_n),
        roi_heads=dataclasses.replace(
            base.roi_heads, score_thresh=score_thresh, detections_per_img=detections
        ),
    )
    return tv_kwargs, config


def converted(tv_model, directory, config) -> MaskRCNN:
    """Our model with ``tv_model``'s weights, through a ``.pth`` file and our reader."""
    path = directory / "maskrcnn.pth"
    torch.save(tv_model.state_dict(), path)
    model = MaskRCNN(config, rng=0)
    model.load_state_dict(from_torchvision(path, config))
    return model


def make_images(sizes=((241, 347), (530, 371)), seed: int = 0) -> list:
    """Smooth colour waves, a few flat rectangles and noise, in [0, 1], float32."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        im = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)]) * 0.4 + 0.5
        for _ in range(4):
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            im[:, y0 : y0 + h // 4, x0 : x0 + w // 3] = rng.random((3, 1, 1))
        images.append(np.clip(im + rng.uniform(-0.1, 0.1, im.shape), 0, 1).astype(np.float32))
    return images


def record(obj, method: str, store: dict, key: str) -> None:
    """Keep what ``obj.method(...)`` returns in ``store[key]``, until ``del obj.method``."""
    call = getattr(obj, method)

    def recorded(*args, **kwargs):
        store[key] = out = call(*args, **kwargs)
        return out

    setattr(obj, method, recorded)


def run_both(tv_model, model, images) -> tuple[dict, dict]:
    """Both models on ``images``: ``{"features": [P2..P6], "proposals": [{"boxes", "scores"}
    per image], "detections": [{"boxes", "labels", "scores", "masks"} per image]}`` each."""
    theirs, ours = {}, {}
    record(tv_model.backbone, "forward", theirs, "features")
    record(tv_model.rpn, "filter_proposals", theirs, "proposals")
    with torch.no_grad():
        out = tv_model([torch.from_numpy(im) for im in images])
    del tv_model.backbone.forward, tv_model.rpn.filter_proposals
    record(model.backbone, "forward", ours, "features")
    record(model.rpn, "filter_proposals", ours, "proposals")
    ours["detections"] = model.predict(images, mask_threshold=None)
    del model.backbone.forward, model.rpn.filter_proposals
    for side in (ours, theirs):
        side["features"] = [np.asarray(f) for f in side["features"].values()]
        side["proposals"] = [
            {"boxes": np.asarray(b), "scores": np.asarray(s)} for b, s in zip(*side["proposals"])
        ]
    theirs["detections"] = [{k: v.numpy() for k, v in d.items()} for d in out]
    return ours, theirs


# -- the comparisons: each asserts its tolerances and returns what it measured ------------------
def compare_features(ours, theirs) -> float:
    """P2..P6: largest |difference| over the level's largest |value|."""
    assert len(ours) == len(theirs) == 5
    worst = 0.0
    for level, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"P{level + 2}: {a.shape} vs torchvision's {b.shape}"
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        assert rel <= FEATURE_RTOL, f"P{level + 2} differs by {rel:.2e} of its largest value"
        worst = max(worst, rel)
    return worst


def pair_up(ours: dict, theirs: dict, box_tol: tuple):
    """Each of our entries (``boxes``, optional ``labels``) paired with the first unpaired one
    of theirs with the same label and a box within ``box_tol`` (pixels, fraction of the longer
    side). Returns (our indices, their indices) of the pairs and the unpaired indices of each
    side."""
    labels = [d.get("labels", np.zeros(len(d["boxes"]), np.int64)) for d in (ours, theirs)]
    free = np.ones(len(labels[1]), bool)
    sides = theirs["boxes"][:, 2:] - theirs["boxes"][:, :2]
    tolerance = np.maximum(box_tol[0], box_tol[1] * sides.max(axis=1, initial=0))
    mine, tv = [], []
    for i, (box, label) in enumerate(zip(ours["boxes"], labels[0])):
        near = np.abs(theirs["boxes"] - box).max(axis=1) <= tolerance
        found = np.flatnonzero(near & (labels[1] == label) & free)
        if found.size:
            mine.append(i)
            tv.append(int(found[0]))
            free[found[0]] = False
    mine, tv = np.array(mine, np.int64), np.array(tv, np.int64)
    return mine, tv, np.setdiff1d(np.arange(len(labels[0])), mine), np.flatnonzero(free)


def compare_ranked(ours: dict, theirs: dict, box_tol: tuple) -> dict:
    """Two ranked lists of one image (``boxes``, ``scores``, optional ``labels``): the same
    entries (same label, boxes to ``box_tol``, scores to SCORE_ATOL) in the same order.

    Scores agree only to rounding, so two entries whose scores lie within SCORE_ATOL of each
    other may come in either order (an "exchange"), and an entry within SCORE_ATOL of the
    last one kept may be in one list only (cut by a top-n or a threshold). Anything else
    fails. Returns the largest box and score differences, the exchanges and the cuts."""
    mine, tv, our_lonely, tv_lonely = pair_up(ours, theirs, box_tol)
    a_scores, b_scores = ours["scores"], theirs["scores"]
    cut = min(a_scores.min(initial=np.inf), b_scores.min(initial=np.inf))
    for side, scores in (("ours", a_scores[our_lonely]), ("torchvision", b_scores[tv_lonely])):
        assert np.all(scores <= cut + SCORE_ATOL), (
            f"{len(scores)} entries of {side} have no counterpart, scores {scores[:5]}"
        )
    score = float(np.abs(a_scores[mine] - b_scores[tv]).max(initial=0))
    assert score <= SCORE_ATOL, f"scores differ by up to {score:.3g}"
    swapped = np.argwhere(np.triu(tv[:, None] > tv[None, :]))  # i < k paired with tv[i] > tv[k]
    gaps = np.abs(b_scores[tv[swapped[:, 0]]] - b_scores[tv[swapped[:, 1]]])
    assert np.all(gaps <= SCORE_ATOL), f"entries {gaps.max(initial=0):.3g} apart in score swapped"
    diff = np.abs(ours["boxes"][mine] - theirs["boxes"][tv]).max(axis=1, initial=0)
    sides = (theirs["boxes"][tv, 2:] - theirs["boxes"][tv, :2]).max(axis=1, initial=0)
    return {
        "box": float(diff.max(initial=0)),
        "box_of_tolerance": float(
            (diff / np.maximum(box_tol[0], box_tol[1] * sides)).max(initial=0)
        ),
        "score": score,
        "exchanged": len(swapped),
        "cut": len(our_lonely) + len(tv_lonely),
    }


def compare_proposals(ours, theirs) -> list[dict]:
    """Per image: the same proposals in the same order, boxes to PROPOSAL_TOL."""
    return [compare_ranked(a, b, PROPOSAL_TOL) for a, b in zip(ours, theirs, strict=True)]


def compare_detections(ours, theirs) -> list[dict]:
    """Per image: the same labels in the same order, boxes to BOX_TOL."""
    return [compare_ranked(a, b, BOX_TOL) for a, b in zip(ours, theirs, strict=True)]


def mask_ious(on, tv_on, counted):
    """IoU of each pair of binary masks (D, H, W) over the ``counted`` pixels."""
    union = (counted & (on | tv_on)).sum(axis=(1, 2))
    return np.where(union > 0, (counted & on & tv_on).sum(axis=(1, 2)) / np.maximum(union, 1), 1)


def compare_masks(ours, theirs) -> dict:
    """For detections that match (compare_ranked), the pasted probabilities agree to
    MASK_PROB_ATOL, and each binary mask (> 0.5) has IoU >= MASK_MIN_IOU with torchvision's
    once the pixels within MASK_PROB_ATOL of 0.5 are set aside: rounding may put those on
    either side (a single one costs a 100-pixel mask 1 % of IoU). Returns the largest
    probability difference, the number of pixels that flipped, and the smallest IoU counting
    every pixel."""
    prob, flipped, strict = 0.0, 0, 1.0
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        compare_ranked(a, b, BOX_TOL)  # the detections themselves match
        mine, tv, _, _ = pair_up(a, b, BOX_TOL)
        p, q = a["masks"][mine], b["masks"][tv, 0]
        assert p.shape == q.shape, f"image {i}: masks {p.shape} vs torchvision's {q.shape}"
        prob = max(prob, float(np.abs(p - q).max(initial=0)))
        assert prob <= MASK_PROB_ATOL, f"image {i}: mask probabilities differ by {prob:.3g}"
        on, tv_on = p > 0.5, q > 0.5
        iou = mask_ious(on, tv_on, np.abs(q - 0.5) > MASK_PROB_ATOL).min(initial=1)
        assert iou >= MASK_MIN_IOU, f"image {i}: mask IoU {iou:.5f}"
        flipped += int((on != tv_on).sum())
        strict = min(strict, float(mask_ious(on, tv_on, np.ones_like(on)).min(initial=1)))
    return {"prob": prob, "flipped": flipped, "strict_iou": strict}


def assert_not_trivial(theirs, detections: int) -> None:
    """The comparison has something to compare: full detection lists, masks with pixels."""
    for det in theirs["detections"]:
        assert len(det["labels"]) == detections
        assert len(np.unique(det["labels"])) > 1
        assert np.median((det["masks"] > 0.5).sum(axis=(1, 2, 3))) > 100


# -- the paste alone ----------------------------------------------------------------------------
def test_mask_paste_matches_torchvision_paste_masks_in_image():
    """``mode="torchvision"`` against torchvision's own function: boxes inside, across the
    border, tiny and larger than the image. torch resizes small outputs (height + width <= 128)
    with its channels-last kernel, whose sums round differently from the generic one we
    reproduce, so probabilities agree to a few float32 ulp there, bit for bit elsewhere."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

    rng = np.random.default_rng(3)
    masks = 1 / (1 + np.exp(-rng.normal(0, 3, (40, 28, 28)))).astype(np.float32)
    xy = rng.uniform(-30, 160, (40, 2))
    wh = np.exp(rng.uniform(np.log(0.5), np.log(300), (40, 2)))
    # clipped to the image like every detection (torchvision's paste fails on boxes outside)
    boxes = clip_boxes_to_image(np.concatenate([xy, xy + wh], axis=1), (130, 170))
    boxes = boxes[(boxes[:, 2:] - boxes[:, :2]).min(axis=1) > 0.01].astype(np.float32)
    masks = masks[: len(boxes)]
    ours = paste_masks_in_image(masks, boxes, (130, 170), None, mode="torchvision")
    theirs = tv_paste(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (130, 170))
    theirs = theirs[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    grown = torchvision_paste_boxes(boxes, 28)
    large = np.flatnonzero((grown[:, 2:] - grown[:, :2] + 1).sum(axis=1) > 128)
    assert large.size >= 5
    np.testing.assert_array_equal(ours[large], theirs[large])
    np.testing.assert_array_equal(ours > 0.5, theirs > 0.5)


# -- at a small size: the stages one by one -----------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tv_kwargs, config = settings(320, 512, post_nms_top_n=300, score_thresh=0.01, detections=20)
        tv_model = torchvision_model(**tv_kwargs)
        model = converted(tv_model, tmp_path_factory.mktemp("parity"), config)
        images = make_images()
        ours, theirs = run_both(tv_model, model, images)
    finally:
        torch.set_num_threads(threads)
    return {"model": model, "images": images, "ours": ours, "theirs": theirs}


def test_backbone_and_fpn_features_match(small):
    compare_features(small["ours"]["features"], small["theirs"]["features"])


def test_rpn_proposals_match_box_for_box_in_order(small):
    assert min(len(p["boxes"]) for p in small["theirs"]["proposals"]) >= 100
    compare_proposals(small["ours"]["proposals"], small["theirs"]["proposals"])


def test_detections_match(small):
    assert_not_trivial(small["theirs"], detections=20)
    compare_detections(small["ours"]["detections"], small["theirs"]["detections"])


def test_masks_match(small):
    compare_masks(small["ours"]["detections"], small["theirs"]["detections"])


def test_the_comparisons_catch_a_small_difference(small):
    """A slightly different RPN NMS threshold, and two of the classes found swapped in the
    converted box classifier, each make the comparison fail (the stages rerun on the recorded
    features)."""
    model, ours, theirs = small["model"], small["ours"], small["theirs"]
    inputs = model._inputs(small["images"])
    features = dict(zip(model.backbone.level_names, ours["features"]))
    rpn_config = model.rpn.config
    model.rpn.config = dataclasses.replace(rpn_config, nms_thresh=0.69)
    try:
        boxes, _ = model.rpn(features, inputs.image_sizes, None, inputs.batch.shape[-2:])
    finally:
        model.rpn.config = rpn_config
    proposals = [{"boxes": b, "scores": s} for b, s in zip(boxes, model.rpn.proposal_scores)]
    with pytest.raises(AssertionError):
        compare_proposals(proposals, theirs["proposals"])

    cls_score = model.roi_heads.box_predictor.cls_score
    saved = cls_score.weight.data.copy(), cls_score.bias.data.copy()
    labels = theirs["detections"][0]["labels"]
    swap = [labels[0], next(k for k in labels if k != labels[0])]  # two classes found
    for p in (cls_score.weight.data, cls_score.bias.data):
        p[swap] = p[swap[::-1]]
    try:
        proposals = [p["boxes"] for p in ours["proposals"]]
        detections, _ = model.roi_heads(features, proposals, inputs.image_sizes)
    finally:
        cls_score.weight.data[...], cls_score.bias.data[...] = saved
    detections = to_original_size(
        detections, inputs.image_sizes, inputs.original_sizes, None, "torchvision"
    )
    with pytest.raises(AssertionError):
        compare_detections(detections, theirs["detections"])


# -- at the published size -----------------------------------------------------------------------
@pytest.mark.slow
def test_the_published_settings_match_at_800_1333(tmp_path):
    """One 427 x 640 photo-sized image resized to 800 x 1199 (padded 800 x 1216: P6 has 13
    rows, an odd multiple of 32, so its anchors step 61 pixels), 1000 proposals, score 0.05,
    100 detections: every stage as above."""
    tv_kwargs, config = settings(800, 1333, post_nms_top_n=1000, score_thresh=0.05, detections=100)
    tv_model = torchvision_model(seed=1, **tv_kwargs)
    model = converted(tv_model, tmp_path, config)
    assert (model.config.rpn, model.config.roi_heads) == (
        MaskRCNNConfig.resnet50_fpn(90).rpn,
        MaskRCNNConfig.resnet50_fpn(90).roi_heads,
    )
    ours, theirs = run_both(tv_model, model, make_images([(427, 640)], seed=1))
    assert_not_trivial(theirs, detections=100)
    compare_features(ours["features"], theirs["features"])
    compare_proposals(ours["proposals"], theirs["proposals"])
    compare_detections(ours["detections"], theirs["detections"])
    compare_masks(ours["detections"], theirs["detections"])
