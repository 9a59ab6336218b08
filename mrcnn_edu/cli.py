"""The ``mrcnn-edu`` command.

mrcnn-edu demo                      train on synthetic shapes, evaluate, write pictures
                                    (2 MPI ranks on 2+ cores with the dist extra; --ranks 1)
mrcnn-edu demo --quick              the same pipeline in about a minute (smoke test)
mrcnn-edu demo --toolkit            fit a tiny conv net with the explicit-autograd toolkit
mrcnn-edu demo --pose [--quick]     keypoints (human pose) of synthetic stick figures, OKS AP
mrcnn-edu train --config run.json --out runs/x [--overwrite]
mrcnn-edu train --data train.json --images DIR --val-data val.json --eval-every 500 --out runs/x
mrcnn-edu train --resume runs/x [--lr 0.005]    continue a stopped run (Ctrl-C, SIGTERM, NaN)
mpiexec -n 2 mrcnn-edu train --config run.json [--device cuda]   data parallel: MPI (GPUs: NCCL)
mrcnn-edu evaluate --run runs/x [--data coco.json --images folder] [--json results.json]
mrcnn-edu predict --run runs/x image.png [...] --out predictions.png [--json results.json]
mrcnn-edu convert torchvision MODEL.pth OUT.npz   torchvision weights -> our .npz (no torch)
mrcnn-edu inspect --data coco.json --images folder [--config run.json] [--out inspect.png]
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli_train import (
    add_run_flags,
    add_val_flags,
    demo_command,
    demo_ranks_command,
    train_command,
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
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
    demo.add_argument("--pose", action="store_true", help="human pose: stick-figure keypoints")
    demo.add_argument("--out", default=None, help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="training steps")
    demo.add_argument("--seed", type=int, default=0)
    add_run_flags(demo, "its folder becomes the output folder unless --out")
    demo.add_argument("--no-progress", action="store_true", help="plain log lines, no bar")
    demo.add_argument(
        "--ranks",
        default=None,
        metavar="N",
        help="processes that train together, each on its share of the batch (default auto: 2 "
        "on a CPU with 2+ cores when the dist extra is installed, else 1; or MRCNN_EDU_RANKS); "
        "more than 1 restarts the command under mpiexec",
    )

    train = sub.add_parser("train", help="train from a run config (JSON)")
    train.add_argument("--config", default=None, help="run config JSON (model/train/data)")
    train.add_argument(
        "--data", default=None, help="'shapes' (default) or a COCO instances json (needs --images)"
    )
    train.add_argument("--images", default=None, help="image folder of the COCO json")
    _add_input_flags(train)
    add_val_flags(train)
    train.add_argument("--out", default=None, help="output folder (overrides the config)")
    add_run_flags(train, "with the run's own config, into its folder, unless --config/--out")
    train.add_argument("--steps", type=_positive_int, default=None, help="training steps")
    train.add_argument("--no-progress", action="store_true")

    ev = _add_evaluate_parser(sub)

    pr = sub.add_parser("predict", help="draw a trained run's predictions on image files")
    pr.add_argument("images", nargs="+", help="PNG/JPEG files")
    pr.add_argument("--run", required=True, help="the run folder (config.json + last.npz)")
    pr.add_argument("--config", default=None, help="run config JSON (default RUN/config.json)")
    pr.add_argument("--weights", default=None)
    pr.add_argument("--out", default="predictions.png", help="the figure to write")
    pr.add_argument("--score-threshold", type=_unit_interval, default=0.5, help="in [0, 1]")
    pr.add_argument("--json", default=None, help="also write COCO results (image ids 1..N)")

    _add_convert_parser(sub)
    _add_inspect_parser(sub)
    _add_threads_flag(demo, train, ev, pr)
    _add_device_flag(demo, train, ev, pr)

    args = parser.parse_args(argv)
    _quiet_other_ranks(args)
    try:
        _check_device(args)  # before anything is read or written
        _check_outputs(args)
        ranks = _demo_ranks(args)
        if ranks > 1:  # the command runs again as `ranks` MPI processes (launch.py)
            return demo_ranks_command(argv, ranks)
        _set_threads(args)
        return _COMMANDS[args.command](args, parser)
    except (OSError, ValueError) as err:  # bad input, or a file that cannot be written
        print(f"mrcnn-edu {args.command}: error: {err}", file=sys.stderr)
        return 2


def _quiet_other_ranks(args) -> None:
    """Under ``mpiexec``, ranks other than 0 print nothing on stdout (their errors still reach
    stderr), so the console shows one run."""
    if args.command not in ("demo", "train"):
        return
    from .distributed import launched_rank

    if launched_rank() > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the rest of the process


def _demo_ranks(args) -> int:
    """How many ranks ``demo`` starts (1: run in this process). Under ``mpiexec`` the
    launcher has decided: ``--ranks`` is checked against it and 1 returned."""
    if args.command != "demo" or args.toolkit:
        return 1
    from . import launch
    from .distributed import launched_world_size
    from .threads import available_cores

    world = launched_world_size()
    if world > 1:
        launch.check_launched_ranks(args.ranks, world)
        return 1
    ranks, note = launch.plan_ranks(args.ranks, args.device, available_cores())
    if note:
        print(note)
    return ranks


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _add_threads_flag(*parsers) -> None:
    for parser in parsers:
        parser.add_argument(
            "--threads",
            default=None,
            metavar="N",
            help="BLAS threads (default: cores - 1, at least 1; under mpiexec cores / ranks on "
            "the node; or MRCNN_EDU_THREADS, OPENBLAS_NUM_THREADS, OMP_NUM_THREADS if set)",
        )


def _set_threads(args) -> None:
    """``--threads`` (or its default, ``threads.choose_threads``), applied and printed; a bad
    count is a ValueError naming it (exit 2). Then a forced BLAS kernel is reported, and the
    rank pinned to cores of its own where ``MRCNN_EDU_PIN_CORES=1`` (``threads.pin_rank``)."""
    if hasattr(args, "threads"):
        from .distributed import launched_rank
        from .threads import PIN_ENV, blas_threads, configure_threads, pin_rank, say_blas_warnings

        choice = configure_threads(args.threads)
        say_blas_warnings()
        cpus = pin_rank(threads=choice.threads or blas_threads())
        if cpus is not None and launched_rank() == 0:
            where = ", ".join(map(str, cpus))
            print(
                f"cores: each rank pinned to its own (rank 0: CPU {where}; "
                f"{PIN_ENV}=0 leaves them free)"
            )


def _add_evaluate_parser(sub):
    ev = sub.add_parser("evaluate", help="COCO bbox/segm AP of a trained run")
    ev.add_argument("--run", required=True, help="the run folder (config.json + last.npz)")
    ev.add_argument("--config", default=None, help="run config JSON (default RUN/config.json)")
    ev.add_argument("--out", default=None, help="folder for the figure (default: the run)")
    ev.add_argument("--weights", default=None, help="checkpoint to load (default RUN/last.npz)")
    ev.add_argument("--data", default=None, help="COCO json to evaluate on (default: held-out)")
    ev.add_argument("--images", default=None, help="image folder of --data")
    ev.add_argument("--json", default=None, help="also write the COCO results json here")
    return ev


_DEVICE_HELP = (
    "cpu (default), cuda or cuda:N (a GPU; needs the gpu extra). Under mpiexec, --device cuda "
    "puts rank r on GPU r %% device_count and all-reduces with NCCL. Not part of the run: a run "
    "started on one device resumes on another"
)


def _add_device_flag(*parsers) -> None:
    for parser in parsers:
        parser.add_argument("--device", default=None, metavar="DEVICE", help=_DEVICE_HELP)


def _check_device(args) -> None:
    """``--device``, checked: a ValueError starting ``--device NAME:`` (exit 2) when there is
    no such device (no CuPy, no GPU) or the command cannot use it."""
    device = getattr(args, "device", None)
    if device is None:
        return
    from .backend import check_device

    try:
        name = check_device(device)
    except ValueError as err:
        reason = str(err).removeprefix(f"device {device!r}: ")
        raise ValueError(f"--device {device}: {reason}") from None
    if name != "cpu" and getattr(args, "toolkit", False):
        raise ValueError(f"--device {device}: the --toolkit demo runs on the CPU only")


def _check_outputs(args) -> None:
    """Every ``--out`` (and ``convert``'s OUT), checked before any work starts."""
    from .out_paths import IMAGE_SUFFIXES, check_output_file, check_output_folder

    out = getattr(args, "out", None)
    if out is None:
        return
    if args.command in ("demo", "train", "evaluate"):
        check_output_folder(out)
    elif args.command == "convert":
        check_output_file(out, "OUT")
    else:  # predict, inspect: a figure
        check_output_file(out, "--out", IMAGE_SUFFIXES)


def _demo(args, parser) -> int:
    if args.steps is not None and args.steps <= 0:
        parser.error("--steps must be positive")
    if args.toolkit and args.pose:
        parser.error("--toolkit and --pose are two different demos; choose one")
    if args.toolkit:
        from . import toolkit_demo

        result = toolkit_demo.run(
            out_dir=args.out or "runs/toolkit_demo",
            steps=args.steps or 300,
            seed=args.seed,
            progress=not args.no_progress,
        )
        return 0 if result["losses"][-1] < result["losses"][0] else 1
    return demo_command(args, parser)


def _add_input_flags(train) -> None:
    """``train``'s augmentation and image-size flags (applied by ``cli_train``)."""
    train.add_argument(
        "--augment",
        default=None,
        metavar="LIST",
        help="training augmentations, a comma list of hflip,vflip,rot90 or 'none' (default: "
        "the config's; hflip for a COCO json given with --data)",
    )
    train.add_argument(
        "--min-size",
        default=None,
        metavar="SIZES",
        help="resize images so the shorter side is this (a comma list, e.g. "
        "640,672,704,736,768,800: one drawn per training image, the last at inference); "
        "needs --max-size (default: the config's, native size)",
    )
    train.add_argument(
        "--max-size", type=int, default=None, help="longest side after resizing (e.g. 1333)"
    )
    train.add_argument(
        "--anchor-sizes",
        default=None,
        metavar="SIZES",
        help="the RPN's anchor sizes, one per level P2..P6, e.g. 19,38,76,152,304 (what "
        "`mrcnn-edu inspect` suggests; default: the config's)",
    )


def _train(args, parser) -> int:
    return train_command(args, parser)


def _load_run(run_dir: str, weights_path: str | None, config_path: str | None = None, device=None):
    from .mask_rcnn import MaskRCNN
    from .run_config import load_run_config
    from .train_checkpoint import load_checkpoint_weights

    # RUN/config.json, or the copy in the checkpoint when it is missing
    cfg = load_run_config(run_dir, weights_path, config_path)
    model = MaskRCNN(cfg.model, rng=0)
    path = weights_path or os.path.join(run_dir, "last.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights at {path!r}; train first or pass --weights")
    load_checkpoint_weights(model, path)
    if device is not None:  # --device: predictions are computed there, returned on the host
        model.to(device)
    print(f"device: {device or 'cpu'}")
    return cfg, model.eval()


def _evaluate(args, parser) -> int:
    from .demo import evaluate_model
    from .evaluate import check_results_path
    from .run_config import build_datasets

    cfg, model = _load_run(args.run, args.weights, args.config, args.device)
    json_path = check_results_path(args.json) if args.json else None
    if args.data:
        if not args.images:
            parser.error("--data needs --images (the image folder)")
        from .data.coco import CocoDataset

        dataset = CocoDataset(args.data, args.images)
    else:
        _, dataset, _ = build_datasets(cfg.data)
        if dataset is None:
            parser.error("the run has no held-out set; pass --data and --images")
    names = _same_classes(_run_classes(args.run, cfg)[0], dataset.class_names, args.data)
    out = args.out or args.run
    os.makedirs(out, exist_ok=True)
    evaluate_model(
        model, dataset, names, out, figure_name="eval_predictions.png", json_path=json_path
    )
    return 0


def _predict(args, parser) -> int:
    from .data.images import read_image
    from .evaluate import check_results_path
    from .visualize import save_predictions_figure

    try:
        import PIL  # noqa: F401
    except ImportError as err:
        raise ValueError("reading images needs Pillow: pip install 'mrcnn-edu[demo]'") from err
    cfg, model = _load_run(args.run, args.weights, args.config, args.device)
    json_path = check_results_path(args.json) if args.json else None
    names, category_ids = _predict_classes(args, cfg)
    images = [read_image(path) for path in args.images]  # scaled by each file's bit depth
    predictions = model.predict(images)
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
    if json_path is not None:
        _write_predict_json(args, predictions, category_ids, json_path)
    return 0


def _run_classes(run_dir: str, cfg):
    """The run's ``(class names, category ids)`` in label order (``load_run_classes``: its
    ``classes.json``, its checkpoint, or the data its config names); ``(None, None)`` when the
    run records none and its data is gone."""
    from .run_config import load_run_classes

    try:
        names, ids = load_run_classes(run_dir)
    except FileNotFoundError:
        return None, None
    if len(names) != cfg.model.num_classes:
        raise ValueError(
            f"the run records {len(names)} classes {list(names)} but its model predicts "
            f"model.num_classes={cfg.model.num_classes}; is {run_dir!r}'s config the one it "
            f"was trained with?"
        )
    return names, ids


def _predict_classes(args, cfg):
    """``predict``'s class names and category ids (checked before predicting: ``--json``
    cannot do without the ids)."""
    names, category_ids = _run_classes(args.run, cfg)
    if args.json and category_ids is None:
        raise ValueError(
            f"--json needs the run's category ids, but {args.run!r} does not record them and "
            f"the annotations json its config names is missing"
        )
    return names, category_ids


def _same_classes(run_names, data_names, data_path):
    """The class names to draw with, after checking the evaluation data has the run's classes
    in the run's label order (else each label would be scored against another class)."""
    if run_names is None or tuple(run_names) == tuple(data_names):
        return tuple(data_names)
    raise ValueError(
        f"the run was trained on classes {list(run_names)} (label order) but "
        f"{data_path or 'its held-out data'} has {list(data_names)}; evaluate on data with the "
        f"run's categories"
    )


def _write_predict_json(args, predictions, category_ids, json_path) -> None:
    """``predict --json``: the drawn detections as COCO results, image ids 1..N in file order."""
    from .evaluate import predictions_to_coco_results, write_coco_results

    keys = ("boxes", "labels", "scores", "masks")
    kept = []
    for p in predictions:
        keep = p["scores"] >= args.score_threshold
        kept.append({k: p[k][keep] for k in keys if k in p})
    ids = list(range(1, len(kept) + 1))
    results = predictions_to_coco_results(kept, ids, dict(enumerate(category_ids, start=1)))
    # file_name right after image_id: which file each image id is.
    results = [
        {"image_id": r["image_id"], "file_name": args.images[r["image_id"] - 1], **r}
        for r in results
    ]
    print(f"results: {write_coco_results(results, json_path)} ({len(results)} detections)")


def _add_convert_parser(sub) -> None:
    cv = sub.add_parser("convert", help="convert published weights to an .npz (no torch needed)")
    cv.add_argument("source", choices=["torchvision"], help="torchvision's maskrcnn_resnet50_fpn")
    cv.add_argument(
        "model", metavar="MODEL.pth", help="its .pth/.pt file (zip or legacy torch.save format)"
    )
    cv.add_argument("out", metavar="OUT.npz", help="the .npz weights file to write")


def _convert(args, parser) -> int:
    from . import weights
    from .convert import CLASS_LOGITS, KEYPOINT_LOGITS, from_torchvision

    if not args.out.endswith(".npz"):
        raise ValueError(f"the output file must end in .npz, got {args.out!r}")
    state = from_torchvision(args.model)
    weights.save(args.out, state)
    k = state[CLASS_LOGITS].shape[0] - 1
    preset = f"resnet50_fpn(num_classes={k})"
    if KEYPOINT_LOGITS in state:  # torchvision's keypointrcnn_resnet50_fpn
        preset = f"keypointrcnn_resnet50_fpn({state[KEYPOINT_LOGITS].shape[1]}, num_classes={k})"
    print(f"wrote {args.out}: {len(state)} arrays, MaskRCNNConfig.{preset}")
    return 0


_COMMANDS = {"demo": _demo, "train": _train, "evaluate": _evaluate, "predict": _predict}
_COMMANDS["convert"] = _convert


def _add_inspect_parser(sub) -> None:
    ins = sub.add_parser("inspect", help="check a COCO dataset: every problem, then statistics")
    ins.add_argument("--data", required=True, help="the COCO instances json")
    ins.add_argument("--images", required=True, help="image folder of --data")
    ins.add_argument("--config", default=None, help="run config whose anchors to compare with")
    ins.add_argument("--out", default="inspect.png", help="the figure to write")
    ins.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ins.add_argument("--no-progress", action="store_true")


def _inspect(args, parser) -> int:
    from .inspect_data import run_inspect

    run_inspect(args.data, args.images, args.config, args.out, args.overwrite, not args.no_progress)
    return 0


_COMMANDS["inspect"] = _inspect


if __name__ == "__main__":
    sys.exit(main())
