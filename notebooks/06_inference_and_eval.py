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
# # 6. Inference, step by step, and COCO evaluation
#
# At test time Mask R-CNN has no ground truth to sample against, and it runs the two heads one
# after the other instead of side by side:
#
# 1. the RPN proposes boxes (100 per image in the small preset, 1000 in the paper);
# 2. the box head scores every proposal for every class and refines its box per class;
# 3. low scores are dropped and per-class NMS removes duplicates; the best detections stay;
# 4. the mask head runs on those **final boxes**, and the mask of the **predicted class** is
#    pasted into the image and thresholded at 0.5.
#
# We walk through these steps, check that they reproduce `model.predict`, and then score a model
# the way the field does: COCO AP for boxes and masks with `pycocotools`, overall and per class.
# The math is in `docs/heads_and_losses.md` §7.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from mrcnn_edu.data.shapes import ShapesDataset, to_coco_dict
from mrcnn_edu.evaluate import coco_eval, evaluate_coco, per_class_ap, predictions_to_coco_results
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.nn.losses import sigmoid
from mrcnn_edu.postprocess import paste_masks_in_image, postprocess_detections
from mrcnn_edu.roi_ops import roi_align
from mrcnn_edu.run_config import RunConfig, build_datasets
from mrcnn_edu.train import TrainConfig, Trainer, load_checkpoint_weights
from mrcnn_edu.visualize import draw_boxes, draw_instances, show_image

QUICK = os.environ.get("MRCNN_EDU_QUICK") == "1"

# %% [markdown]
# ## A model to evaluate
#
# `mrcnn-edu demo` trains the small model for 2000 steps and writes its run folder, `runs/demo`,
# with `config.json` (model, training and data settings) and `last.npz` (the weights). If that
# folder exists (here or one level up, for a notebook opened from `notebooks/`) we load it and
# evaluate on its held-out split. Otherwise we train right here: chapter 5's 600 steps (a few
# minutes), or, with `MRCNN_EDU_QUICK=1`, just 20 steps -- enough to run every line below, but
# such a model scores **near zero**. The numbers of the fully trained model are the ones
# `mrcnn-edu demo` prints (and the README reports).


# %%
def is_run(folder):
    return all(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "last.npz"))


RUN = next((d for d in ("runs/demo", "../runs/demo") if is_run(d)), None)
run_config = RunConfig.load(os.path.join(RUN, "config.json")) if RUN else None
if run_config is not None and run_config.data.source == "shapes":
    model = MaskRCNN(run_config.model, rng=0)
    load_checkpoint_weights(model, os.path.join(RUN, "last.npz"))
    _, val_set, class_names = build_datasets(run_config.data)
    print(f"loaded {RUN}/last.npz (a run configured for {run_config.train.max_steps} steps)")
