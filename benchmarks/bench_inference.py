"""Mask R-CNN R50-FPN inference on the CPU, stage by stage: ours vs torchvision in the same run.

One 800x1088 image (min_size 800 / max_size 1333 keep it at 800x1088, already a multiple of
32, so neither side resizes or pads it) goes through ResNet-50-FPN Mask R-CNN with the SAME
random weights on both sides: a torchvision model (FrozenBatchNorm, as torchvision builds it for
its published weights, with non-trivial statistics) is saved to a ``.pth`` and converted with
``mrcnn_edu.convert.from_torchvision``. The stages timed on each side:

    transform     normalise, resize rule, pad                     (model._inputs / model.transform)
    backbone+FPN  ResNet-50 + FPN -> P2..P6
    RPN           head on 5 levels, decode, top-n, NMS -> 1000 proposals
    box branch    RoIAlign 7x7, box head, post-processing (score threshold, NMS, best 100)
    mask branch   RoIAlign 14x14, mask head and predictor, sigmoid of the labelled class
    paste         boxes and masks back to the original image (ours thresholds at 0.5 as
                  ``predict`` does; torchvision returns float probabilities)

So that both do the same work, the box score threshold is lowered (``--score-thresh``) until
100 detections survive, and the mask branch and the paste of BOTH sides run on the same 100
detections: ours, written to a file by our run and read by torchvision's. torchvision's own
detections are compared with ours as a check that both compute the same thing.

Each side runs in a fresh subprocess (its peak memory, VmHWM, is its own), with ``--threads``
threads for BLAS/OpenMP (environment variables set before NumPy or torch is imported;
``torch.set_num_threads``; threadpoolctl when installed also reports the BLAS kernel). Times are
medians over ``--repeats`` whole pipelines after one warm-up pipeline, in ``--rounds`` fresh
processes per side run alternately (ours, torchvision, ours, ...), then the median over rounds:
on a shared machine the load changes from minute to minute.

On machines that set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (older OpenBLAS builds need them),
a current NumPy runs a slower kernel: benchmark with both unset in that command only, e.g.
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_inference.py``.

Needs torch and torchvision. Usage:
    python benchmarks/bench_inference.py [--rounds 3] [--repeats 2] [--threads 2]
                                         [--only ours|torchvision] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _timing import blas_info  # benchmarks/_timing.py

STAGES = ("transform", "backbone+FPN", "RPN", "box branch", "mask branch", "paste")
IMAGE_HW = (800, 1088)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# -------------------------------------------------------------------------------------------
# Process helpers (the workers import NumPy/torch only after the thread variables are set)
# -------------------------------------------------------------------------------------------
def memory_kib() -> dict:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process in KiB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def run_pipeline(stages, repeats: int) -> dict:
    """Run the list of ``(name, fn)`` stages in order ``repeats + 1`` times (the first is a
    warm-up); each fn gets the previous one's result. Returns the median wall seconds per
    stage (``"wall"``) and the median CPU seconds of the process (``"cpu"``, all threads: less
    sensitive to other programs on a busy machine, but it counts BLAS threads' spin-waits)."""
    import statistics

    times = {kind: {name: [] for name, _ in stages} for kind in ("wall", "cpu")}
    for rep in range(repeats + 1):
        value = None
        for name, fn in stages:
            t0, c0 = time.perf_counter(), time.process_time()
            value = fn(value)
            if rep:
                times["wall"][name].append(time.perf_counter() - t0)
                times["cpu"][name].append(time.process_time() - c0)
    return {k: {n: statistics.median(t) for n, t in v.items()} for k, v in times.items()}


# -------------------------------------------------------------------------------------------
# Workers
# -------------------------------------------------------------------------------------------
def prepare(folder: str, seed: int) -> None:
    """A torchvision R50-FPN Mask R-CNN (FrozenBN, 91 classes) with seeded random weights,
    saved to ``folder/model.pth``, and a smooth random image saved to ``folder/image.npy``."""
    import numpy as np
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(seed)
    model = torchvision_model()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):  # statistics that are not the identity
            c = m.weight.shape[0]
            m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
            m.bias.copy_(0.1 * torch.randn(c, generator=gen))
            m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    # larger class weights than the 0.01-std init, so the scores are not all ~1/91
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.2, generator=gen)
    torch.save(model.state_dict(), os.path.join(folder, "model.pth"))
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (3, IMAGE_HW[0] // 16, IMAGE_HW[1] // 16)).astype(np.float32)
    image = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)
    image += rng.normal(0, 0.05, image.shape).astype(np.float32)
    np.save(os.path.join(folder, "image.npy"), np.clip(image, 0, 1))


