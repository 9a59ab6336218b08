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
# # 3. RoIPool vs RoIAlign
#
# The second stage of Mask R-CNN needs a fixed-size grid of features for every proposal, however
# large the proposal and wherever it sits. Fast R-CNN's **RoIPool** gets it by rounding the box
# to the feature grid and taking maxima over integer bins; Mask R-CNN's **RoIAlign** rounds
# nothing and averages bilinear samples. This notebook draws what each op reads, derives
# RoIAlign's fast separable form, and measures what the rounding costs: frozen-then-jumping
# outputs under sub-pixel shifts, and masks that no longer line up with their objects.
#
# Code: `mrcnn_edu/roi_ops/` (`align.py`, `pool.py`; same semantics as torchvision's
# `roi_pool` / `roi_align`).
# The math and the backward passes: `docs/roi_pooling.md`.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from mrcnn_edu.roi_ops import (
    LevelMapper,
    interpolation_matrices,
    roi_align,
    roi_align_backward,
    roi_align_reference,
    roi_pool,
    roi_pool_backward,
    roi_pool_bins,
)

QUICK = os.environ.get("MRCNN_EDU_QUICK") == "1"
NUM_OBJECTS = 6 if QUICK else 50  # ellipses per stride in the mask-IoU comparison
rng = np.random.default_rng(0)

# %% [markdown]
# ## One RoI on a feature map
#
# A stride-16 feature map of a 160 × 192 image is 10 × 12 feature pixels. We pool a sub-pixel
# box — in image pixels — to a 3 × 3 grid. Box corner $x$ lands at $x \cdot s$ in feature
# pixels, $s = 1/16$.

# %%
stride = 16
features = rng.standard_normal((1, 1, 10, 12))
roi = np.array([[0.0, 37.0, 29.0, 141.0, 118.0]])  # (batch index, x1, y1, x2, y2), image pixels
print("RoI in feature pixels:", roi[0, 1:] / stride)

# %% [markdown]
# **RoIPool** rounds the corners to whole feature pixels (the region includes both ends), then
# cuts it into bins with floored starts and ceiled ends:
#
# $$x_s = \operatorname{round}(x_1 s), \quad w = x_e - x_s + 1, \quad
#   \text{bin } q = [\lfloor q\, w/P \rfloor,\ \lceil (q+1)\, w/P \rceil) + x_s$$

# %%
x_s, x_e = (int(v) for v in np.round(roi[0, [1, 3]] / stride))  # 2.31 -> 2, 8.81 -> 9
width = x_e - x_s + 1
by_hand = [
    (int(np.floor(q * width / 3)) + x_s, int(np.ceil((q + 1) * width / 3)) + x_s) for q in range(3)
]
hstart, hend, wstart, wend = roi_pool_bins(roi, 3, 1 / stride, 10, 12)
print("column bins by hand:", by_hand)
print("roi_pool_bins:      ", list(zip(wstart[0].tolist(), wend[0].tolist())))
assert by_hand == list(zip(wstart[0].tolist(), wend[0].tolist()))

# %% [markdown]
# **RoIAlign** keeps the exact box. Bin $(p, q)$ holds $g \times g$ samples on a regular
# sub-grid ($g$ = `sampling_ratio`, here 2), each read by bilinear interpolation:
#
# $$x_j = x_1 s + q\,b_w + (j + \tfrac12)\, b_w / g, \qquad b_w = (x_2 - x_1)\, s / P$$

# %%
g, P = 2, 3
x1, y1, x2, y2 = roi[0, 1:] / stride
bw, bh = (x2 - x1) / P, (y2 - y1) / P
xs = np.array([x1 + q * bw + (j + 0.5) * bw / g for q in range(P) for j in range(g)])
ys = np.array([y1 + p * bh + (i + 0.5) * bh / g for p in range(P) for i in range(g)])
print("sample columns:", xs.round(2))
print("sample rows:   ", ys.round(2))

# %% [markdown]
# Side by side, over the feature map (pixel $j$ drawn centred on $j$, the `aligned=False`
# convention both ops use here): RoIPool's bins (orange) snap to pixel lines and no longer
# match the box (white); RoIAlign's bins (cyan) are the box's, and its samples (dots) sit
# between pixels.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
for ax, title in zip(
    axes, ["RoIPool: rounded box, integer bins", "RoIAlign: exact bins, 2×2 samples each"]
):
    ax.imshow(features[0, 0], cmap="gray", extent=(-0.5, 11.5, 9.5, -0.5))
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="white", lw=2, ls="--"))
    ax.set_title(title)
