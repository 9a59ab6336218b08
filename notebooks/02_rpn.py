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
# # 2. The Region Proposal Network
#
# Chapter 1 tiled the image with anchors. The RPN turns them into proposals in four steps:
#
# 1. **match** every anchor to the ground truth: positive, negative or ignored;
# 2. **sample** 256 of them per image, at most half positive;
# 3. **learn** an objectness score and four box deltas per anchor (the losses and their
#    gradients);
# 4. **filter**: move the anchors by the deltas, keep the best per level, and remove duplicates
#    with non-maximum suppression.
#
# The code is `mrcnn_edu.matching`, `mrcnn_edu.boxes`, `mrcnn_edu.nms` and `mrcnn_edu.rpn`; the
# math is in `docs/anchors_rpn.md`.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from mrcnn_edu.anchors import AnchorGenerator
from mrcnn_edu.boxes import BoxCoder, box_iou, clip_boxes_to_image
from mrcnn_edu.data.shapes import ShapesDataset
from mrcnn_edu.matching import BalancedPositiveNegativeSampler, Matcher
from mrcnn_edu.nms import nms
from mrcnn_edu.nn.losses import binary_cross_entropy_with_logits, softmax_cross_entropy
from mrcnn_edu.rpn import RPN, RPNConfig
from mrcnn_edu.visualize import draw_boxes

QUICK = os.environ.get("MRCNN_EDU_QUICK") == "1"
TRAIN_STEPS = 15 if QUICK else 150

# %% [markdown]
# The same 256 × 256 image and the same FPN anchors as in chapter 1:

# %%
sample = ShapesDataset(1, image_size=(256, 256), min_objects=3, max_objects=4, seed=3)[0]
image, gt_boxes = sample["image"], sample["boxes"]
feature_shapes = [(256 // s, 256 // s) for s in (4, 8, 16, 32, 64)]
generator = AnchorGenerator()
anchors = generator((256, 256), feature_shapes)
counts = generator.num_anchors_per_level(feature_shapes)
print(len(gt_boxes), "objects,", len(anchors), "anchors")

# %% [markdown]
# ## 1. Matching
#
# With $v = \max_g \mathrm{IoU}(g, \text{anchor})$: $v \ge 0.7$ is positive (matched to that
# $g$), $v < 0.3$ negative, anything between is ignored. Then the **low-quality rule**: for each
# object, the anchors that reach *its* best IoU (ties included) become positive too, so no object
# is left without a positive anchor.

# %%
iou = box_iou(gt_boxes, anchors)  # (G, T) quality matrix
strict = Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou)
matched = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
for name, m in [("IoU thresholds only", strict), ("+ low-quality matches", matched)]:
    print(
        f"{name:22s} positive {np.sum(m >= 0):4d}  ignored {np.sum(m == -2):4d}  "
        f"negative {np.sum(m == -1):5d}"
    )
print("positives per object:", np.bincount(matched[matched >= 0], minlength=len(gt_boxes)))

# %%
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(image.transpose(1, 2, 0))
colours = ["white", "cyan", "orange", "lime", "red"]
for g in range(len(gt_boxes)):
    draw_boxes(ax, anchors[matched == g], colours[g % 5], lw=1.2)
    draw_boxes(ax, gt_boxes[g : g + 1], colours[g % 5], lw=2.5, ls="--")
ax.set_title("positive anchors, coloured by their object (dashed: GT)")
plt.show()

# %% [markdown]
# ## 2. Sampling
#
# Of ~16 000 anchors only a handful are positive. The loss uses a minibatch of 256 per image,
# at most 128 positives, the rest random negatives; ignored anchors are never sampled. The
# sampler draws from a seeded NumPy generator, so the sample is reproducible.

# %%
labels = np.where(matched >= 0, 1, np.where(matched == -1, 0, -1))  # 1 / 0 / -1 (ignore)
sampler = BalancedPositiveNegativeSampler(256, 0.5, np.random.default_rng(0))
(pos_mask,), (neg_mask,) = sampler([labels])
print("sampled positives:", pos_mask.sum(), " sampled negatives:", neg_mask.sum())

fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(image.transpose(1, 2, 0))
neg_centres = (anchors[neg_mask, :2] + anchors[neg_mask, 2:]) / 2
ax.scatter(neg_centres[:, 0], neg_centres[:, 1], s=6, color="red", label="sampled negatives")
draw_boxes(ax, anchors[pos_mask], "lime")
ax.plot([], [], color="lime", label="sampled positives")
ax.set_xlim(-60, 316), ax.set_ylim(316, -60)
ax.legend(loc="lower left", fontsize=8)
ax.set_title("the 256 anchors of one training step")
plt.show()

# %% [markdown]
# ## 3. Regression targets
#
# A positive anchor $p$ learns to move onto its object $g$:
#
# $$t_x = \frac{g_{cx} - p_{cx}}{p_w},\quad t_y = \frac{g_{cy} - p_{cy}}{p_h},\quad
#   t_w = \log\frac{g_w}{p_w},\quad t_h = \log\frac{g_h}{p_h}$$
#
# and decoding applies the inverse. Encoding then decoding gives the object's box back:

# %%
coder = BoxCoder((1.0, 1.0, 1.0, 1.0))  # the RPN's weights
positive = np.flatnonzero(matched >= 0)
targets = coder.encode(gt_boxes[matched[positive]], anchors[positive])
print("first targets (tx, ty, tw, th):\n", targets[:4].round(3))
back = coder.decode(targets, anchors[positive])
print("max |decode(encode(g)) - g| =", np.abs(back - gt_boxes[matched[positive]]).max(), "px")

# %% [markdown]
# ## 4. The head and its losses
#
# The RPN head is a 3×3 conv + ReLU followed by two 1×1 convs: 2 objectness logits and 4
# deltas per anchor. It needs a feature pyramid; the backbone comes in a later chapter, so here
# we use a **stand-in**: the image average-pooled to each stride, plus a channel measuring how
# far each pixel's colour is from the background's. It is crude, but it is a function of the
# image, so the head has something to learn from.

# %%
background = np.median(image.reshape(3, -1), axis=1)
contrast = np.abs(image - background[:, None, None]).sum(axis=0, keepdims=True)
stand_in = np.concatenate([image, contrast], axis=0)  # (4, 256, 256)


def pool(x, s):
    c, h, w = x.shape
    return x.reshape(c, h // s, s, w // s, s).mean(axis=(2, 4))


features = [pool(stand_in, s)[None].astype(np.float32) for s in (4, 8, 16, 32, 64)]
print([f.shape for f in features])

config = RPNConfig(objectness_loss="softmax", pre_nms_top_n_train=300, post_nms_top_n_train=100)
rpn = RPN(in_channels=4, config=config, rng=0)
targets_list = [{"boxes": gt_boxes}]
rpn.sampler.rng = np.random.default_rng(0)
proposals, losses = rpn(features, [(256, 256)], targets_list)
print(losses)

# %% [markdown]
# The head starts with weights of std 0.01, so every logit is close to 0 and every anchor gets
# $p(\text{object}) \approx 1/2$: the objectness loss starts at $\log 2 \approx 0.693$.
#
# **Softmax or sigmoid?** The paper scores each anchor with a 2-way softmax over
# $(z_{bg}, z_{obj})$; torchvision with one logit and a sigmoid. Since
# $\mathrm{softmax}(z_{bg}, z_{obj})_{obj} = \sigma(z_{obj} - z_{bg})$, the two are one model:
# a softmax over $[0, z]$ gives the same loss and the same gradient with respect to $z$ as a
# sigmoid of $z$:

# %%
z = np.random.default_rng(1).normal(0, 2, 8)
y = np.array([1, 0, 0, 1, 1, 0, 1, 0])
loss_sigmoid, grad_sigmoid = binary_cross_entropy_with_logits(z, y.astype(float))
loss_softmax, grad_softmax = softmax_cross_entropy(np.stack([np.zeros(8), z], axis=1), y)
print("losses:", loss_sigmoid, loss_softmax)
print("max gradient difference:", np.abs(grad_softmax[:, 1] - grad_sigmoid).max())

# %% [markdown]
# `RPN.backward()` sends the gradient of `loss_objectness + loss_rpn_box_reg` back through the
# head — one backward pass per pyramid level, parameter gradients summed over levels — and
# returns the gradient for each level's features (for the backbone). To see the gradients do
# something, we take a few SGD steps on this single image. This **overfits one image with
# stand-in features**: it shows the losses can go down, not that the RPN generalises.

# %%
history = []
for _step in range(TRAIN_STEPS):
    rpn.zero_grad()
    _, losses = rpn(features, [(256, 256)], targets_list)
    rpn.backward()
    for p in rpn.parameters():
        p.data -= 0.5 * p.grad  # plain SGD
    history.append([losses["loss_objectness"], losses["loss_rpn_box_reg"]])
history = np.array(history)
print("first step:", history[0].round(4), " last step:", history[-1].round(4))

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(history[:, 0], label="loss_objectness")
ax.plot(history[:, 1], label="loss_rpn_box_reg")
ax.set_xlabel("SGD step"), ax.legend()
ax.set_title("RPN losses on one image (stand-in features)")
plt.show()

# %% [markdown]
# ## 5. From scores to proposals: top-k and NMS
#
# To see what proposal filtering does, independently of how well a head is trained, we build
# the objectness by hand: an **oracle** whose logit is $10\,(v - 0.5)$ with $v$ the anchor's
# best IoU with the ground truth, and zero deltas (the proposals are the anchors themselves).
# Then we run the RPN's filtering: per level the top-k logits, clip, drop tiny boxes, NMS at 0.7
# within each level, and keep the best overall.

# %%
oracle_logit = (10.0 * (iou.max(axis=0) - 0.5)).astype(np.float32)[None]  # (1, T)
proposals_in = anchors[None].copy()  # decode(0 deltas, anchors) = anchors
rpn.eval()
rpn.config.pre_nms_top_n_test, rpn.config.post_nms_top_n_test = 40, 20

# before NMS: the top-k of every level, clipped -- what NMS receives
starts = np.cumsum([0, *counts])
top = np.concatenate(
    [
        lo + np.argsort(-oracle_logit[0, lo:hi], kind="stable")[:40]
        for lo, hi in zip(starts, starts[1:])
    ]
)
before = clip_boxes_to_image(anchors[top], (256, 256))
(after,), (after_scores,) = rpn.filter_proposals(proposals_in, oracle_logit, [(256, 256)], counts)
print(f"{len(before)} boxes before NMS, {len(after)} after NMS + top-20")

fig, axes = plt.subplots(1, 2, figsize=(10, 5))
for ax, boxes, title in [
    (axes[0], before, f"top-40 per level: {len(before)} boxes"),
    (axes[1], after, f"after NMS (0.7, per level): {len(after)} proposals"),
]:
    ax.imshow(image.transpose(1, 2, 0))
    draw_boxes(ax, boxes, "yellow", lw=0.8)
    draw_boxes(ax, gt_boxes, "white", lw=2, ls="--")
    ax.set_xlim(-40, 296), ax.set_ylim(296, -40)
    ax.set_title(title)
plt.show()

# %% [markdown]
# NMS keeps a box unless a higher-scoring *kept* box overlaps it with IoU above the threshold.
# At 0.7 it only removes near-duplicates; a lower threshold removes more. On all levels mixed
# together (`nms`, not per level):

# %%
scores = oracle_logit[0, top]
for threshold in (0.9, 0.7, 0.5, 0.3):
    print(
        f"IoU threshold {threshold}: {len(nms(before, scores, threshold)):3d} of {len(before)} kept"
    )

# %% [markdown]
# Finally the proposals of our briefly trained head (the same filtering, now on its own
# objectness and deltas). After a few steps on stand-in features they are rough; the full model
# trains the head together with a real backbone.

# %%
rpn.config.post_nms_top_n_test = 10
(trained,), _ = rpn(features, [(256, 256)])
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(image.transpose(1, 2, 0))
draw_boxes(ax, trained, "yellow")
draw_boxes(ax, gt_boxes, "white", lw=2, ls="--")
ax.set_title(f"top {len(trained)} proposals of the trained head")
plt.show()
