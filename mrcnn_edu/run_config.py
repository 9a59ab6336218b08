"""A run's configuration (``config.json``) and the datasets it names.

``RunConfig`` bundles the three parts of a run -- the model (``MaskRCNNConfig``), the training
schedule (``TrainConfig``) and the data (``DataConfig``: generated shapes or a COCO-format json
and image folder) -- and is saved as ``config.json`` in the run folder, enough to rebuild the
model for ``mrcnn-edu evaluate``/``predict``. ``build_datasets`` turns a ``DataConfig`` into the
training and held-out sets. ``demo_train_config`` and ``quick_run_config`` are the presets of
``mrcnn-edu demo`` and ``mrcnn-edu demo --quick``; plain ``mrcnn-edu train`` starts from them too.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from .data.shapes import ShapesDataset
from .mask_rcnn import MaskRCNNConfig
from .train_config import TrainConfig

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