for p in range(3):
    for q in range(3):
        # a pool bin covers whole pixels: left edge of its first to right edge of its last
        h0, h1, w0, w1 = hstart[0, p], hend[0, p], wstart[0, q], wend[0, q]
        axes[0].add_patch(
            Rectangle((w0 - 0.5, h0 - 0.5), w1 - w0, h1 - h0, fill=False, color="orange", lw=1.5)
        )
        axes[1].add_patch(
            Rectangle((x1 + q * bw, y1 + p * bh), bw, bh, fill=False, color="cyan", lw=1.5)
        )
yy, xx = np.meshgrid(ys, xs, indexing="ij")
axes[1].plot(xx.ravel(), yy.ravel(), ".", color="red", ms=6)
plt.show()

# %% [markdown]
# ## Bilinear interpolation and the bin average
#
# A sample at real $(y, x)$ with $y_0 = \lfloor y \rfloor$, $l_y = y - y_0$, $h_y = 1 - l_y$
# (same in $x$) reads
#
# $$F(y, x) = h_y h_x F_{y_0 x_0} + h_y l_x F_{y_0, x_0+1} + l_y h_x F_{y_0+1, x_0} + l_y l_x
#   F_{y_0+1, x_0+1}$$
#
# and a bin is the mean of its samples. Written out for the top-left bin:


# %%
def bilinear(f, y, x):
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * f[y0, x0]
        + hy * lx * f[y0, x0 + 1]
        + ly * hx * f[y0 + 1, x0]
        + ly * lx * f[y0 + 1, x0 + 1]
    )


top_left = np.mean([bilinear(features[0, 0], y, x) for y in ys[:g] for x in xs[:g]])
print(f"by hand: {top_left:.6f}")
print(f"roi_align: {roi_align(features, roi, 3, 1 / stride, g)[0, 0, 0, 0]:.6f}")

# %% [markdown]
# ## The separable form
#
# Each sample weight is a row weight times a column weight, so the average over a bin is too:
#
# $$\text{out}[c] = A_y \, F[c] \, A_x^\top, \qquad A_y \in \mathbb{R}^{P_H \times H},
#   \ A_x \in \mathbb{R}^{P_W \times W}$$
#
# Row $p$ of $A_y$ is the mean of the interpolation weights of bin $p$'s sample rows. Two small
# matrix products per RoI replace the per-sample loop; this is how `roi_align` runs.

# %%
ay, ax = interpolation_matrices(roi, 10, 12, 3, 1 / stride, g)
separable = ay[0] @ features[0, 0] @ ax[0].T
print("rows of Ay sum to", ay[0].sum(axis=1))
print(
    "max |Ay F Ax^T - roi_align| =",
    np.abs(separable - roi_align(features, roi, 3, 1 / stride, g)[0, 0]).max(),
)

fig, axes = plt.subplots(1, 2, figsize=(10, 2.2))
axes[0].imshow(ay[0], cmap="viridis")
axes[0].set_title("$A_y$ (3 × H): weights of feature rows")
axes[1].imshow(ax[0], cmap="viridis")
axes[1].set_title("$A_x$ (3 × W): weights of feature columns")
plt.show()

# %% [markdown]
# The per-sample definition (`roi_align_reference`, Python loops) and the separable form agree
# to rounding, and the loops are far slower:

# %%
big = rng.standard_normal((1, 64, 50, 68)).astype(np.float32)
n_rois = 16 if QUICK else 64
xy = rng.uniform(0, 900, (n_rois, 2))
boxes = np.concatenate(
    [np.zeros((n_rois, 1)), xy, xy + rng.uniform(32, 300, (n_rois, 2))], axis=1
).astype(np.float32)
t0 = time.perf_counter()
fast = roi_align(big, boxes, 7, 1 / 16, 2)
t1 = time.perf_counter()
slow = roi_align_reference(big, boxes, 7, 1 / 16, 2)
t2 = time.perf_counter()
print(
    f"{n_rois} RoIs: separable {1e3 * (t1 - t0):.1f} ms, "
    f"per-sample loops {1e3 * (t2 - t1):.0f} ms, max difference {np.abs(fast - slow).max():.1e}"
)

