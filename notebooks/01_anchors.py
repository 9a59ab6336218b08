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
# # 1. Anchors
#
# The Region Proposal Network does not search for boxes of arbitrary shape. At every position of
# every feature map it considers a few fixed **anchors** — reference boxes of chosen sizes and
# aspect ratios — and only decides, for each, *is there an object here?* and *how should this
# box move to fit it?* This notebook builds those anchors, draws them over an image level by
# level, and checks which level suits which object size.
#
# Everything here is `mrcnn_edu.anchors.AnchorGenerator`, whose numbers equal torchvision's
# (see `docs/anchors_rpn.md` and `tests/test_detection_torchvision.py`).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from mrcnn_edu.anchors import AnchorGenerator
from mrcnn_edu.boxes import box_iou
from mrcnn_edu.data.shapes import ShapesDataset
from mrcnn_edu.visualize import draw_boxes

QUICK = os.environ.get("MRCNN_EDU_QUICK") == "1"

# %% [markdown]
# ## Cell anchors: one size, three shapes
#
# For a size $S$ (the square root of the area) and an aspect ratio $r = h / w$:
#
# $$h = S\sqrt{r}, \qquad w = S / \sqrt{r}, \qquad \text{anchor} =
#   \operatorname{round}\big([-w, -h, w, h] / 2\big)$$
#
# so every anchor of size $S$ has area $S^2$, whatever its shape. The rounding (half to even)
# puts the corners on whole pixels.

# %%
S, ratios = 32.0, np.array([0.5, 1.0, 2.0], dtype=np.float32)
h = S * np.sqrt(ratios)  # h = S sqrt(r)
w = S / np.sqrt(ratios)  # w = S / sqrt(r)
by_hand = np.round(np.stack([-w, -h, w, h], axis=1) / 2)
print("by hand:\n", by_hand)

generator = AnchorGenerator()  # the paper's FPN defaults: sizes 32..512, ratios 0.5, 1, 2
print("AnchorGenerator, level P2:\n", generator.cell_anchors()[0])
assert np.array_equal(by_hand, generator.cell_anchors()[0])

# %% [markdown]
# One size per FPN level, P2 (stride 4) to P6 (stride 64). Drawn around a common centre, the
# fifteen cell anchors cover object sizes from about 20 to 700 pixels:

# %%
fig, ax = plt.subplots(figsize=(5, 5))
colours = plt.cm.viridis(np.linspace(0, 0.9, 5))
for level, (cells, colour) in enumerate(zip(generator.cell_anchors(), colours)):
    draw_boxes(ax, cells, colour, lw=1.5)
    ax.plot([], [], color=colour, label=f"P{level + 2}: size {generator.sizes[level][0]}")
ax.set_xlim(-400, 400), ax.set_ylim(400, -400), ax.set_aspect("equal")
ax.legend(loc="upper right", fontsize=8)
ax.set_title("cell anchors of the five levels")
plt.show()

# %% [markdown]
# ## Anchors over an image
#
# On a feature map with stride $s$ the cell anchors are shifted to every position
# $(x s, y s)$. Our example image is a 256 × 256 picture of synthetic shapes; its pyramid has
# maps of 64², 32², 16², 8² and 4² positions. The **stride of a level is image size // feature
# size**, computed by the generator from the shapes alone.

