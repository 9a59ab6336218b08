"""NMS speed: our tiled NumPy NMS against torchvision's CPU kernel, measured in the same run.

Boxes are realistic detector output: jittered copies of a few dozen objects (about 40 boxes per
object, like the raw boxes around each object before NMS), random scores. A second, "sparse"
set of uniformly scattered small boxes is the worst case for us: almost nothing is suppressed,
so nearly all N^2 / 2 pairs must be tested (torchvision's loop is also quadratic there).

For every size we also check that both return the same indices. Random float32 scores repeat a
few times among 20000 boxes; torchvision's batched_nms sorts its result with an unstable sort,
so equal-score boxes of different categories may come out in another order ("yes*").

Usage: python benchmarks/bench_nms.py [--repeats 5] [--threshold 0.7] [--sizes 1000 5000 20000]
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
from _timing import median_time  # benchmarks/_timing.py

from mrcnn_edu.nms import batched_nms, nms


def clustered_boxes(rng, n: int, boxes_per_object: int = 40):
    objects = max(n // boxes_per_object, 1)
    centres = rng.uniform(0, 1000, (objects, 2))
    sizes = rng.uniform(20, 300, (objects, 2))
    which = rng.integers(0, objects, n)
    ctr = centres[which] + rng.normal(0, 0.1, (n, 2)) * sizes[which]
    wh = sizes[which] * np.exp(rng.normal(0, 0.15, (n, 2)))
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32)


def sparse_boxes(rng, n: int):
    ctr = rng.uniform(0, 1000, (n, 2))
    wh = rng.uniform(5, 50, (n, 2))
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32)


def report(name: str, ours, theirs, scores, repeats: int) -> None:
    """Time both callables, check they keep the same boxes, print one row."""
    t_ours = median_time(ours, repeats)
    keep = ours()
    tv_ms, ratio, same = "n/a", "n/a", "n/a"
    if theirs is not None:
        t_tv = median_time(theirs, repeats)
        tv_ms, ratio = f"{t_tv * 1e3:.1f}", f"{t_ours / t_tv:.2f}x"
        tv_keep = theirs().numpy()
        if np.array_equal(keep, tv_keep):
            same = "yes"
        elif set(keep) == set(tv_keep) and np.array_equal(scores[keep], scores[tv_keep]):
            same = "yes*"  # same boxes; equal scores listed in another order
        else:
            same = "NO"
    print(f"{name:24s} {len(keep):6d} {t_ours * 1e3:9.1f} {tv_ms:>15s} {ratio:>8s} {same:>5s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    args = ap.parse_args()
    try:
        import torch
        import torchvision
    except ImportError:
        torch = torchvision = None

    rng = np.random.default_rng(0)
    thr = args.threshold
    print(
        f"{'case':24s} {'kept':>6s} {'ours ms':>9s} {'torchvision ms':>15s} "
        f"{'ours/tv':>8s} {'same':>5s}"
    )
    for kind, make in (("clustered", clustered_boxes), ("sparse", sparse_boxes)):
        for n in args.sizes:
            boxes, scores = make(rng, n)
            idxs = rng.integers(0, 5, n)  # 5 FPN levels, as in the RPN
            ours = partial(nms, boxes, scores, thr)
            ours_batched = partial(batched_nms, boxes, scores, idxs, thr)
            theirs = theirs_batched = None
            if torchvision is not None:
                tb, ts, ti = map(torch.from_numpy, (boxes, scores, idxs))
                theirs = partial(torchvision.ops.nms, tb, ts, thr)
                theirs_batched = partial(torchvision.ops.batched_nms, tb, ts, ti, thr)
            report(f"nms {kind} {n}", ours, theirs, scores, args.repeats)
            report(f"batched {kind} {n}", ours_batched, theirs_batched, scores, args.repeats)
    if torchvision is not None:
        print(
            f"(torch {torch.__version__} with {torch.get_num_threads()} threads; "
            "'ours/tv' is our time / torchvision's time, < 1 means we are faster)"
        )
        print(
            "(yes*: the same boxes kept; boxes of different categories with equal scores are "
            "listed in index order by us, in torchvision's unstable sort order by it)"
        )
    else:
        print("(torchvision not installed: no comparison)")


if __name__ == "__main__":
    main()
