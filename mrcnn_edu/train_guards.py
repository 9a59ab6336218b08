"""How a training run fails without losing work: the NaN guard and Ctrl-C held back.

- The NaN guard: before any update, every loss, their sum and every gradient must be finite;
  otherwise :class:`TrainingDiverged` is raised and the update is never applied (one NaN update
  would spread NaN into every parameter it touches).
- :func:`interrupts_deferred`: the update, the step counter and the log row run as one unit; a
  Ctrl-C arriving during them takes effect once all are done, so a checkpoint never holds
  half-updated parameters.

``docs/training.md`` ("Interrupts", "The NaN guard") tells the story.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Mapping

from .backend import get_xp
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


def loss_dict(losses) -> dict[str, float]:
    """What ``model.forward`` returned, checked and converted: ``{name: float}``, non-empty,
    with string names that are not columns of ``log.csv``."""
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError(
            f"model.forward must return a non-empty dict {{name: float}} of losses, got "
            f"{type(losses).__name__}"
        )
    out = {}
    reserved = set(LOG_COLUMNS_BEFORE) | set(LOG_COLUMNS_AFTER)
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
    """TrainingDiverged naming the first trainable Param whose gradient has a NaN/inf."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        finite = get_xp(p.grad).isfinite(p.grad)
        if not bool(finite.all()):
            raise TrainingDiverged(step, f"gradient of {name}", float(p.grad[~finite][0]))


@contextlib.contextmanager
def interrupts_deferred():
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
