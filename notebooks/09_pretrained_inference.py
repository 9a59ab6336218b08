# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 9. A full-size Mask R-CNN, one photo through every stage
#
# The earlier chapters train a small model on 128 × 128 shapes. This one runs the model of the
# paper's headline numbers: **ResNet-50-FPN Mask R-CNN** with torchvision's settings
# (`MaskRCNNConfig.resnet50_fpn(num_classes=90)`: FrozenBN, 256-channel FPN, sigmoid RPN
# objectness, images resized so the short side is 800 and the long side at most 1333). Its
# weights can come from torchvision: `mrcnn-edu convert torchvision` reads a `.pth` file with our
# own restricted reader (no torch needed) and writes our weights (`docs/weights.md`).
#
# We take one picture through every stage: the input transform, the ResNet and FPN levels
# (`docs/backbone_fpn.md`), the RPN's objectness and proposals, the pyramid level each RoI is
# pooled from, the box head's detections and the mask head's 28 × 28 masks, pasted back into the
# picture.
#
# **Which weights.** In order of preference:
#
# 1. **Published weights**, if you point `MRCNN_EDU_WEIGHTS` at them (a converted `.npz`, or the
#    torchvision `.pth` itself). This environment has no internet, so get the file elsewhere:
#    torchvision's COCO weights for `maskrcnn_resnet50_fpn` are
#    `https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth` (170 MB, mask
#    AP 34.6 on COCO val2017). Then
#    `mrcnn-edu convert torchvision maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth coco_r50.npz` and
#    start Jupyter with `MRCNN_EDU_WEIGHTS=coco_r50.npz`. With these, the detections below are
#    real ones. (`MRCNN_EDU_PHOTO=your.jpg` walks your own photo through instead of ours.)
# 2. Otherwise, if torch and torchvision are installed, a **randomly initialised torchvision
#    model**, saved with `torch.save` and converted with our reader: its detections are
#    meaningless, but every number we compute can be compared with torchvision's.
# 3. Otherwise our own model with **random weights**: the stages and shapes are the real ones,
#    the detections are noise.
#
# With `MRCNN_EDU_QUICK=1` (the test suite) the picture is resized to a short side of 256
# instead of 800, so that the notebook runs in seconds.

# %%
import dataclasses
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from mrcnn_edu.data import coco_label_names
from mrcnn_edu.data.shapes import ALL_SHAPE_KINDS, ShapesDataset
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.roi_ops import LevelMapper
from mrcnn_edu.train import load_checkpoint_weights
from mrcnn_edu.transform import resize_boxes
from mrcnn_edu.visualize import draw_boxes, draw_instances, show_image
from mrcnn_edu.weights import from_torchvision

QUICK = os.environ.get("MRCNN_EDU_QUICK") == "1"
WEIGHTS = os.environ.get("MRCNN_EDU_WEIGHTS")  # converted .npz (or torchvision .pth), optional
PHOTO = os.environ.get("MRCNN_EDU_PHOTO")  # your own picture, optional
MIN_SIZE, MAX_SIZE = (256, 384) if QUICK else (800, 1333)
RANDOM_DETECTIONS = 10 if QUICK else 100  # detections kept per image with random weights
NAMES = coco_label_names()  # label k (a COCO category id) is NAMES[k - 1]


def torchvision_available():
    try:
        import torchvision.models.detection  # noqa: F401
    except ImportError:
        return False
    return True


# %% [markdown]
# ## The model and its weights
#
# The preset with the resize rule set explicitly (800/1333, or 256/384 in quick mode). A
# torchvision model is converted by writing its state dict to a `.pth` file, exactly as the
# published weights are distributed, and reading that file back with `from_torchvision`.

# %%
config = dataclasses.replace(
    MaskRCNNConfig.resnet50_fpn(num_classes=90), min_size=MIN_SIZE, max_size=MAX_SIZE
)
model = MaskRCNN(config, rng=0)
tv_model = None  # the torchvision model, when we built one
if WEIGHTS:
    if WEIGHTS.endswith((".pth", ".pt")):
        model.load_state_dict(from_torchvision(WEIGHTS))
    else:
        load_checkpoint_weights(model, WEIGHTS)
    SOURCE = f"weights from {WEIGHTS}"
