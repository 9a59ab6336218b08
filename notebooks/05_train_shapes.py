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
# # 5. Training Mask R-CNN on synthetic shapes
#
# Chapter 4 followed one batch through the heads and their losses. Training repeats that,
# thousands of times, with a parameter update after each batch:
#
# ```python
# losses = model.forward(images, targets)   # five losses
# model.backward()                           # gradient of their sum into every parameter
# optimizer.step(); scheduler.step()         # SGD with momentum, warm-up, step decay
# ```
#
# `mrcnn_edu.train.Trainer` runs this loop and keeps a CSV log, a loss-curve plot and
# checkpoints (`docs/training.md`). Here we train the small CPU model on generated shapes,
# plot the curves and look at predictions on held-out images.
#
# **Time.** With `MRCNN_EDU_QUICK=1` (the test suite) the run is 20 steps of 2 images on a tiny
# dataset: it shows the machinery and the first fall of the losses, and the model predicts
# nothing useful yet. Without it, 600 steps of 4 images take a few minutes on an idle 2-core CPU,
# and the model becomes a usable detector. `mrcnn-edu demo` (2000 steps of 4 images, as two MPI
# ranks of 2 images on two cores, about 3 minutes) is the run that reaches the README's numbers.

# %%
import csv
import os

import matplotlib.pyplot as plt
import numpy as np

from mrcnn_edu.data.shapes import ShapesDataset
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.train import TrainConfig, Trainer
from mrcnn_edu.visualize import draw_instances, plot_training_curves, save_predictions_figure

QUICK = os.environ.get("MRCNN_EDU_QUICK") == "1"
NUM_TRAIN = 40 if QUICK else 2000
STEPS = 20 if QUICK else 600
BATCH = 2 if QUICK else 4
OUT = os.path.join("runs", "nb05")  # everything this notebook writes goes here, under the cwd

# %% [markdown]
# ## Data
#
# `ShapesDataset` draws one to four circles, squares and triangles per 128 × 128 image, with
# random colours, sizes, overlaps and backgrounds. Item $i$ is generated from the seed and $i$,
# so the training set (seed 1) and the held-out set (seed 2) never share an image, and nothing
# has to be downloaded or stored.

# %%
train_set = ShapesDataset(NUM_TRAIN, seed=1)
val_set = ShapesDataset(8, seed=2)
class_names = train_set.class_names
print(train_set)
print("classes:", class_names)

