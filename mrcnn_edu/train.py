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
``train_guards.py`` (``TrainingDiverged``, the NaN guard, Ctrl-C and SIGTERM held back during an
update), ``train_state.py`` (``state_dict``, ``save_checkpoint``, ``resume``: the Trainer's base
class), ``train_checkpoint.py`` (reading a checkpoint back, ``load_checkpoint_weights``),
``train_eval.py`` (evaluation every ``eval_every`` steps, ``best.npz``) and ``train_console.py``
(the progress bar and log lines). ``TrainConfig``, ``TrainingDiverged`` and
``load_checkpoint_weights`` are importable from here too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .distributed import Communicator, rank_seeds, shard
from .nn.module import Module
from .nn.optim import SGD, WarmupMultiStepLR
from .run_folder import remove_stale_temp_files
from .train_checkpoint import (
    LAST_NAME,
    load_checkpoint_weights,
)
from .train_config import TRAJECTORY_FIELDS, TrainConfig, as_train_config, stop_step
from .train_console import TrainConsole
from .train_eval import BEST_NAME, periodic_evaluation
from .train_guards import (
    TrainingDiverged,
    check_finite_gradients,
    check_model_and_dataset,
    interrupts_deferred,
    sigterm_as_interrupt,
    stop_message,
)
from .train_log import LOG_NAME, CsvLog, draw_curves
from .train_parallel import TrainerParallel
from .train_state import TrainerState
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


