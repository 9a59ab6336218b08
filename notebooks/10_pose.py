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
# # 10. Human pose: keypoints as one-hot masks
#
# The last section of the Mask R-CNN paper estimates human pose with the mask framework: each of
# the K keypoints of a person is a **one-hot m × m mask** over the person's RoI, the keypoint
# branch predicts K heatmaps of 56 × 56 logits per RoI, and the loss is a softmax cross-entropy
# over the 56² locations of each labelled keypoint. This notebook shows
#
# 1. the synthetic stick figures the pose demo trains on, with COCO's keypoint visibility;
# 2. the targets: where each keypoint falls on its RoI's grid, and which keypoints give no loss;
# 3. why the loss is a softmax over locations;
# 4. a trained model's heatmaps;
# 5. its skeletons, and OKS, the similarity keypoint AP is built on.
#
# The chapter is `docs/keypoints.md`; the code is `mrcnn_edu/keypoints.py` (targets, loss,
# decoding), `mrcnn_edu/data/pose.py` (the figures) and `mrcnn_edu/evaluate_keypoints.py`.

# %%
import os
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np

from mrcnn_edu.boxes import box_iou
from mrcnn_edu.data.pose import KEYPOINT_NAMES, SKELETON, PoseDataset
from mrcnn_edu.evaluate import predictions_to_coco_results
from mrcnn_edu.evaluate_keypoints import evaluate_keypoints, object_keypoint_similarity
from mrcnn_edu.keypoints import keypointrcnn_loss, keypoints_to_heatmap
from mrcnn_edu.mask_rcnn import MaskRCNN
from mrcnn_edu.run_config import RunConfig, build_datasets, pose_run_config
from mrcnn_edu.train import Trainer, load_checkpoint_weights
from mrcnn_edu.visualize import draw_boxes, draw_instances, draw_keypoints, show_image

QUICK = os.environ.get("MRCNN_EDU_QUICK") == "1"

# %% [markdown]
# ## 1. Stick figures with keypoints
#
# `PoseDataset` draws one to three frontal stick figures per image, each with 14 keypoints
# (head, neck, and left/right shoulder, elbow, hand, hip, knee, foot) in a random pose, and its
# instance mask drawn from the limbs. Visibility is COCO's: **2** visible (filled dots),
# **1** labelled but hidden behind a figure in front (open circles), **0** not labelled (the
# joint is outside the image; stored as zeros). Figures face us, so a figure's *left* shoulder
# is on the image's *right*.

# %%
data = PoseDataset(200, seed=2)  # the pose demo's held-out split
fig, axes = plt.subplots(1, 4, figsize=(13, 3.5))
for ax, i in zip(axes, range(4)):
    item = data[i]
    draw_instances(ax, item["image"], item["boxes"], item["labels"], item["masks"], mask_alpha=0.25)
    draw_keypoints(ax, item["keypoints"], SKELETON)
    v = item["keypoints"][..., 2]
    ax.set_title(f"{int((v == 2).sum())} visible, {int((v == 1).sum())} hidden, "
                 f"{int((v == 0).sum())} outside", fontsize=9)  # fmt: skip
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Targets on the RoI's grid
#
# A positive RoI `(x1, y1, x2, y2)` is cut into an m × m grid; a keypoint's target is the one cell
# it falls in (torchvision's `keypoints_to_heatmap`):
#
# $$\text{col} = \lfloor (x - x_1)\, m / (x_2 - x_1) \rfloor, \qquad
#   \text{row} = \lfloor (y - y_1)\, m / (y_2 - y_1) \rfloor, \qquad
#   \text{target} = \text{row} \cdot m + \text{col}$$
#
# A keypoint gives no loss when it is not labelled (v = 0) or falls outside the RoI. The model
# uses m = 56; we draw m = 14 so the cells can be seen. The right panel's RoI is a proposal
# covering only the upper body: the legs' keypoints have no target there.

