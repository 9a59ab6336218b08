"""The Trainer's checkpoints: the whole training state as a dict, saving it, resuming from it.

``TrainerState`` is a part of :class:`mrcnn_edu.train.Trainer` (its base class), kept in its
own module: ``state_dict`` lists everything the next step depends on (``docs/training.md`` has
the table of keys), ``save_checkpoint`` writes it atomically, and ``resume`` reads a checkpoint
back through ``train_checkpoint.read_checkpoint`` (which checks it first) and restores it. The
methods use the trainer's attributes: ``model``, ``optimizer``, ``scheduler``, ``config``,
``dataset``, the generators, the data order and the evaluation state.
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import weights
from .backend import to_host
from .train_checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckedCheckpoint,
    read_checkpoint,
    restore_augment_rng,
)


class TrainerState:
    """Checkpoint methods of the Trainer (see the module docstring)."""

    def state_dict(self) -> dict:
        """The whole training state as a nested dict for ``weights.save`` (format in
        ``docs/training.md``): no pickled objects, generator states as JSON strings."""
        ranks = self._rank_rng_states()  # several ranks: a collective, called on every rank
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "model_class": type(self.model).__name__,
            # host copies: a checkpoint holds NumPy arrays wherever the model trains
            "model": to_host(self.model.state_dict()),
            "optimizer": to_host(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "data": json.dumps(self.data_rng.bit_generator.state),
                "model": json.dumps(self.model_rng.bit_generator.state),
                "augment": json.dumps(self.augment_rng.bit_generator.state),
            },
            "data": {
                "order": np.asarray(self._order, dtype=np.int64),
                "position": self._position,
                "epoch": self._epoch,
                "dataset_len": len(self.dataset),
                "fingerprint": self.data_fingerprint,
                "world_size": self.comm.world_size,
            },
            # Optional parts (absent, they store nothing): the evaluation's best result, and
            # the strings the caller asked to keep with the run.
            "evaluation": self._eval.state_dict() if self._eval is not None else {},
            "run": dict(self.run_info),
        }
        if self.comm.world_size > 1:  # every rank's model and augment generators
            state["rng"]["ranks"] = json.dumps(ranks)
        return state

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> str:
        """Write the training state atomically (default ``out_dir/last.npz``); returns the path.
        Several ranks: every rank calls it (the generators are gathered), rank 0 writes."""
        path = os.fspath(path) if path is not None else self.last_checkpoint_path
        state = self.state_dict()
        if self.comm.is_root:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            weights.save(path, state)
        return path

    def resume(self, path: str | os.PathLike, strict: bool = True) -> TrainerState:
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
        rngs = (self.data_rng, self.model_rng)
        checked = read_checkpoint(
            path, self.config, len(self.dataset), rngs, strict, self.data_fingerprint
        )
        self._load_state(checked, strict)
        self._say(checked.describe())
        return self

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
        note = restore_augment_rng(ckpt, self.augment_rng, self.config.seed)
        if note and self.augment is not None:
            self._say(note)
        self._order, self._position, self._epoch = ckpt.order, ckpt.position, ckpt.epoch
        note = self._resume_ranks(ckpt)  # several ranks, or another number of them
        if note:
            self._say(note)
        self.step = step
        if self._eval is not None:
            self._eval.load_state_dict(ckpt.evaluation)
        self._log = None  # reopened at this step: rows logged after the checkpoint are dropped
