"""``TrainConfig``: the hyper-parameters of a training run, each one checked when it is set.

The defaults are the Mask R-CNN paper's schedule (``docs/training.md`` maps each field to the
paper). ``TRAJECTORY_FIELDS`` names the fields that change the numbers a run computes: a
checkpoint resumes exactly only when they match.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping

from .config_checks import ConfigError, Rule, check_fields

# (field, test, what the test requires): after the type check of each field's hint
# (config_checks.check_fields), a failure raises "<field> <requirement>, got <value>".
_RANGE_RULES = (
    ("lr", lambda v: v > 0, "must be > 0"),
    ("momentum", lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("warmup_factor", lambda v: 0 < v <= 1, "must lie in (0, 1]"),
    ("gamma", lambda v: 0 < v <= 1, "must lie in (0, 1] (0.1 in the paper)"),
    ("batch_size", lambda v: v >= 1, "must be >= 1"),
    ("max_steps", lambda v: v >= 1, "must be >= 1"),
    ("log_every", lambda v: v >= 1, "must be >= 1"),
    ("warmup_iters", lambda v: v >= 0, "must be >= 0"),
    ("checkpoint_every", lambda v: v >= 0, "must be >= 0"),
    ("eval_every", lambda v: v >= 0, "must be >= 0 (0: no evaluation during training)"),
    ("seed", lambda v: v >= 0, "must be >= 0"),
    ("out_dir", lambda v: bool(v), "must be a non-empty path"),
)

# Fields that change the numbers a run computes. A resumed run reproduces an uninterrupted one
# only if they all match; the others (where files go, how often to log or evaluate) may change
# freely.
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
        eval_every: evaluate on the validation set every this many steps and at the end,
            recording the scores in ``log.csv`` and keeping ``best.npz`` (0: off). Needs an
            ``evaluate`` callable for the Trainer (``mrcnn-edu train --val-data``).
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
    eval_every: int = 0
    seed: int = 0
    out_dir: str = "runs/train"
    progress: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # the dataclass is frozen; validation normalises in place
        if isinstance(self.out_dir, os.PathLike):
            set_(self, "out_dir", os.fspath(self.out_dir))
        # types from the fields' hints (bools and strings are refused as numbers), then ranges
        check_fields(self, {name: Rule(holds, text) for name, holds, text in _RANGE_RULES})
        if self.warmup_iters > self.max_steps:
            raise ValueError(
                f"warmup_iters={self.warmup_iters} exceeds max_steps={self.max_steps}: the rate "
                "would never reach lr; shorten the warm-up"
            )
        set_(self, "milestones", _milestone_fractions(self.milestones))
        self.milestone_steps()  # the fractions must also give distinct steps >= 1

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


def as_train_config(config: TrainConfig | Mapping | None) -> TrainConfig:
    """``config`` itself, ``TrainConfig.from_dict(config)`` for a dict, the defaults for None."""
    if config is None:
        return TrainConfig()
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig or a dict, got {type(config)}")
    return config


def stop_step(until, step: int, max_steps: int) -> int:
    """The global step a ``Trainer.train(until=...)`` call stops after: ``until``, checked to be
    an integer in ``[step, max_steps]``, or ``max_steps`` when it is None."""
    stop = max_steps if until is None else until
    if isinstance(stop, bool) or not isinstance(stop, numbers.Integral):
        raise ValueError(f"until must be an integer step, got {until!r}")
    if not step <= stop <= max_steps:
        raise ValueError(
            f"until={stop} must lie between the current step {step} and max_steps={max_steps}"
        )
    return stop


def fit_milestones(milestones, max_steps: int) -> tuple[float, ...]:
    """The milestone fractions a run of ``max_steps`` can use: those whose steps
    ``round(f * max_steps)`` are >= 1 and strictly increasing, in order (a later fraction that
    lands on the same step as the one before is dropped). Unchanged whenever they already fit;
    ``(0.8, 0.93)`` for 2 steps becomes ``(0.8,)``."""
    kept, last = [], 0
    for f in milestones:
        step = int(math.floor(f * max_steps + 0.5))
        if step > last:
            kept.append(f)
            last = step
    return tuple(kept)


def _milestone_fractions(milestones: tuple[float, ...]) -> tuple[float, ...]:
    """The checks of the (already type-checked) fractions: in (0, 1), increasing."""
    if any(not 0 < f < 1 for f in milestones):
        raise ConfigError(
            "milestones",
            f"are fractions of max_steps and must lie in (0, 1), got {list(milestones)} "
            "(e.g. 0.75 for the paper's 120k of 160k)",
        )
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ConfigError("milestones", f"must be strictly increasing, got {list(milestones)}")
    return milestones
