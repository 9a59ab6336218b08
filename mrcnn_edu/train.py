"""The training loop: SGD with warm-up and step decay, logs, checkpoints and exact resume.

One iteration (``Trainer.train_step``) is the paper's recipe, written out::

    images, targets = next batch of the data order      # epoch permutations, trainer's rng
    losses = model.forward(images, targets)              # {"loss_objectness": 0.69, ...}
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

Around the loop: ``train_config.py`` (``TrainConfig``, its checks), ``train_log.py`` (``log.csv``),
``train_guards.py`` (``TrainingDiverged``, the NaN guard, Ctrl-C held back during an update) and
``train_checkpoint.py`` (reading a checkpoint back, ``load_checkpoint_weights``). ``TrainConfig``,
``TrainingDiverged`` and ``load_checkpoint_weights`` are importable from here too.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import time
from collections.abc import Mapping

import numpy as np

from . import weights
from .nn.module import Module
from .nn.optim import SGD, WarmupMultiStepLR
from .progress import progress_bar
from .train_checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LAST_NAME,
    CheckedCheckpoint,
    load_checkpoint_weights,
    read_checkpoint,
)
from .train_config import TRAJECTORY_FIELDS, TrainConfig
from .train_guards import (
    TrainingDiverged,
    check_finite_gradients,
    finite_total,
    interrupts_deferred,
    loss_dict,
)
from .train_log import LOG_NAME, CsvLog, has_rows
from .visualize import plot_training_curves

# Re-exported: tests, notebooks and the CLI import these from here.
__all__ = [
    "TRAJECTORY_FIELDS",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "load_checkpoint_weights",
]

PLOT_NAME = "loss_curve.png"


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
        self._log: CsvLog | None = None  # opened on the first step at the current self.step
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
        stop = self._stop_step(until)
        os.makedirs(self.config.out_dir, exist_ok=True)
        self.model.train()
        self.model.rng = self.model_rng
        self._bar = self._progress_bar() if self.config.progress else None
        self._window = {}
        self._run_until(stop)
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

    def _stop_step(self, until) -> int:
        """The global step ``train`` stops after: ``until``, checked, or ``max_steps``."""
        stop = self.config.max_steps if until is None else until
        if isinstance(stop, bool) or not isinstance(stop, numbers.Integral):
            raise ValueError(f"until must be an integer step, got {until!r}")
        if not self.step <= stop <= self.config.max_steps:
            raise ValueError(
                f"until={stop} must lie between the current step {self.step} and "
                f"max_steps={self.config.max_steps}"
            )
        return stop

    def _run_until(self, stop: int) -> None:
        """Steps, reports and periodic checkpoints up to step ``stop``. On any exception (a
        divergence, Ctrl-C) the state after the last completed step is saved, then re-raised."""
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
        losses = loss_dict(self.model.forward(images, targets))
        total = finite_total(step, losses)  # or TrainingDiverged, before anything changes
        self.model.backward()
        check_finite_gradients(step, self.model)

        log = self._open_log()
        # Update, count and log as one unit: a Ctrl-C arriving here waits until all three are
        # done, so a checkpoint never holds half-updated parameters or a step without its row.
        with interrupts_deferred():
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
        checked = read_checkpoint(
            path, self.config, len(self.dataset), (self.data_rng, self.model_rng), strict
        )
        self._load_state(checked, strict)
        changed = [c.split(":")[0] for c in checked.changed]
        note = f" with changed {', '.join(changed)}" if changed else ""
        self._say(f"resumed from {checked.path} at step {checked.step}{note}")
        return self

    # -- helpers -------------------------------------------------------------------------------
    def _load_state(self, ckpt: CheckedCheckpoint, strict: bool) -> None:
        """Put a checked checkpoint's state into the model, optimizer, scheduler, generators
        and data order. Not strict: the optimizer's hyper-parameters and the schedule come from
        the current config, at the checkpoint's step."""
        path, step = ckpt.path, ckpt.step
        try:
            self.model.load_state_dict(ckpt.model)
        except ValueError as err:
            raise ValueError(
                f"{path!r} (saved from a {ckpt.model_class}) does not fit this "
                f"{type(self.model).__name__}: {err}"
            ) from err
        self.optimizer.load_state_dict(ckpt.optimizer)
        if strict:
            self.scheduler.load_state_dict(ckpt.scheduler)
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
        self.data_rng.bit_generator.state = ckpt.data_rng
        self.model_rng.bit_generator.state = ckpt.model_rng
        self.model.rng = self.model_rng
        self._order, self._position, self._epoch = ckpt.order, ckpt.position, ckpt.epoch
        self.step = step
        self._log = None  # reopened at this step: rows logged after the checkpoint are dropped

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

    def _open_log(self) -> CsvLog:
        if self._log is None:
            os.makedirs(self.config.out_dir, exist_ok=True)
            self._log = CsvLog(self.log_path, keep_through=self.step)
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
        if not has_rows(self.log_path):
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

    def _progress_bar(self):
        return progress_bar(
            self.config.max_steps, "train", "step", initial=self.step, dynamic_ncols=True
        )

    def _say(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