else:
    steps = 20 if QUICK else 600
    train_set = ShapesDataset(40 if QUICK else 2000, seed=1)
    val_set = ShapesDataset(200, seed=2)  # the demo's held-out split
    class_names = train_set.class_names
    model = MaskRCNN(MaskRCNNConfig.small(len(class_names)), rng=0)
    batch = 2 if QUICK else 4
    config = TrainConfig(lr=0.02 * batch / 4, batch_size=batch, max_steps=steps,
                         warmup_iters=min(100, steps // 4), milestones=(0.75,),
                         checkpoint_every=0, out_dir=os.path.join("runs", "nb06"),
                         progress=False, log_every=max(steps // 4, 1))  # fmt: skip
    Trainer(model, train_set, config).train()
    print(f"no trained run found: trained {steps} steps here" + (" (expect AP near zero)" * QUICK))
NUM_EVAL = 8 if QUICK else len(val_set)  # held-out images to score
print(f"evaluating on {NUM_EVAL} held-out images; classes {list(class_names)}")

# %% [markdown]
# ## 1. Proposals
#
# For the walk-through we take the two of the first eight held-out images on which the model
# detects most (a briefly trained model detects nothing at all on some images).
#
# `model.eval()` switches the RPN to its test-time settings (fewer boxes kept before and after
# NMS) and nothing is sampled. The forward pass is the training one without targets:

# %%
preview = model.predict([val_set[i]["image"] for i in range(8)])
chosen = sorted(range(8), key=lambda i: -len(preview[i]["scores"]))[:2]
items = [val_set[i] for i in chosen]
images = [it["image"] for it in items]
model.eval()
batch, image_sizes = model.transform(images)
features = model.backbone(batch)
proposals, _ = model.rpn(features, image_sizes, None, batch_shape=tuple(batch.shape[-2:]))
print("proposals per image:", [p.shape[0] for p in proposals])

fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, image, props, item in zip(axes, images, proposals, items):
    show_image(ax, image, f"top 20 of {len(props)} proposals (yellow); GT (white)")
    draw_boxes(ax, props[:20], "yellow", lw=0.8)
    draw_boxes(ax, item["boxes"], "white", lw=2)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The box head, before and after NMS
#
# The box head scores every proposal: $p = \mathrm{softmax}(z) \in \mathbb{R}^{K+1}$, and decodes
# one box per class from that class's four deltas. Every (proposal, class $\ge 1$) pair is a
# **candidate detection** with score $p_c$; we keep those above `score_thresh` = 0.05:

# %%
rh = model.config.roi_heads
heads = model.roi_heads  # the second stage: sampling, poolers, box and mask heads, losses
class_logits, box_deltas = heads.box_predictor(
    heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
)
num = proposals[0].shape[0]  # image 0's rows come first
logits0, deltas0 = class_logits[:num], box_deltas[:num]
z = logits0 - logits0.max(axis=1, keepdims=True)
probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # (R, K+1)
per_class_boxes = heads.box_coder.decode(deltas0, proposals[0]).reshape(num, -1, 4)  # (R, K+1, 4)
rows, cols = np.nonzero(probs[:, 1:] > rh.score_thresh)  # column c is class c + 1
candidates = per_class_boxes[rows, cols + 1]
print(f"{num} proposals x {len(class_names)} classes -> {len(candidates)} candidates with p > 0.05")

boxes, scores, labels = postprocess_detections(
    logits0, deltas0, proposals[0], image_sizes[0], heads.box_coder,
    rh.score_thresh, rh.nms_thresh, rh.detections_per_img,
)  # fmt: skip
print(f"after per-class NMS at IoU {rh.nms_thresh} and top {rh.detections_per_img}: "
      f"{len(boxes)} detections")  # fmt: skip
print("best five (class, score):", [(class_names[k - 1], round(float(s), 3))
                                    for k, s in zip(labels[:5], scores[:5])])  # fmt: skip

fig, axes = plt.subplots(1, 2, figsize=(8, 4))
show_image(axes[0], images[0], f"{len(candidates)} candidates before NMS")
draw_boxes(axes[0], candidates, "yellow", lw=0.6, alpha=0.6)
keep5 = slice(0, 5)
draw_instances(axes[1], images[0], boxes[keep5], labels[keep5], scores=scores[keep5],
               class_names=class_names)  # fmt: skip
axes[1].set_title(f"{len(boxes)} detections after NMS (best 5 drawn)", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# `postprocess_detections` does exactly the candidate step above, then drops boxes thinner than
# 0.01 px, runs NMS **per class** (a circle never suppresses a square) and keeps the best
# `detections_per_img`. Because every class of every proposal is a candidate, one proposal can
# produce detections of several classes; with a well-trained classifier only one of them has a
# high score.
#
# ## 3. Masks for the detections
#
# The mask head now runs on the final boxes (not on the proposals: fewer and better boxes). Of
# its $K$ masks per box we take the predicted class's, apply the sigmoid, and paste the model's
# $m \times m$ probabilities (14 × 14 in the demo preset, 28 × 28 in the paper) into the image
# by bilinear resampling; the pasted probabilities are then thresholded at 0.5.

# %%
m = rh.mask_size  # the model's masks are m x m
d = len(boxes)
if d:
    mask_logits = heads.mask_predictor(
        heads.mask_head(heads.mask_roi_pool(features, [boxes, boxes[:0]], image_sizes))
    )  # image 0's detections only: (D, K, m, m)
    mask_probs = sigmoid(mask_logits[np.arange(d), labels - 1])  # the predicted class's channel
else:  # nothing detected (a barely trained model): no RoIs for the mask head
    mask_probs = np.zeros((0, m, m), np.float32)
pasted = paste_masks_in_image(mask_probs, boxes, image_sizes[0], threshold=None)  # probabilities
binary = paste_masks_in_image(mask_probs, boxes, image_sizes[0], threshold=0.5)  # uint8
print(f"{d} detections -> masks (D, K, {m}, {m}) -> pasted", pasted.shape,
      "-> binary", binary.shape)  # fmt: skip

if d:
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    x1, y1, x2, y2 = boxes[0]
    axes[0].imshow(mask_probs[0], cmap="viridis", vmin=0, vmax=1)
    axes[0].set_title(f"{m} × {m} mask of the best box ({class_names[labels[0] - 1]})", fontsize=9)
    extent = (0, image_sizes[0][1], image_sizes[0][0], 0)  # pixel edges on integer coordinates
    axes[1].imshow(pasted[0], cmap="viridis", vmin=0, vmax=1, extent=extent)
    draw_boxes(axes[1], boxes[:1], "white")
    axes[1].set_title("pasted into the image (probability)", fontsize=9)
    axes[2].imshow(binary[0], cmap="gray", extent=extent)
    draw_boxes(axes[2], boxes[:1], "red")
    axes[2].set_title("thresholded at 0.5", fontsize=9)
    draw_instances(axes[3], images[0], boxes[:1], labels[:1], binary[:1], scores[:1],
                   class_names=class_names)  # fmt: skip
    axes[3].set_title("over the image", fontsize=9)
    for ax in axes[:3]:
        ax.set_axis_off()
    plt.tight_layout()
    plt.show()

# %% [markdown]
# These steps are `model.predict`; it gives the same boxes, labels, scores and masks:

# %%
predicted = model.predict(images[:1])[0]
print("same boxes:", np.array_equal(predicted["boxes"], boxes),
      "| same labels:", np.array_equal(predicted["labels"], labels),
      "| same masks:", np.array_equal(predicted["masks"], binary))  # fmt: skip

# %% [markdown]
# ## 4. COCO evaluation
#
# A detection is a **true positive** if its IoU with a not-yet-matched ground-truth object of
# the same class reaches a threshold; detections are visited by decreasing score, so the
# precision–recall curve is traced as the score threshold falls. AP is the area under that
# curve (101-point interpolated), averaged over the classes and over the IoU thresholds
# $0.50, 0.55, \dots, 0.95$. `bbox` measures IoU between boxes, `segm` between masks;
# everything else is the same. `pycocotools`' `COCOeval` prints twelve numbers per type:
#
# | name | meaning |
# |---|---|
# | AP | mean over IoU 0.50:0.95 (the headline number) |
# | AP50, AP75 | at IoU 0.50 (lenient), 0.75 (strict) |
# | APs, APm, APl | small (area $< 32^2$), medium (to $96^2$), large objects; −1: none in the set |
# | AR1, AR10, AR100 | recall given 1, 10, 100 detections per image |
# | ARs, ARm, ARl | recall (100 detections) by object size |
#
# We predict on the held-out images, turn the predictions into COCO results (boxes as
# `[x, y, w, h]`, masks as run-length encodings) and evaluate:

# %%
eval_items = [val_set[i] for i in range(NUM_EVAL)]
image_ids = [int(it["image_id"]) for it in eval_items]
ground_truth = to_coco_dict(val_set)  # the held-out set in COCO format, built once
predictions = []
for start in range(0, NUM_EVAL, 8):
    predictions += model.predict([it["image"] for it in eval_items[start : start + 8]])
results = predictions_to_coco_results(predictions, image_ids, val_set.label_to_category_id)
print(f"{len(results)} detections on {NUM_EVAL} images")
metrics = evaluate_coco(ground_truth, results, image_ids=image_ids)

# %% [markdown]
# Per class: `coco_eval` returns the accumulated `COCOeval`, whose precision array
# `(IoU thresholds, recall points, classes, areas, max detections)` `per_class_ap` averages per
# class. The mean over the classes is the overall AP above.

# %%
per_class = {}
for iou_type in ("bbox", "segm"):
    ev = coco_eval(ground_truth, results, iou_type, image_ids=image_ids)
    per_class[iou_type] = (per_class_ap(ev), per_class_ap(ev, iou_threshold=0.5))
print(f"{'class':10s} {'bbox AP':>8s} {'bbox AP50':>10s} {'segm AP':>8s} {'segm AP50':>10s}")
for name in class_names:
    cells = [per_class[t][j][name] for t in ("bbox", "segm") for j in (0, 1)]
    print(f"{name:10s}" + "".join(f"{c:{w}.3f}" for c, w in zip(cells, (9, 11, 9, 11))))
segm_mean = np.mean([v for v in per_class["segm"][0].values() if v >= 0])
print(f"mean of the per-class segm AP: {segm_mean:.3f} (overall: {metrics['segm']['AP']:.3f})")

# %% [markdown]
# How to read this depends on the model. A model trained for a few steps here (the quick path)
# scores near zero: its boxes barely overlap the objects and its classes are guesses. That is the
# expected result of a 20-step run, not a measurement of the method. For scale: the 600-step
# model of chapter 5's full run scored, when we ran it with an earlier preset (28 × 28 masks, on
# every positive), segm AP 0.57 (AP50 0.83) and bbox AP 0.61 on the 200 held-out images; the
# demo's model is trained 2000 steps, and `mrcnn-edu demo` prints its table. Masks score a
# little below boxes, since a mask must match pixel by pixel.
#
# **What a perfect model would score.** As a check of the evaluation, and to see the ceiling set
# by the mask representation, we evaluate two "oracle" predictions built from the ground truth:
# the GT masks themselves, and the GT masks squeezed through the model's $m \times m$ mask
# representation -- RoIAligned onto the GT box as in training, then pasted back as at test
# time -- once with `aligned=False` (torchvision's choice) and once with `aligned=True` (what
# `RoIHeads.mask_targets` uses, Detectron2's choice):


# %%
def oracle(items, aligned=None):
    preds = []
    for it in items:
        masks = it["masks"]
        if aligned is not None and len(masks):
            rows = np.concatenate(
                [np.arange(len(masks), dtype=np.float32)[:, None], it["boxes"]], axis=1
            )
            t = roi_align(masks[:, None].astype(np.float32), rows, m, 1.0, -1, aligned)[:, 0]
            masks = paste_masks_in_image(np.clip(t, 0, 1), it["boxes"], masks.shape[1:], 0.5)
        preds.append({"boxes": it["boxes"], "labels": it["labels"], "masks": masks,
                      "scores": np.ones(len(it["labels"]))})  # fmt: skip
    return predictions_to_coco_results(preds, image_ids, val_set.label_to_category_id)


for title, aligned in [("GT masks", None), (f"{m}x{m}, aligned=False", False),
                       (f"{m}x{m}, aligned=True", True)]:  # fmt: skip
    oracle_results = oracle(eval_items, aligned)
    ap = evaluate_coco(ground_truth, oracle_results, ("segm",), False, image_ids)["segm"]
    print(f"{title:22s} segm AP {ap['AP']:.3f}  AP75 {ap['AP75']:.3f}  AP50 {ap['AP50']:.3f}")

# %% [markdown]
# The ground truth scores 1.000: the evaluation itself is right. The mask representation itself
# costs almost nothing on these shapes. On the 200 held-out images with `aligned=True`, every
# mask round-tripped at 28 × 28 keeps an IoU above 0.95 with the original, so even AP at IoU
# 0.95 is 1; at 14 × 14, 3 of the 512 masks, large objects where a cell spans about 4 pixels,
# fall below 0.95 (segm AP 0.999). With `aligned=False` targets the pasted masks come back a
# third to a half pixel up and to the left (chapter 4, §5), which costs AP at the strict IoU
# thresholds even for a perfect head: this ceiling is segm AP 0.900 at 28 × 28 and 0.931 at
# 14 × 14. That is why our mask targets are made with `aligned=True`.