elif torchvision_available():
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    tv_model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE,
        box_score_thresh=0.0, box_detections_per_img=RANDOM_DETECTIONS,
    ).eval()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "maskrcnn_random.pth")
        torch.save(tv_model.state_dict(), path)
        state = from_torchvision(path)  # our reader: torch is not involved from here on
    model.load_state_dict(state)
    SOURCE = f"a random torchvision model, converted ({len(state)} arrays)"
else:
    SOURCE = "our own random initialisation (no torch here and no MRCNN_EDU_WEIGHTS)"
RANDOM = not WEIGHTS
if RANDOM:
    # Random classifiers spread their probability over 91 classes: few pass the usual 0.05.
    # Keep the best candidates whatever their score, so that there is something to look at
    # (only 10 in quick mode: the mask head costs about 0.5 G multiply-adds per detection).
    model.roi_heads.config.score_thresh = 0.0
    model.roi_heads.config.detections_per_img = RANDOM_DETECTIONS
print("weights:", SOURCE)
if RANDOM:
    print("RANDOM WEIGHTS: the class names and scores below mean nothing (see the top cell).")
params = sum(p.data.size for _, p in model.named_parameters())
print(f"{params:,} parameters (FrozenBN statistics included)")

# %% [markdown]
# ## The photo
#
# Nothing is downloaded: our "photo" is a 480 × 640 scene of the synthetic shapes (COCO has no
# circles and triangles, so even real weights find little in it; try `MRCNN_EDU_PHOTO` with a
# photo of people, animals or vehicles).

# %%
if PHOTO:
    from mrcnn_edu.data.images import read_image

    photo = read_image(PHOTO)
else:
    photo = ShapesDataset(
        1, image_size=(480, 640), classes=ALL_SHAPE_KINDS, min_objects=5, max_objects=7, seed=1
    )[0]["image"]
print("photo:", photo.shape, photo.dtype, f"values in [{photo.min():.2f}, {photo.max():.2f}]")

# %% [markdown]
# ## 1. The input transform
#
# `model.transform` does what torchvision's `GeneralizedRCNNTransform` does
# (`docs/conventions.md` §14): normalise each channel with the ImageNet mean and std, resize
# bilinearly by `scale = min(min_size / short side, max_size / long side)`, and pad the batch
# with zeros at the bottom and right to a multiple of 32, the stride of C5. A 480 × 640 photo
# becomes 800 × 1066, padded to 800 × 1088 (256 × 341 → 256 × 352 in quick mode).

# %%
model.eval()
batch, image_sizes = model.transform([photo])
(h, w), (hp, wp) = image_sizes[0], batch.shape[-2:]
print(f"photo {photo.shape[1]}x{photo.shape[2]} -> resized {h}x{w} -> padded batch {batch.shape}")
mean = np.array(config.image_mean, np.float32)[:, None, None]
std = np.array(config.image_std, np.float32)[:, None, None]
inside = batch[0, :, :h, :w]
resized = np.clip(inside * std + mean, 0, 1)  # the resized photo, un-normalised for display
print("per-channel mean / std after normalising:", inside.mean(axis=(1, 2)).round(2),
      inside.std(axis=(1, 2)).round(2))  # fmt: skip

fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
show_image(axes[0], photo, f"as given: {photo.shape[1]} x {photo.shape[2]}")
show_image(axes[1], np.clip(batch[0] * std + mean, 0, 1), f"resized, padded: {hp} x {wp}")
draw_boxes(axes[1], [0, 0, w, h], "red", lw=1, ls="--")
shown = axes[2].imshow(batch[0, 0], cmap="RdBu_r", vmin=-2.5, vmax=2.5)
axes[2].set_title("what the backbone reads: red channel, normalised", fontsize=9)
axes[2].set_axis_off()
fig.colorbar(shown, ax=axes[2], fraction=0.03)
plt.tight_layout()
plt.show()

