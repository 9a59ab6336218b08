"""``mrcnn-edu train`` and ``mrcnn-edu demo``: from the command line's flags to a run.

    mrcnn-edu train --data train.json --images DIR --val-data val.json --out runs/x
    mrcnn-edu train --resume runs/x                 # continue exactly where it stopped
    mrcnn-edu train --resume runs/x --lr 0.005      # continue at a lower rate (not exact)
    mrcnn-edu train --config run.json --out runs/x --overwrite   # start over in runs/x

``train --resume RUN`` reads the run's own config (``RUN/config.json``, or the copy in the
checkpoint) and writes into ``RUN``; ``--lr`` or ``--steps`` with ``--resume`` rebuild the schedule
at the new values (a non-strict resume: the run then differs from an uninterrupted one). A
folder that already holds a run is refused without ``--resume`` or ``--overwrite``
(``run_folder.check_run_folder``).

Ctrl-C, SIGTERM and a diverged loss stop training with the state saved and one message naming
the command that continues; the exit status is 130 (Ctrl-C), 143 (SIGTERM) or 1 (divergence).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time


def add_run_flags(parser, what: str) -> None:
    """The flags ``train`` and ``demo`` share: resuming, overwriting, the rate, evaluation."""
    parser.add_argument(
        "--resume", default=None, help=f"a checkpoint or run folder to continue ({what})"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output folder that already holds a run (deletes that run's files)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base learning rate; with --resume, continue at this rate (the schedule is rebuilt "
        "at the new rate: not an exact resume)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="evaluate on the validation set every N steps and at the end: AP in log.csv, "
        "best.npz (0: off; default 0, or the checkpoint interval with --val-data)",
    )


def add_val_flags(parser) -> None:
    parser.add_argument("--val-data", default=None, help="COCO json of a validation set")
    parser.add_argument(
        "--val-images", default=None, help="image folder of --val-data (default: --images)"
    )


def demo_command(args, parser) -> int:
    """``mrcnn-edu demo`` (not ``--toolkit``): the shapes preset, or ``--quick``'s; with
    ``--pose``, the stick-figure keypoint preset (``pose_run_config``)."""
    from .distributed import launched_world_size
    from .launch import split_batch
    from .run_config import RunConfig, pose_run_config, quick_run_config
    from .threads import command_reference, reference_summary

    started, reference = time.perf_counter(), command_reference()  # ~2 s, for the summary
    default = ("runs/pose" if args.pose else "runs/demo") + ("_quick" if args.quick else "")
    out = args.out or (_resume_folder(args.resume) if args.resume is not None else default)
    if args.pose:
        cfg = pose_run_config(out, quick=args.quick)
    else:
        cfg = quick_run_config(out) if args.quick else RunConfig()
    overrides = {"seed": args.seed, "progress": not args.no_progress}
    cfg.train = _train_settings(args, parser, cfg.train, out, overrides)
    # Under mpiexec the demo's batch and rate are shared by the ranks (launch.py): the same run.
    cfg.train = split_batch(cfg.train, launched_world_size())
    status = _run(cfg, args, out)
    if status == 0 and reference is not None:
        print(reference_summary(time.perf_counter() - started, reference))
    return status


def demo_ranks_command(argv: list[str], ranks: int) -> int:
    """``mrcnn-edu demo`` as ``ranks`` MPI processes (``launch.run_ranks``), with the GEMM
    reference measured here, before they start, for the closing line."""
    from .launch import launch_command, run_ranks
    from .threads import command_reference, pin_setting, reference_summary

    pin_setting()  # a bad MRCNN_EDU_PIN_CORES is refused before anything starts
    started, reference = time.perf_counter(), command_reference()
    print(f"training on {ranks} ranks, one per core: {shlex.join(launch_command(argv, ranks))}")
    sys.stdout.flush()  # before the ranks' own lines
    status = run_ranks(argv, ranks)
    if status == 0 and reference is not None:
        print(reference_summary(time.perf_counter() - started, reference))
    return status


def train_command(args, parser) -> int:
    """``mrcnn-edu train``: a config file (or the run's own, with ``--resume``) and flags."""
    from .run_config import RunConfig, load_run_config
    from .train_checkpoint import checkpoint_path

    if args.resume is not None:
        folder = _resume_folder(args.resume)
        cfg = RunConfig.load(args.config) if args.config else None
        cfg = cfg or load_run_config(folder, weights=checkpoint_path(args.resume))
        out = args.out or folder
    else:
        cfg = RunConfig.load(args.config) if args.config else RunConfig()
        out = args.out or cfg.train.out_dir
    given_data = cfg.data
    cfg.data = _data_settings(args, parser, cfg.data)
    cfg = _input_settings(args, parser, cfg, given_data)
    cfg.model = _anchor_settings(args, parser, cfg.model)
    overrides = {"progress": cfg.train.progress and not args.no_progress}
    if args.val_data and args.eval_every is None and not cfg.train.eval_every:
        overrides["eval_every"] = cfg.train.checkpoint_every
    cfg.train = _train_settings(args, parser, cfg.train, out, overrides)
    if cfg.data.source == "coco":
        from .data.coco import CocoDataset

        dataset = CocoDataset(cfg.data.annotations, cfg.data.images)
        n = len(dataset.class_names)
        if cfg.model.num_classes != n:
            cfg.model = dataclasses.replace(cfg.model, num_classes=n)
        _note_native_size(cfg.model, dataset)
    return _run(cfg, args, out)


# Above this many pixels per image, training at the images' own size needs gigabytes per step
# (a 2000x3000 photo: about 6 GB and 24 s on 2 cores with the small preset).
_LARGE_IMAGE_PIXELS = 1024 * 1024


def _note_native_size(model_cfg, dataset) -> None:
    """Say so when large images would be trained at their own size (no --min-size)."""
    if model_cfg.min_size is not None or not len(dataset):
        return
    sizes = [(int(i["height"]), int(i["width"])) for i in dataset.coco.imgs.values()]
    h, w = max(sizes, key=lambda s: s[0] * s[1])
    if h * w > _LARGE_IMAGE_PIXELS:
        print(
            f"note: images up to {h}x{w} will be trained at their own size, which needs "
            "gigabytes of memory per step; resize them on the fly with --min-size and "
            "--max-size (torchvision: --min-size 800 --max-size 1333; smaller is faster)"
        )


def _data_settings(args, parser, data):
    """``--data/--images`` (a COCO training set) and ``--val-data/--val-images``."""
    from .run_config import DataConfig

    if args.data and args.data != "shapes":
        if not args.images:
            parser.error("--data with a COCO json needs --images (the image folder)")
        data = DataConfig(source="coco", annotations=args.data, images=args.images)
    if args.val_images and not args.val_data:
        parser.error("--val-images needs --val-data (the validation json)")
    if args.val_data:
        if data.source != "coco":
            parser.error(
                "--val-data needs COCO training data (--data train.json --images DIR); the "
                "shapes data brings its own held-out set"
            )
        data = dataclasses.replace(
            data, val_annotations=args.val_data, val_images=args.val_images or data.images
        )
    return data


def _input_settings(args, parser, cfg, given_data):
    """``--augment`` and ``--min-size/--max-size`` applied to ``cfg``, then printed. Without
    ``--augment``, the augmentations of ``given_data`` (the config's, or the resumed run's)
    are kept, except that a COCO json given with ``--data`` gets the paper's hflip unless a
    ``--config`` file sets ``data.augment``."""
    from .data.transforms import AugmentConfig

    augment = given_data.augment
    if args.augment is not None:
        augment = AugmentConfig.from_names(args.augment)
    elif args.data and args.data != "shapes" and args.resume is None:
        if not (args.config and _config_sets_augment(args.config)):
            augment = AugmentConfig(hflip=True)
    cfg.data = dataclasses.replace(cfg.data, augment=augment)
    if args.min_size is not None or args.max_size is not None:
        try:
            sizes = [int(v) for v in str(args.min_size).split(",")] if args.min_size else None
        except ValueError:
            parser.error(
                f"--min-size takes whole numbers separated by commas, got {args.min_size!r}"
            )
        min_size = sizes if sizes is not None else cfg.model.min_size
        max_size = args.max_size if args.max_size is not None else cfg.model.max_size
        if min_size is None or max_size is None:
            parser.error("--min-size and --max-size go together (torchvision: 800 and 1333)")
        cfg.model = dataclasses.replace(cfg.model, min_size=min_size, max_size=max_size)
    print(
        f"augmentation: {', '.join(augment.active) or 'none'}; image size: {_size_rule(cfg.model)}"
    )
    return cfg


def _anchor_settings(args, parser, model):
    """``--anchor-sizes 19,38,76,152,304``: one size per pyramid level, into ``model.rpn``."""
    if args.anchor_sizes is None:
        return model
    try:
        sizes = tuple((int(v),) for v in args.anchor_sizes.split(","))
    except ValueError:
        parser.error(f"--anchor-sizes takes whole numbers separated by commas, got "
                     f"{args.anchor_sizes!r}")  # fmt: skip
    levels = len(model.rpn.anchor_sizes)
    if len(sizes) != levels or min(s for (s,) in sizes) <= 0:
        parser.error(f"--anchor-sizes needs {levels} positive sizes, one per level P2..P6, got "
                     f"{args.anchor_sizes!r}")  # fmt: skip
    rpn = dataclasses.replace(model.rpn, anchor_sizes=sizes)
    print(f"anchor sizes: {', '.join(str(s) for (s,) in sizes)}")
    return dataclasses.replace(model, rpn=rpn)


def _config_sets_augment(path: str) -> bool:
    import json

    with open(path) as f:
        data = json.load(f).get("data") or {}
    return isinstance(data, dict) and "augment" in data


def _size_rule(model) -> str:
    if model.min_size is None:
        return "native (no resizing)"
    sizes = model.min_size
    short = (
        str(sizes[0])
        if len(sizes) == 1
        else f"one of {list(sizes)} per training image, {sizes[-1]} at inference"
    )
    return f"shorter side {short}, longer side at most {model.max_size}"


def _train_settings(args, parser, train, out: str, overrides: dict):
    """The TrainConfig with the flags applied: ``--out``, ``--steps``, ``--lr``,
    ``--eval-every`` and ``overrides``."""
    if args.steps is not None and args.steps <= 0:
        parser.error("--steps must be positive")
    from .train_config import fit_milestones

    overrides = {"out_dir": out, **overrides}
    if args.steps:
        overrides["max_steps"] = args.steps
        overrides["warmup_iters"] = min(train.warmup_iters, args.steps)
        overrides["milestones"] = fit_milestones(train.milestones, args.steps)
        if overrides["milestones"] != train.milestones:
            print(
                f"note: --steps {args.steps} is too short for the lr milestones "
                f"{list(train.milestones)}; using {list(overrides['milestones'])}"
            )
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.eval_every is not None:
        overrides["eval_every"] = args.eval_every
    return dataclasses.replace(train, **overrides)


def _run(cfg, args, out: str) -> int:
    """``run_demo`` with SIGTERM handled like Ctrl-C; the exit status of an early stop."""
    from .demo import run_demo
    from .distributed import abort_on_error
    from .out_paths import check_output_folder
    from .train_guards import TrainingDiverged, TrainingTerminated, sigterm_as_interrupt

    comm = parallel_communicator(args.device)  # mpiexec with --device cuda: NCCL, GPU bound
    check_output_folder(out, "--out" if args.out else "the output folder (train.out_dir)")
    # --lr or --steps with --resume: continue with the new schedule (said when resuming).
    strict = not (args.resume is not None and (args.lr is not None or args.steps))
    try:
        # several ranks: an error on one rank (not shared by all) ends the whole job
        with sigterm_as_interrupt(), abort_on_error(comm):
            run_demo(cfg, resume=args.resume, overwrite=args.overwrite, strict=strict,
                     comm=comm, device=args.device)  # fmt: skip
    except TrainingDiverged:
        return 1  # the trainer has said where the state is and how to continue
    except KeyboardInterrupt as err:
        terminated = isinstance(err, TrainingTerminated)
        if getattr(err, "saved_checkpoint", None) is None:  # not stopped inside training
            _say_stopped(args.command, out, terminated, comm)
        return 143 if terminated else 130
    return 0


def parallel_communicator(device: str | None = None):
    """The run's communicator (``mpiexec -n N``: MPI, or NCCL with a CUDA ``device``); ranks
    other than 0 print nothing on stdout (their errors still reach stderr), so the console
    shows one run."""
    from .distributed import get_communicator

    comm = get_communicator(device=device)
    if not comm.is_root:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the rest of the process
    return comm


def _say_stopped(command: str, out: str, terminated: bool, comm=None) -> None:
    from .demo import resume_command

    cause = "stopped by SIGTERM" if terminated else "interrupted"
    last = os.path.join(out, "last.npz")
    if os.path.isfile(last):
        cause += f"; the newest state is in {last}: continue with `{resume_command(out, comm)}`"
    print(f"mrcnn-edu {command}: {cause}", file=sys.stderr)


def _resume_folder(resume: str) -> str:
    if not os.path.exists(resume):
        raise FileNotFoundError(f"nothing to resume at {resume!r}: no such run folder or file")
    return resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))
