"""The main job: train Mask R-CNN on synthetic shapes, evaluate it the COCO way, draw pictures.

    mrcnn-edu demo                 # about 3 minutes on 2 CPU cores, as 2 MPI ranks
    mrcnn-edu demo --quick         # a 1-minute smoke run (the numbers will be poor)

Steps: generate a seeded training set and a held-out set of shapes images (circles, squares,
triangles with exact masks) -> train the small configuration with the Trainer (progress bar,
CSV log, checkpoints) -> predict on the held-out images -> COCO bbox and segm AP via
pycocotools -> ``predictions.png`` (ground truth beside predictions) and ``loss_curve.png``.
Everything lands in the output folder, together with ``config.json`` (enough to rebuild the
model for ``mrcnn-edu evaluate``/``predict``; every checkpoint keeps a copy too),
``classes.json`` and ``metrics.json`` (``run_folder.py`` lists a run's files). The run's
settings and its datasets (``RunConfig``, ``build_datasets``, the demo presets) are in
``run_config.py``; ``mrcnn-edu train`` runs this same pipeline on a config of its own.
"""

from __future__ import annotations

import json
import os
import shlex
import time

from .data.transforms import build_augment
from .mask_rcnn import MaskRCNN
from .progress import progress_bar
from .run_config import (
    RUN_CONFIG_NAME,
    RunConfig,
    build_datasets,
    check_resume_fits,
    data_fingerprint,
    run_classes,
    save_run_classes,
)
from .run_folder import (
    atomic_write_text,
    check_run_folder,
    clear_run_files,
    remove_stale_temp_files,
)
from .train import Trainer
from .train_eval import COCO_METRICS, coco_evaluator
from .train_parallel import images_word


def run_demo(
    cfg: RunConfig,
    resume: str | None = None,
    overwrite: bool = False,
    strict: bool = True,
    comm=None,
    device: str | None = None,
) -> dict:
    """Train, evaluate and draw. Returns ``{"metrics", "figures", "out_dir", "seconds",
    "train_seconds"}``.

    Args:
        cfg: the run; its ``train.out_dir`` is the run folder.
        resume: a checkpoint or run folder to continue (``Trainer.resume``), with ``strict``.
        overwrite: start over in a folder that holds a run, deleting that run's files.
        comm, device: the Trainer's (every rank calls ``run_demo``; rank 0 writes the run
            folder and evaluates, the others only train; on ``device``); None: one process, host.

    Nothing is written before every check has passed: the folder (``check_run_folder``: a folder
    holding a run needs ``resume`` or ``overwrite``), the data, the model config and the
    checkpoint to resume. Then ``config.json`` and ``classes.json`` are written and training starts.
    """
    out = cfg.train.out_dir
    check_run_folder(out, resume=resume, overwrite=overwrite)
    t0 = time.perf_counter()
    train_set, val_set, class_names = _load_data(cfg)
    model = MaskRCNN(cfg.model, rng=cfg.train.seed)
    trainer = _make_trainer(cfg, model, train_set, val_set, comm, device)
    if resume is not None:
        check_resume_fits(resume, cfg)
        trainer.resume(resume, strict=strict)
    _start_training(cfg, trainer, overwrite)
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    if not trainer.comm.is_root:  # rank 0 evaluates and writes the results
        return {"metrics": {}, "figures": {}, "out_dir": out, "seconds": train_seconds,
                "train_seconds": train_seconds}  # fmt: skip
    out_files = {
        "loss_curve": result.get("plot"),
        "log": result.get("log"),
        "checkpoint": result.get("checkpoint"),
    }
    metrics = {}
    if val_set is not None:
        metrics, figure = evaluate_model(
            model, val_set, class_names, out, progress=cfg.train.progress
        )
        out_files["predictions"] = figure
    seconds = time.perf_counter() - t0
    summary = {
        "metrics": metrics,
        "figures": out_files,
        "out_dir": out,
        "seconds": seconds,
        "train_seconds": train_seconds,
    }
    saved = {"metrics": metrics, "seconds": seconds, "train_seconds": train_seconds}
    atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(saved, indent=2))
    _print_summary(summary)
    return summary