# %% [markdown]
# The padding is 0 *after* normalising, i.e. the ImageNet mean colour; the red dashes mark the
# resized picture. Every stage below knows each image's own size (`image_sizes`) and clips its
# boxes to it.
#
# ## 2. ResNet and FPN
#
# `ResNetFPN.forward` is `fpn(body(images))`: the ResNet's four stage outputs C2..C5, then the
# FPN's P2..P6 (`docs/backbone_fpn.md` §1–4). We call the two halves separately to see both:

# %%
backbone = model.backbone
c_maps = backbone.body(batch)  # [C2, C3, C4, C5]
features = dict(zip(backbone.level_names, backbone.fpn(c_maps)))  # {"p2": P2, ..., "p6": P6}
print(f"{'map':4s} {'stride':>6s}  shape")
for i, c in enumerate(c_maps):
    print(f"C{i + 2:<3d} {2 ** (i + 2):6d}  {c.shape}")
for name, p in features.items():
    size = np.abs(p).mean()
    print(f"{name.upper():4s} {backbone.strides[name]:6d}  {p.shape}   mean |P| {size:.3f}")

# %% [markdown]
# Four channels of each level, all drawn over the padded image's extent, so that the cells
# grow by 2 × 2 from level to level (we pick each level's four channels with the largest
# variance):

# %%
fig, axes = plt.subplots(5, 4, figsize=(11, 11 * hp / wp * 5 / 4 + 0.6))
for row, (name, p) in zip(axes, features.items()):
    maps = p[0]
    for ax, ch in zip(row, np.argsort(-maps.var(axis=(1, 2)))[:4]):
        ax.imshow(maps[ch], cmap="magma", extent=(0, wp, hp, 0), interpolation="nearest")
        ax.set_title(f"{name.upper()} {maps.shape[1]}x{maps.shape[2]}, channel {ch}", fontsize=8)
        ax.set_axis_off()
plt.tight_layout()
plt.show()

# %% [markdown]
# With random weights these are textures; with trained weights the coarse levels light up on
# whole objects and the fine ones on edges and parts.
#
# When torchvision built the weights, its own backbone can read our normalised batch: the
# converted model must give the same five maps (torchvision names them `"0"`..`"3"` and
# `"pool"`).

# %%
if tv_model is not None:
    with torch.no_grad():
        tv_features = tv_model.backbone(torch.from_numpy(batch))
    for (name, ours), (tv_name, theirs) in zip(features.items(), tv_features.items()):
        theirs = theirs.numpy()
        rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
        print(f"{name} vs torchvision {tv_name!r}: max difference {rel:.1e} of the largest value")
else:
    print("torchvision is not installed: no comparison")

# %% [markdown]
# ## 3. The RPN: objectness per level, proposals
#
# One head, shared by the five levels, predicts for each of the 3 anchors at every cell an
# object logit and four box deltas; level P`k` carries the anchors of size `2^(k+3)` (32 on P2
# up to 512 on P6). `model.rpn` decodes the deltas, keeps the 1000 best logits per level, clips,
# removes duplicates by NMS within each level and keeps the 1000 best overall. Below: the head's
# object probability (the best of the 3 anchors at each cell) on every level.

# %%
rpn = model.rpn
proposals, _ = rpn(features, image_sizes, None, batch_shape=(hp, wp))
objectness, _ = rpn.head(list(features.values()))  # per level (N, A * k, H, W)
num_anchors, k = rpn.head.num_anchors, rpn.config.logits_per_anchor
shapes = [tuple(p.shape[-2:]) for p in features.values()]
counts = rpn.anchor_generator.num_anchors_per_level(shapes)
print("anchors per level:", dict(zip(features, counts)), "total", sum(counts))
print(f"proposals kept: {len(proposals[0])}, best object probabilities:",
      rpn.proposal_scores[0][:5].round(3))  # fmt: skip

fig, axes = plt.subplots(1, 6, figsize=(17, 2.6))
for ax, name, logits in zip(axes, features, objectness):
    n, _, fh, fw = logits.shape
    per_anchor = rpn.object_logit(
        logits.reshape(n, num_anchors, k, fh, fw).transpose(0, 1, 3, 4, 2)
    )  # (N, A, H, W) log-odds of "object"
    prob = 1 / (1 + np.exp(-per_anchor[0].max(axis=0)))
    ax.imshow(prob, cmap="viridis", extent=(0, wp, hp, 0), interpolation="nearest")
    ax.set_title(f"{name.upper()}: max p = {prob.max():.2f}", fontsize=9)
    ax.set_axis_off()
