# %% [markdown]
# # 07 · GPU kernels: RoIAlign and NMS in CuPy and Numba-CUDA
#
# Two operations dominate the non-convolution time of Mask R-CNN: **RoIAlign** (thousands of
# RoIs × 256 channels × 7×7 or 14×14 bins, each an average of bilinear samples) and **NMS**
# (thousands of proposals per image). `mrcnn_edu/roi_ops/` and `mrcnn_edu/nms.py` are the
# NumPy references; `kernels/` holds two GPU versions of each, written to be read next to them:
#
# | op | CuPy (CUDA C, compiled by NVRTC) | Numba-CUDA (Python kernels) |
# |---|---|---|
# | RoIAlign fwd/bwd, RoIPool fwd/bwd | `kernels/cupy_roi_align.py` | `kernels/numba_roi_align.py` |
# | NMS, batched NMS | `kernels/cupy_nms.py` | `kernels/numba_nms.py` |
#
# The public ops pick a kernel when handed CuPy arrays (`MRCNN_EDU_KERNELS=cupy|numba`, CuPy by
# default); NumPy arrays never import a GPU library. This notebook runs everywhere: without a
# CUDA device the GPU cells print that they are skipped, and the parts that explain the kernels
# run on the CPU. `docs/gpu_kernels.md` walks through the kernels line by line.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

from mrcnn_edu import nms as nms_ops
from mrcnn_edu import roi_ops
from mrcnn_edu.backend import gpu_available

QUICK = os.environ.get("MRCNN_EDU_QUICK") == "1"
GPU = gpu_available()
print("CUDA device:", "yes" if GPU else "no -- GPU cells will be skipped")
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. One thread per output element
#
# Both RoIAlign kernels give each GPU thread one element of the pooled output
# `(K, C, PH, PW)`. Thread `index` finds its element by unravelling the index, `pw` fastest:
#
# $$pw = i \bmod PW,\quad ph = \lfloor i / PW\rfloor \bmod PH,\quad
#   c = \lfloor i / (PW\,PH)\rfloor \bmod C,\quad k = \lfloor i / (PW\,PH\,C)\rfloor$$
#
# Neighbouring threads of a warp therefore work on neighbouring bins of the *same* RoI and
# channel, and read neighbouring pixels of the same feature plane -- their memory loads coalesce.


