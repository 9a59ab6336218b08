"""Weights and checkpoint files: ``.npz`` archives written atomically, read without pickle.

A state is a dict of arrays, numbers and strings, possibly nested (a checkpoint holds
``{"model": {...}, "optimizer": {...}, "rng": {...}, "step": 1200}``). Nested keys are
flattened with ``"/"`` (``"optimizer/momentum_buffers/0"``) and each value becomes one ``.npy``
member of the zip; strings become 0-d unicode arrays, so no member ever needs pickle.

``save`` writes to a temporary file in the target's directory, fsyncs it and then renames it
over the target with ``os.replace``: a crash or an error mid-write leaves the previous file
untouched and no half-written file under the target's name. ``load`` refuses pickled (object)
arrays and turns every way a file can be wrong into an error that names the file.
"""

from __future__ import annotations

import math
import os
import secrets
import zipfile
from collections.abc import Mapping

import numpy as np

from .backend import is_device_array, to_host
from .convert import from_torchvision as from_torchvision  # re-exported: torchvision weights

SEP = "/"


def save(path: str | os.PathLike, state: Mapping, compress: bool = False) -> None:
    """Write ``state`` to ``path`` (which must end in ``.npz``) atomically.

    Args:
        path: the target file. The ``.npz`` suffix is required rather than appended (as
            ``numpy.savez`` does silently), so the name you save is the name you load.
        state: ``{name: value}`` where a value is an array (NumPy or CuPy; copied to the
            host), a Python/NumPy number or bool, a ``str``, or a nested dict of those. Keys
            are non-empty strings; ``"/"`` separates nesting levels. Empty sub-dicts store
            nothing (a ``.npz`` has no entry for them), so ``load`` will not recreate them.
        compress: deflate the members (smaller, slower); default stored, like ``numpy.savez``.
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"weights file name must end in '.npz', got {path!r}; add the suffix")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save {path!r}: directory {directory!r} does not exist")
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    arrays = _flatten(state)
    if not arrays:
        raise ValueError(f"refusing to save an empty state to {path!r}: there is nothing in it")

    # A hidden sibling (same filesystem, so the rename is atomic), created with mode 0o666 so
    # the umask applies as for any new file (mkstemp would force 0600).
    tmp_path = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp_path, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_npz(f, arrays, compress)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        # Never leave the temp file behind, whatever went wrong (KeyboardInterrupt included).
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    _fsync_directory(directory)


def load(path: str | os.PathLike, nested: bool = False) -> dict:
    """Read a file written by :func:`save`.

    Args:
        path: an ``.npz`` file.
        nested: rebuild the nested dicts from the ``"/"``-separated keys.

    Returns:
        ``{name: ndarray}`` (flat keys, or nested dicts when ``nested``). Numbers come back as
        0-d arrays and strings as 0-d unicode arrays: use ``int(a)``, ``float(a)``, ``str(a)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a zip (truncated, or some other format), holds members that
            are not ``.npy`` arrays, holds no arrays, holds pickled object arrays, or is corrupt.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not an .npz weights file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(6)
        kind = (
            "a single .npy array, not an .npz archive; re-save it with weights.save"
            if head == b"\x93NUMPY"
            else "not a zip archive: it is truncated, or not an .npz file at all"
        )
        raise ValueError(f"cannot load {path!r}: {kind}")
    try:
        with zipfile.ZipFile(path) as zf:
            arrays = _read_npz(zf, path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"cannot load {path!r}: corrupt zip archive ({err})") from err
    return _unflatten(arrays, path) if nested else arrays


# -- writing -------------------------------------------------------------------------------------


def _flatten(state: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(SEP)):
            raise ValueError(
                f"state key {prefix + str(key)!r} is not a valid name: keys must be non-empty "
                f"strings without empty '{SEP}'-separated parts"
            )
        name = prefix + key
        if isinstance(value, Mapping):
            children = _flatten(value, name + SEP)
            duplicates = set(children) & set(out)
        else:
            children = {name: _to_array(value, name)}
            duplicates = set(children) & set(out)
        if duplicates:
            raise ValueError(f"state keys collide after flattening with '{SEP}': {duplicates}")
        out.update(children)
    return out


