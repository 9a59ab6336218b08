"""RoIAlign (forward, backward) and NMS speed: NumPy, CuPy, Numba-CUDA, against torchvision.

Every implementation is timed in the same run on the same data, and every GPU time is reported
as a ratio to torchvision's CUDA kernel (targets on an H100-class GPU: CuPy <= 1.0x, Numba
<= 1.5x). Timing: one warm-up call (compilation, allocations), then the median of ``--repeats``
calls, each between two device synchronisations so that the timer sees finished work.

Cases (Mask R-CNN at an 800 x 1088 input, torchvision's settings: sampling_ratio 2, aligned
False): RoIAlign on a 1x256x200x272 map (FPN P2, stride 4) and a 4x256x50x68 batch (P4, stride
16) with 512 and 2000 RoIs at 7x7 (box head) and 14x14 (mask head); NMS of 1k, 5k and 20k boxes
at IoU 0.7 (the RPN's threshold).

Without a CUDA device the GPU part is skipped with a message, and the NumPy reference is timed
on the smallest cases (against torchvision's CPU kernels when torch is installed).

Usage: python benchmarks/bench_kernels.py [--repeats 10] [--quick] [--numpy-all]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from _timing import median_time  # benchmarks/_timing.py

IMAGE_HW = (800, 1088)
MAPS = [  # name, (N, C, H, W), spatial_scale
    ("P2 1x256x200x272", (1, 256, 200, 272), 1 / 4),
    ("P4 4x256x50x68", (4, 256, 50, 68), 1 / 16),
]
ROI_COUNTS = (512, 2000)
OUTPUT_SIZES = (7, 14)
NMS_SIZES = (1000, 5000, 20000)
SAMPLING_RATIO, ALIGNED, NMS_THRESHOLD = 2, False, 0.7


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="only the first case of each kind")
    ap.add_argument(
        "--numpy-all", action="store_true", help="time NumPy on every case (minutes on a CPU)"
    )
    args = ap.parse_args()

    gpu = _gpu_libraries()
    if gpu is None:
        print(
            "No CUDA device (or cupy missing): skipping the CuPy / Numba / torchvision CUDA part."
        )
        print("Timing the NumPy reference on the smallest cases instead.\n")
    torch = _optional_torch(need_cuda=gpu is not None)

    rng = np.random.default_rng(0)
    rows = []
    for map_name, shape, scale in MAPS[:1] if args.quick else MAPS:
        features = rng.standard_normal(shape, dtype=np.float32)
        for k in ROI_COUNTS[:1] if args.quick else ROI_COUNTS:
            rois = random_rois(rng, k, shape[0])
            for size in OUTPUT_SIZES[:1] if args.quick else OUTPUT_SIZES:
                case = f"RoIAlign {map_name} K={k} {size}x{size}"
                smallest = (map_name, k, size) == (MAPS[0][0], ROI_COUNTS[0], OUTPUT_SIZES[0])
                run_numpy = gpu is None and (smallest or args.numpy_all)
                rows += bench_roi_align(
                    case, features, rois, size, scale, gpu, torch, args, run_numpy
                )
    for n in NMS_SIZES[:1] if args.quick else NMS_SIZES:
        boxes, scores = random_boxes(rng, n)
        run_numpy = gpu is None and (n == NMS_SIZES[0] or args.numpy_all)
        rows += bench_nms(
            f"NMS {n} boxes IoU {NMS_THRESHOLD}", boxes, scores, gpu, torch, args, run_numpy
        )

    print_table(rows, device=gpu["device"] if gpu else "CPU (no CUDA device)")
    return 0


# -- data ----------------------------------------------------------------------------------
def random_rois(rng, k: int, batch: int) -> np.ndarray:
    """(K, 5) float32 RoIs in image pixels, 16..400 px a side, inside an 800 x 1088 image."""
    h, w = IMAGE_HW
    size = rng.uniform(16, 400, (k, 2))
    x1 = rng.uniform(0, w - size[:, 0])
    y1 = rng.uniform(0, h - size[:, 1])
    idx = rng.integers(0, batch, k)
    return np.stack([idx, x1, y1, x1 + size[:, 0], y1 + size[:, 1]], 1).astype(np.float32)


def random_boxes(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Proposals-like boxes: (N, 4) float32 in the image, and (N,) float32 scores."""
    return random_rois(rng, n, 1)[:, 1:].copy(), rng.random(n, dtype=np.float32)


