"""A run's configuration (``config.json``) and the datasets it names.

``RunConfig`` bundles the three parts of a run -- the model (``MaskRCNNConfig``), the training
schedule (``TrainConfig``) and the data (``DataConfig``: generated shapes or a COCO-format json
and image folder) -- and is saved as ``config.json`` in the run folder, enough to rebuild the
model for ``mrcnn-edu evaluate``/``predict``. ``build_datasets`` turns a ``DataConfig`` into the
training and held-out sets. ``demo_train_config`` and ``quick_run_config`` are the presets of
``mrcnn-edu demo`` and ``mrcnn-edu demo --quick``; plain ``mrcnn-edu train`` starts from them too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from .config_checks import (
    ConfigError,
    Rule,
    at_least,
    check_fields,
    from_mapping,
    one_of,
    shown,
    under,
)
from .data.pose import NUM_KEYPOINTS, PoseDataset
from .data.shapes import SHAPE_KINDS, ShapesDataset
from .data.transforms import AugmentConfig
from .mask_rcnn import MaskRCNNConfig
from .run_folder import atomic_write_text
from .train_checkpoint import checkpoint_path, read_run_info
from .train_config import TrainConfig

RUN_CONFIG_NAME = "config.json"
CLASSES_NAME = "classes.json"
_DATA_RULES = {
    "source": one_of("shapes", "coco", "pose"),
    "num_train": at_least(1),
    "num_val": Rule(lambda n: n >= 0, "must be >= 0 (0: no held-out set, no evaluation)"),
    "image_size": Rule(lambda hw: min(hw) >= 8, "must be [height, width], both >= 8"),
    "train_seed": at_least(0),
    "val_seed": at_least(0),
}


@dataclass
class DataConfig:
    """Where the images come from: ``"shapes"`` or ``"pose"`` (generated: ``ShapesDataset``,
    ``PoseDataset``'s stick figures with keypoints) or a COCO-format json + folder."""

    source: str = "shapes"
    num_train: int = 3000
    num_val: int = 200
    image_size: tuple[int, int] = (128, 128)
    train_seed: int = 1
    val_seed: int = 2
    annotations: str | None = None  # COCO json (source="coco")
    images: str | None = None  # image folder (source="coco")
    val_annotations: str | None = None
    val_images: str | None = None
    # Training-time flips/rotations (data/transforms.py); off unless asked for (the CLI turns
    # hflip on for a COCO json given with --data).
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        check_fields(self, _DATA_RULES)
        if self.source == "coco" and not (self.annotations and self.images):
            raise ValueError("data.source 'coco' needs data.annotations and data.images")


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

    def __post_init__(self):
        check_fields(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """Build from a (JSON) dict; every value is checked and a bad one named by its key
        path (``model.rpn.nms_thresh must be in [0, 1], got -1``)."""
        if not isinstance(d, Mapping):
            raise ValueError(
                f"a run config must be a JSON object with 'model', 'train' and 'data' parts, "
                f"got {type(d).__name__}"
            )
        unknown = sorted(str(k) for k in set(d) - {"model", "train", "data"})
        if unknown:
            raise ValueError(
                f"unknown top-level key(s) {unknown}; valid: ['data', 'model', 'train']"
            )
        base = cls()
        model = from_mapping(MaskRCNNConfig, d["model"], "model") if "model" in d else base.model
        train_d = d.get("train", {})
        if not isinstance(train_d, Mapping):
            raise ConfigError("train", f"must be an object of settings, got {shown(train_d)}")
        with under("train"):
            train = TrainConfig.from_dict({**base.train.to_dict(), **train_d})
        data = from_mapping(DataConfig, d.get("data", {}), "data")
        return cls(model=model, train=train, data=data)

    def save(self, path: str) -> None:
        """Write ``config.json`` atomically (a temporary file renamed over ``path``)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

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


def pose_run_config(out_dir: str = "runs/pose", quick: bool = False) -> RunConfig:
    """``mrcnn-edu demo --pose`` (``quick``: ``--pose --quick``, a smoke run): the small pose
    preset trained on generated stick figures, flipped at random (left/right keypoints swap),
    with the shapes demo's schedule.

    Training samples 32 RoIs per image (8 positives at most) instead of the preset's 64: the
    mask and keypoint heads then run on half as many RoIs, and a step of a trained model takes
    0.34 s instead of 0.54 s (measured back to back). 2000 such steps reach the keypoint AP
    that 1500 steps of 64 RoIs reached (0.59 on the 200 held-out images) in 13 minutes instead
    of about 14 to 16. Inference is unchanged (the sampler only runs in training)."""
    model = MaskRCNNConfig.small_pose(num_keypoints=NUM_KEYPOINTS)
    model = replace(model, roi_heads=replace(model.roi_heads, batch_size_per_image=32))
    if quick:  # --quick's schedule, shorter
        train = quick_run_config(out_dir).train
        train = replace(train, max_steps=40, warmup_iters=20, checkpoint_every=20)
        sizes = (80, 8)
    else:
        train, sizes = demo_train_config(out_dir=out_dir), (3000, 200)
    augment = AugmentConfig(hflip=True)
    data = DataConfig(source="pose", num_train=sizes[0], num_val=sizes[1], augment=augment)
    return RunConfig(model=model, train=train, data=data)


def build_datasets(data: DataConfig):
    """(train, val, class_names) for the configured source; val is None without a held-out
    set (generated data with ``num_val`` 0, or COCO without ``val_annotations``)."""
    if data.source in ("shapes", "pose"):
        generated = ShapesDataset if data.source == "shapes" else PoseDataset
        train = generated(data.num_train, image_size=data.image_size, seed=data.train_seed)
        val = (
            generated(data.num_val, image_size=data.image_size, seed=data.val_seed)
            if data.num_val
            else None
        )
        return train, val, train.class_names
    from .data.coco import CocoDataset

    train = CocoDataset(data.annotations, data.images)
    val = (
        CocoDataset(data.val_annotations, data.val_images or data.images)
        if data.val_annotations
        else None
    )
    return train, val, train.class_names


# -- what a run folder records about its run -------------------------------------------------


def load_run_config(
    run_dir: str, weights: str | None = None, config_path: str | None = None
) -> RunConfig:
    """The config a run was trained with: ``config_path`` when given, else ``RUN/config.json``,
    else the copy every checkpoint keeps (``run/config`` of ``weights`` or ``RUN/last.npz``),
    so a checkpoint alone is enough to rebuild its model."""
    if config_path:
        return RunConfig.load(config_path)
    path = os.path.join(run_dir, RUN_CONFIG_NAME)
    if os.path.exists(path):
        return RunConfig.load(path)
    ckpt = checkpoint_path(weights or run_dir)
    saved = read_run_info(ckpt).get("config") if os.path.isfile(ckpt) else None
    if saved is None:
        raise FileNotFoundError(
            f"run config not found: {path!r}, and no checkpoint with a copy of it "
            f"({ckpt!r}); pass --config"
        )
    try:
        return RunConfig.from_dict(json.loads(saved))
    except json.JSONDecodeError as err:
        raise ValueError(f"{ckpt!r} holds an unreadable run config: {err}") from err


def run_classes(dataset) -> dict:
    """``{"class_names": [...], "category_ids": [...]}`` of a dataset, in label order (label
    ``k`` is entry ``k - 1``): what ``classes.json`` and the checkpoints record."""
    names = [str(n) for n in dataset.class_names]
    mapping = dataset.label_to_category_id
    return {
        "class_names": names,
        "category_ids": [int(mapping[k]) for k in range(1, len(names) + 1)],
    }


def load_run_classes(run_dir_or_checkpoint: str) -> tuple[tuple[str, ...], list[int]]:
    """``(class_names, category_ids)`` of a trained run, in label order (label ``k`` is entry
    ``k - 1``): from ``RUN/classes.json``, else from a checkpoint (the given ``.npz``, or
    ``RUN/last.npz``), else -- runs from before classes were recorded -- from the data its
    config names (the shapes kinds, or the categories of the COCO json, sorted by id).

    Raises FileNotFoundError when none of these is there, ValueError for a malformed record.
    """
    path = os.fspath(run_dir_or_checkpoint)
    is_folder = os.path.isdir(path)
    folder = path if is_folder else os.path.dirname(path)
    listed, ckpt = os.path.join(folder, CLASSES_NAME), checkpoint_path(path)
    for source in (listed, ckpt) if is_folder else (ckpt, listed):
        text = _recorded_classes(source)
        if text is not None:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{source!r} holds unreadable class names: {err}") from err
            return _checked_classes(record, source)
    return _classes_from_data(load_run_config(folder, ckpt if os.path.isfile(ckpt) else None))


def save_run_classes(folder: str, classes: dict) -> str:
    """Write ``classes.json`` (``run_classes``) into the run folder, atomically."""
    return atomic_write_text(os.path.join(folder, CLASSES_NAME), json.dumps(classes, indent=2))


def data_fingerprint(data: DataConfig) -> str:
    """What identifies a run's training data, so a resume on other data is refused: the
    generator settings of the shapes, or the sha256 of the COCO json's content."""
    if data.source in ("shapes", "pose"):
        h, w = data.image_size
        return f"{data.source} num_train={data.num_train} train_seed={data.train_seed} size={h}x{w}"
    digest = hashlib.sha256()
    with open(data.annotations, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"COCO annotations with sha256 {digest.hexdigest()}"


def check_resume_fits(checkpoint: str, cfg: RunConfig) -> None:
    """Refuse to resume ``checkpoint`` with a model config or augmentation other than the ones
    it was trained with (parameters of the same shapes can still mean another model: anchors,
    image sizes, the heads' rules; other augmentations change every later step). Checkpoints
    without a run config (older ones) are not checked."""
    saved = read_run_info(checkpoint_path(checkpoint)).get("config")
    if saved is None:
        return
    before, now = (_compared_settings(d) for d in (json.loads(saved), cfg.to_dict()))
    # Settings only one side knows (added or removed since) are not compared.
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
    if changed:
        shown = "; ".join(f"{k}: was {before[k]!r}, now {now[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume from {checkpoint!r}: its config differs from this run's ({shown}). "
            "Resume with the run's own config (`mrcnn-edu train --resume RUN` reads it from "
            "the run)"
        )


def _compared_settings(run_dict: Mapping) -> dict:
    """``{"model.rpn.nms_thresh": 0.7, ..., "data.augment.hflip": False}`` as JSON values."""
    run_dict = json.loads(json.dumps(run_dict))  # tuples -> lists, as in the saved copy
    augment = (run_dict.get("data") or {}).get("augment") or {}
    return {**_flat(run_dict.get("model", {}), "model."), **_flat(augment, "data.augment.")}


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _recorded_classes(source: str) -> str | None:
    """The class record (JSON text) of ``classes.json`` or of a checkpoint; None if absent."""
    if not os.path.isfile(source):
        return None
    if source.endswith(".json"):
        with open(source) as f:
            return f.read()
    return read_run_info(source).get("classes")


def _checked_classes(record, where: str) -> tuple[tuple[str, ...], list[int]]:
    names = record.get("class_names") if isinstance(record, Mapping) else None
    ids = record.get("category_ids") if isinstance(record, Mapping) else None
    if (
        not isinstance(names, list)
        or not isinstance(ids, list)
        or len(names) != len(ids)
        or not all(isinstance(n, str) for n in names)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        or len(set(ids)) != len(ids)
    ):
        raise ValueError(
            f"{where!r} must record 'class_names' (strings) and 'category_ids' (distinct "
            f"integers), one per class; got {record!r}"
        )
    return tuple(names), list(ids)


def _classes_from_data(cfg: RunConfig) -> tuple[tuple[str, ...], list[int]]:
    """The classes of a run that did not record them, from the data its config names."""
    if cfg.data.source == "shapes":
        return tuple(SHAPE_KINDS), list(range(1, len(SHAPE_KINDS) + 1))
    if cfg.data.source == "pose":
        return ("person",), [1]
    from .data.coco import read_coco_json

    if not (cfg.data.annotations and os.path.isfile(cfg.data.annotations)):
        raise FileNotFoundError(
            "the run records no class names (no classes.json, no checkpoint with them) and "
            f"the COCO json its config names, {cfg.data.annotations!r}, is missing"
        )
    categories = sorted(read_coco_json(cfg.data.annotations)["categories"], key=lambda c: c["id"])
    return tuple(str(c["name"]) for c in categories), [int(c["id"]) for c in categories]