def torchvision_model(**kwargs):
    """torchvision's R50-FPN Mask R-CNN (91 classes) as it is built for its published weights:
    FrozenBatchNorm, stem and res2 frozen (trainable_layers=3)."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    return MaskRCNN(backbone, num_classes=91, **kwargs)


def worker_ours(folder: str, repeats: int, score_thresh: float) -> dict:
    import dataclasses

    import numpy as np

    from mrcnn_edu.convert import from_torchvision
    from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
    from mrcnn_edu.transform import to_original_size

    cfg = MaskRCNNConfig.resnet50_fpn(num_classes=90)
    cfg = dataclasses.replace(
        cfg,
        min_size=800,
        max_size=1333,
        roi_heads=dataclasses.replace(cfg.roi_heads, score_thresh=score_thresh),
    )
    model = MaskRCNN(cfg, rng=0)
    model.load_state_dict(from_torchvision(os.path.join(folder, "model.pth")))
    model.eval()
    image = np.load(os.path.join(folder, "image.npy"))
    loaded = memory_kib()
    state = {}
    forced_path = os.path.join(folder, "detections.npz")

    def transform(_):
        state["inputs"] = model._inputs([image])
        return state["inputs"].batch

    def rpn(features):
        inputs = state["inputs"]
        proposals, _ = model.rpn(features, inputs.image_sizes, None, inputs.batch.shape[-2:])
        return features, proposals

    def box_branch(args):
        features, proposals = args
        dets = model.roi_heads.detect_boxes(features, proposals, state["inputs"].image_sizes)
        if "forced" not in state:  # the first run fixes the 100 detections both sides mask
            state["forced"] = {k: v.copy() for k, v in dets[0].items()}
            np.savez(forced_path, **state["forced"])
        return features

    def mask_branch(features):
        dets = [{k: v.copy() for k, v in state["forced"].items()}]
        return model.roi_heads.add_mask_probs(features, dets, state["inputs"].image_sizes)

    def paste(dets):
        inputs = state["inputs"]
        return to_original_size(dets, inputs.image_sizes, inputs.original_sizes, 0.5)

    stages = [transform, model.backbone, rpn, box_branch, mask_branch, paste]
    times = run_pipeline(list(zip(STAGES, stages)), repeats)
    return {
        "times": times,
        "mem_loaded_kib": loaded["VmRSS"],
        "peak_kib": memory_kib()["VmHWM"],
        "size": list(state["inputs"].batch.shape),
        "detections": int(state["forced"]["boxes"].shape[0]),
    }


def worker_torchvision(folder: str, repeats: int, score_thresh: float) -> dict:
    import numpy as np
    import torch
    from torchvision.models.detection.roi_heads import maskrcnn_inference

    model = torchvision_model(min_size=800, max_size=1333, box_score_thresh=score_thresh)
    model.load_state_dict(torch.load(os.path.join(folder, "model.pth"), weights_only=True))
    model.eval()
    image = torch.from_numpy(np.load(os.path.join(folder, "image.npy")))
    forced = dict(np.load(os.path.join(folder, "detections.npz")))
    loaded = memory_kib()
    heads, state = model.roi_heads, {}

    def transform(_):
        state["images"], _ = model.transform([image])
        return state["images"].tensors

    def rpn(features):
        proposals, _ = model.rpn(state["images"], features)
        return features, proposals

    def box_branch(args):
        features, proposals = args
        sizes = state["images"].image_sizes
        x = heads.box_head(heads.box_roi_pool(features, proposals, sizes))
        logits, deltas = heads.box_predictor(x)
        boxes, scores, labels = heads.postprocess_detections(logits, deltas, proposals, sizes)
        state["own"] = {"boxes": boxes[0].numpy(), "labels": labels[0].numpy()}
        return features

    def mask_branch(features):
        boxes = torch.from_numpy(forced["boxes"])
        labels = torch.from_numpy(forced["labels"])
        x = heads.mask_roi_pool(features, [boxes], state["images"].image_sizes)
        probs = maskrcnn_inference(heads.mask_predictor(heads.mask_head(x)), [labels])
        return [{"boxes": boxes, "labels": labels, "masks": probs[0]}]

    def paste(dets):
        images = state["images"]
        return model.transform.postprocess(dets, images.image_sizes, [tuple(image.shape[-2:])])

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    stages = [transform, model.backbone, rpn, box_branch, mask_branch, paste]
    with torch.inference_mode():
        times = run_pipeline(list(zip(STAGES, stages)), repeats)
    return {
        "times": times,
        "mem_loaded_kib": loaded["VmRSS"],
        "peak_kib": memory_kib()["VmHWM"],
        "size": list(state["images"].tensors.shape),
        **compare_detections(state["own"], forced),
    }


def compare_detections(own: dict, forced: dict) -> dict:
    """torchvision's own detections against ours (the forced ones): count, labels, boxes."""
    import numpy as np

    n = min(len(own["boxes"]), len(forced["boxes"]))
    return {
        "detections": len(own["boxes"]),
        "max_box_diff_px": float(np.abs(own["boxes"][:n] - forced["boxes"][:n]).max()),
        "labels_equal": bool(np.array_equal(own["labels"][:n], forced["labels"][:n])),
    }