# %% [markdown]
# ## Backward: where the gradient of one bin goes
#
# RoIPool's bin is a max: its gradient goes whole to the one pixel that won. RoIAlign's bin is a
# weighted average: its gradient spreads over the bilinear neighbours of its samples,
# $\partial L / \partial F = A_y^\top G A_x$.

# %%
grad_bin = np.zeros((1, 1, 3, 3))
grad_bin[0, 0, 1, 1] = 1.0  # the centre bin only
pooled, argmax = roi_pool(features, roi, 3, 1 / stride)
g_pool = roi_pool_backward(grad_bin, argmax, features.shape)
g_align = roi_align_backward(grad_bin, roi, features.shape, 3, 1 / stride, g)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
for ax_, grad, title in zip(
    axes, [g_pool, g_align], ["RoIPool: one pixel", "RoIAlign: bilinear neighbours"]
):
    im = ax_.imshow(grad[0, 0], cmap="magma", extent=(-0.5, 11.5, 9.5, -0.5))
    ax_.add_patch(Rectangle((x1 + bw, y1 + bh), bw, bh, fill=False, color="cyan", lw=1.5))
    ax_.set_title(f"{title} (sum = {grad.sum():.2f})")
    fig.colorbar(im, ax=ax_)
plt.show()

# %% [markdown]
# ## Sub-pixel shifts
#
# Slide the RoI right by $\delta$ feature pixels, $\delta = 0 \dots 1$. On a ramp $F = x$
# RoIAlign's output follows $\delta$ exactly; RoIPool's stays frozen until the rounding of a
# corner flips, then jumps a whole pixel.

# %%
yy_, xx_ = np.mgrid[0:20, 0:30].astype(np.float64)
ramp_map = xx_[None, None]  # F(y, x) = x
smooth_map = (np.sin(0.3 * xx_ + 1.0) * np.cos(0.2 * yy_ - 0.5))[None, None]
base = np.array([[0.0, 100.3, 50.2, 260.7, 180.9]])
deltas = np.linspace(0, 1, 21 if QUICK else 101)


def shift_curves(fmap):
    align, pool = [], []
    for d in deltas:
        r = base.copy()
        r[:, [1, 3]] += d * 16
        align.append(roi_align(fmap, r, 7, 1 / 16, 2, True)[0, 0, 3, 3])  # the centre bin
        pool.append(roi_pool(fmap, r, 7, 1 / 16)[0][0, 0, 3, 3])
    return np.array(align), np.array(pool)


fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for ax_, fmap, name in zip(axes, [ramp_map, smooth_map], ["ramp F = x", "smooth map"]):
    a, p = shift_curves(fmap)
    ax_.plot(deltas, a, label="RoIAlign")
    ax_.step(deltas, p, where="post", label="RoIPool")
    ax_.set_xlabel("shift δ (feature pixels)")
    ax_.set_ylabel("centre bin output")
    ax_.set_title(name)
    ax_.legend()
plt.show()
a, p = shift_curves(ramp_map)
print("RoIAlign steps:", np.unique(np.diff(a).round(6)), " RoIPool steps:", np.unique(np.diff(p)))

# %% [markdown]
# ## Do the masks line up?
#
# The experiment of the paper, in miniature. Render an ellipse's mask in a 320 × 320 image;
# make a stride-$s$ "feature map" by averaging the mask over $s \times s$ cells (feature pixel
# $j$ then summarises image pixels $[sj, s(j+1))$); pool the ellipse's exact box to 28 × 28 with
# each op; paste the pooled mask back into the box (bilinear, threshold ½) and compare with the
# true mask (IoU). Only the pooling differs between the columns.

# %%
IMAGE, MASK = 320, 28
v_grid, u_grid = np.mgrid[0:IMAGE, 0:IMAGE] + 0.5  # pixel centres


def render_ellipse(rng):
    cx, cy = rng.uniform(100, IMAGE - 100, 2)
    a_, b_ = rng.uniform(30, 75, 2)
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    xr, yr = (u_grid - cx) * c + (v_grid - cy) * s, -(u_grid - cx) * s + (v_grid - cy) * c
    hx, hy = np.hypot(a_ * c, b_ * s), np.hypot(a_ * s, b_ * c)  # exact half extents
    return (xr / a_) ** 2 + (yr / b_) ** 2 <= 1, np.array([cx - hx, cy - hy, cx + hx, cy + hy])


