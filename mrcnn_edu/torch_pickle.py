"""Read PyTorch ``.pth``/``.pt`` state dicts without torch, and without trusting the file.

``torch.save`` writes a pickle, and a pickle is a small program: its ``GLOBAL`` opcode imports
any name and ``REDUCE`` calls it, so ``pickle.load`` of a downloaded file can run any code. This
module unpickles with a **restricted unpickler**: ``find_class`` hands out only the few names a
state dict needs (``collections.OrderedDict``, torch's tensor-rebuild functions, the storage
classes and dtypes), each replaced by a harmless stand-in of ours, and refuses everything else
with a ValueError naming the refused ``module.name``. Nothing from torch is imported or run.

Two container formats (see docs/weights.md for the byte-level layout):

- **zip** (torch >= 1.6): ``<name>/data.pkl`` (the pickle), ``<name>/data/<key>`` (one raw
  storage per key), ``<name>/byteorder`` (``little``/``big``; absent means little),
  ``<name>/version`` and a few bookkeeping records we ignore.
- **legacy stream** (torch < 1.6, e.g. torchvision's 2019 Mask R-CNN weights): five pickles in
  a row -- the magic number, the protocol version 1001, a sys-info dict, the data pickle, the
  sorted list of storage keys -- then, per key, an int64 element count and the raw bytes
  (little endian).

In both, the data pickle refers to storages by *persistent id*
``("storage", StorageClass, key, location, numel[, view])``, and a tensor is
``_rebuild_tensor_v2(storage, offset, size, stride, ...)``: a strided view into the storage.
We rebuild each as a NumPy array (a bounds-checked ``as_strided`` view, then a C-contiguous
copy in native byte order). bfloat16 has no NumPy dtype: it is widened to float32, exactly
(a bfloat16 is the upper half of a float32). The device location (``cpu``, ``cuda:0``) is
ignored: every array lands in host memory.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Mapping

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
# Entries of a checkpoint dict that may hold the state dict itself, tried in this order.
WRAPPER_KEYS = ("model", "state_dict")

# torch's typed-storage classes -> element dtype (byte order is applied when reading). "bf16"
# is read as raw 16-bit words and widened to float32.
STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
}
# torch dtypes that ``_rebuild_tensor_v3`` names (on an untyped byte storage).
TORCH_DTYPES = {
    "float64": "f8",
    "float32": "f4",
    "float16": "f2",
    "bfloat16": "bf16",
    "int64": "i8",
    "int32": "i4",
    "int16": "i2",
    "int8": "i1",
    "uint8": "u1",
    "uint16": "u2",
    "uint32": "u4",
    "uint64": "u8",
    "bool": "?",
    "complex64": "c8",
    "complex128": "c16",
}
REBUILD_FUNCTIONS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3")


class TorchFileError(ValueError):
    """A ``.pth`` file that cannot be read safely; the message names the file."""


class _Frozen:
    """Our stand-ins must not be edited by the pickle's BUILD opcode."""

    __slots__ = ()

    def __setstate__(self, state):
        raise TorchFileError("the pickle tries to set the state of a storage or tensor")


class _StorageType(_Frozen):
    """Stands for ``torch.FloatStorage`` and friends (and ``torch.storage.UntypedStorage``)."""

    __slots__ = ("name", "code")

    def __init__(self, name: str, code: str):
        self.name, self.code = name, code


class _DType(_Frozen):
    """Stands for a ``torch.<dtype>`` global (the last argument of ``_rebuild_tensor_v3``)."""

    __slots__ = ("code",)

    def __init__(self, code: str):
        self.code = code


class _Storage(_Frozen):
    """One storage: its key, element dtype code, declared element count and raw bytes (the
    legacy format fills ``data`` only after the whole pickle has been read)."""

    __slots__ = ("key", "code", "numel", "data")

    def __init__(self, key: str, code: str, numel: int, data: bytes | None):
        self.key, self.code, self.numel, self.data = key, code, numel, data


class _TensorRef(_Frozen):
    """A tensor to rebuild once every storage's bytes are known."""

    __slots__ = ("storage", "offset", "size", "stride", "code")

    def __init__(self, storage, offset, size, stride, code):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.code = code