# -------------------------------------------------------------------------------------------
# Driver
# -------------------------------------------------------------------------------------------
def spawn(role: str, folder: str, args) -> dict:
    """Run this script as ``--worker role`` in a fresh process with the thread variables set."""
    env = dict(os.environ)
    n = str(args.threads)
    env.update(OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", role, "--dir", folder]
    cmd += ["--repeats", str(args.repeats), "--score-thresh", str(args.score_thresh)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(results: dict, args) -> None:
    gib = 1024.0**2
    names = [n for n in ("ours", "torchvision") if n in results]
    print(
        f"image {IMAGE_HW[0]}x{IMAGE_HW[1]}, {args.threads} threads, median over {args.rounds} "
        f"alternated rounds of the median of {args.repeats} pipelines (after a warm-up one)"
    )
    for name in names:
        r = results[name]
        print(f"  {name}: batch {r['size']}, {r['detections']} detections, BLAS: {r['blas']}")
    for kind in ("wall", "cpu"):
        header = "".join(f"{n + ' ' + kind + ' s':>20s}" for n in names)
        print(f"{'stage':18s}{header}{'ours/tv':>10s}")
        for stage in [*STAGES, "total"]:
            vals = [results[n]["times"][kind] for n in names]
            vals = [sum(v.values()) if stage == "total" else v[stage] for v in vals]
            print(f"{stage:18s}" + "".join(f"{v:20.3f}" for v in vals) + _ratio(vals, ".2f"))
    for label, key in (("RSS after load GiB", "mem_loaded_kib"), ("peak RSS GiB", "peak_kib")):
        vals = [results[n][key] / gib for n in names]
        print(f"{label:18s}" + "".join(f"{v:20.2f}" for v in vals) + _ratio(vals, ".2f"))
    tv = results.get("torchvision")
    if tv is not None and "max_box_diff_px" in tv:
        print(
            f"check: torchvision's own {tv['detections']} detections vs ours: labels equal "
            f"{tv['labels_equal']}, max box difference {tv['max_box_diff_px']:.2e} px"
        )


def _ratio(vals, fmt: str) -> str:
    return f"{vals[0] / vals[1]:10{fmt}}" if len(vals) == 2 and vals[1] > 0 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="timed pipelines per process")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per side, alternated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score-thresh", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("ours", "torchvision"), default=None)
    ap.add_argument("--json", help="also write the raw results to this file")
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=("prepare", "ours", "torchvision"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "prepare":
        prepare(args.dir, args.seed)
        return
    if args.worker is not None:
        run = worker_ours if args.worker == "ours" else worker_torchvision
        result = run(args.dir, args.repeats, args.score_thresh)
        result["blas"] = blas_info()
        print(json.dumps(result))
        return
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(var):
            print(f"note: {var}={os.environ[var]} is set (see the module docstring)")
    roles = ["ours"] if args.only == "ours" else ["ours", "torchvision"]
    runs = {role: [] for role in roles}
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as folder:
        spawn_prepare = [sys.executable, os.path.abspath(__file__), "--worker", "prepare"]
        subprocess.run(spawn_prepare + ["--dir", folder, "--seed", str(args.seed)], check=True)
        for _ in range(args.rounds):  # alternate, so that both see the same load on average
            for role in roles:  # ours first: its first run writes the forced detections
                runs[role].append(spawn(role, folder, args))
    if args.only == "torchvision":
        del runs["ours"]
    results = {role: merge_rounds(r) for role, r in runs.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": results, "rounds": runs}, f, indent=1)
    report(results, args)


def merge_rounds(rounds: list) -> dict:
    """One worker's results over the rounds: per stage the median of the rounds' medians, the
    largest peak memory."""
    import statistics

    out = dict(rounds[0])
    out["times"] = {
        kind: {k: statistics.median(r["times"][kind][k] for r in rounds) for k in STAGES}
        for kind in ("wall", "cpu")
    }
    out["peak_kib"] = max(r["peak_kib"] for r in rounds)
    return out


if __name__ == "__main__":
    main()