# %%
def unravel(index, channels, pooled_h, pooled_w):
    """The kernels' index arithmetic, in Python."""
    pw = index % pooled_w
    ph = (index // pooled_w) % pooled_h
    c = (index // (pooled_w * pooled_h)) % channels
    k = index // (pooled_w * pooled_h * channels)
    return k, c, ph, pw


K, C, PH, PW = 2, 3, 2, 2
for i in (0, 1, 2, 3, 4, 12, 23):
    print(f"thread {i:2d} -> (k, c, ph, pw) = {unravel(i, C, PH, PW)}")
# the same order as NumPy's C layout of a (K, C, PH, PW) array:
assert all(
    unravel(i, C, PH, PW) == np.unravel_index(i, (K, C, PH, PW)) for i in range(K * C * PH * PW)
)

# %% [markdown]
# ## 2. What one thread computes
#
# Thread `(k, c, ph, pw)` averages a `grid_h × grid_w` grid of bilinear samples inside its bin
# (`grid = sampling_ratio`, or `ceil(roi_size / pooled_size)` when it is ≤ 0):
#
# $$y_{iy} = y_1 + ph\cdot b_h + (iy + \tfrac12)\,\frac{b_h}{g_h},\qquad
#   \text{out}[k,c,ph,pw] = \frac{1}{g_h g_w}\sum_{iy,ix} \text{bilinear}(x[n, c], y_{iy}, x_{ix})$$
#
# Here is that loop for one bin in plain Python, checked against the NumPy reference.

# %%
features = rng.standard_normal((1, 1, 6, 8))
roi = np.array([[0, 1.2, 0.7, 6.3, 4.9]])  # batch 0, (x1, y1, x2, y2)
pooled, sampling_ratio = 2, 2


def bilinear(plane, y, x):
    height, width = plane.shape
    if y < -1 or y > height or x < -1 or x > width:
        return 0.0  # outside: contributes 0 but still counts in the average
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    if y0 >= height - 1:
        y0, y = height - 1, float(height - 1)
    if x0 >= width - 1:
        x0, x = width - 1, float(width - 1)
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * plane[y0, x0]
        + (1 - ly) * lx * plane[y0, x1]
        + ly * (1 - lx) * plane[y1, x0]
        + ly * lx * plane[y1, x1]
    )


_, x1, y1, x2, y2 = roi[0]
bin_h, bin_w = max(y2 - y1, 1.0) / pooled, max(x2 - x1, 1.0) / pooled
ph, pw = 1, 0
samples = [
    bilinear(
        features[0, 0],
        y1 + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio,
        x1 + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio,
    )
    for iy in range(sampling_ratio)
    for ix in range(sampling_ratio)
]
one_thread = np.mean(samples)
reference = roi_ops.roi_align(features, roi, pooled, 1.0, sampling_ratio, False)[0, 0, ph, pw]
print(f"one thread: {one_thread:.12f}   roi_ops.roi_align: {reference:.12f}")
assert np.isclose(one_thread, reference, rtol=1e-12, atol=1e-12)

# %% [markdown]
# The backward pass runs the same loop and, instead of reading the four neighbours of each
# sample, **adds** `grad · weight / count` to them. Bins of overlapping RoIs (and samples of one
# bin) touch the same pixels from different threads at the same time, so the kernels use
# `atomicAdd`; plain `+=` would lose updates. The order of the atomic additions varies from run
# to run, so the GPU gradient equals the NumPy one up to float rounding, not bit for bit.
#
# ## 3. NMS as bitmasks
#
# Greedy NMS is sequential, but its O(N²) IoU tests are not. The kernels sort the boxes by
# score and cut them into tiles of 64. GPU block `(row, col)` writes, for every box `i` of tile
# `row`, one 64-bit word whose bit `j` says "box `i` overlaps box `64·col + j` above the
# threshold". A single block then sweeps the boxes in order with a `removed` bitmap. Below, the
# same two steps in NumPy on 150 boxes (three tiles), checked against `nms_ops.nms`.

# %%
TILE = 64
n = 150
xy = rng.uniform(0, 100, (n, 2))
boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], axis=1)
scores = rng.random(n)
threshold = 0.5

order = np.argsort(-scores, kind="stable")
sorted_boxes = boxes[order]
tiles = (n + TILE - 1) // TILE
area = (sorted_boxes[:, 2] - sorted_boxes[:, 0]) * (sorted_boxes[:, 3] - sorted_boxes[:, 1])
left_top = np.maximum(sorted_boxes[:, None, :2], sorted_boxes[None, :, :2])
right_bottom = np.minimum(sorted_boxes[:, None, 2:], sorted_boxes[None, :, 2:])
wh = np.clip(right_bottom - left_top, 0, None)
inter = wh[..., 0] * wh[..., 1]
above = np.triu(inter / (area[:, None] + area[None, :] - inter) > threshold, k=1)

# the mask kernel's output: mask[i, t] packs above[i, 64 t : 64 t + 64] into one uint64
mask = np.zeros((n, tiles), dtype=np.uint64)
for t in range(tiles):
    bits = above[:, t * TILE : (t + 1) * TILE]
    weights = np.left_shift(np.uint64(1), np.arange(bits.shape[1], dtype=np.uint64))
    mask[:, t] = (bits * weights).sum(axis=1, dtype=np.uint64)

# the reduction kernel's sweep
removed = np.zeros(tiles, dtype=np.uint64)
kept = []
for i in range(n):
    t, b = divmod(i, TILE)
    if (int(removed[t]) >> b) & 1:
        continue
    kept.append(i)
    removed[t:] |= mask[i, t:]
keep = order[kept]
i = int(np.flatnonzero(mask[:, 0])[0])  # the first box that overlaps something in tile 0
print(f"{len(keep)} of {n} boxes kept")
print(f"sorted box {i}, word 0 = {int(mask[i, 0]):064b}  (bit 0 is the rightmost)")
print(f"   its bits say it overlaps sorted boxes {np.flatnonzero(above[i, :TILE]).tolist()}")
assert np.array_equal(keep, nms_ops.nms(boxes, scores, threshold))

# %% [markdown]
# ## 4. NumPy vs CuPy vs Numba: results and timings
#
# On a GPU machine the next cell runs each implementation on the same RoIs and boxes, checks
# that the GPU results equal the NumPy reference, and times them (one warm-up call, which
# compiles the kernels, then the median of a few calls between device synchronisations).
# `benchmarks/bench_kernels.py` does this at full Mask R-CNN sizes against torchvision.