def paste(pooled, box):
    bx1, by1, bx2, by2 = box
    gx = np.clip((u_grid - bx1) / (bx2 - bx1) * MASK - 0.5, 0, MASK - 1)  # bin q centred at q + 0.5
    gy = np.clip((v_grid - by1) / (by2 - by1) * MASK - 0.5, 0, MASK - 1)
    x0, y0 = np.minimum(gx.astype(int), MASK - 2), np.minimum(gy.astype(int), MASK - 2)
    fx, fy = gx - x0, gy - y0
    value = (
        pooled[y0, x0] * (1 - fx) * (1 - fy)
        + pooled[y0, x0 + 1] * fx * (1 - fy)
        + pooled[y0 + 1, x0] * (1 - fx) * fy
        + pooled[y0 + 1, x0 + 1] * fx * fy
    )
    inside = (u_grid >= bx1) & (u_grid <= bx2) & (v_grid >= by1) & (v_grid <= by2)
    return inside & (value >= 0.5)


def iou(m1, m2):
    return (m1 & m2).sum() / (m1 | m2).sum()


methods = {
    "RoIAlign aligned": lambda f, r, s: roi_align(f, r, MASK, 1 / s, 2, True),
    "RoIAlign": lambda f, r, s: roi_align(f, r, MASK, 1 / s, 2, False),
    "RoIPool": lambda f, r, s: roi_pool(f, r, MASK, 1 / s)[0],
}
strides = [4, 8, 16, 32]
table = {name: [] for name in methods}
examples = {}
for s in strides:
    scores = {name: [] for name in methods}
    for i in range(NUM_OBJECTS):
        mask, box = render_ellipse(rng)
        n = IMAGE // s
        fmap = mask.reshape(n, s, n, s).mean(axis=(1, 3))[None, None]
        r = np.concatenate([[0.0], box])[None]
        for name, op in methods.items():
            pasted = paste(op(fmap, r, s)[0, 0], box)
            scores[name].append(iou(pasted, mask))
            if i == 0 and s == 16:
                examples[name] = (mask, pasted, box)
    for name in methods:
        table[name].append(np.mean(scores[name]))

print(f"mean mask IoU over {NUM_OBJECTS} ellipses per stride")
print(f"{'stride':>6s}" + "".join(f"{name:>18s}" for name in methods))
for j, s in enumerate(strides):
    print(f"{s:6d}" + "".join(f"{table[name][j]:18.3f}" for name in methods))

# %%
fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
for name, scores in table.items():
    axes[0].plot(strides, scores, "o-", label=name)
axes[0].set_xscale("log", base=2)
axes[0].set_xlabel("feature stride")
axes[0].set_ylabel("mean mask IoU")
axes[0].legend()
axes[0].set_title("pool, paste back, compare")
for ax_, (name, (mask, pasted, box)) in zip(axes[1:], examples.items()):
    overlay = np.zeros(mask.shape + (3,))
    overlay[..., 1] = mask  # truth in green
    overlay[..., 0] = pasted  # pasted in red: yellow where both agree
    ax_.imshow(overlay[int(box[1]) - 10 : int(box[3]) + 10, int(box[0]) - 10 : int(box[2]) + 10])
    ax_.set_title(f"{name}, stride 16: IoU {iou(pasted, mask):.2f}")
    ax_.axis("off")
plt.show()

# %% [markdown]
# RoIAlign with the half-pixel correction keeps the mask within a pixel or two at every
# stride; RoIPool's two roundings cost up to a feature pixel — $s$ image pixels — and the IoU
# falls with the stride. That is why the mask branch of Mask R-CNN uses RoIAlign.
#
# ## Which pyramid level pools which box
#
# With FPN, a box of $w \times h$ image pixels is pooled from level
# $k = \lfloor 4 + \log_2(\sqrt{wh}/224) + 10^{-6} \rfloor$, clamped to the levels present
# (P2–P5). `MultiScaleRoIAlign` does this and runs `roi_align` per level with its scale.

# %%
sizes = np.array([16, 56, 111.9, 112, 150, 224, 300, 448, 800])
by_hand = np.clip(np.floor(4 + np.log2(sizes / 224) + 1e-6), 2, 5).astype(int)
mapper = LevelMapper(2, 5)
levels = mapper(np.stack([np.zeros_like(sizes), np.zeros_like(sizes), sizes, sizes], axis=1)) + 2
for size, k_hand, k in zip(sizes, by_hand, levels):
    print(f"box {size:6.1f}² -> P{k} (by hand P{k_hand})")
assert (levels == by_hand).all()