def _start_training(cfg: RunConfig, trainer: Trainer, overwrite: bool) -> None:
    """Write the run folder's first files (rank 0, once every rank has checked the folder)
    and say what is trained."""
    trainer.comm.barrier()
    if trainer.comm.is_root:
        _start_run_folder(cfg, trainer.run_info["classes"], overwrite)
    n_params = sum(p.data.size for p in trainer.model.parameters())
    print(
        f"model: Mask R-CNN, {n_params / 1e6:.2f}M trainable parameters; "
        f"training {cfg.train.max_steps} steps of {images_word(cfg.train.batch_size)}"
        + (" per rank" if trainer.comm.world_size > 1 else "")
    )
    print(trainer.parallel_summary())  # the device; several ranks: batch and learning rate


def _load_data(cfg: RunConfig):
    """``build_datasets``, checked against the model's number of classes, and described."""
    train_set, val_set, class_names = build_datasets(cfg.data)
    if cfg.model.num_classes != len(class_names):
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the data has {len(class_names)} "
            f"classes {list(class_names)}"
        )
    print(
        f"data: {len(train_set)} training images, "
        f"{len(val_set) if val_set is not None else 0} held-out; classes {list(class_names)}"
    )
    if val_set is None:
        print("no held-out set (data.num_val is 0, or no validation json): evaluation skipped")
    return train_set, val_set, class_names


def _make_trainer(cfg: RunConfig, model, train_set, val_set, comm=None, device=None) -> Trainer:
    """The Trainer of a CLI run: evaluation on the held-out set when ``eval_every`` is set, the
    data's fingerprint, the run config and classes kept in every checkpoint, and the command
    that continues the run named in the message of an early stop."""
    evaluate = None
    if cfg.train.eval_every:
        if val_set is None:
            raise ValueError(
                f"train.eval_every={cfg.train.eval_every} needs a validation set: --val-data "
                "(COCO data) or data.num_val > 0 (shapes)"
            )
        evaluate = coco_evaluator(val_set)
    run_info = {
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "classes": json.dumps(run_classes(train_set)),
    }
    return Trainer(
        model,
        train_set,
        cfg.train,
        augment=build_augment(cfg.data.augment, _keypoint_flip(cfg, train_set)),
        evaluate=evaluate,
        metrics=COCO_METRICS,
        data_fingerprint=data_fingerprint(cfg.data),
        run_info=run_info,
        resume_command=resume_command(cfg.train.out_dir, comm),
        comm=comm,
        device=device,
    )


def resume_command(out_dir: str, comm=None) -> str:
    """The command that continues the run in ``out_dir`` exactly: ``mrcnn-edu train --resume
    RUN``, under ``mpiexec -n W`` when ``W`` ranks trained it (the same number of ranks keeps
    the resume exact)."""
    world = comm.world_size if comm is not None else 1
    launcher = f"mpiexec -n {world} " if world > 1 else ""
    return f"{launcher}mrcnn-edu train --resume {shlex.quote(out_dir)}"


def _keypoint_flip(cfg: RunConfig, train_set):
    """The left/right swap map of the data's keypoints when a flip is on (None otherwise)."""
    flips = cfg.data.augment.hflip or cfg.data.augment.vflip
    return getattr(train_set, "keypoint_flip", None) if flips else None


def _start_run_folder(cfg: RunConfig, classes_json: str, overwrite: bool) -> None:
    """After every check passed: clear the old run (``overwrite``) and leftovers of interrupted
    writes, then write ``config.json`` and ``classes.json``."""
    out = cfg.train.out_dir
    os.makedirs(out, exist_ok=True)
    removed = clear_run_files(out) if overwrite else remove_stale_temp_files(out)
    if removed:
        what = "the previous run's files" if overwrite else "temporary files of interrupted writes"
        print(f"removed {what}: {', '.join(removed)}")
    cfg.save(os.path.join(out, RUN_CONFIG_NAME))
    save_run_classes(out, json.loads(classes_json))


