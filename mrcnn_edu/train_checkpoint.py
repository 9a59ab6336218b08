"""Reading a Trainer checkpoint back: every check that makes a resume exact, or refuses it.

A checkpoint is one ``.npz`` (``Trainer.state_dict``, written by ``weights.save``; the table of
its keys is in ``docs/training.md``). :func:`read_checkpoint` loads one and checks it against the
run that wants to continue from it -- format and version, the config fields that change the
numbers, the dataset, the data position, the generator states -- before anything is restored,
so a refused checkpoint leaves the trainer untouched. :func:`load_checkpoint_weights` takes only
the parameters, for evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from . import weights
from .nn.module import Module
from .train_config import TRAJECTORY_FIELDS, TrainConfig

CHECKPOINT_FORMAT = "mrcnn-edu-trainer-checkpoint"
CHECKPOINT_VERSION = 1
LAST_NAME = "last.npz"


@dataclasses.dataclass
class CheckedCheckpoint:
    """A trainer checkpoint, read and checked, ready to be restored.

    ``changed`` lists ``"<field>: checkpoint <old>, now <new>"`` for each of the
    ``TRAJECTORY_FIELDS`` the current config changes (empty for an exact resume); ``model``,
    ``optimizer`` and ``scheduler`` are the saved state dicts; ``data_rng`` and ``model_rng``
    the generators' ``bit_generator.state``; ``order``, ``position``, ``epoch`` the data order.
    """

    path: str
    step: int
    changed: list[str]
    model_class: str
    model: dict
    optimizer: dict
    scheduler: dict
    data_rng: dict
    model_rng: dict
    order: np.ndarray
    position: int
    epoch: int


def read_checkpoint(
    path: str | os.PathLike,
    config: TrainConfig,
    dataset_len: int,
    rngs: tuple[np.random.Generator, np.random.Generator],
    strict: bool = True,
) -> CheckedCheckpoint:
    """Load the checkpoint at ``path`` (a run folder means its ``last.npz``) and check that a
    run with ``config``, a dataset of ``dataset_len`` items and generators of the kinds of
    ``rngs`` (data, model) can continue from it; ``strict`` refuses changed
    ``TRAJECTORY_FIELDS``. Raises a ValueError saying what does not fit."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LAST_NAME)
    ckpt = weights.load(path, nested=True)
    changed = _config_changes(_saved_config(ckpt, path), config)
    if changed and strict:
        raise ValueError(
            f"cannot resume exactly from {path!r}: the config differs in "
            + "; ".join(changed)
            + ". Use the checkpoint's config (only out_dir, log_every, checkpoint_every and "
            "progress may change), or resume(..., strict=False) to continue with the new "
            "values (the run will then differ from an uninterrupted one)"
        )
    step = int(ckpt["step"])
    if step > config.max_steps:
        raise ValueError(f"{path!r} is at step {step}, beyond max_steps={config.max_steps}")
    order, position = _data_position(ckpt["data"], dataset_len, path)
    return CheckedCheckpoint(
        path=path,
        step=step,
        changed=changed,
        model_class=str(ckpt["model_class"]),
        model=ckpt["model"],
        optimizer=ckpt["optimizer"],
        scheduler=ckpt["scheduler"],
        data_rng=_rng_state(ckpt["rng"]["data"], rngs[0], path),
        model_rng=_rng_state(ckpt["rng"]["model"], rngs[1], path),
        order=order,
        position=position,
        epoch=int(ckpt["data"]["epoch"]),
    )


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


def _saved_config(ckpt: dict, path: str) -> TrainConfig:
    """The checkpoint's TrainConfig, after checking that this is a trainer checkpoint of the
    version this code reads."""
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
        return TrainConfig.from_dict(json.loads(str(ckpt["config"])))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path!r} holds a config this code cannot read: {err}") from err


def _config_changes(saved: TrainConfig, now: TrainConfig) -> list[str]:
    return [
        f"{name}: checkpoint {getattr(saved, name)!r}, now {getattr(now, name)!r}"
        for name in TRAJECTORY_FIELDS
        if getattr(saved, name) != getattr(now, name)
    ]


def _data_position(data: dict, dataset_len: int, path: str) -> tuple[np.ndarray, int]:
    """The saved epoch permutation and the position in it, checked against the dataset."""
    order = np.asarray(data["order"], dtype=np.int64)
    position = int(data["position"])
    if int(data["dataset_len"]) != dataset_len or order.size not in (0, dataset_len):
        raise ValueError(
            f"{path!r} was trained on a dataset of {int(data['dataset_len'])} items, this "
            f"one has {dataset_len}; resume with the same dataset"
        )
    if not 0 <= position <= order.size:
        raise ValueError(f"{path!r} is corrupt: data position {position} of {order.size}")
    return order, position


def _rng_state(text, rng: np.random.Generator, path: str) -> dict:
    try:
        state = json.loads(str(text))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path!r} holds an unreadable generator state: {err}") from err
    want = type(rng.bit_generator).__name__
    if not isinstance(state, dict) or state.get("bit_generator") != want:
        raise ValueError(f"{path!r} holds a generator state that is not a {want} state")
    return state
