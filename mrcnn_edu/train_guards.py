"""How a training run fails without losing work: the NaN guard, Ctrl-C and SIGTERM held back.

- The NaN guard: before any update, every loss, their sum and every gradient must be finite;
  otherwise :class:`TrainingDiverged` is raised and the update is never applied (one NaN update
  would spread NaN into every parameter it touches).
- :func:`interrupts_deferred`: the update, the step counter and the log row run as one unit; a
  Ctrl-C (or SIGTERM) arriving during them takes effect once all are done, so a checkpoint
  never holds half-updated parameters.
- :func:`sigterm_as_interrupt`: SIGTERM (``kill``, batch schedulers) raises
  :class:`TrainingTerminated`, a ``KeyboardInterrupt``, so it saves the state like Ctrl-C.
- :func:`stop_message`: the one message saying why a run stopped and how to continue it.

``docs/training.md`` ("Interrupts", "The NaN guard") tells the story.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Mapping

import numpy as np

from .backend import get_xp, is_device_array, to_host
from .nn.module import Module
from .train_log import LOG_COLUMNS_AFTER, LOG_COLUMNS_BEFORE


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


def check_model_and_dataset(model, dataset) -> None:
    """What the Trainer needs: a Module, and a non-empty dataset with len() and indexing."""
    if not isinstance(model, Module):
        raise ValueError(f"model must be a mrcnn_edu.nn.module.Module, got {type(model).__name__}")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(f"dataset must support len() and indexing, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty; there is nothing to train on")


def loss_dict(losses) -> dict[str, float]:
    """What ``model.forward`` returned, checked and converted: ``{name: float}``, non-empty,
    with string names that are not columns of ``log.csv``. Losses that are 0-d device arrays
    come to the host together, in one transfer (one host sync per step)."""
    _check_loss_names(losses)
    if any(is_device_array(v) for v in losses.values()):
        return dict(zip(losses, (float(v) for v in to_host(loss_vector(losses)))))
    out = {}
    for name, value in losses.items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"loss {name!r} is not a number: {value!r}") from err
    return out


def loss_vector(losses):
    """The losses of ``model.forward`` as one float64 array, in their order: on the device when
    any of them is a device array (for an all-reduce there and a single transfer), else NumPy."""
    on_device = [v for v in losses.values() if is_device_array(v)]
    if not on_device:
        return np.array(list(loss_dict(losses).values()), dtype=np.float64)
    _check_loss_names(losses)
    xp = get_xp(*on_device)
    return xp.stack([xp.asarray(v, dtype=xp.float64).reshape(()) for v in losses.values()])


def _check_loss_names(losses) -> None:
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(
            f"model.forward must return a non-empty dict {{name: float}} of losses, got "
            f"{type(losses).__name__}"
        )
    reserved = set(LOG_COLUMNS_BEFORE) | set(LOG_COLUMNS_AFTER)
    for name in losses:
        if not isinstance(name, str) or name in reserved:
            raise ValueError(
                f"loss name {name!r} is not allowed: use strings other than {sorted(reserved)}"
            )


def finite_total(step: int, losses: dict[str, float]) -> float:
    """The sum of the losses of ``step``; TrainingDiverged if a loss or the sum is NaN/inf."""
    for name, value in losses.items():
        if not math.isfinite(value):
            raise TrainingDiverged(step, name, value)
    total = math.fsum(losses.values())
    if not math.isfinite(total):
        raise TrainingDiverged(step, "total", total)
    return total


def check_finite_gradients(step: int, model: Module) -> None:
    """TrainingDiverged naming the first trainable Param whose gradient has a NaN/inf. On a
    device, the check is one transfer of one flag per Param (not one host sync per Param)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        return
    grads = [p.grad for _, p in named]
    xp = get_xp(*grads)
    if xp is np:
        bad = np.array([not np.isfinite(g).all() for g in grads])
    else:
        bad = to_host(xp.stack([~xp.isfinite(g).all() for g in grads]))
    if not bad.any():
        return
    name, p = named[int(np.flatnonzero(bad)[0])]
    grad = to_host(p.grad)
    raise TrainingDiverged(step, f"gradient of {name}", float(grad[~np.isfinite(grad)][0]))


class TrainingTerminated(KeyboardInterrupt):
    """SIGTERM (what ``kill`` and batch schedulers send) arrived while training: handled like
    Ctrl-C -- the state after the last completed step is saved -- and the CLI exits with 143."""


def _raise_terminated(signum, frame):
    raise TrainingTerminated


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM raises :class:`TrainingTerminated` instead of ending the
    process at once, so the trainer can save its state first.

    Only a default SIGTERM disposition is replaced (an ignored SIGTERM, or a handler installed
    by someone else, is left alone), and only in the main thread, where Python runs handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold back SIGINT (Ctrl-C) and SIGTERM for the duration of the block; afterwards each one
    that arrived is passed to its own handler (``KeyboardInterrupt``, ``TrainingTerminated``).

    A signal whose handler is not a Python function (default or ignored, or set outside
    Python) is left alone. Only the main thread receives signals in Python; elsewhere the block
    runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            handlers[signum] = handler
    received = []
    for signum in handlers:
        signal.signal(signum, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    for signum in received:
        handlers[signum](signum, None)


def stop_message(
    err: BaseException, step: int, checkpoint: str, resume_command: str | None, lr: float
) -> str:
    """The one message printed when a training run stops early: what stopped it, where the
    state after step ``step`` is saved, and how to continue -- the CLI command when
    ``resume_command`` is given (``mrcnn-edu train --resume RUN``), else the Python call."""
    if isinstance(err, TrainingDiverged):
        if resume_command is None:
            how = (
                f"Trainer(...).resume({checkpoint!r}, strict=False) with a config of a lower lr "
                "(the schedule is rebuilt at the new rate)"
            )
        else:
            how = (
                f"`{resume_command} --lr {lr / 2:g}` (half the rate: the schedule is rebuilt at "
                "the new rate from this step, a non-strict resume, so the run then differs from "
                "an uninterrupted one)"
            )
        return f"{err} To continue at a lower learning rate: {how}."
    if resume_command is None:
        how = f"trainer.train(resume={checkpoint!r})"
    else:
        how = f"`{resume_command}`"
    cause = "stopped by SIGTERM" if isinstance(err, TrainingTerminated) else "interrupted (Ctrl-C)"
    return (
        f"{cause}: the state after step {step} is saved in {checkpoint}; continue exactly "
        f"where it stopped with {how}"
    )
