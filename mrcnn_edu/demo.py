"""The main job: train Mask R-CNN on synthetic shapes, evaluate it the COCO way, draw pictures.

    mrcnn-edu demo                 # about 10 minutes on 2 CPU cores (9.7 min measured)
    mrcnn-edu demo --quick         # a 1-minute smoke run (the numbers will be poor)

Steps: generate a seeded training set and a held-out set of shapes images (circles, squares,
triangles with exact masks) -> train the small configuration with the Trainer (progress bar,
CSV log, checkpoints) -> predict on the held-out images -> COCO bbox and segm AP via
pycocotools -> ``predictions.png`` (ground truth beside predictions) and ``loss_curve.png``.
Everything lands in the output folder, together with ``config.json`` (enough to rebuild the
model for ``mrcnn-edu evaluate``/``predict``) and ``metrics.json``. The run's settings and its
datasets (``RunConfig``, ``build_datasets``, the demo presets) are in ``run_config.py``;
``mrcnn-edu train`` runs this same pipeline on a config of its own.
"""

from __future__ import annotations

import json
import os
import time

from .mask_rcnn import MaskRCNN
from .progress import progress_bar
from .run_config import RUN_CONFIG_NAME, RunConfig, build_datasets
from .train import Trainer


def run_demo(cfg: RunConfig, resume: str | None = None) -> dict:
    """Train, evaluate and draw. Returns ``{"metrics", "figures", "out_dir", "seconds",
    "train_seconds"}``."""
    out = cfg.train.out_dir
    os.makedirs(out, exist_ok=True)
    cfg.save(os.path.join(out, RUN_CONFIG_NAME))
    t0 = time.perf_counter()
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
    model = MaskRCNN(cfg.model, rng=cfg.train.seed)
    n_params = sum(p.data.size for p in model.parameters())
    print(
        f"model: Mask R-CNN, {n_params / 1e6:.2f}M trainable parameters; "
        f"training {cfg.train.max_steps} steps of {cfg.train.batch_size} images"
    )
    trainer = Trainer(model, train_set, cfg.train)
    result = trainer.train(resume=resume)
    train_seconds = time.perf_counter() - t0
    out_files = {
        "loss_curve": result.get("plot"),
        "log": result.get("log"),
        "checkpoint": result.get("checkpoint"),
    }
    metrics = {}
    if val_set is not None:
        metrics, figure = evaluate_model(model, val_set, class_names, out)
        out_files["predictions"] = figure
    seconds = time.perf_counter() - t0
    summary = {
        "metrics": metrics,
        "figures": out_files,
        "out_dir": out,
        "seconds": seconds,
        "train_seconds": train_seconds,
    }
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(
            {"metrics": metrics, "seconds": seconds, "train_seconds": train_seconds}, f, indent=2
        )
    _print_summary(summary)
    return summary


def evaluate_model(
    model,
    dataset,
    class_names,
    out_dir: str,
    batch_size: int = 8,
    figure_name: str = "predictions.png",
):
    """Predict on every image, run COCOeval (bbox, segm), save a predictions figure."""
    from .evaluate import evaluate_coco, predictions_to_coco_results
    from .visualize import save_predictions_figure

    predictions, images, image_ids = [], [], []
    bar = progress_bar(len(dataset), "predict", "img", leave=False)
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
    gt = dataset.coco if hasattr(dataset, "coco") else dataset
    metrics = evaluate_coco(gt, results, print_table=True, image_ids=image_ids)
    figure = save_predictions_figure(
        [it["image"] for it in images[:8]],
        predictions[:8],
        targets=images[:8],
        class_names=class_names,
        path=os.path.join(out_dir, figure_name),
    )
    return metrics, figure


def _print_summary(summary: dict) -> None:
    m = summary["metrics"]
    if m:
        print(
            f"held-out: segm AP {m['segm']['AP']:.3f}, AP50 {m['segm']['AP50']:.3f}; "
            f"bbox AP {m['bbox']['AP']:.3f}, AP50 {m['bbox']['AP50']:.3f}"
        )
    print(
        f"time: {summary['seconds'] / 60:.1f} min "
        f"(training {summary['train_seconds'] / 60:.1f} min)"
    )
    for name, path in summary["figures"].items():
        if path:
            print(f"{name}: {path}")