class Trainer(TrainerState, TrainerParallel):
    """Train ``model`` on ``dataset`` with SGD, warm-up + step decay, logs and checkpoints.

    Args:
        model: a Module following the model protocol (module docstring). The trainer sets
            ``model.rng`` to its own ``numpy.random.Generator``; every random draw the model
            makes while training must come from it, or resumed runs cannot be exact.
        dataset: ``len(dataset)`` and ``dataset[i] -> {"image": (3, H, W) float32, ...}``.
        config: a :class:`TrainConfig` or a dict for ``TrainConfig.from_dict``; None gives
            the paper's defaults.
        augment: ``(item, rng) -> item`` applied to each training item as it is fetched
            (``data.transforms.Augment``), drawing only from ``rng`` (``augment_rng``).
        evaluate: ``model -> {metric: float}`` (``train_eval.coco_evaluator(val_set)``), run
            every ``config.eval_every`` steps and at the end; it cannot change the run.
        metrics: the names ``evaluate`` returns (``log.csv`` columns); the first ranks the
            evaluations (higher is better) and the best model is kept in ``best.npz``.
        data_fingerprint: a description of the training data (e.g. the annotation file's
            sha256) saved in checkpoints; ``resume`` refuses a checkpoint with another one.
        run_info: ``{name: str}`` saved as ``run/<name>`` in every checkpoint, not read by the
            trainer (the CLI stores the run config and class names there).
        resume_command: the shell command that continues this run (``mrcnn-edu train --resume
            RUN``), named in the message printed when training stops early; None names the
            Python call instead.
        comm: a :class:`~mrcnn_edu.distributed.Communicator` for data-parallel training (one
            Trainer per rank, see ``train_parallel.py``); None: a single process.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (``backend.check_device``): the model is
            moved there (``model.to``) before training; None leaves it where it is (under
            NCCL: the GPU the communicator bound). Not part of the run: checkpoints hold host
            arrays, so a run resumes on another device.

    Attributes:
        step: optimizer steps taken so far (0 for a fresh run).
        device: the checked device the model trains on (None: not moved by the trainer).
        optimizer: the :class:`SGD` over ``model.parameters()``.
        scheduler: the :class:`WarmupMultiStepLR` driving ``optimizer.lr``.
        data_rng, model_rng, augment_rng: the three generators, seeded from ``config.seed``
            as independent streams (``SeedSequence(seed).spawn(3)``: the first two are those
            of ``spawn(2)``), so the model's and augmentation's draws never change the data.
        last_losses: the losses of the latest step, ``{name: float}``.
    """

    def __init__(
        self,
        model: Module,
        dataset,
        config: TrainConfig | Mapping | None = None,
        augment: Callable[[dict, np.random.Generator], dict] | None = None,
        *,
        evaluate: Callable[[Module], Mapping] | None = None,
        metrics: Sequence[str] = (),
        data_fingerprint: str = "",
        run_info: Mapping[str, str] | None = None,
        resume_command: str | None = None,
        comm: Communicator | None = None,
        device: str | None = None,
    ):
        check_model_and_dataset(model, dataset)
        config = as_train_config(config)
        self.model = model
        self.dataset = dataset
        self.config = config
        self._eval = periodic_evaluation(config.eval_every, evaluate, metrics)
        self.data_fingerprint = str(data_fingerprint)
        self.run_info = {str(k): str(v) for k, v in (run_info or {}).items()}
        self.resume_command = resume_command

        rank = comm.rank if comm is not None else 0
        data_seed, model_seed, augment_seed = rank_seeds(config.seed, rank)
        self.data_rng = np.random.default_rng(data_seed)
        self.model_rng = np.random.default_rng(model_seed)
        self.augment_rng = np.random.default_rng(augment_seed)
        model.rng = self.model_rng
        if augment is not None and not callable(augment):
            raise ValueError(f"augment must be a callable (item, rng) -> item, got {augment!r}")
        self.augment = augment

        self._setup_parallel(comm, device)  # the model on its device, the same on all ranks
        self.optimizer = SGD(
            model.parameters(),
            lr=config.lr * self.lr_scale,
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
        self._console = TrainConsole()

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

    @property
    def best_checkpoint_path(self) -> str:
        return os.path.join(self.config.out_dir, BEST_NAME)

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
            ``{"step", "losses" (of the last step), "checkpoint", "log", "plot", "best",
            "evaluation"}``; ``plot`` is None without matplotlib; with evaluation on, ``best``
            is the path of ``best.npz`` and ``evaluation`` the latest ``{metric: value}``
            (else None and ``{}``).

        Raises:
            TrainingDiverged: a loss or gradient was NaN/inf; ``last.npz`` holds the state
                before the failing step.
            KeyboardInterrupt: Ctrl-C, or :class:`~mrcnn_edu.train_guards.TrainingTerminated`
                for SIGTERM; re-raised after ``last.npz`` is written, so no finished step is
                lost.
        """
        if resume is not None:
            self.resume(resume)
        stop = stop_step(until, self.step, self.config.max_steps)
        removed = []
        if self.comm.is_root:  # several ranks: only rank 0 writes into the run folder
            os.makedirs(self.config.out_dir, exist_ok=True)
            removed = remove_stale_temp_files(self.config.out_dir)
        if removed:
            self._say(f"removed temporary files of interrupted writes: {', '.join(removed)}")
        self.model.train()
        self.model.rng = self.model_rng
        if self.comm.is_root:
            self._console.open(self.config.progress, self.config.max_steps, self.step)
        with sigterm_as_interrupt(), self._interrupts_flagged():
            self._run_until(stop)
        plot = self._plot()
        if self._eval is not None and self._eval.last_step == self.config.max_steps:
            self._say(self._eval.summary())
        return {
            "step": self.step,
            "losses": dict(self.last_losses),
            "checkpoint": self.last_checkpoint_path,
            "log": self.log_path,
            "plot": plot,
            "best": self.best_checkpoint_path if self._eval is not None else None,
            "evaluation": dict(self._eval.last) if self._eval is not None else {},
        }

    def _run_until(self, stop: int) -> None:
        """Steps, reports, evaluations and periodic checkpoints up to step ``stop``, then
        ``last.npz``. On any exception (a divergence, Ctrl-C, SIGTERM) the state after the last
        completed step is saved, then re-raised."""
        before = self._snapshot()
        c = self.config
        try:
            while self.step < stop:
                before = self._snapshot()
                losses = self.train_step()
                self._check_stop()  # several ranks: a Ctrl-C/SIGTERM on any stops all here
                lr = self.scheduler.lr_at(self.step - 1)  # the rate this step used
                if self.comm.is_root:
                    self._console.report(self.step, c.max_steps, c.log_every, lr, losses)
                if self._eval is not None and self._eval.due(self.step, c.max_steps):
                    self._evaluate()
                if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint(self.checkpoint_path(self.step))
                    self.save_checkpoint(self.last_checkpoint_path)
                    self._plot()
            self._console.close()
            self.save_checkpoint(self.last_checkpoint_path)
        except BaseException as err:
            self._abort_unless_agreed(err)  # several ranks: one rank's own error ends the job
            if self.step == before["step"]:
                # The step did not complete: rewind the generators and the data order too, so
                # the saved state is exactly "after the previous step".
                self._restore(before)
            self._console.close()
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
            TrainingDiverged: before any parameter changes, if a loss, their sum, a gradient or
                a feature map an op refuses (``NonFiniteError``) is not finite.
        """
        started = time.perf_counter()
        if (images is None) != (targets is None):
            raise ValueError("pass both images and targets, or neither (next batch)")
        if images is None:
            images, targets = self._next_batch()
        step = self.step + 1
        lr = self.optimizer.lr

        self.model.zero_grad()
        # several ranks: the mean losses, and every rank now holds the mean gradient; a
        # non-finite loss raises TrainingDiverged here, before anything changes
        losses, total = self._forward_backward(images, targets, step)
        check_finite_gradients(step, self.model)

        log = self._open_log() if self.comm.is_root else None
        # Update, count and log as one unit: a Ctrl-C (or SIGTERM) arriving here waits until all
        # three are done, so a checkpoint never holds half-updated parameters or a step without
        # its row.
        with interrupts_deferred():
            self.optimizer.step()
            self.scheduler.step()
            self.step = step
            self.last_losses = losses
            if log is not None:
                log.append(step, lr, losses, total, time.perf_counter() - started)
        return losses

    # -- helpers -------------------------------------------------------------------------------
    def _make_scheduler(self) -> WarmupMultiStepLR:
        c = self.config
        return WarmupMultiStepLR(
            self.optimizer,
            base_lr=c.lr * self.lr_scale,
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
        rank, world = self.comm.rank, self.comm.world_size
        indices: list[int] = []
        mine = shard(self._order, rank, world)  # several ranks: this rank's share of the epoch
        while len(indices) < self.config.batch_size:
            if self._position >= mine.size:
                self._order = self.data_rng.permutation(n).astype(np.int64)
                mine = shard(self._order, rank, world)
                self._position = 0
                self._epoch += 1
            take = min(self.config.batch_size - len(indices), mine.size - self._position)
            indices.extend(int(i) for i in mine[self._position : self._position + take])
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
            if self.augment is not None:
                item = self.augment(item, self.augment_rng)
            images.append(item["image"])
            targets.append({k: v for k, v in item.items() if k != "image"})
        return images, targets

    def _snapshot(self) -> dict:
        # Cheap: two small dicts and a reference (the order array is replaced, never mutated).
        return {
            "step": self.step,
            "data_rng": self.data_rng.bit_generator.state,
            "model_rng": self.model_rng.bit_generator.state,
            "augment_rng": self.augment_rng.bit_generator.state,
            "order": self._order,
            "position": self._position,
            "epoch": self._epoch,
        }

    def _restore(self, snap: dict) -> None:
        self.data_rng.bit_generator.state = snap["data_rng"]
        self.model_rng.bit_generator.state = snap["model_rng"]
        self.augment_rng.bit_generator.state = snap["augment_rng"]
        self._order, self._position, self._epoch = snap["order"], snap["position"], snap["epoch"]

    def _evaluate(self) -> None:
        """Evaluate after this step without changing the run (see ``PeriodicEvaluation.run``);
        the metrics go into the step's log row, and a new best model into ``best.npz``.
        Several ranks: rank 0 evaluates, the others go on to the next step and wait there."""
        if not self.comm.is_root:
            return
        rngs = (self.data_rng, self.model_rng, self.augment_rng)
        values, improved = self._eval.run(self.model, self.step, rngs)
        self._open_log().fill(self.step, values)
        if improved:
            self.save_checkpoint(self.best_checkpoint_path)
        self._say(self._eval.line())

    def _save_after_failure(self, err: BaseException) -> None:
        """Write last.npz after an exception in the loop, and say why (one message, naming how
        to continue); never hide ``err``. ``err.saved_checkpoint`` tells callers it was said."""
        try:
            path = self.save_checkpoint(self.last_checkpoint_path)
            self._plot()
        except Exception as save_err:  # the original error matters more
            self._say(f"could not write {self.last_checkpoint_path}: {save_err}")
            return
        if isinstance(err, TrainingDiverged):
            err.checkpoint = path
        if isinstance(err, (TrainingDiverged, KeyboardInterrupt)):
            lr = self.config.lr
            self._say(stop_message(err, self.step, path, self.resume_command, lr))
            err.saved_checkpoint = path
        else:
            self._say(f"{type(err).__name__} during step {self.step + 1}; state saved in {path}")

    def _open_log(self) -> CsvLog:
        if self._log is None:
            os.makedirs(self.config.out_dir, exist_ok=True)
            metrics = self._eval.metrics if self._eval is not None else ()
            self._log = CsvLog(self.log_path, keep_through=self.step, metrics=metrics)
        return self._log

    def _plot(self) -> str | None:
        """Redraw ``loss_curve.png`` from ``log.csv``; None without matplotlib or log rows. A
        failed drawing is reported and never stops training. Only rank 0 draws."""
        if not self.comm.is_root:
            return None
        return draw_curves(self.log_path, self.plot_path, plot_training_curves, self._say)

    def _say(self, message: str) -> None:
        if not self.comm.is_root:
            return
        self._console.say(message)