show_image(axes[5], resized, "top 20 proposals")
draw_boxes(axes[5], proposals[0][:20], "yellow", lw=0.8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Which level each RoI is pooled from
#
# The RoI heads read P2..P5 only. `MultiScaleRoIAlign` pools each box from one level, by its
# size (FPN eq. 1, `LevelMapper`): `k = floor(4 + log2(sqrt(w h) / 224))`, clamped to 2..5.
# So boxes below 112 pixels (geometric mean side, in the *resized* image) read the stride-4 P2,
# 112–224 P3, 224–448 P4, larger ones P5.

# %%
mapper = LevelMapper(2, 5)
roi_level = mapper(proposals[0]) + 2  # 2..5
side = np.sqrt(
    (proposals[0][:, 2] - proposals[0][:, 0]) * (proposals[0][:, 3] - proposals[0][:, 1])
)
for lvl in range(2, 6):
    sel = roi_level == lvl
    sizes = f"sqrt(wh) {side[sel].min():6.1f} .. {side[sel].max():6.1f}" if sel.any() else ""
    print(f"P{lvl}: {sel.sum():4d} proposals  {sizes}")

colours = {2: "yellow", 3: "cyan", 4: "magenta", 5: "red"}
fig, ax = plt.subplots(figsize=(6, 6 * h / w))
show_image(ax, resized, "top 60 proposals by level: P2 yellow, P3 cyan, P4 magenta, P5 red")
for box, lvl in zip(proposals[0][:60], roi_level[:60]):
    draw_boxes(ax, box, colours[int(lvl)], lw=1)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. The box head: detections with COCO names
#
# The box branch pools a 7 × 7 grid from each proposal's level, runs two fully connected
# layers of 1024, and scores 91 classes (background + COCO ids 1..90) with one box per class.
# Per-class NMS at 0.5 keeps the best 100 (`docs/heads_and_losses.md` §7). Then the mask branch
# runs on those final boxes: a 14 × 14 pool, four 3×3 convs, a deconvolution to 28 × 28, and the
# predicted class's channel. `model.roi_heads` does both; its answer is in the resized image's
# pixels.

# %%
heads = model.roi_heads
detections, _ = heads(features, proposals, image_sizes)
det = detections[0]
record = heads.box_roi_pool.cache  # the box pooler's record of its last call, if it keeps one
if record is not None:
    same = np.array_equal(record.levels + 2, roi_level)
    print("the box pooler used the levels computed above:", same)
print(f"{len(det['boxes'])} detections (score threshold {heads.config.score_thresh})")
for box, label, score in zip(det["boxes"][:8], det["labels"][:8], det["scores"][:8]):
    print(f"  {NAMES[label - 1]:>14s} {score:.3f}  box {box.round(1)}")
if RANDOM:
    print("(random weights: these names and scores are meaningless)")

# %% [markdown]
# ## 6. Masks: 28 × 28 probabilities, pasted into the photo
#
# Each detection gets the sigmoid of its class's 28 × 28 mask logits. `model.predict` runs
# everything above in one call and maps the result back to the photo as given: the boxes are
# scaled from the resized image to the photo, and each 28 × 28 map is resampled into its box at
# the photo's resolution (`mask_threshold=None` keeps the probabilities; the default
# thresholds them at 0.5).

# %%
shown = min(6, len(det["boxes"]))
fig, axes = plt.subplots(1, max(shown, 1), figsize=(2.2 * max(shown, 1), 2.5), squeeze=False)
for i, ax in enumerate(axes[0][:shown]):
    ax.imshow(det["mask_probs"][i], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"{NAMES[det['labels'][i] - 1]} {det['scores'][i]:.2f}", fontsize=8)
    ax.set_axis_off()
plt.suptitle("the 28 x 28 mask probabilities of the best detections", fontsize=9)
plt.tight_layout()
plt.show()

prediction = model.predict([photo], mask_threshold=None)[0]
photo_size = photo.shape[1:]
print("predict gives the same labels and scores:",
      np.array_equal(prediction["labels"], det["labels"]),
      np.allclose(prediction["scores"], det["scores"]))  # fmt: skip
print(
    "and the boxes scaled to the photo:",
    np.allclose(prediction["boxes"], resize_boxes(det["boxes"], (h, w), photo_size), atol=1e-3),
)
print("pasted masks:", prediction["masks"].shape, prediction["masks"].dtype)

top = slice(0, min(10, len(prediction["boxes"])))
fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
if len(prediction["boxes"]):
    axes[0].imshow(prediction["masks"][0], cmap="viridis", vmin=0, vmax=1,
                   extent=(0, photo_size[1], photo_size[0], 0))  # fmt: skip
    draw_boxes(axes[0], prediction["boxes"][:1], "white")
axes[0].set_title("best detection's mask, pasted (probability)", fontsize=9)
axes[0].set_axis_off()
draw_instances(axes[1], photo, prediction["boxes"][top], prediction["labels"][top],
               prediction["masks"][top], prediction["scores"][top], class_names=NAMES)  # fmt: skip
axes[1].set_title(f"the {top.stop} best detections, masks at 0.5"
                  + (" (random weights: meaningless)" if RANDOM else ""), fontsize=9)  # fmt: skip
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 7. The same numbers as torchvision, stage by stage
#
# With a converted torchvision model we can run torchvision's own stages on the photo — its
# transform, backbone, RPN and RoI heads — and compare each output with ours: the normalised
# batch, the proposals, and the detections with their 28 × 28 mask probabilities (torchvision's
# RoI heads return those before its transform pastes them; the paste rule is in
# `docs/conventions.md` §11).
#
# Random weights make odd proposals: their box deltas are large, and many proposals are
# needles a fraction of a pixel wide. For two such needles a rounding difference of 1e-4 px
# can move their IoU across the NMS threshold of 0.7; if the two lists part at some rank, look
# at the boxes there. The detections come from the best-scored proposals and are compared
# separately.

# %%
if tv_model is not None:
    with torch.no_grad():
        tv_images, _ = tv_model.transform([torch.from_numpy(photo)])
        tv_feats = tv_model.backbone(tv_images.tensors)
        tv_props, _ = tv_model.rpn(tv_images, tv_feats)
        tv_det = tv_model.roi_heads(tv_feats, tv_props, tv_images.image_sizes)[0][0]
    tv_det = {key: value.numpy() for key, value in tv_det.items()}
    tv_props = tv_props[0].numpy()
    print(f"input batch: largest difference {np.abs(tv_images.tensors.numpy() - batch).max():.1e}")
    m = min(len(tv_props), len(proposals[0]))
    apart = np.flatnonzero(np.abs(tv_props[:m] - proposals[0][:m]).max(axis=1) > 1e-2)
    print(f"proposals: {len(tv_props)} from torchvision, {len(proposals[0])} ours; "
          + (f"the first {apart[0]} equal within 0.01 px, then they part:" if len(apart)
             else "all equal within 0.01 px"))  # fmt: skip
    for i in apart[:1]:
        print(f"  rank {i}: torchvision {tv_props[i].round(3)}, ours {proposals[0][i].round(3)}")
    n = min(len(tv_det["boxes"]), len(det["boxes"]))
    gap = {
        "box (px)": np.abs(tv_det["boxes"][:n] - det["boxes"][:n]).max(initial=0),
        "score": np.abs(tv_det["scores"][:n] - det["scores"][:n]).max(initial=0),
        "28 x 28 mask": np.abs(tv_det["masks"][:n, 0] - det["mask_probs"][:n]).max(initial=0),
    }
    print(
        f"detections: {len(tv_det['boxes'])} from torchvision, {len(det['boxes'])} ours; "
        f"same labels: {np.array_equal(tv_det['labels'][:n], det['labels'][:n])}"
    )
    print("largest differences:", ", ".join(f"{key} {value:.1e}" for key, value in gap.items()))
else:
    print("torchvision is not installed: no comparison")

# %% [markdown]
# `docs/backbone_fpn.md` explains the backbone's layers, its parameter counts and cost, and how
# the gradients of the RPN and of both RoI poolers are summed per level and sent back through
# the FPN and the ResNet when the model trains.