def bench_roi_align(case, features, rois, size, scale, gpu, torch, args, run_numpy):
    rows = []
    rng = np.random.default_rng(1)
    grad = rng.standard_normal((rois.shape[0], features.shape[1], size, size), dtype=np.float32)
    fwd_args = (size, scale, SAMPLING_RATIO, ALIGNED)
    if run_numpy:
        from mrcnn_edu import roi_ops

        t_np_f = timed(lambda: roi_ops.roi_align(features, rois, *fwd_args), _noop, 1)
        t_np_b = timed(
            lambda: roi_ops.roi_align_backward(grad, rois, features.shape, *fwd_args), _noop, 1
        )
        ref_f = ref_b = None
        if torch is not None:  # torchvision's CPU kernels, same threads as this machine
            tf, tr, tg = (torch.from_numpy(a) for a in (features, rois, grad))
            ref_f = timed(lambda: _tv_align(torch, tf, tr, fwd_args), _noop, 1)
            ref_b = timed(lambda: _tv_align_backward(torch, tg, tr, tf.shape, fwd_args), _noop, 1)
        rows.append((case + " fwd", "NumPy (CPU)", t_np_f, ref_f, "torchvision CPU"))
        rows.append((case + " bwd", "NumPy (CPU)", t_np_b, ref_b, "torchvision CPU"))
    if gpu is None:
        return rows

    cp = gpu["cupy"]
    feats_d, rois_d, grad_d = (cp.asarray(a) for a in (features, rois, grad))
    ref_f = ref_b = None
    if torch is not None:
        tf, tr, tg = (torch.as_tensor(a, device="cuda") for a in (features, rois, grad))
        sync_t = torch.cuda.synchronize
        ref_f = timed(lambda: _tv_align(torch, tf, tr, fwd_args), sync_t, args.repeats)
        ref_b = timed(
            lambda: _tv_align_backward(torch, tg, tr, tf.shape, fwd_args), sync_t, args.repeats
        )
    for label, module in gpu["roi_align"].items():
        t_f = timed(
            lambda m=module: m.roi_align(feats_d, rois_d, *fwd_args), gpu["sync"], args.repeats
        )
        t_b = timed(
            lambda m=module: m.roi_align_backward(grad_d, rois_d, features.shape, *fwd_args),
            gpu["sync"],
            args.repeats,
        )
        rows.append((case + " fwd", label, t_f, ref_f, "torchvision CUDA"))
        rows.append((case + " bwd", label, t_b, ref_b, "torchvision CUDA"))
    return rows


def bench_nms(case, boxes, scores, gpu, torch, args, run_numpy):
    rows = []
    if run_numpy:
        from mrcnn_edu.nms import nms

        t_np = timed(lambda: nms(boxes, scores, NMS_THRESHOLD), _noop, 3)
        ref = None
        if torch is not None:
            from torchvision.ops import nms as tv_nms

            tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
            ref = timed(lambda: tv_nms(tb, ts, NMS_THRESHOLD), _noop, 3)
        rows.append((case, "NumPy (CPU)", t_np, ref, "torchvision CPU"))
    if gpu is None:
        return rows
    cp = gpu["cupy"]
    boxes_d, scores_d = cp.asarray(boxes), cp.asarray(scores)
    ref = None
    if torch is not None:
        from torchvision.ops import nms as tv_nms

        tb, ts = (torch.as_tensor(a, device="cuda") for a in (boxes, scores))
        ref = timed(lambda: tv_nms(tb, ts, NMS_THRESHOLD), torch.cuda.synchronize, args.repeats)
    for label, module in gpu["nms"].items():
        t = timed(
            lambda m=module: m.nms(boxes_d, scores_d, NMS_THRESHOLD), gpu["sync"], args.repeats
        )
        rows.append((case, label, t, ref, "torchvision CUDA"))
    return rows


