"""The training loop: SGD with warm-up and step decay, logs, checkpoints and exact resume.

One iteration (``Trainer.train_step``) is the paper's recipe, written out::

    images, targets = next batch of the data order      # epoch permutations, trainer's rng
    losses = model.forward(images, targets)              # {"loss_rpn_cls": 0.69, ...}
    (stop if any loss is NaN/inf: the update is never applied)
    model.backward()                                     # grads of sum(losses) into every Param
    optimizer.step(); scheduler.step()                   # SGD + momentum, then the next lr

``Trainer.train()`` repeats it until ``max_steps`` and around it keeps a CSV log, a progress bar,
a loss-curve PNG and checkpoints. A checkpoint holds *everything* the next step depends on --
parameters, momentum buffers, the schedule's position, both random generators and the position
in the data order -- so a run stopped and resumed ends with the same parameters, bit for bit, as
one that never stopped (``docs/training.md`` explains why each piece is needed).

Model protocol (what ``MaskRCNN`` and the test's toy model provide): a
:class:`~mrcnn_edu.nn.module.Module` with ``forward(images, targets) -> {name: float}`` and
``backward()`` (no argument: it fills ``.grad`` of every Param from the *sum* of the losses the
last forward returned). A model that samples (anchors, RoIs) must draw from ``model.rng``: the
trainer sets that attribute to a ``numpy.random.Generator`` it owns, saves and restores.

Dataset protocol: ``len(ds)`` and ``ds[i] -> {"image": (3, H, W) float32, "boxes", "labels",
"masks", "image_id"}``; the model gets the images as a list and the rest of each item as its
target dict.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import numbers
import os
import secrets
import signal
import threading
import time
from collections.abc import Mapping

import numpy as np

from . import weights
from .backend import get_xp
from .nn.module import Module
from .nn.optim import SGD, WarmupMultiStepLR
from .visualize import plot_training_curves

CHECKPOINT_FORMAT = "mrcnn-edu-trainer-checkpoint"
CHECKPOINT_VERSION = 1
LOG_NAME = "log.csv"
PLOT_NAME = "loss_curve.png"
LAST_NAME = "last.npz"

# Columns of log.csv around the model's own loss names.
_LOG_COLUMNS_BEFORE = ("step", "lr")
_LOG_COLUMNS_AFTER = ("total", "seconds")


class TrainingDiverged(RuntimeError):
    """A loss (or a gradient) became NaN or infinite; the update of that step was not applied.

    Attributes:
        step: the 1-based number of the step that failed (the state saved is after ``step - 1``).
        quantity: the loss name (``"loss_mask"``), ``"total"``, or ``"gradient of <param>"``.
        value: the offending value (for a gradient, its first non-finite element).
        checkpoint: path of the checkpoint holding the last good state, once it is written.
    """

    def __init__(self, step: int, quantity: str, value: float, checkpoint: str | None = None):
        super().__init__(step, quantity, value)
        self.step = step
        self.quantity = quantity
        self.value = value
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        saved = (
            f"the last good state (after step {self.step - 1}) is saved in {self.checkpoint}"
            if self.checkpoint
            else f"the parameters are those after step {self.step - 1}"
        )
        return (
            f"training diverged at step {self.step}: {self.quantity} is {self.value}. "
            f"The update was not applied; {saved}. Lower the learning rate, lengthen the "
            "warm-up, or check the data of this step."
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run; defaults are the Mask R-CNN paper's (8 GPUs x 2 images).

    Args:
        lr: base learning rate after warm-up (paper: 0.02 for batch 16; scale it linearly with
            ``batch_size``).
        momentum: SGD momentum, in ``[0, 1)``.
        weight_decay: L2 coefficient, ``>= 0`` (not applied to biases and norm parameters).
        batch_size: images per step, ``>= 1``.
        max_steps: optimizer steps of the whole run (paper: 160k).
        warmup_iters: steps of linear warm-up from ``warmup_factor * lr`` to ``lr``
            (``0 <= warmup_iters <= max_steps``).
        warmup_factor: fraction of ``lr`` used at step 0, in ``(0, 1]``.
        milestones: **fractions of max_steps**, each in ``(0, 1)`` and strictly increasing, where
            the rate is multiplied by ``gamma``: the first ``round(f * max_steps)`` steps use
            the higher rate (paper: 120k of 160k -> ``(0.75,)``). Fractions keep the schedule's
            shape when a preset changes ``max_steps``.
        gamma: the drop factor at each milestone, in ``(0, 1]``.
        checkpoint_every: write ``checkpoint_<step>.npz`` and ``last.npz`` every this many
            steps (0: only ``last.npz`` at the end, on interrupt and on divergence).
        log_every: steps between plain log lines (used when there is no progress bar).
        seed: seeds the trainer's two generators (data order, model sampling).
        out_dir: folder for ``log.csv``, ``loss_curve.png`` and the checkpoints.
        progress: show a tqdm bar (when tqdm is installed) instead of plain log lines.

    ``TrainConfig.from_dict(d)`` builds one from a dict (a JSON file), rejecting unknown keys.
    The object is frozen: use ``dataclasses.replace(config, lr=0.01)`` for a variant.
    """

    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 16
    max_steps: int = 160_000
    warmup_iters: int = 1000
    warmup_factor: float = 1e-3
    milestones: tuple[float, ...] = (0.75,)
    gamma: float = 0.1
    checkpoint_every: int = 5000
    log_every: int = 20
    seed: int = 0
    out_dir: str = "runs/train"
    progress: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # the dataclass is frozen; validation normalises in place
        for name in ("lr", "momentum", "weight_decay", "warmup_factor", "gamma"):
            set_(self, name, _real(name, getattr(self, name)))
        for name in ("batch_size", "max_steps", "warmup_iters", "checkpoint_every"):
            set_(self, name, _integer(name, getattr(self, name)))
        for name in ("log_every", "seed"):
            set_(self, name, _integer(name, getattr(self, name)))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"warmup_factor must lie in (0, 1], got {self.warmup_factor}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must lie in (0, 1] (0.1 in the paper), got {self.gamma}")
        for name, low in (("batch_size", 1), ("max_steps", 1), ("log_every", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("warmup_iters", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_iters > self.max_steps:
            raise ValueError(
                f"warmup_iters={self.warmup_iters} exceeds max_steps={self.max_steps}: the rate "
                "would never reach lr; shorten the warm-up"
            )
        set_(self, "milestones", _milestone_fractions(self.milestones))
        self.milestone_steps()  # the fractions must also give distinct steps >= 1
        if not isinstance(self.out_dir, (str, os.PathLike)) or not os.fspath(self.out_dir):
            raise ValueError(f"out_dir must be a non-empty path, got {self.out_dir!r}")
        set_(self, "out_dir", os.fspath(self.out_dir))
        if not isinstance(self.progress, (bool, np.bool_)):
            raise ValueError(f"progress must be True or False, got {self.progress!r}")
        set_(self, "progress", bool(self.progress))

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
        """Build a config from ``{field: value}`` (e.g. ``json.load``); missing fields keep
        their defaults. Unknown keys raise a ValueError naming them and the valid ones."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a TrainConfig is built from a dict, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in valid)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys are {valid}")
        return cls(**d)

    def to_dict(self) -> dict:
        """The fields as JSON-ready Python values (milestones as a list)."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def milestone_steps(self) -> list[int]:
        """The milestones as step counts ``round(f * max_steps)`` (halves round up): the
        scheduler's 0-based iteration from which the lower rate applies."""
        steps = [int(math.floor(f * self.max_steps + 0.5)) for f in self.milestones]
        if any(s < 1 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(
                f"milestones {list(self.milestones)} of max_steps={self.max_steps} give steps "
                f"{steps}, which must be >= 1 and strictly increasing; spread the fractions or "
                "raise max_steps"
            )
        return steps


# Fields that change the numbers a run computes. A resumed run reproduces an uninterrupted one
# only if they all match; the others (where files go, how often to log) may change freely.
TRAJECTORY_FIELDS = (
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "max_steps",
    "warmup_iters",
    "warmup_factor",
    "milestones",
    "gamma",
    "seed",
)


class Trainer:
    """Train ``model`` on ``dataset`` with SGD, warm-up + step decay, logs and checkpoints.

    Args:
        model: a Module following the model protocol (module docstring). The trainer sets
            ``model.rng`` to its own ``numpy.random.Generator``; every random draw the model
            makes while training must come from it, or resumed runs cannot be exact.
        dataset: ``len(dataset)`` and ``dataset[i] -> {"image": (3, H, W) float32, ...}``.
        config: a :class:`TrainConfig` or a dict for ``TrainConfig.from_dict``; None gives
            the paper's defaults.

    Attributes:
        step: optimizer steps taken so far (0 for a fresh run).
        optimizer: the :class:`SGD` over ``model.parameters()``.
        scheduler: the :class:`WarmupMultiStepLR` driving ``optimizer.lr``.
        data_rng, model_rng: the two generators, seeded from ``config.seed`` as independent
            streams, so how many numbers the model draws never changes the data order.
        last_losses: the losses of the latest step, ``{name: float}``.
    """

    def __init__(self, model: Module, dataset, config: TrainConfig | Mapping | None = None):
        if not isinstance(model, Module):
            raise ValueError(
                f"model must be a mrcnn_edu.nn.module.Module, got {type(model).__name__}"
            )
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ValueError(
                f"dataset must support len() and indexing, got {type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise ValueError("dataset is empty; there is nothing to train on")
        if config is None:
            config = TrainConfig()
        elif isinstance(config, Mapping):
            config = TrainConfig.from_dict(config)
        elif not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig or a dict, got {type(config)}")
        self.model = model
        self.dataset = dataset
        self.config = config

        data_seed, model_seed = np.random.SeedSequence(config.seed).spawn(2)
        self.data_rng = np.random.default_rng(data_seed)
        self.model_rng = np.random.default_rng(model_seed)
        model.rng = self.model_rng

        self.optimizer = SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.scheduler = self._make_scheduler()
        self.step = 0
        self.last_losses: dict[str, float] = {}
        # The data order: a permutation of the dataset per epoch, consumed batch by batch.
        self._order = np.zeros(0, dtype=np.int64)
        self._position = 0
        self._epoch = 0
        self._log: _CsvLog | None = None  # opened on the first step at the current self.step
        self._bar = None  # the tqdm bar while train() runs with progress
        self._window: dict[str, list[float]] = {}  # losses since the last plain log line

    # -- paths ---------------------------------------------------------------------------------
    @property
    def log_path(self) -> str:
        return os.path.join(self.config.out_dir, LOG_NAME)

    @property
    def plot_path(self) -> str:
        return os.path.join(self.config.out_dir, PLOT_NAME)

    @property
    def last_checkpoint_path(self) -> str:
        return os.path.join(self.config.out_dir, LAST_NAME)

    def checkpoint_path(self, step: int) -> str:
        return os.path.join(self.config.out_dir, f"checkpoint_{step}.npz")

    # -- the loop ------------------------------------------------------------------------------
    def train(self, resume: str | os.PathLike | None = None, until: int | None = None) -> dict:
        """Run steps until ``max_steps`` (or global step ``until``), then write ``last.npz``.

        Args:
            resume: a checkpoint file, or a run folder (its ``last.npz``), to continue from;
                see :meth:`resume`.
            until: stop early after this global step (``step <= until <= max_steps``), e.g. to
                look at a run half-way; a later ``train()`` continues exactly.

        Returns:
            ``{"step", "losses" (of the last step), "checkpoint", "log", "plot"}``; ``plot`` is
            None without matplotlib.

        Raises:
            TrainingDiverged: a loss or gradient was NaN/inf; ``last.npz`` holds the state
                before the failing step.
            KeyboardInterrupt: re-raised after ``last.npz`` is written, so no finished step
                is lost.
        """
        if resume is not None:
            self.resume(resume)
        stop = self.config.max_steps if until is None else until
        if isinstance(stop, bool) or not isinstance(stop, numbers.Integral):
            raise ValueError(f"until must be an integer step, got {until!r}")
        if not self.step <= stop <= self.config.max_steps:
            raise ValueError(
                f"until={stop} must lie between the current step {self.step} and "
                f"max_steps={self.config.max_steps}"
            )
        os.makedirs(self.config.out_dir, exist_ok=True)
        self.model.train()
        self.model.rng = self.model_rng
        self._bar = _progress_bar(self.config.progress, self.step, self.config.max_steps)
        self._window = {}
        before = self._snapshot()
        try:
            while self.step < stop:
                before = self._snapshot()
                losses = self.train_step()
                self._report(losses)
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint(self.checkpoint_path(self.step))
                    self.save_checkpoint(self.last_checkpoint_path)
                    self._plot()
        except BaseException as err:
            if self.step == before["step"]:
                # The step did not complete: rewind the generators and the data order too, so
                # the saved state is exactly "after the previous step".
                self._restore(before)
            self._close_bar()
            self._save_after_failure(err)
            raise
        self._close_bar()
        self.save_checkpoint(self.last_checkpoint_path)
        plot = self._plot()
        return {
            "step": self.step,
            "losses": dict(self.last_losses),
            "checkpoint": self.last_checkpoint_path,
            "log": self.log_path,
            "plot": plot,
        }

    def train_step(
        self, images: list | None = None, targets: list[dict] | None = None
    ) -> dict[str, float]:
        """One iteration: batch -> forward -> check -> backward -> check -> SGD step -> lr step.

        Args:
            images: list of ``(3, H, W)`` float32 arrays and ``targets`` their dicts; when both
                are None the next batch of the trainer's data order is used.

        Returns:
            ``{loss name: float}`` of this step (also kept in ``last_losses``). The step's row
            (step, lr, losses, total, seconds) is appended to ``log.csv``.

        Raises:
            TrainingDiverged: before any parameter changes, if a loss, their sum or a gradient
                is not finite.
        """
        started = time.perf_counter()
        if (images is None) != (targets is None):
            raise ValueError("pass both images and targets, or neither (next batch)")
        if images is None:
            images, targets = self._next_batch()
        step = self.step + 1
        lr = self.optimizer.lr

        self.model.zero_grad()
        losses = _loss_dict(self.model.forward(images, targets))
        for name, value in losses.items():
            if not math.isfinite(value):
                raise TrainingDiverged(step, name, value)
        total = math.fsum(losses.values())
        if not math.isfinite(total):
            raise TrainingDiverged(step, "total", total)
        self.model.backward()
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            finite = get_xp(p.grad).isfinite(p.grad)
            if not bool(finite.all()):
                raise TrainingDiverged(step, f"gradient of {name}", float(p.grad[~finite][0]))

        log = self._open_log()
        # Update, count and log as one unit: a Ctrl-C arriving here waits until all three are
        # done, so a checkpoint never holds half-updated parameters or a step without its row.
        with _interrupts_deferred():
            self.optimizer.step()
            self.scheduler.step()
            self.step = step
            self.last_losses = losses
            log.append(step, lr, losses, total, time.perf_counter() - started)
        return losses

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The whole training state as a nested dict for ``weights.save`` (format in
        ``docs/training.md``): no pickled objects, generator states as JSON strings."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "model_class": type(self.model).__name__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "data": json.dumps(self.data_rng.bit_generator.state),
                "model": json.dumps(self.model_rng.bit_generator.state),
            },
            "data": {
                "order": np.asarray(self._order, dtype=np.int64),
                "position": self._position,
                "epoch": self._epoch,
                "dataset_len": len(self.dataset),
            },
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> str:
        """Write the training state atomically (default ``out_dir/last.npz``); returns the path."""
        path = os.fspath(path) if path is not None else self.last_checkpoint_path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        weights.save(path, self.state_dict())
        return path

    def resume(self, path: str | os.PathLike, strict: bool = True) -> Trainer:
        """Load a checkpoint written by this trainer so the next step is the one that followed.

        Args:
            path: a checkpoint ``.npz``, or a run folder (then its ``last.npz``).
            strict: require every config field that changes the numbers (``TRAJECTORY_FIELDS``)
                to match the checkpoint's, which is what makes the resumed run exact. With
                False, the new values are used from here on (e.g. a lower ``lr`` after a
                divergence) and the run no longer matches an uninterrupted one.

        Raises:
            ValueError: the file is not a trainer checkpoint, the config differs (the message
                lists the fields), or the model or dataset does not fit it.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, LAST_NAME)
        ckpt = weights.load(path, nested=True)
        if str(ckpt.get("format", "")) != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path!r} is not a Trainer checkpoint (no format={CHECKPOINT_FORMAT!r} entry); "
                "to start from bare weights use load_checkpoint_weights(model, path) instead"
            )
        version = int(ckpt["version"])
        if version != CHECKPOINT_VERSION:
            raise ValueError(
                f"{path!r} is checkpoint version {version}; this code reads version "
                f"{CHECKPOINT_VERSION}"
            )
        try:
            saved_config = TrainConfig.from_dict(json.loads(str(ckpt["config"])))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path!r} holds a config this code cannot read: {err}") from err
        changed = [
            f"{name}: checkpoint {getattr(saved_config, name)!r}, "
            f"now {getattr(self.config, name)!r}"
            for name in TRAJECTORY_FIELDS
            if getattr(saved_config, name) != getattr(self.config, name)
        ]
        if changed and strict:
            raise ValueError(
                f"cannot resume exactly from {path!r}: the config differs in "
                + "; ".join(changed)
                + ". Use the checkpoint's config (only out_dir, log_every, checkpoint_every and "
                "progress may change), or resume(..., strict=False) to continue with the new "
                "values (the run will then differ from an uninterrupted one)"
            )
        step = int(ckpt["step"])
        if step > self.config.max_steps:
            raise ValueError(
                f"{path!r} is at step {step}, beyond max_steps={self.config.max_steps}"
            )
        data = ckpt["data"]
        order = np.asarray(data["order"], dtype=np.int64)
        position = int(data["position"])
        n = len(self.dataset)
        if int(data["dataset_len"]) != n or order.size not in (0, n):
            raise ValueError(
                f"{path!r} was trained on a dataset of {int(data['dataset_len'])} items, this "
                f"one has {n}; resume with the same dataset"
            )
        if not 0 <= position <= order.size:
            raise ValueError(f"{path!r} is corrupt: data position {position} of {order.size}")
        data_rng_state = _rng_state(ckpt["rng"]["data"], self.data_rng, path)
        model_rng_state = _rng_state(ckpt["rng"]["model"], self.model_rng, path)

        try:
            self.model.load_state_dict(ckpt["model"])
        except ValueError as err:
            raise ValueError(
                f"{path!r} (saved from a {str(ckpt['model_class'])}) does not fit this "
                f"{type(self.model).__name__}: {err}"
            ) from err
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if strict:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        else:
            self.optimizer.momentum = self.config.momentum
            self.optimizer.weight_decay = self.config.weight_decay
            self.scheduler = self._make_scheduler()
            self.scheduler.iteration = step
            self.optimizer.lr = self.scheduler.lr_at(step)
        if not self.optimizer.step_count == self.scheduler.iteration == step:
            raise ValueError(
                f"{path!r} is inconsistent: step {step}, optimizer step "
                f"{self.optimizer.step_count}, scheduler iteration {self.scheduler.iteration}"
            )
        self.data_rng.bit_generator.state = data_rng_state
        self.model_rng.bit_generator.state = model_rng_state
        self.model.rng = self.model_rng
        self._order, self._position, self._epoch = order, position, int(data["epoch"])
        self.step = step
        self._log = None  # reopened at this step: rows logged after the checkpoint are dropped
        note = f" with changed {', '.join(c.split(':')[0] for c in changed)}" if changed else ""
        self._say(f"resumed from {path} at step {step}{note}")
        return self

    # -- helpers -------------------------------------------------------------------------------
    def _make_scheduler(self) -> WarmupMultiStepLR:
        c = self.config
        return WarmupMultiStepLR(
            self.optimizer,
            base_lr=c.lr,
            milestones=c.milestone_steps(),
            gamma=c.gamma,
            warmup_iters=c.warmup_iters,
            warmup_factor=c.warmup_factor,
        )

    def _next_batch(self) -> tuple[list, list[dict]]:
        """The next ``batch_size`` items of the data order. A batch that runs past the end of
        an epoch is completed from the next epoch's permutation, so every batch is full and
        every item is seen once per epoch."""
        n = len(self.dataset)
        indices: list[int] = []
        while len(indices) < self.config.batch_size:
            if self._position == self._order.size:
                self._order = self.data_rng.permutation(n).astype(np.int64)
                self._position = 0
                self._epoch += 1
            take = min(self.config.batch_size - len(indices), n - self._position)
            indices.extend(int(i) for i in self._order[self._position : self._position + take])
            self._position += take
        images, targets = [], []
        for i in indices:
            item = self.dataset[i]
            if not isinstance(item, Mapping) or "image" not in item:
                raise ValueError(
                    f"dataset[{i}] must be a dict with an 'image' entry, got {type(item).__name__}"
                )
            image = item["image"]
            if getattr(image, "ndim", None) != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"dataset[{i}]['image'] must be (3, H, W), got {getattr(image, 'shape', None)}"
                )
            images.append(image)
            targets.append({k: v for k, v in item.items() if k != "image"})
        return images, targets

    def _snapshot(self) -> dict:
        # Cheap: two small dicts and a reference (the order array is replaced, never mutated).
        return {
            "step": self.step,
            "data_rng": self.data_rng.bit_generator.state,
            "model_rng": self.model_rng.bit_generator.state,
            "order": self._order,
            "position": self._position,
            "epoch": self._epoch,
        }

    def _restore(self, snap: dict) -> None:
        self.data_rng.bit_generator.state = snap["data_rng"]
        self.model_rng.bit_generator.state = snap["model_rng"]
        self._order, self._position, self._epoch = snap["order"], snap["position"], snap["epoch"]

    def _save_after_failure(self, err: BaseException) -> None:
        """Write last.npz after an exception in the loop, and say why; never hide ``err``."""
        try:
            path = self.save_checkpoint(self.last_checkpoint_path)
            self._plot()
        except Exception as save_err:  # the original error matters more
            self._say(f"could not write {self.last_checkpoint_path}: {save_err}")
            return
        if isinstance(err, TrainingDiverged):
            err.checkpoint = path
            self._say(str(err))
        elif isinstance(err, KeyboardInterrupt):
            self._say(
                f"interrupted: the state after step {self.step} is saved in {path}; "
                f"continue with train(resume={path!r})"
            )
        else:
            self._say(f"{type(err).__name__} during step {self.step + 1}; state saved in {path}")

    def _open_log(self) -> _CsvLog:
        if self._log is None:
            os.makedirs(self.config.out_dir, exist_ok=True)
            self._log = _CsvLog(self.log_path, keep_through=self.step)
        return self._log

    def _report(self, losses: dict) -> None:
        """Progress bar postfix every step, or a plain line of means every ``log_every``."""
        if self._bar is not None:
            shown = {**losses, "total": math.fsum(losses.values())}
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
            self._bar.update(1)
            return
        self._window = {k: self._window.get(k, []) + [v] for k, v in losses.items()}
        if self.step % self.config.log_every and self.step != self.config.max_steps:
            return
        means = {k: math.fsum(v) / len(v) for k, v in self._window.items()}
        parts = [f"{k} {v:.4f}" for k, v in means.items()]
        parts.append(f"total {math.fsum(means.values()):.4f}")
        lr = self.scheduler.lr_at(self.step - 1)  # the rate this step used
        print(f"step {self.step}/{self.config.max_steps}  lr {lr:.5g}  " + "  ".join(parts))
        self._window = {}

    def _plot(self) -> str | None:
        """Redraw ``loss_curve.png`` from ``log.csv`` (written to a temporary file, then
        renamed); None without matplotlib or log rows. A failed drawing never stops training."""
        if not _has_rows(self.log_path):
            return None
        directory, name = os.path.split(os.path.abspath(self.plot_path))
        # The temporary name keeps the .png suffix: savefig picks the format from it.
        tmp = os.path.join(directory, f".{secrets.token_hex(4)}.{name}")
        try:
            plot_training_curves(self.log_path, tmp)
            os.replace(tmp, self.plot_path)
        except ImportError:
            return None
        except Exception as err:
            self._say(f"(loss curve not drawn: {type(err).__name__}: {err})")
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self.plot_path

    def _say(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def load_checkpoint_weights(model: Module, path: str | os.PathLike) -> Module:
    """Load only the parameters into ``model`` (for evaluation or fine-tuning), from a Trainer
    checkpoint (its ``model/`` part) or a plain weights file of ``model.state_dict()``."""
    state = weights.load(path, nested=False)
    if "format" in state and str(state["format"]) == CHECKPOINT_FORMAT:
        prefix = "model" + weights.SEP
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{os.fspath(path)!r} does not fit this model: {err}") from err
    return model


# -- private helpers -----------------------------------------------------------------------------


class _CsvLog:
    """``log.csv``: one row per step, appended (open, write, close) as each step completes.

    Opened at step ``keep_through``, it drops rows of later steps -- steps a crashed run logged
    after its last checkpoint, which the resumed run will compute again -- so no step appears
    twice. A fresh run (``keep_through=0``) therefore starts an empty log.
    """

    def __init__(self, path: str, keep_through: int):
        self.path = path
        self.columns: list[str] | None = None
        if not os.path.exists(path):
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept: list[list[str]] = []
        if rows and keep_through > 0:
            header = rows[0]
            if header[:2] != list(_LOG_COLUMNS_BEFORE):
                raise ValueError(
                    f"{path!r} is not a training log (header {header}); use another out_dir"
                )
            try:
                kept = [r for r in rows[1:] if r and int(r[0]) <= keep_through]
            except ValueError as err:
                raise ValueError(f"{path!r} has a malformed row ({err}); remove it") from err
            self.columns = header
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w", newline="") as f:
            if self.columns is not None:
                csv.writer(f).writerows([self.columns, *kept])
        os.replace(tmp, path)

    def append(self, step: int, lr: float, losses: dict, total: float, seconds: float) -> None:
        columns = [*_LOG_COLUMNS_BEFORE, *losses, *_LOG_COLUMNS_AFTER]
        new_file = self.columns is None
        if not new_file and columns != self.columns:
            raise ValueError(
                f"the model returned losses {list(losses)} at step {step}, but {self.path!r} "
                f"has columns {self.columns}; a model must return the same loss names every "
                "step (0.0 for an absent term)"
            )
        # repr() of a float round-trips exactly, so the log can be compared bit for bit.
        row = [str(step), repr(float(lr)), *(repr(v) for v in losses.values()), repr(total)]
        row.append(f"{seconds:.4f}")
        with open(self.path, "w" if new_file else "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(columns)
            writer.writerow(row)
        self.columns = columns


def _has_rows(path: str) -> bool:
    """True when the CSV at ``path`` has a header and at least one row."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return sum(1 for line, _ in zip(f, range(2)) if line.strip()) == 2


def _loss_dict(losses) -> dict[str, float]:
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(
            f"model.forward must return a non-empty dict {{name: float}} of losses, got "
            f"{type(losses).__name__}"
        )
    out = {}
    reserved = set(_LOG_COLUMNS_BEFORE) | set(_LOG_COLUMNS_AFTER)
    for name, value in losses.items():
        if not isinstance(name, str) or name in reserved:
            raise ValueError(
                f"loss name {name!r} is not allowed: use strings other than {sorted(reserved)}"
            )
        try:
            out[name] = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"loss {name!r} is not a number: {value!r}") from err
    return out


def _rng_state(text, rng: np.random.Generator, path: str) -> dict:
    try:
        state = json.loads(str(text))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path!r} holds an unreadable generator state: {err}") from err
    want = type(rng.bit_generator).__name__
    if not isinstance(state, dict) or state.get("bit_generator") != want:
        raise ValueError(f"{path!r} holds a generator state that is not a {want} state")
    return state


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold back SIGINT (Ctrl-C) for the duration of the block, then raise KeyboardInterrupt.

    Only the main thread receives signals in Python; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: leave it alone
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _progress_bar(enabled: bool, initial: int, total: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _real(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _integer(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _milestone_fractions(milestones) -> tuple[float, ...]:
    if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
        raise ValueError(f"milestones must be a list of fractions of max_steps, got {milestones!r}")
    values = tuple(_real("milestones entry", m) for m in milestones)
    if any(not 0 < f < 1 for f in values):
        raise ValueError(
            f"milestones are fractions of max_steps and must lie in (0, 1), got {list(values)} "
            "(e.g. 0.75 for the paper's 120k of 160k)"
        )
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"milestones must be strictly increasing, got {list(values)}")
    return values
