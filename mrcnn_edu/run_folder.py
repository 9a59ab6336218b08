"""A run folder's files: which ones a run writes, and how to start a run without losing one.

A run (``mrcnn-edu train``/``demo``) writes these files into its folder and nothing else:

- ``config.json`` (the run config), ``classes.json`` (class names and COCO category ids),
- ``log.csv``, ``loss_curve.png``, ``last.npz``, ``best.npz``, ``checkpoint_<step>.npz``,
- ``metrics.json``, ``predictions.png`` (the final evaluation; ``eval_predictions.png`` from
  ``mrcnn-edu evaluate``).

Every file is written atomically: to a hidden temporary sibling, then renamed over the target.
A process killed mid-write leaves that temporary file behind; :func:`remove_stale_temp_files`
deletes such leftovers when the next run starts in the folder.

:func:`check_run_folder` is the guard ``mrcnn-edu train``/``demo`` run first: a folder that
already holds a run is only written to by ``--resume`` (continue it) or ``--overwrite`` (start
over: :func:`clear_run_files` removes the old run's files first, so old and new never mix).
"""

from __future__ import annotations

import os
import re
import secrets

# The names a run writes (see the module docstring); checkpoint_<step>.npz by pattern.
RUN_FILE_NAMES = (
    "config.json",
    "classes.json",
    "log.csv",
    "loss_curve.png",
    "last.npz",
    "best.npz",
    "metrics.json",
    "predictions.png",
    "eval_predictions.png",
)
_CHECKPOINT_NAME = re.compile(r"checkpoint_\d+\.npz")

# Temporary names of interrupted atomic writes: weights.save and atomic_write_text
# (".<name>.<pid>.<hex>.tmp"), the run's figures through atomic_save (".<hex>.<figure>.png"),
# and the names earlier versions used for log.csv and config.json.
_TEMP_NAMES = (
    re.compile(r"\..+\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp"),
    re.compile(r"\.[0-9a-f]{8}\.(loss_curve|predictions|eval_predictions)\.png"),
    re.compile(r"log\.csv\.[0-9a-f]{8}\.tmp"),
    re.compile(r"config\.json\.tmp"),
)


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``: readers see
    the old file or the new one, never half of one. Returns the path."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(path: str | os.PathLike, write) -> str:
    """``write(tmp)`` writes the file at a hidden temporary sibling ``.<hex>.<name>``, which
    keeps ``path``'s extension (matplotlib's ``savefig`` picks the format from it); the file
    is then renamed over ``path``. Whatever ``write`` raises, no temporary file is left.
    Returns the path."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{secrets.token_hex(4)}.{name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def is_run_file(name: str) -> bool:
    """True for a file name a run writes (``RUN_FILE_NAMES``, ``checkpoint_<step>.npz``)."""
    return name in RUN_FILE_NAMES or _CHECKPOINT_NAME.fullmatch(name) is not None


def run_markers(folder: str | os.PathLike) -> list[str]:
    """The files that show ``folder`` already holds a run: ``config.json``, ``log.csv`` and
    every ``*.npz``, sorted ([] for a missing or empty folder)."""
    names = _file_names(folder)
    return sorted(n for n in names if n in ("config.json", "log.csv") or n.endswith(".npz"))


def check_run_folder(
    out_dir: str | os.PathLike, resume: str | os.PathLike | None = None, overwrite: bool = False
) -> None:
    """Refuse (ValueError) to start a run in ``out_dir`` that would mix with or destroy another.

    A fresh run needs a folder without a run (``run_markers``), or ``overwrite``. A resumed run
    may write into the folder of the checkpoint it continues, or into a folder without a run;
    ``resume`` and ``overwrite`` together are refused, since overwriting would delete the run
    being resumed. Nothing is written here.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output folder {out_dir!r} is a file; choose another --out")
    if resume is not None and overwrite:
        raise ValueError(
            "--resume and --overwrite exclude each other: --overwrite deletes the run's files, "
            "--resume continues them; give one"
        )
    markers = run_markers(out_dir)
    if not markers or overwrite:
        return
    if resume is not None and _same_folder(_resume_folder(resume), out_dir):
        return
    shown = ", ".join(markers[:6]) + (", ..." if len(markers) > 6 else "")
    what = "another run than the one resumed" if resume is not None else "a run"
    raise ValueError(
        f"{out_dir!r} already holds {what} ({shown}); nothing was written. Continue it with "
        f"`mrcnn-edu train --resume {out_dir}`, start over in it with --overwrite (deletes "
        f"that run's files), or choose another --out"
    )


def clear_run_files(folder: str | os.PathLike) -> list[str]:
    """Delete the files a run writes (and stale temporary files) from ``folder``; other files
    are kept. Returns the names removed."""
    removed = []
    for name in _file_names(folder):
        if is_run_file(name):
            os.unlink(os.path.join(folder, name))
            removed.append(name)
    return sorted(removed + remove_stale_temp_files(folder))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files interrupted atomic writes left in ``folder`` (names in
    ``_TEMP_NAMES``); returns their names. A name that carries the id of another process
    still running is kept: that write may be in progress."""
    removed = []
    for name in _file_names(folder):
        match = next((m for m in (p.fullmatch(name) for p in _TEMP_NAMES) if m), None)
        if match and not _written_by_another_live_process(match):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            removed.append(name)
    return sorted(removed)


def _written_by_another_live_process(match: re.Match) -> bool:
    pid = match.groupdict().get("pid")
    if pid is None or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's), or cannot tell: keep the file
    return True


def _file_names(folder) -> list[str]:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    return [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))]


def _resume_folder(resume) -> str:
    resume = os.fspath(resume)
    return resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)