# %%
sample = ShapesDataset(1, image_size=(256, 256), min_objects=3, max_objects=4, seed=3)[0]
image, gt_boxes = sample["image"], sample["boxes"]
feature_shapes = [(256 // s, 256 // s) for s in (4, 8, 16, 32, 64)]
print("strides:", generator.strides((256, 256), feature_shapes))
anchors = generator((256, 256), feature_shapes)
counts = generator.num_anchors_per_level(feature_shapes)
print("anchors per level:", counts, "total:", anchors.shape)

# %% [markdown]
# The order is fixed: level by level, then position by position (row by row), then the three
# cell anchors. Row $(y W + x) A + a$ of a level is cell anchor $a$ moved to $(x s, y s)$ —
# the same order the RPN head's outputs will be flattened into, which is what pairs anchor $i$
# with prediction $i$:

# %%
A, W_p3, s_p3 = 3, feature_shapes[1][1], 8
y, x, a = 5, 7, 2
row = counts[0] + (y * W_p3 + x) * A + a  # skip P2's anchors, then index within P3
print(
    "anchor",
    row,
    "=",
    anchors[row],
    " cell anchor + shift =",
    generator.cell_anchors()[1][a] + [x * s_p3, y * s_p3, x * s_p3, y * s_p3],
)

# %% [markdown]
# Below, each panel is one level: the dots are the anchor centres, and the three anchors of a
# few positions are drawn in full. Anchors stick out of the image near the borders; they are
# kept (torchvision keeps them too; the original paper ignored them during training).

# %%
fig, axes = plt.subplots(1, 5, figsize=(17, 3.8))
start = 0
for level, (ax, count) in enumerate(zip(axes, counts)):
    level_anchors = anchors[start : start + count]
    start += count
    ax.imshow(image.transpose(1, 2, 0))
    centres = level_anchors[::3, :2] + (level_anchors[::3, 2:] - level_anchors[::3, :2]) / 2
    step = max(1, len(centres) // 400)  # thin out P2's 4096 centres for the picture
    ax.scatter(centres[::step, 0], centres[::step, 1], s=2, color="white")
    h_l, w_l = feature_shapes[level]
    for yy, xx in [(h_l // 2, w_l // 2), (h_l // 4, w_l // 4)]:
        draw_boxes(ax, level_anchors[(yy * w_l + xx) * 3 : (yy * w_l + xx) * 3 + 3], "yellow")
    ax.set_xlim(-150, 406), ax.set_ylim(406, -150)
    ax.set_title(f"P{level + 2}: stride {256 // h_l}, size {generator.sizes[level][0]}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Which level fits which object?
#
# The RPN will call an anchor *positive* when its IoU with an object is at least 0.7 (next
# notebook). For every ground-truth box we take its best IoU over each level's anchors: objects
# of size ~$S$ are best served by the level whose anchors have size $S$. With only three shapes
# per level the best IoU is often well below 0.7 — an object may reach 0.7 nowhere, which is
# why the next chapter needs the "low-quality match" rule.

# %%
iou = box_iou(gt_boxes, anchors)  # (G, T)
start = 0
best = np.zeros((len(gt_boxes), 5))
for level, count in enumerate(counts):
    best[:, level] = iou[:, start : start + count].max(axis=1)
    start += count
for g, box in enumerate(gt_boxes):
    size = np.sqrt((box[2] - box[0]) * (box[3] - box[1]))
    print(f"GT {g}: sqrt(area) = {size:5.1f} px, best IoU per level P2..P6:", best[g].round(2))
print(
    "objects with some anchor at IoU >= 0.7:", int((best.max(axis=1) >= 0.7).sum()), "of", len(best)
)

fig, ax = plt.subplots(figsize=(5, 3))
ax.imshow(best, vmin=0, vmax=1, cmap="magma")
ax.set_xticks(range(5), [f"P{i + 2}" for i in range(5)])
ax.set_yticks(range(len(gt_boxes)), [f"GT {g}" for g in range(len(gt_boxes))])
ax.set_title("best anchor IoU per object and level")
plt.show()

# %% [markdown]
# The best anchor of each object, drawn over the image (dashed: the object's box):

# %%
fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.imshow(image.transpose(1, 2, 0))
for g, box in enumerate(gt_boxes):
    draw_boxes(ax, box, "white", ls="--")
    best_anchor = anchors[iou[g].argmax()]
    draw_boxes(ax, best_anchor, "lime", lw=2)
    ax.text(best_anchor[0], best_anchor[1] - 2, f"{iou[g].max():.2f}", color="lime", fontsize=9)
ax.set_title("best anchor per object (IoU)")
plt.show()

# %% [markdown]
# ## Strides when sizes do not divide
#
# Real batches are padded to a multiple of 32, and the coarsest map is rounded up. For an
# 800 × 1088 batch P6 has 13 × 17 positions; integer division gives strides (61, 64), not 64 —
# torchvision's rule, which we follow so the anchors stay identical:

# %%
fpn_shapes = [(200, 272), (100, 136), (50, 68), (25, 34), (13, 17)]
print(generator.strides((800, 1088), fpn_shapes))
print("anchors for one 800 x 1088 image:", sum(generator.num_anchors_per_level(fpn_shapes)))

# %% [markdown]
# Single-level Faster R-CNN (no FPN) is the same generator with one level and nine anchors
# per position:

# %%
single = AnchorGenerator(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
print(single.num_anchors_per_location(), single((600, 1000), [(38, 63)]).shape)
