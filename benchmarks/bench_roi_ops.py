"""RoIAlign / RoIPool speed (forward and backward), against torchvision's CPU ops in the same run.

Workload: one stride-16 feature map of an 800x1088 image, 1x256x50x68 float32, and 512 RoIs
(the number Mask R-CNN samples per image in training) with centres uniform over the image and
widths/heights log-uniform between 32 and 512 pixels (the anchor sizes), clipped to the image.
Output 7x7 (box head) and 14x14 (mask head), sampling_ratio 2, aligned=False.

For each op the script prints our median time, torchvision's median time (when torch is
installed) with the same number of threads, and the ratio. Targets: forward <= 0.5x and
backward <= 1.0x torchvision's CPU time.

Usage: python benchmarks/bench_roi_ops.py [--repeats 7] [--threads N]
``--threads`` must be set before NumPy starts its BLAS threads, so it is read from the command
line before numpy is imported; torch gets the same number.
"""

from __future__ import annotations

import argparse
import os
import sys


def _threads_from_argv() -> int:
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return os.cpu_count() or 1


THREADS = _threads_from_argv()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(THREADS)

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)

from mrcnn_edu.roi_ops import (  # noqa: E402
    roi_align,
    roi_align_backward,
    roi_pool,
    roi_pool_backward,
)

IMAGE_HW = (800, 1088)
STRIDE = 16
CHANNELS = 256
NUM_ROIS = 512
SAMPLING = 2


def make_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    h, w = IMAGE_HW
    features = rng.standard_normal((1, CHANNELS, h // STRIDE, w // STRIDE)).astype(np.float32)
    cx, cy = rng.uniform(0, w, NUM_ROIS), rng.uniform(0, h, NUM_ROIS)
    bw, bh = np.exp(rng.uniform(np.log(32), np.log(512), (2, NUM_ROIS)))
    x1, x2 = np.clip(cx - bw / 2, 0, w), np.clip(cx + bw / 2, 0, w)
    y1, y2 = np.clip(cy - bh / 2, 0, h), np.clip(cy + bh / 2, 0, h)
    rois = np.stack([np.zeros(NUM_ROIS), x1, y1, x2, y2], axis=1).astype(np.float32)
    return features, rois


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=THREADS, help="BLAS and torch threads")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(THREADS)
    except ImportError:
        torch = None
    features, rois = make_inputs()
    print(
        f"features {features.shape} float32, {NUM_ROIS} RoIs, sampling_ratio {SAMPLING}, "
        f"{THREADS} thread(s), median of {args.repeats}"
    )
    if torch is None:
        print("torch not installed: our times only")
    header = f"{'op':30s} {'ours ms':>9s} {'torch ms':>9s} {'ratio':>7s} {'target':>7s}  max|diff|"
    print(header)
    print("-" * len(header))
    for size in (7, 14):
        bench_size(size, features, rois, args.repeats, torch)


def bench_size(size, features, rois, repeats, torch) -> None:
    scale = 1.0 / STRIDE
    rng = np.random.default_rng(1)
    out = roi_align(features, rois, size, scale, SAMPLING)
    grad = rng.standard_normal(out.shape).astype(np.float32)
    pooled, argmax = roi_pool(features, rois, size, scale)
    ops = {
        "roi_align forward": (lambda: roi_align(features, rois, size, scale, SAMPLING), 0.5),
        "roi_align backward": (
            lambda: roi_align_backward(grad, rois, features.shape, size, scale, SAMPLING, False),
            1.0,
        ),
        "roi_pool forward": (lambda: roi_pool(features, rois, size, scale)[0], 0.5),
        "roi_pool backward": (
            lambda: roi_pool_backward(grad, argmax, features.shape, rois),
            1.0,
        ),
    }
    reference = {}
    if torch is not None:
        import torchvision

        reference = torch_timings(torch, torchvision, features, rois, grad, size, repeats)
    for name, (fn, target) in ops.items():
        ours = median_time(fn, repeats)
        label = f"{name} {size}x{size}"
        if name in reference:
            theirs, value = reference[name]
            diff = float(np.abs(fn() - value).max())
            verdict = "ok" if ours / theirs <= target else "MISSED"
            print(
                f"{label:30s} {ours * 1e3:9.1f} {theirs * 1e3:9.1f} {ours / theirs:7.2f} "
                f"{target:7.1f}  {diff:.1e} {verdict}"
            )
        else:
            print(f"{label:30s} {ours * 1e3:9.1f} {'-':>9s} {'-':>7s} {target:7.1f}")


def torch_timings(torch, torchvision, features, rois, grad, size, repeats):
    """{op: (median seconds, result as NumPy)} for torchvision's CPU ops."""
    from torchvision.ops import roi_align as tv_align
    from torchvision.ops import roi_pool as tv_pool

    x = torch.from_numpy(features).requires_grad_(True)
    r = torch.from_numpy(rois)
    g = torch.from_numpy(grad)
    scale = 1.0 / STRIDE
    result = {}
    with torch.no_grad():
        t = median_time(lambda: tv_align(x, r, size, scale, SAMPLING), repeats)
        result["roi_align forward"] = (t, tv_align(x, r, size, scale, SAMPLING).numpy())
        t = median_time(lambda: tv_pool(x, r, size, scale), repeats)
        result["roi_pool forward"] = (t, tv_pool(x, r, size, scale).numpy())
    for name, op in (
        ("roi_align backward", lambda: tv_align(x, r, size, scale, SAMPLING)),
        ("roi_pool backward", lambda: tv_pool(x, r, size, scale)),
    ):
        times = []
        for i in range(repeats + 1):
            y = op()
            x.grad = None
            t0 = time.perf_counter()
            y.backward(g)  # only the backward is timed
            if i:  # the first run is the warm-up
                times.append(time.perf_counter() - t0)
        result[name] = (statistics.median(times), x.grad.numpy().copy())
    return result


if __name__ == "__main__":
    main()
