"""Convolution forward + backward speed, measured against references in the same run.

For each shape we time our im2col + GEMM conv (forward, then backward for input and weights)
and report:
  * GFLOP/s of the whole forward+backward (3 GEMM-equivalents of 2*O*K*P FLOPs each);
  * the ratio to a plain float32 GEMM of the same size (O x K) @ (K x P) run three times —
    the best an im2col convolution can do on this BLAS (target: >= 50%);
  * when torch is installed, the time ratio to torch.nn.functional.conv2d forward+backward on
    the CPU with the same thread count (target: <= 1.5x), and the same ratio for those three
    plain GEMMs ('GEMMs/torch'): no im2col convolution on this BLAS gets below that floor.

The BLAS library and kernel are printed first: OpenBLAS's kernel (AVX2 or AVX-512) changes
every figure, by 2x on one machine of ours (``mrcnn_edu.threads.forced_kernel_warning``).

Usage: python benchmarks/bench_conv.py [--repeats 3] [--small]
"""

from __future__ import annotations

import argparse

import numpy as np
from _timing import median_time, print_blas  # benchmarks/_timing.py

from mrcnn_edu.nn import functional as F

# name, N, C, H, W, O, k, stride, padding  (ResNet-50 at an 800x1088 input, and the mask head)
SHAPES = [
    ("stem 7x7/2 3->64 @800x1088", 1, 3, 800, 1088, 64, 7, 2, 3),
    ("res2 3x3 64->64 @200x272", 1, 64, 200, 272, 64, 3, 1, 1),
    ("res3 3x3 128->128 @100x136", 1, 128, 100, 136, 128, 3, 1, 1),
    ("res4 3x3 256->256 @50x68", 1, 256, 50, 68, 256, 3, 1, 1),
    ("res4 1x1 256->1024 @50x68", 1, 256, 50, 68, 1024, 1, 1, 0),
    ("res5 3x3 512->512 @25x34", 1, 512, 25, 34, 512, 3, 1, 1),
    ("mask head 3x3 256->256 @14x14 x128 RoIs", 128, 256, 14, 14, 256, 3, 1, 1),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="quarter-size images (quick check)")
    args = ap.parse_args()
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print_blas()
    print(
        f"{'shape':42s} {'ours ms':>9s} {'GFLOP/s':>8s} {'vs GEMM':>8s} {'vs torch':>9s} "
        f"{'GEMMs/torch':>11s}"
    )
    for name, n, c, h, w, o, k, s, p in SHAPES:
        if args.small and n == 1:
            h, w = h // 4, w // 4
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        wt = rng.standard_normal((o, c, k, k), dtype=np.float32) * 0.01
        b = np.zeros(o, np.float32)
        y, cache = F.conv2d_forward(x, wt, b, s, p)
        dy = rng.standard_normal(y.shape, dtype=np.float32)

        def ours():
            _, c_ = F.conv2d_forward(x, wt, b, s, p)
            F.conv2d_backward(dy, c_)

        t_ours = median_time(ours, args.repeats)
        kdim, pdim = c * k * k, n * y.shape[2] * y.shape[3]
        flops = 3 * 2.0 * o * kdim * pdim
        a_ = rng.standard_normal((o, kdim), dtype=np.float32)
        b_ = rng.standard_normal((kdim, pdim), dtype=np.float32)
        t_gemm = 3 * median_time(lambda: a_ @ b_, args.repeats)
        torch_col = floor_col = "n/a"
        if torch is not None:
            tx = torch.from_numpy(x).requires_grad_(True)
            tw = torch.from_numpy(wt).requires_grad_(True)
            tb = torch.from_numpy(b).requires_grad_(True)
            tdy = torch.from_numpy(dy)

            def theirs():
                tx.grad = tw.grad = tb.grad = None
                torch.nn.functional.conv2d(tx, tw, tb, s, p).backward(tdy)

            t_torch = median_time(theirs, args.repeats)
            torch_col = f"{t_ours / t_torch:8.2f}x"
            floor_col = f"{t_gemm / t_torch:10.2f}x"
        print(
            f"{name:42s} {t_ours * 1e3:9.1f} {flops / t_ours / 1e9:8.1f} "
            f"{t_gemm / t_ours:7.0%} {torch_col:>9s} {floor_col:>11s}"
        )
    if torch is not None:
        print(f"(torch uses {torch_threads} threads; 'vs torch' is our time / torch's time)")
    else:
        print("(torch not installed: no torch comparison)")


if __name__ == "__main__":
    main()