def evaluate_model(
    model,
    dataset,
    class_names,
    out_dir: str,
    batch_size: int = 8,
    figure_name: str = "predictions.png",
    json_path: str | None = None,
    progress: bool = True,
):
    """Predict on every image, run COCOeval (bbox, segm; keypoints too for a pose model on data
    with keypoints), save a predictions figure (``progress``: a bar over the images while
    predicting; skeletons drawn where there are keypoints).

    Prints COCOeval's tables and the per-class AP table; returns ``(metrics, figure path)``
    with ``metrics = {"bbox": {..}, "segm": {..}, "per_class": {name: {..}}}`` (see
    ``evaluate_coco``), and ``"keypoints"`` (``evaluate_keypoints``) when evaluated.
    ``json_path``: also write the COCO results there (category ids of the dataset's json,
    every detection, as evaluated).
    """
    from .evaluate import evaluate_coco, predictions_to_coco_results, write_coco_results
    from .visualize import save_predictions_figure

    predictions, images, image_ids = [], [], []
    bar = progress_bar(len(dataset), "predict", "img", leave=False) if progress else None
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        predictions += model.predict([it["image"] for it in items])
        image_ids += [int(it["image_id"]) for it in items]
        if start < 8:
            images += items
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()
    results = predictions_to_coco_results(predictions, image_ids, dataset.label_to_category_id)
    if json_path is not None:
        print(f"results: {write_coco_results(results, json_path)}")
    gt = dataset.coco if hasattr(dataset, "coco") else dataset
    metrics = evaluate_coco(gt, results, print_table=True, image_ids=image_ids, per_class=True)
    if predictions and "keypoints" in predictions[0]:
        metrics.update(_keypoint_metrics(dataset, gt, results, image_ids))
    figure = save_predictions_figure(
        [it["image"] for it in images[:8]],
        predictions[:8],
        targets=images[:8],
        class_names=class_names,
        path=os.path.join(out_dir, figure_name),
        skeleton=getattr(dataset, "skeleton", ()),
    )
    return metrics, figure


def _keypoint_metrics(dataset, gt, results, image_ids) -> dict:
    """``{"keypoints": COCO keypoint AP}`` with the dataset's OKS sigmas (COCO's for its 17
    keypoints); ``{}`` with a note when the data has no keypoints or no sigmas for them."""
    from .evaluate_keypoints import COCO_KEYPOINT_SIGMAS, evaluate_keypoints

    names = getattr(dataset, "keypoint_names", ())
    sigmas = getattr(dataset, "keypoint_sigmas", None)
    if sigmas is None and len(names) == len(COCO_KEYPOINT_SIGMAS):
        sigmas = COCO_KEYPOINT_SIGMAS
    if sigmas is None:
        print(
            f"keypoint AP skipped: the data has {len(names)} keypoints and OKS needs a sigma "
            "for each (known: the pose data's and COCO's 17)"
        )
        return {}
    return {"keypoints": evaluate_keypoints(gt, results, sigmas, image_ids=image_ids)}


def _print_summary(summary: dict) -> None:
    m = summary["metrics"]
    if m:
        print(
            f"held-out: segm AP {m['segm']['AP']:.3f}, AP50 {m['segm']['AP50']:.3f}; "
            f"bbox AP {m['bbox']['AP']:.3f}, AP50 {m['bbox']['AP50']:.3f}"
        )
    if "keypoints" in m:
        k = m["keypoints"]
        print(f"held-out: keypoint AP {k['AP']:.3f}, AP50 {k['AP50']:.3f} (OKS)")
    print(
        f"time: {summary['seconds'] / 60:.1f} min "
        f"(training {summary['train_seconds'] / 60:.1f} min)"
    )
    for name, path in summary["figures"].items():
        if path:
            print(f"{name}: {path}")