# %%
item = data[1]
person = item["keypoints"][:1]  # the first figure, (1, K, 3)
box = item["boxes"][0]
upper = box.copy()
upper[3] = box[1] + 0.5 * (box[3] - box[1])  # the top half of the box
m = 14
fig, axes = plt.subplots(1, 2, figsize=(10, 5))
for ax, roi in zip(axes, (box, upper)):
    index, valid = keypoints_to_heatmap(person, roi[None].astype(np.float32), m)
    show_image(ax, item["image"])
    x1, y1, x2, y2 = roi
    for t in range(m + 1):  # the grid lines
        ax.plot([x1, x2], [y1 + t * (y2 - y1) / m] * 2, color="white", lw=0.3)
        ax.plot([x1 + t * (x2 - x1) / m] * 2, [y1, y2], color="white", lw=0.3)
    rows, cols = index[0] // m, index[0] % m
    for j in np.flatnonzero(valid[0]):  # the target cell of each keypoint with a target
        cx, cy = x1 + cols[j] * (x2 - x1) / m, y1 + rows[j] * (y2 - y1) / m
        draw_boxes(ax, [cx, cy, cx + (x2 - x1) / m, cy + (y2 - y1) / m], "yellow", lw=1.5)
    draw_keypoints(ax, person, SKELETON, colour="red")
    draw_boxes(ax, roi, "cyan", lw=1.5)
    ax.set_xlim(x1 - 4, x2 + 4)
    ax.set_ylim(box[3] + 4, y1 - 4)
    missing = [KEYPOINT_NAMES[j] for j in np.flatnonzero(~valid[0])]
    ax.set_title(f"{int(valid.sum())} targets; none for {missing or 'no keypoint'}", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. A softmax over the 56² locations
#
# A keypoint is at exactly **one** of the m² locations, so the paper trains an m²-way softmax
# per labelled keypoint, $L = -\log p_{\text{target}}$, not m² independent sigmoids as for masks.
# At initialisation (every logit 0) the two losses look like this:

# %%
cells = 56 * 56
print(
    f"softmax:  loss {np.log(cells):.2f}, gradient on the target cell {1 / cells - 1:+.4f}, "
    f"on each other cell {1 / cells:+.6f}"
)
print(f"sigmoid:  loss {np.log(2):.3f}, gradient on the target cell {(0.5 - 1) / cells:+.6f}, "
      f"on each other cell {0.5 / cells:+.6f}")  # fmt: skip

# %% [markdown]
# With the sigmoid, one positive pixel faces 3135 negatives: "nothing anywhere" already gives a
# small loss, and the target's pull is 3135 times weaker than the negatives' push. The softmax
# keeps the loss at $-\log p_{\text{target}}$ until the right cell wins. Its gradient,
# $(p - \text{onehot}) / N$, is exactly zero on the maps of keypoints without a target:

# %%
rng = np.random.default_rng(0)
logits = rng.normal(size=(1, 14, 56, 56)).astype(np.float32)
kp = item["keypoints"][:1].copy()
kp[0, 3:, 2] = 0  # keep only the first three keypoints labelled
loss, grad = keypointrcnn_loss(logits, [box[None]], [kp], [np.array([0])])
per_map = np.abs(grad[0]).sum(axis=(1, 2))
print(f"loss {loss:.3f}; |gradient| per keypoint map: {np.round(per_map, 3).tolist()}")

# %% [markdown]
# ## 4. A trained model's heatmaps
#
# `mrcnn-edu demo --pose` trains `MaskRCNNConfig.small_pose` and writes `runs/pose`. If that run
# exists (here or one level up), we load it. Otherwise we train here: a few hundred steps (some
# minutes), or with `MRCNN_EDU_QUICK=1` only 10 -- enough to run every cell, but such a model
# has barely started to localise anything.


# %%
found = [d for d in ("runs/pose", "../runs/pose") if os.path.isfile(os.path.join(d, "last.npz"))]
run_config = RunConfig.load(os.path.join(found[0], "config.json")) if found else None
if run_config is not None and run_config.data.source == "pose":
    model = MaskRCNN(run_config.model, rng=0)
    load_checkpoint_weights(model, os.path.join(found[0], "last.npz"))
    print(f"loaded {found[0]}/last.npz")
else:
    steps = 10 if QUICK else 400  # the pose demo's settings, a shorter schedule
    cfg = pose_run_config("runs/nb10", quick=QUICK)
    train = replace(cfg.train, max_steps=steps, warmup_iters=steps // 4, checkpoint_every=0,
                    progress=False, log_every=max(steps // 4, 1))  # fmt: skip
    train_set, _, _ = build_datasets(cfg.data)
    model = MaskRCNN(cfg.model, rng=0)
    Trainer(model, train_set, train).train()
    print(f"no trained run found: trained {steps} steps here")
model.eval()

# %% [markdown]
# At inference the keypoint branch runs on the final detections: RoIAlign 14 × 14 on each box,
# the head, and K maps of 56 × 56 logits. A softmax over each map turns it into "where is this
# keypoint" probabilities; the keypoint is the peak (after a bicubic resize to the box's size).
# Below: the maps of one detection, the ground-truth keypoint in red.

# %%
image = item["image"]
prediction = model.predict([image])[0]
found = len(prediction["scores"]) > 0  # a briefly trained model may find nobody: use a GT box
boxes = (prediction["boxes"] if found else item["boxes"])[:1].astype(np.float32)
batch, sizes = model.transform([image])
features = model.backbone(batch)
heads = model.roi_heads
pooled = heads.keypoint_roi_pool(features, [boxes], sizes)
maps = heads.keypoint_predictor(heads.keypoint_head(pooled))[0]  # (K, 56, 56) logits
probs = np.exp(maps - maps.max(axis=(1, 2), keepdims=True))
probs /= probs.sum(axis=(1, 2), keepdims=True)
x1, y1, x2, y2 = boxes[0]
gt = item["keypoints"][int(np.argmax(box_iou(boxes, item["boxes"])[0]))]  # its person
fig, axes = plt.subplots(2, 7, figsize=(14, 4.5))
for j, ax in enumerate(axes.ravel()):
    ax.imshow(probs[j], extent=(x1, x2, y2, y1), cmap="magma")
    if gt[j, 2] > 0:
        ax.plot(gt[j, 0], gt[j, 1], "o", mfc="none", mec="red", ms=6)
    ax.set_title(KEYPOINT_NAMES[j], fontsize=8)
    ax.set_axis_off()
fig.suptitle("the best detection's heatmaps" if found else "heatmaps on a ground-truth box")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Skeletons and OKS
#
# The predicted skeletons beside the ground truth. Keypoints are scored by **object keypoint
# similarity**, the part IoU plays for boxes: for a person of mask area A,
#
# $$\text{OKS} = \frac{1}{|\{i: v_i > 0\}|} \sum_{i: v_i > 0}
#   \exp\!\left(-\frac{d_i^2}{2 A (2\sigma_i)^2}\right)$$
#
# with $d_i$ the pixel error and $\sigma_i$ a per-keypoint tolerance (the dataset's
# `keypoint_sigmas`, COCO's rescaled to the figures: `docs/keypoints.md` §5). Keypoint AP is COCO
# AP with OKS in place of IoU.

# %%
num = 8 if QUICK else 50
items = [data[i] for i in range(num)]
predictions = model.predict([it["image"] for it in items])
fig, axes = plt.subplots(2, 4, figsize=(13, 7))
for k, ax in enumerate(axes.ravel()):
    i, panel = divmod(k, 2)
    it, p = items[i], predictions[i]
    if panel == 0:
        show_image(ax, it["image"], "ground truth")
        draw_keypoints(ax, it["keypoints"], SKELETON)
        continue
    keep = p["scores"] >= 0.5
    shown = p["keypoints"][keep].copy()
    shown[..., 2] = 2
    show_image(ax, it["image"], f"prediction ({int(keep.sum())} people)")
    draw_keypoints(ax, shown, SKELETON)
    for box, person in zip(p["boxes"][keep], p["keypoints"][keep]):
        best = np.nanmax([
            object_keypoint_similarity(person, g, m.sum(), data.keypoint_sigmas)
            for g, m in zip(it["keypoints"], it["masks"])
        ])  # fmt: skip
        ax.text(box[0], box[1], f"OKS {best:.2f}", color="white", fontsize=7,
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1})  # fmt: skip
plt.tight_layout()
plt.show()

results = predictions_to_coco_results(predictions, [it["image_id"] for it in items])
metrics = evaluate_keypoints(data, results, data.keypoint_sigmas, image_ids=list(range(num)))
print(f"keypoint AP {metrics['AP']:.3f}, AP50 {metrics['AP50']:.3f} on {num} held-out images")