# %%
def median_ms(fn, sync=lambda: None, repeats=3):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


n_rois, size = (64, 7) if QUICK else (512, 7)
feature_map = rng.standard_normal((2, 64 if QUICK else 256, 50, 68)).astype(np.float32)
box_xy = rng.uniform(0, 700, (n_rois, 2))
rois = np.concatenate(
    [rng.integers(0, 2, (n_rois, 1)), box_xy, box_xy + rng.uniform(16, 300, (n_rois, 2))], axis=1
).astype(np.float32)
n_boxes = 500 if QUICK else 5000
nms_xy = rng.uniform(0, 1000, (n_boxes, 2))
nms_boxes = np.concatenate([nms_xy, nms_xy + rng.uniform(10, 200, (n_boxes, 2))], axis=1).astype(
    np.float32
)
nms_scores = rng.random(n_boxes).astype(np.float32)

timings = {
    "NumPy": (
        median_ms(lambda: roi_ops.roi_align(feature_map, rois, size, 1 / 16, 2, False)),
        median_ms(lambda: nms_ops.nms(nms_boxes, nms_scores, 0.7)),
    )
}
want_align = roi_ops.roi_align(feature_map, rois, size, 1 / 16, 2, False)
want_keep = nms_ops.nms(nms_boxes, nms_scores, 0.7)

if GPU:
    import cupy as cp
    from mrcnn_edu.kernels import cupy_nms, cupy_roi_align

    implementations = {"CuPy": (cupy_roi_align, cupy_nms)}
    try:
        from mrcnn_edu.kernels import numba_nms, numba_roi_align

        implementations["Numba"] = (numba_roi_align, numba_nms)
    except Exception as err:  # e.g. numba-cuda missing
        print("Numba-CUDA unavailable:", err)
    sync = cp.cuda.Device().synchronize
    fm_d, rois_d = cp.asarray(feature_map), cp.asarray(rois)
    boxes_d, scores_d = cp.asarray(nms_boxes), cp.asarray(nms_scores)
    for name, (align_mod, nms_mod) in implementations.items():
        got = align_mod.roi_align(fm_d, rois_d, size, 1 / 16, 2, False).get()
        keep_d = nms_mod.nms(boxes_d, scores_d, 0.7).get()
        print(
            f"{name}: RoIAlign max |diff| = {np.abs(got - want_align).max():.2e}, "
            f"NMS keep equal: {np.array_equal(keep_d, want_keep)}"
        )
        timings[name] = (
            median_ms(lambda m=align_mod: m.roi_align(fm_d, rois_d, size, 1 / 16, 2, False), sync),
            median_ms(lambda m=nms_mod: m.nms(boxes_d, scores_d, 0.7), sync),
        )
else:
    print("No CUDA device: skipping the CuPy and Numba runs (only NumPy is timed).")

for name, (t_align, t_nms) in timings.items():
    print(
        f"{name:6s} RoIAlign {n_rois} RoIs {size}x{size}: {t_align:9.3f} ms   "
        f"NMS {n_boxes} boxes: {t_nms:8.3f} ms"
    )

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
names = list(timings)
for ax, j, title in zip(axes, (0, 1), (f"RoIAlign, {n_rois} RoIs", f"NMS, {n_boxes} boxes")):
    ax.bar(
        names,
        [timings[k][j] for k in names],
        color=["tab:gray", "tab:green", "tab:blue"][: len(names)],
    )
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_title(title)
fig.suptitle("median time per call" + ("" if GPU else " (no GPU here: NumPy only)"))
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Testing GPU code without a GPU
#
# The Numba kernels also run on the CPU under Numba's **CUDA simulator**
# (`NUMBA_ENABLE_CUDASIM=1`, set before `numba.cuda` is imported): every GPU thread becomes a
# Python thread, shared memory and `syncthreads` are emulated, and the kernels see NumPy arrays.
# `tests/test_kernels_numba_sim.py` uses it to compare every Numba kernel with the NumPy
# reference in CI. The simulator cannot catch GPU-only typing problems (on the GPU
# `math.floor` returns a float, a `0.5` literal is float64), so `tests/test_kernels_gpu.py`
# also compiles the Numba kernels to PTX and the CUDA C sources with NVRTC, which needs the CUDA
# compilers but no device; its remaining tests run on a real GPU.
