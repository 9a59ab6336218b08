"""Reading a Trainer checkpoint back: every check that makes a resume exact, or refuses it.

A checkpoint is one ``.npz`` (``Trainer.state_dict``, written by ``weights.save``; the table of
its keys is in ``docs/training.md``). :func:`read_checkpoint` loads one and checks it against the
run that wants to continue from it -- format and version, the config fields that change the
numbers, the dataset, the data position, the generator states -- before anything is restored,
so a refused checkpoint leaves the trainer untouched. :func:`load_checkpoint_weights` takes only
the parameters, for evaluation; :func:`read_run_info` only the run's own records (``run/``: the
run config and class names the CLI stores), without loading the parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import numpy as np

from . import weights
from .nn.module import Module, nonfinite_entries
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
    the generators' ``bit_generator.state``; ``order``, ``position``, ``epoch`` the data order;
    ``evaluation`` the periodic evaluation's state (``{}`` without one) and ``run_info`` the
    ``run/`` strings (``{}`` without them); ``augment_rng`` the augmentation generator's state
    (None in checkpoints written before it existed); ``world_size`` the number of ranks that
    wrote it (1 when not recorded) and ``rank_rngs`` each rank's ``[model, augment]`` generator
    states (None for one rank: the ``model_rng`` and ``augment_rng`` above).
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
    evaluation: dict = dataclasses.field(default_factory=dict)
    run_info: dict = dataclasses.field(default_factory=dict)
    augment_rng: dict | None = None
    world_size: int = 1
    rank_rngs: list | None = None

    def describe(self) -> str:
        """``resumed from <path> at step <k>``, naming the changed fields of a non-strict
        resume."""
        changed = [c.split(":")[0] for c in self.changed]
        note = (
            f" with changed {', '.join(changed)} (not strict: the schedule is rebuilt, and the "
            "run now differs from an uninterrupted one)"
            if changed
            else ""
        )
        return f"resumed from {self.path} at step {self.step}{note}"


# Entries every trainer checkpoint has (``data/fingerprint``, ``evaluation/``, ``run/`` and
# ``rng/augment`` are optional: older checkpoints lack them).
REQUIRED_ENTRIES = (
    "format",
    "version",
    "step",
    "config",
    "model_class",
    "model",
    "optimizer",
    "scheduler",
    "rng/data",
    "rng/model",
    "data/order",
    "data/position",
    "data/epoch",
    "data/dataset_len",
)


def read_checkpoint(
    path: str | os.PathLike,
    config: TrainConfig,
    dataset_len: int,
    rngs: tuple[np.random.Generator, np.random.Generator],
    strict: bool = True,
    data_fingerprint: str = "",
) -> CheckedCheckpoint:
    """Load the checkpoint at ``path`` (a run folder means its ``last.npz``) and check that a
    run with ``config``, a dataset of ``dataset_len`` items (described by
    ``data_fingerprint``, when both runs give one) and generators of the kinds of ``rngs``
    (data, model) can continue from it; ``strict`` refuses changed ``TRAJECTORY_FIELDS``.
    Raises a ValueError saying what does not fit."""
    path = checkpoint_path(path)
    ckpt = weights.load(path, nested=True)
    changed = _config_changes(_saved_config(ckpt, path), config)
    if changed and strict:
        raise ValueError(
            f"cannot resume exactly from {path!r}: the config differs in "
            + "; ".join(changed)
            + ". Use the checkpoint's config (only out_dir, log_every, checkpoint_every, "
            "eval_every and progress may change; `mrcnn-edu train --resume RUN` reads the "
            "run's own), or resume(..., strict=False) to continue with the new values (from "
            "the command line: --lr or --steps with --resume); the run will then differ from "
            "an uninterrupted one"
        )
    step = int(ckpt["step"])
    if step > config.max_steps:
        raise ValueError(f"{path!r} is at step {step}, beyond max_steps={config.max_steps}")
    order, position = _data_position(ckpt["data"], dataset_len, path)
    _check_fingerprint(ckpt["data"], data_fingerprint, path)
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
        evaluation=ckpt.get("evaluation", {}),
        run_info={k: str(v) for k, v in ckpt.get("run", {}).items()},
        augment_rng=(
            _rng_state(ckpt["rng"]["augment"], rngs[0], path) if "augment" in ckpt["rng"] else None
        ),
        world_size=int(ckpt["data"].get("world_size", 1)),
        rank_rngs=json.loads(str(ckpt["rng"]["ranks"])) if "ranks" in ckpt["rng"] else None,
    )


def restore_augment_rng(ckpt: CheckedCheckpoint, rng: np.random.Generator, seed) -> str | None:
    """Put the checkpoint's augmentation generator state into ``rng``. A checkpoint written
    before that generator existed gets the fresh state of ``seed``'s third stream (exact only
    if its run drew nothing from it), and the note to print about it is returned."""
    if ckpt.augment_rng is not None:
        rng.bit_generator.state = ckpt.augment_rng
        return None
    fresh = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[2])
    rng.bit_generator.state = fresh.bit_generator.state
    return (
        f"{ckpt.path!r} holds no augmentation generator (written before it existed): the "
        "augment stream starts fresh from the seed"
    )


def checkpoint_path(path: str | os.PathLike) -> str:
    """``path`` itself, or ``<path>/last.npz`` when ``path`` is a run folder."""
    path = os.fspath(path)
    return os.path.join(path, LAST_NAME) if os.path.isdir(path) else path


def read_run_info(path: str | os.PathLike) -> dict[str, str]:
    """The ``run/<name>`` strings of a checkpoint (a run folder means its ``last.npz``), read
    without loading the parameters; ``{}`` for a checkpoint or weights file without them."""
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot read {path!r}: not an .npz checkpoint")
    info = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if member.startswith("run" + weights.SEP) and member.endswith(".npy"):
                    with zf.open(member) as f:
                        value = np.lib.format.read_array(f, allow_pickle=False)
                    info[member[len("run/") : -len(".npy")]] = str(value)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ValueError(f"cannot read {path!r}: corrupt checkpoint ({err})") from err
    return info


def load_checkpoint_weights(model: Module, path: str | os.PathLike) -> Module:
    """Load only the parameters into ``model`` (for evaluation or fine-tuning), from a Trainer
    checkpoint (its ``model/`` part) or a plain weights file of ``model.state_dict()``."""
    state = weights.load(path, nested=False)
    if "format" in state and str(state["format"]) == CHECKPOINT_FORMAT:
        prefix = "model" + weights.SEP
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    broken = nonfinite_entries(state)
    if broken:
        raise ValueError(
            f"{os.fspath(path)!r} is broken: {'; '.join(broken[:3])}"
            f"{f' (and {len(broken) - 3} more)' if len(broken) > 3 else ''}; load an earlier "
            "checkpoint (a diverged run keeps the last good state in last.npz)"
        )
    try:
        model.load_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{os.fspath(path)!r} does not fit this model: {err}") from err
    return model


def _saved_config(ckpt: dict, path: str) -> TrainConfig:
    """The checkpoint's TrainConfig, after checking that this is a complete trainer checkpoint
    of the version this code reads."""
    if str(ckpt.get("format", "")) != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path!r} is not a Trainer checkpoint (no format={CHECKPOINT_FORMAT!r} entry); "
            "to start from bare weights use load_checkpoint_weights(model, path) instead"
        )
    missing = [name for name in REQUIRED_ENTRIES if not _has_entry(ckpt, name)]
    if missing:
        raise ValueError(
            f"{path!r} is an incomplete Trainer checkpoint: it lacks {missing}; resume from "
            "another checkpoint of the run, or load only its weights with "
            "load_checkpoint_weights"
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


def _has_entry(ckpt: dict, name: str) -> bool:
    node = ckpt
    for part in name.split(weights.SEP):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _check_fingerprint(data: dict, fingerprint: str, path: str) -> None:
    """Refuse a checkpoint whose data description differs from the current one (both given)."""
    saved = str(data.get("fingerprint", ""))
    if saved and fingerprint and saved != fingerprint:
        raise ValueError(
            f"cannot resume from {path!r}: it was trained on other data ({saved}), this run "
            f"has {fingerprint}. Resume with the run's own data (same files, same seed), or "
            "start a new run"
        )


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
