"""Checking where a command will write, before it starts any work.

``check_output_folder`` (``train``/``demo``/``evaluate --out``) and ``check_output_file``
(``predict``/``inspect --out``, ``convert OUT``) refuse, with a message naming the flag and
the path: a folder path that is an existing file, a path under a file, a folder that cannot be
written, and -- for a figure -- a name without an image extension (matplotlib would add
``.png`` and write a file other than the one named). A missing output folder is fine (it is
created); a missing folder for an output file is not (nothing creates it).
"""

from __future__ import annotations

import os

# The figure formats matplotlib writes (jpg/tiff through Pillow, which reading images needs).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".tif", ".tiff")


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> str:
    """``path`` as a str when a command can create it (or write into it); else a ValueError."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{flag} is empty; give a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a folder; choose another folder")
    _check_writable(path, flag)
    return path


def check_output_file(
    path: str | os.PathLike, flag: str = "--out", suffixes: tuple[str, ...] | None = None
) -> str:
    """``path`` as a str when a file can be written there, with one of ``suffixes`` (lower
    case, with the dot) when given; else a ValueError (FileNotFoundError: no such folder)."""
    path = os.fspath(path)
    if not path or os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file name such as figure.png")
    if suffixes is not None and os.path.splitext(path)[1].lower() not in suffixes:
        raise ValueError(
            f"{flag} {path!r} needs an image extension, one of {list(suffixes)} (it decides "
            "the format); e.g. predictions.png"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        _check_writable(folder, flag)  # names a file on the way, if there is one
        raise FileNotFoundError(
            f"{flag} {path!r}: folder {folder!r} does not exist; create it first"
        )
    _check_writable(folder, flag)
    return path


def _check_writable(path: str, flag: str) -> None:
    """The nearest existing folder of ``path`` (itself, or an ancestor) must be a writable
    folder: a file on the way, or a read-only folder, is refused."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path!r} lies under {existing!r}, which is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag} {path!r}: cannot write in {existing!r} (a read-only folder, or no "
            "permission); choose another place"
        )