def _tv_align(torch, features, rois, fwd_args):
    size, scale, sampling_ratio, aligned = fwd_args
    return torch.ops.torchvision.roi_align(
        features, rois, scale, size, size, sampling_ratio, aligned
    )


def _tv_align_backward(torch, grad, rois, shape, fwd_args):
    """torchvision's backward kernel itself (no autograd bookkeeping), like ours."""
    size, scale, sampling_ratio, aligned = fwd_args
    n, c, h, w = shape
    return torch.ops.torchvision._roi_align_backward(
        grad, rois, scale, size, size, n, c, h, w, sampling_ratio, aligned
    )


def timed(fn, sync, repeats: int) -> float:
    """Median seconds of ``fn()``, synchronising the device around every call."""
    return median_time(fn, repeats, sync)


def _noop() -> None:
    pass


# -- environment ---------------------------------------------------------------------------
def _gpu_libraries():
    """cupy, the kernel modules that import, a sync function and the device name; or None."""
    from mrcnn_edu.backend import gpu_available

    if not gpu_available():
        return None
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    gpu = {
        "cupy": cupy,
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "sync": cupy.cuda.Device().synchronize,
        "roi_align": {},
        "nms": {},
    }
    from mrcnn_edu.kernels import cupy_nms, cupy_roi_align

    gpu["roi_align"]["CuPy"] = cupy_roi_align
    gpu["nms"]["CuPy"] = cupy_nms
    try:
        from mrcnn_edu.kernels import numba_nms, numba_roi_align

        # One tiny call each: a broken numba-cuda (e.g. with numpy 2.5) fails here, not mid-table.
        x = cupy.zeros((1, 1, 2, 2), cupy.float32)
        numba_roi_align.roi_align(x, cupy.asarray([[0, 0, 0, 1, 1]], cupy.float32), 1)
        numba_nms.nms(cupy.asarray([[0, 0, 1, 1]], cupy.float32), cupy.ones(1, cupy.float32), 0.5)
        gpu["roi_align"]["Numba"] = numba_roi_align
        gpu["nms"]["Numba"] = numba_nms
    except Exception as err:  # report and carry on with CuPy
        print(f"Numba-CUDA kernels unavailable, skipping them: {err!r}")
    return gpu


def _optional_torch(need_cuda: bool):
    try:
        import torch
        import torchvision  # noqa: F401  (registers torch.ops.torchvision)
    except ImportError:
        print("torch/torchvision not installed: no reference times, no ratios.")
        return None
    if need_cuda and not torch.cuda.is_available():
        print("torch has no CUDA here: no torchvision CUDA reference, no ratios.")
        return None
    return torch


def print_table(rows, device: str) -> None:
    print(f"\ndevice: {device}; median of repeats, milliseconds")
    print(f"{'case':58s} {'impl':12s} {'ms':>9s} {'ref ms':>9s} {'ratio':>7s}  reference")
    for case, impl, t, ref, ref_name in rows:
        ref_ms = f"{ref * 1e3:9.3f}" if ref else f"{'-':>9s}"
        ratio = f"{t / ref:6.2f}x" if ref else f"{'-':>7s}"
        print(f"{case:58s} {impl:12s} {t * 1e3:9.3f} {ref_ms} {ratio}  {ref_name if ref else ''}")


if __name__ == "__main__":
    sys.exit(main())
