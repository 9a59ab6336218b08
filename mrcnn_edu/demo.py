"""The main job: train Mask R-CNN on synthetic shapes, evaluate it the COCO way, draw pictures.

    mrcnn-edu demo                 # ~12 minutes on 2 CPU cores
    mrcnn-edu demo --quick         # a 1-minute smoke run (the numbers will be poor)

Steps: generate a seeded training set and a held-out set of shapes images (circles, squares,
triangles with exact masks) -> train the small configuration with the Trainer (progress bar,
CSV log, checkpoints) -> predict on the held-out images -> COCO bbox and segm AP via
pycocotools -> ``predictions.png`` (ground truth beside predictions) and ``loss_curve.png``.
Everything lands in the output folder, together with ``config.json`` (enough to rebuild the
model for ``mrcnn-edu evaluate``/``predict``) and ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from .data.shapes import ShapesDataset
from .mask_rcnn import MaskRCNN, MaskRCNNConfig
from .train import TrainConfig, Trainer

RUN_CONFIG_NAME = "config.json"


@dataclass
class DataConfig:
    """Where the images come from: ``"shapes"`` (generated) or a COCO-format json + folder."""

    source: str = "shapes"
    num_train: int = 3000
    num_val: int = 200
    image_size: tuple = (128, 128)
    train_seed: int = 1
    val_seed: int = 2
    annotations: str | None = None  # COCO json (source="coco")
    images: str | None = None  # image folder (source="coco")
    val_annotations: str | None = None
    val_images: str | None = None

    def __post_init__(self):
        if self.source not in ("shapes", "coco"):
            raise ValueError(f"data.source must be 'shapes' or 'coco', got {self.source!r}")
        if self.source == "coco" and not (self.annotations and self.images):
            raise ValueError("data.source 'coco' needs data.annotations and data.images")
        self.image_size = tuple(int(v) for v in self.image_size)


@dataclass
class RunConfig:
    """A whole run: model, training and data settings (stored as ``config.json``)."""

    model: MaskRCNNConfig = field(default_factory=lambda: MaskRCNNConfig.small(3))
    train: TrainConfig = field(default_factory=lambda: demo_train_config())
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "data": asdict(self.data),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        unknown = sorted(set(d) - {"model", "train", "data"})
        if unknown:
            raise ValueError(
                f"unknown top-level key(s) {unknown}; valid: ['data', 'model', 'train']"
            )
        base = cls()
        model = MaskRCNNConfig.from_dict(d["model"]) if "model" in d else base.model
        train = TrainConfig.from_dict({**base.train.to_dict(), **d.get("train", {})})
        data_d = d.get("data", {})
        valid = set(DataConfig.__dataclass_fields__)
        bad = sorted(set(data_d) - valid)
        if bad:
            raise ValueError(f"unknown key(s) {bad} in data; valid keys: {sorted(valid)}")
        return cls(model=model, train=train, data=DataConfig(**data_d))

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> RunConfig:
        if not os.path.exists(path):
            raise FileNotFoundError(f"run config not found: {path!r}")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not valid JSON: {err}") from err
        return cls.from_dict(d)


def demo_train_config(**overrides) -> TrainConfig:
    """The demo schedule: 2000 steps of 4 images, lr 0.02, warm-up 200, decay at 80% and 93%."""
    base = dict(
        lr=0.02,
        batch_size=4,
        max_steps=2000,
        warmup_iters=200,
        milestones=(0.8, 0.93),
        checkpoint_every=500,
        log_every=50,
        out_dir="runs/demo",
    )
    base.update(overrides)
    return TrainConfig(**base)


def quick_run_config(out_dir: str) -> RunConfig:
    """A one-minute smoke run of the same pipeline (tests and ``--quick``)."""
    return RunConfig(
        train=demo_train_config(
            max_steps=60,
            batch_size=2,
            lr=0.01,
            warmup_iters=30,
            checkpoint_every=30,
            out_dir=out_dir,
        ),
        data=DataConfig(num_train=100, num_val=10),
    )


def build_datasets(data: DataConfig):
    """(train, val, class_names) for the configured source."""
    if data.source == "shapes":
        train = ShapesDataset(data.num_train, image_size=data.image_size, seed=data.train_seed)
        val = ShapesDataset(data.num_val, image_size=data.image_size, seed=data.val_seed)
        return train, val, train.class_names
    from .data.coco import CocoDataset

    train = CocoDataset(data.annotations, data.images)
    val = (
        CocoDataset(data.val_annotations, data.val_images or data.images)
        if data.val_annotations
        else None
    )
    return train, val, train.class_names


def run_demo(cfg: RunConfig, resume: str | None = None) -> dict:
    """Train, evaluate and draw. Returns ``{"metrics", "figures", "out_dir", "seconds"}``."""
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
    bar = _bar(len(dataset), "predict")
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


def _bar(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False)


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