def _to_array(value, name: str) -> np.ndarray:
    if is_device_array(value):
        value = to_host(value)
    if isinstance(value, str):
        return np.array(value)  # 0-d '<U..' array: text without pickle
    if value is None or isinstance(value, bytes):
        raise ValueError(f"state[{name!r}] is {type(value).__name__}; store arrays/numbers/str")
    arr = np.asarray(value)
    if arr.dtype.hasobject:
        raise ValueError(
            f"state[{name!r}] would be an object array ({type(value).__name__}); "
            "object arrays need pickle, which weights files never use. Store numeric arrays"
        )
    return arr


def _write_npz(f, arrays: dict[str, np.ndarray], compress: bool) -> None:
    # The .npz layout is a zip of "<key>.npy" members, as numpy.savez writes it. Writing it
    # here (not via savez) lets keys like "file" through, which savez takes as its own argument.
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(f, mode="w", compression=method, allowZip64=True) as zf:
        for key, arr in arrays.items():
            with zf.open(key + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable on POSIX; some platforms cannot open directories.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading -------------------------------------------------------------------------------------


def _read_npz(zf: zipfile.ZipFile, path: str) -> dict[str, np.ndarray]:
    names = [n for n in zf.namelist() if not n.endswith("/")]
    foreign = [n for n in names if not n.endswith(".npy")]
    if foreign:
        raise ValueError(
            f"cannot load {path!r}: zip members {foreign[:5]} are not .npy arrays; "
            "this is not an .npz weights file"
        )
    if not names:
        raise ValueError(f"cannot load {path!r}: the archive holds no arrays")
    arrays = {}
    for name in names:
        key = name[: -len(".npy")]
        try:
            oversized = _oversized(zf, name)
            if oversized is None:
                with zf.open(name) as member:
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
        except MemoryError as err:
            raise ValueError(
                f"cannot load {path!r}: member {key!r} is too large to hold in memory ({err})"
            ) from err
        except ValueError as err:
            if "allow_pickle" in str(err) or "Object arrays" in str(err):
                raise ValueError(
                    f"cannot load {path!r}: member {key!r} is a pickled object array, which "
                    "is refused for safety (re-save it as numeric arrays)"
                ) from err
            raise ValueError(f"cannot load {path!r}: member {key!r} is corrupt ({err})") from err
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise ValueError(f"cannot load {path!r}: member {key!r} is corrupt ({err})") from err
        if oversized is not None:
            raise ValueError(f"cannot load {path!r}: member {key!r} {oversized}")
    return arrays


def _oversized(zf: zipfile.ZipFile, name: str) -> str | None:
    """Why the member's ``.npy`` header claims more data than the member holds, or None. Read
    before ``read_array``, which allocates the claimed size first (a corrupt or forged header
    would otherwise ask for terabytes)."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    with zf.open(name) as member:
        reader = readers.get(np.lib.format.read_magic(member))
        if reader is None:  # format 3.0 (utf-8 field names): read_array checks it alone
            return None
        shape, _, dtype = reader(member)
        data_bytes = zf.getinfo(name).file_size - member.tell()
    claimed = math.prod(shape) * dtype.itemsize
    if claimed <= data_bytes:
        return None
    return (
        f"claims a {dtype} array of shape {shape} ({claimed} bytes) but holds "
        f"{max(data_bytes, 0)} bytes of data; the file is corrupt or truncated"
    )


def _unflatten(arrays: dict[str, np.ndarray], path: str) -> dict:
    root: dict = {}
    # Sorted so a conflict is found the same way whatever the member order.
    for key in sorted(arrays):
        parts = key.split(SEP)
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"cannot nest {path!r}: {key!r} lies under the array {part!r}")
            node = child
        if parts[-1] in node:
            raise ValueError(f"cannot nest {path!r}: {key!r} is both an array and a group")
        node[parts[-1]] = arrays[key]
    return root