fig, axes = plt.subplots(1, 4, figsize=(12, 3))
for ax, i in zip(axes, range(4)):
    item = train_set[i]
    draw_instances(ax, item["image"], item["boxes"], item["labels"], item["masks"],
                   class_names=class_names)  # fmt: skip
    ax.set_title(f"training image {i}", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The model, and its losses before training
#
# The small configuration: a narrow ResNet + FPN with 64 channels, the RPN and both heads of
# Mask R-CNN at reduced width, 64 RoIs per image, and 14 × 14 masks (the paper's 28 × 28) trained
# on at most 4 positives per image (chapter 4).

# %%
model = MaskRCNN(MaskRCNNConfig.small(len(class_names)), rng=0)
print(f"{sum(p.data.size for p in model.parameters()) / 1e6:.2f}M parameters")

batch = [train_set[i] for i in range(2)]
batch_targets = [{k: it[k] for k in ("boxes", "labels", "masks")} for it in batch]
losses = model.forward([it["image"] for it in batch], batch_targets)
for name, value in losses.items():
    print(f"{name:18s} {value:.4f}")
print(f"log 2 = {np.log(2):.4f}, log(K + 1) = {np.log(len(class_names) + 1):.4f}")

# %% [markdown]
# The starting values say what an untrained model knows, which is nothing:
#
# * `loss_objectness` $\approx \log 2$: the RPN's logits start near 0, so every sampled anchor
#   gets probability 1/2 of being an object;
# * `loss_classifier` $\approx \log(K + 1)$: the box classifier starts with tiny weights, so
#   the $K + 1 = 4$ classes are equally likely;
# * `loss_mask` is above $\log 2$: the mask head's convolutions start with He initialisation,
#   so its logits are spread out, confidently wrong about half the time;
# * the two box losses are small because they are normalised by all sampled anchors / RoIs,
#   most of which are negatives with no box loss.
#
# ## Training
#
# SGD with momentum 0.9 and weight decay $10^{-4}$, a linear warm-up from $10^{-3}\eta$ (the
# first updates, when the heads are random, are the largest and most badly scaled), then the
# rate drops tenfold for the last quarter of the steps.

# %%
config = TrainConfig(
    lr=0.02 * BATCH / 4,  # the demo's 0.02 for 4 images, scaled linearly with the batch
    batch_size=BATCH,
    max_steps=STEPS,
    warmup_iters=5 if QUICK else 100,
    milestones=(0.75,),
    checkpoint_every=0,  # only last.npz, at the end
    log_every=5 if QUICK else 100,
    seed=0,
    out_dir=OUT,
    progress=False,  # plain log lines (a progress bar is the default)
)
trainer = Trainer(model, train_set, config)
result = trainer.train()
print("files:", result["log"], result["checkpoint"], result["plot"])

# %% [markdown]
# ## The loss curves
#
# `log.csv` has one row per step: the learning rate, the five losses, their total, and the
# seconds the step took. `plot_training_curves` draws every loss on a log scale, with the
# learning rate dashed on a second axis:

# %%
curves = plot_training_curves(result["log"], os.path.join(OUT, "curves.png"))
fig, ax = plt.subplots(figsize=(9, 5))
ax.imshow(plt.imread(curves))
ax.set_axis_off()
plt.show()

with open(result["log"], newline="") as f:
    rows = list(csv.DictReader(f))
window = max(len(rows) // 5, 1)  # compare the mean of the first and the last fifth of the run
print(f"{'loss':18s} first {window} steps   last {window} steps")
for name in ["loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
             "loss_mask", "total"]:  # fmt: skip
    first = np.mean([float(r[name]) for r in rows[:window]])
    last = np.mean([float(r[name]) for r in rows[-window:]])
    print(f"{name:18s} {first:15.4f} {last:16.4f}")
print(f"mean seconds per step: {np.mean([float(r['seconds']) for r in rows]):.2f}")

# %% [markdown]
# Single steps are noisy -- each batch is a few random images, and the sampled anchors and RoIs
# change every time -- so compare averages over many steps, not one step with the next. The
# classifier and mask losses fall first: the GT boxes are among the RoIs from the first step,
# so the heads have perfect positives to learn from while the RPN is still poor. As the RPN
# improves, more proposals become positives, the RoIs get harder, and the box-regression loss
# can even rise for a while before it falls.
#
# ## Predictions on held-out images
#
# `model.predict` runs the inference path (chapter 6 goes through it step by step) and returns,
# per image, boxes, labels, scores and full-image binary masks. `save_predictions_figure`
# draws the ground truth beside the detections with score $\ge 0.5$:

# %%
held_out = [val_set[i] for i in range(len(val_set))]
predictions = model.predict([it["image"] for it in held_out])
for i, p in enumerate(predictions[:4]):
    print(
        f"image {i}: {len(held_out[i]['labels'])} objects; {len(p['scores'])} detections, "
        f"{int((p['scores'] >= 0.5).sum())} with score >= 0.5"
    )
figure = save_predictions_figure(
    [it["image"] for it in held_out], predictions, targets=held_out, class_names=class_names,
    path=os.path.join(OUT, "predictions.png"), max_images=4,
)  # fmt: skip
fig, ax = plt.subplots(figsize=(12, 6))
ax.imshow(plt.imread(figure))
ax.set_axis_off()
plt.show()

# %% [markdown]
# After a short run the scores are low and few detections pass 0.5. To see what the model
# *does* predict, draw its three best detections per image whatever their score:

# %%
fig, axes = plt.subplots(1, 4, figsize=(12, 3))
for ax, item, p in zip(axes, held_out, predictions):
    top = np.argsort(-p["scores"])[:3]
    draw_instances(ax, item["image"], p["boxes"][top], p["labels"][top], p["masks"][top],
                   p["scores"][top], class_names=class_names)  # fmt: skip
    ax.set_title("3 best detections", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# After 20 steps (the quick run) the boxes are mostly the RPN's rough proposals with low,
# near-uniform class scores. After the full run's 600 steps most objects are found with the
# right class and the masks follow the outlines; what remains is mostly duplicates of one object
# under two classes (NMS runs per class, so a circle does not suppress a square), confusions
# between similar small shapes, and missed low-contrast objects. When we ran it with an earlier
# preset (the paper's 28 × 28 masks, on every positive), the 600-step model scored segm AP 0.57
# (AP50 0.83) and bbox AP 0.61 on the 200 held-out images, measured as in chapter 6. The demo
# trains over three times as many steps.
#
# The run folder holds everything needed to continue or reuse the model:

# %%
print(sorted(os.listdir(OUT)))
