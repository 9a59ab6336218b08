"""The ``mrcnn-edu`` command.

mrcnn-edu demo                      train on synthetic shapes, evaluate, write pictures
mrcnn-edu demo --quick              the same pipeline in about a minute (smoke test)
mrcnn-edu demo --toolkit            fit a tiny conv net with the explicit-autograd toolkit
mrcnn-edu train --config run.json --out runs/x [--resume runs/x]
mrcnn-edu evaluate --run runs/x [--data coco.json --images folder]
mrcnn-edu predict --run runs/x image.png [...] --out predictions.png
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mrcnn-edu",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train on synthetic shapes, evaluate, write pictures")
    demo.add_argument("--toolkit", action="store_true", help="the tiny conv-net toolkit demo")
    demo.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    demo.add_argument("--out", default=None, help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--resume", default=None, help="a checkpoint or run folder to continue")
    demo.add_argument("--no-progress", action="store_true", help="plain log lines, no bar")

    train = sub.add_parser("train", help="train from a run config (JSON)")
    train.add_argument("--config", default=None, help="run config JSON (model/train/data)")
    train.add_argument(
        "--data", default=None, help="'shapes' (default) or a COCO instances json (needs --images)"
    )
    train.add_argument("--images", default=None, help="image folder of the COCO json")
    train.add_argument("--out", default=None, help="output folder (overrides the config)")
    train.add_argument("--resume", default=None, help="a checkpoint or run folder to continue")
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("evaluate", help="COCO bbox/segm AP of a trained run")
    ev.add_argument("--run", required=True, help="the run folder (config.json + last.npz)")
    ev.add_argument("--config", default=None, help="run config JSON (default RUN/config.json)")
    ev.add_argument("--out", default=None, help="folder for the figure (default: the run)")
    ev.add_argument("--weights", default=None, help="checkpoint to load (default RUN/last.npz)")
    ev.add_argument("--data", default=None, help="COCO json to evaluate on (default: held-out)")
    ev.add_argument("--images", default=None, help="image folder of --data")

    pr = sub.add_parser("predict", help="draw a trained run's predictions on image files")
    pr.add_argument("images", nargs="+", help="PNG/JPEG files")
    pr.add_argument("--run", required=True, help="the run folder (config.json + last.npz)")
    pr.add_argument("--config", default=None, help="run config JSON (default RUN/config.json)")
    pr.add_argument("--weights", default=None)
    pr.add_argument("--out", default="predictions.png", help="the figure to write")
    pr.add_argument("--score-threshold", type=float, default=0.5)

    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args, parser)
    except (FileNotFoundError, ValueError) as err:
        print(f"mrcnn-edu {args.command}: error: {err}", file=sys.stderr)
        return 2


def _demo(args, parser) -> int:
    if args.steps is not None and args.steps <= 0:
        parser.error("--steps must be positive")
    if args.toolkit:
        from . import toolkit_demo

        result = toolkit_demo.run(
            out_dir=args.out or "runs/toolkit_demo",
            steps=args.steps or 300,
            seed=args.seed,
            progress=not args.no_progress,
        )
        return 0 if result["losses"][-1] < result["losses"][0] else 1
    import dataclasses

    from .demo import run_demo
    from .run_config import RunConfig, quick_run_config

    out = args.out or ("runs/demo_quick" if args.quick else "runs/demo")
    cfg = quick_run_config(out) if args.quick else RunConfig()
    overrides = {"out_dir": out, "seed": args.seed, "progress": not args.no_progress}
    if args.steps:
        overrides["max_steps"] = args.steps
        overrides["warmup_iters"] = min(cfg.train.warmup_iters, args.steps)
    cfg.train = dataclasses.replace(cfg.train, **overrides)
    run_demo(cfg, resume=args.resume)
    return 0


def _train(args, parser) -> int:
    import dataclasses

    from .demo import run_demo
    from .run_config import DataConfig, RunConfig

    cfg = RunConfig.load(args.config) if args.config else RunConfig()
    if args.data and args.data != "shapes":
        if not args.images:
            parser.error("--data with a COCO json needs --images (the image folder)")
        cfg.data = DataConfig(source="coco", annotations=args.data, images=args.images)
    overrides = {"progress": not args.no_progress}
    if args.out:
        overrides["out_dir"] = args.out
    if args.steps:
        overrides["max_steps"] = args.steps
        overrides["warmup_iters"] = min(cfg.train.warmup_iters, args.steps)
    cfg.train = dataclasses.replace(cfg.train, **overrides)
    if cfg.data.source == "coco":
        from .data.coco import CocoDataset

        n = len(CocoDataset(cfg.data.annotations, cfg.data.images).class_names)
        if cfg.model.num_classes != n:
            cfg.model = dataclasses.replace(cfg.model, num_classes=n)
    run_demo(cfg, resume=args.resume)
    return 0


def _load_run(run_dir: str, weights_path: str | None, config_path: str | None = None):
    from .mask_rcnn import MaskRCNN
    from .run_config import RUN_CONFIG_NAME, RunConfig
    from .train_checkpoint import load_checkpoint_weights

    cfg = RunConfig.load(config_path or os.path.join(run_dir, RUN_CONFIG_NAME))
    model = MaskRCNN(cfg.model, rng=0)
    path = weights_path or os.path.join(run_dir, "last.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights at {path!r}; train first or pass --weights")
    load_checkpoint_weights(model, path)
    return cfg, model.eval()


def _evaluate(args, parser) -> int:
    from .demo import evaluate_model
    from .run_config import build_datasets

    cfg, model = _load_run(args.run, args.weights, args.config)
    if args.data:
        if not args.images:
            parser.error("--data needs --images (the image folder)")
        from .data.coco import CocoDataset

        dataset = CocoDataset(args.data, args.images)
        names = dataset.class_names
    else:
        _, dataset, names = build_datasets(cfg.data)
        if dataset is None:
            parser.error("the run has no held-out set; pass --data and --images")
    out = args.out or args.run
    os.makedirs(out, exist_ok=True)
    evaluate_model(model, dataset, names, out, figure_name="eval_predictions.png")
    return 0


def _predict(args, parser) -> int:
    import numpy as np

    from .run_config import build_datasets
    from .visualize import save_predictions_figure

    try:
        from PIL import Image
    except ImportError as err:
        raise ValueError("reading images needs Pillow: pip install 'mrcnn-edu[demo]'") from err
    cfg, model = _load_run(args.run, args.weights, args.config)
    images = []
    for path in args.images:
        if not os.path.exists(path):
            raise FileNotFoundError(f"image not found: {path!r}")
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except OSError as err:
            raise ValueError(f"cannot read {path!r} as an image: {err}") from err
        images.append(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    predictions = model.predict(images)
    _, _, names = build_datasets(cfg.data) if cfg.data.source == "shapes" else (0, 0, None)
    out = save_predictions_figure(
        images,
        predictions,
        class_names=names,
        path=args.out,
        max_images=len(images),
        score_threshold=args.score_threshold,
    )
    for path, p in zip(args.images, predictions):
        keep = p["scores"] >= args.score_threshold
        print(f"{path}: {int(keep.sum())} detections")
    print(f"figure: {out}")
    return 0


_COMMANDS = {"demo": _demo, "train": _train, "evaluate": _evaluate, "predict": _predict}


if __name__ == "__main__":
    sys.exit(main())