def _text(value) -> str:
    # Files written by Python 2 carry some strings as bytes.
    return value.decode("ascii") if isinstance(value, bytes) else value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value, what: str, source: str) -> tuple[int, ...]:
    ok = isinstance(value, (tuple, list)) and len(value) <= 32
    if not ok or not all(_is_int(v) and v >= 0 for v in value):
        raise TorchFileError(
            f"cannot read {source!r}: a tensor {what} must be a tuple of at most 32 "
            f"non-negative ints, got {value!r:.80}"
        )
    return tuple(value)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch data pickle allowing only what a state dict needs.

    ``fetch(key) -> bytes`` returns a storage's bytes (zip format), or is None when the bytes
    come after the pickle (legacy format). ``storages`` maps each key to its ``_Storage``.
    """

    def __init__(self, file, source: str, fetch=None):
        super().__init__(file)
        self.source = source
        self.fetch = fetch
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        # Only exact (module, name) pairs; nothing is imported and nothing of torch is called.
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in REBUILD_FUNCTIONS:
            return getattr(self, name)
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return self._rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(name, "u1")
        if module == "torch" and name in TORCH_DTYPES:
            return _DType(TORCH_DTYPES[name])
        raise TorchFileError(
            f"cannot read {self.source!r}: its pickle asks for {module}.{name}, which is not "
            "allowed; the file may not be a plain state dict (only tensors, storages and "
            "OrderedDict are allowed, see docs/weights.md). If you trust the file, load it "
            "with torch and re-save model.state_dict()"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or _text(pid[0]) != "storage":
            raise TorchFileError(
                f"cannot read {self.source!r}: unexpected persistent id {pid!r:.80} "
                "(only storages are allowed)"
            )
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise TorchFileError(
                f"cannot read {self.source!r}: it uses storage views (a torch < 0.4 file); "
                "load it with torch and re-save it"
            )
        key = _text(key)
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise TorchFileError(f"cannot read {self.source!r}: malformed storage id {pid!r:.80}")
        if not _is_int(numel) or numel < 0:
            raise TorchFileError(f"cannot read {self.source!r}: storage {key!r} size {numel!r}")
        old = self.storages.get(key)
        if old is not None:
            if old.code != storage_type.code:
                raise TorchFileError(
                    f"cannot read {self.source!r}: storage {key!r} is used with two dtypes"
                )
            return old
        data = self.fetch(key) if self.fetch is not None else None
        self.storages[key] = storage = _Storage(key, storage_type.code, numel, data)
        return storage

    # -- the allowed callables (stand-ins for torch._utils functions) --------------------------
    def _rebuild_tensor(self, storage, offset, size, stride):
        return self._ref(storage, offset, size, stride, None)

    def _rebuild_tensor_v2(
        self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None
    ):
        return self._ref(storage, offset, size, stride, None, metadata)

    def _rebuild_tensor_v3(
        self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None
    ):
        if not isinstance(dtype, _DType):
            raise TorchFileError(f"cannot read {self.source!r}: tensor dtype {dtype!r:.80}")
        return self._ref(storage, offset, size, stride, dtype.code, metadata)

    def _rebuild_parameter(self, data, requires_grad=False, hooks=None):
        if not isinstance(data, _TensorRef):
            raise TorchFileError(f"cannot read {self.source!r}: a parameter without a tensor")
        return data

    def _ref(self, storage, offset, size, stride, code, metadata=None):
        if metadata:
            raise TorchFileError(
                f"cannot read {self.source!r}: a tensor carries metadata {metadata!r:.80} "
                "(not a plain dense tensor)"
            )
        if not isinstance(storage, _Storage) or not _is_int(offset) or offset < 0:
            raise TorchFileError(f"cannot read {self.source!r}: malformed tensor arguments")
        size = _int_tuple(size, "size", self.source)
        stride = _int_tuple(stride, "stride", self.source)
        if len(size) != len(stride):
            raise TorchFileError(f"cannot read {self.source!r}: size {size} vs stride {stride}")
        return _TensorRef(storage, offset, size, stride, code or storage.code)


def _itemsize(code: str) -> int:
    return 2 if code == "bf16" else np.dtype(code).itemsize


def tensor_to_array(ref: _TensorRef, byteorder: str, source: str) -> np.ndarray:
    """The NumPy array of one tensor: a bounds-checked strided view of its storage's bytes,
    copied to a C-contiguous array in native byte order (bfloat16 widened to float32)."""
    st = ref.storage
    if st.data is None:
        raise TorchFileError(f"cannot read {source!r}: storage {st.key!r} has no data")
    if len(st.data) != st.numel * _itemsize(st.code):
        raise TorchFileError(
            f"cannot read {source!r}: storage {st.key!r} holds {len(st.data)} bytes, expected "
            f"{st.numel} elements of {_itemsize(st.code)} bytes"
        )
    if ref.code != st.code and st.code != "u1":  # only an untyped (byte) storage is retyped
        raise TorchFileError(f"cannot read {source!r}: storage {st.key!r} read as two dtypes")
    bf16 = ref.code == "bf16"
    stored = np.dtype("u2" if bf16 else ref.code).newbyteorder(byteorder)
    if len(st.data) % stored.itemsize:
        raise TorchFileError(f"cannot read {source!r}: storage {st.key!r} has a partial element")
    buf = np.frombuffer(st.data, dtype=stored)
    native = stored.newbyteorder("=")
    if 0 in ref.size:
        try:
            out = np.empty(ref.size, dtype=native)
        except ValueError as err:  # other dimensions too large even for an empty array
            raise TorchFileError(f"cannot read {source!r}: tensor size {ref.size}: {err}") from err
    else:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if last >= buf.size:
            raise TorchFileError(
                f"cannot read {source!r}: a tensor of size {ref.size}, stride {ref.stride} at "
                f"offset {ref.offset} reaches past its storage {st.key!r} ({buf.size} elements)"
            )
        view = np.lib.stride_tricks.as_strided(
            buf[ref.offset :],
            shape=ref.size,
            # a dimension of length 1 never steps: its stride may be anything, so use 0
            strides=[s * stored.itemsize if n > 1 else 0 for n, s in zip(ref.size, ref.stride)],
            writeable=False,
        )
        try:
            out = np.array(view, dtype=native, order="C")
        except MemoryError as err:  # e.g. a huge tensor expanded from one element (stride 0)
            raise TorchFileError(f"cannot read {source!r}: tensor size {ref.size}: {err}") from err
    if bf16:
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _materialise(obj, byteorder: str, source: str, depth: int = 0):
    """Replace every tensor stand-in in the unpickled structure by its array."""
    if depth > 100:
        raise TorchFileError(f"cannot read {source!r}: nesting deeper than 100 levels")
    if isinstance(obj, _TensorRef):
        return tensor_to_array(obj, byteorder, source)
    if isinstance(obj, (_Storage, _StorageType, _DType)):
        raise TorchFileError(f"cannot read {source!r}: a bare storage or dtype, not a tensor")
    if isinstance(obj, dict):  # OrderedDict too; its _metadata attribute is dropped
        return {k: _materialise(v, byteorder, source, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, byteorder, source, depth + 1) for v in obj)
    return obj


def _unpickle(unpickler: RestrictedUnpickler, what: str):
    try:
        return unpickler.load()
    except TorchFileError:
        raise
    except Exception as err:  # any parse failure of untrusted bytes: corrupt or truncated
        raise TorchFileError(
            f"cannot read {unpickler.source!r}: its {what} is corrupt or truncated "
            f"({type(err).__name__}: {err})"
        ) from err


def _read_zip(path: str):
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pickles = sorted(n for n in names if n.endswith("data.pkl") and n.count("/") <= 1)
        if len(pickles) != 1:
            raise TorchFileError(
                f"cannot read {path!r}: a zip archive without exactly one '<name>/data.pkl' "
                f"record (found {pickles}), so not a torch.save file (an .npz weights file "
                "loads with mrcnn_edu.weights.load)"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = zf.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
        if byteorder not in (b"little", b"big"):
            raise TorchFileError(f"cannot read {path!r}: unknown byteorder {byteorder!r:.40}")

        def fetch(key: str) -> bytes:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise TorchFileError(f"cannot read {path!r}: storage record {name!r} is missing")
            return zf.read(name)

        unpickler = RestrictedUnpickler(io.BytesIO(zf.read(pickles[0])), path, fetch)
        obj = _unpickle(unpickler, "data.pkl")
    return _materialise(obj, "<" if byteorder == b"little" else ">", path)


def _read_legacy(path: str, f):
    if _unpickle(RestrictedUnpickler(f, path), "protocol version") != LEGACY_PROTOCOL_VERSION:
        raise TorchFileError(f"cannot read {path!r}: unknown legacy torch protocol version")
    _unpickle(RestrictedUnpickler(f, path), "sys info")
    unpickler = RestrictedUnpickler(f, path)
    obj = _unpickle(unpickler, "data pickle")
    keys = _unpickle(RestrictedUnpickler(f, path), "storage key list")
    if not isinstance(keys, list):
        raise TorchFileError(f"cannot read {path!r}: malformed storage key list")
    for key in map(_text, keys):
        storage = unpickler.storages.get(key)
        if storage is None:
            raise TorchFileError(f"cannot read {path!r}: data for an unknown storage {key!r:.40}")
        head = f.read(8)
        if len(head) != 8:
            raise TorchFileError(f"cannot read {path!r}: truncated before storage {key!r}")
        (numel,) = struct.unpack("<q", head)
        if numel != storage.numel:
            raise TorchFileError(
                f"cannot read {path!r}: storage {key!r} has {numel} elements, the pickle "
                f"says {storage.numel}"
            )
        itemsize = _itemsize(storage.code)
        storage.data = f.read(numel * itemsize)
        if len(storage.data) != numel * itemsize:
            raise TorchFileError(
                f"cannot read {path!r}: truncated: storage {key!r} has {len(storage.data)} of "
                f"{numel * itemsize} bytes"
            )
    return _materialise(obj, "<", path)


def load_torch_file(path: str | os.PathLike):
    """Everything a ``torch.save`` file holds, tensors as NumPy arrays, read without torch.

    Raises FileNotFoundError for a missing file and ValueError (``TorchFileError``) naming the
    file for anything else: a refused global (the file may run code), a truncated or corrupt
    file, a zip without ``data.pkl``, a file that is not from ``torch.save`` at all.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PyTorch file not found: {path!r}")
    if os.path.isdir(path):
        raise TorchFileError(f"{path!r} is a directory, not a .pth file")
    if zipfile.is_zipfile(path):
        try:
            return _read_zip(path)
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise TorchFileError(f"cannot read {path!r}: corrupt zip archive ({err})") from err
    with open(path, "rb") as f:
        if f.read(1) == b"\x80":  # a binary pickle's PROTO opcode: try the legacy stream
            f.seek(0)
            magic = _unpickle(RestrictedUnpickler(f, path), "first pickle")
            if not (_is_int(magic) and magic == LEGACY_MAGIC_NUMBER):
                raise TorchFileError(
                    f"cannot read {path!r}: a pickle, but not a torch.save file (no legacy "
                    "magic number)"
                )
            return _read_legacy(path, f)
    old_tar = tarfile.is_tarfile(path)
    raise TorchFileError(
        f"cannot read {path!r}: "
        + (
            "it is a tar archive (the torch < 0.4 format); load it with torch and re-save it"
            if old_tar
            else "neither a zip-format nor a legacy torch.save file (truncated, or not a "
            "PyTorch file at all)"
        )
    )


def unwrap_state_dict(obj, source: str) -> dict[str, np.ndarray]:
    """The ``{name: array}`` state dict in ``obj``: ``obj`` itself when every value is an array,
    else ``obj["model"]`` or ``obj["state_dict"]`` (a training checkpoint's entry)."""
    if not isinstance(obj, Mapping):
        raise TorchFileError(f"{source!r} holds a {type(obj).__name__}, not a state dict")
    candidates = [obj] + [obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    for state in candidates:
        if state and all(isinstance(v, np.ndarray) for v in state.values()):
            bad = [k for k in state if not isinstance(k, str)]
            if bad:
                raise TorchFileError(f"{source!r}: state dict keys {bad[:5]} are not strings")
            return dict(state)
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, np.ndarray))
    raise TorchFileError(
        f"{source!r} is not a state dict: entries {others[:8]} are not tensors; accepted are "
        f"a state dict or a checkpoint dict with the state dict under one of {WRAPPER_KEYS}"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: array}`` from a ``.pth`` state dict (or a checkpoint wrapping one, see
    :func:`unwrap_state_dict`), read with :func:`load_torch_file`."""
    return unwrap_state_dict(load_torch_file(path), os.fspath(path))
