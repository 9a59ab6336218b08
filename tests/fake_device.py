"""A strict fake GPU for CPU tests: NumPy arrays that behave like CuPy arrays where it matters.

``FakeArray`` is an ``ndarray`` subclass registered with ``mrcnn_edu.backend`` as the device
``"fake"`` (``register_array_module``), with ``TracingXP`` as its array module. Inside
``fake_device()`` the whole model runs on it exactly as it would on CuPy, on the CPU:

- **No mixing.** A ufunc or NumPy function (``__array_ufunc__`` / ``__array_function__``) or an
  ``xp.<function>`` that gets a host ``ndarray`` of ndim >= 1 next to device arrays (or in place
  of them) raises ``TypeError`` as CuPy does; so does an assignment ``a[i] = host_array``. Only
  the transfer functions (``xp.asarray``, ``xp.array``, ...) take host arrays; index arrays may
  be host arrays (CuPy copies them over). ``np.asarray``/``np.array``/``np.asanyarray``/
  ``np.ascontiguousarray`` of a device array raise ``TypeError`` like CuPy's ``__array__``
  (those four are patched on the ``numpy`` module while the fake device is active).
- **CuPy's results.** Reductions and scalar indexing return 0-d device arrays, not NumPy
  scalars; ``xp.asarray(host)`` copies, as a transfer does.
- **Counted syncs.** ``.get()`` (so ``backend.to_host``), ``float()``, ``int()``, ``bool()``,
  ``operator.index()``, ``.item()``, ``.tolist()`` and ``repr``/``str``/``format`` of a device
  array each count one host sync (``FakeDevice.syncs``; ``sync_log`` says what and where:
  ``"get at poolers.py:218"``, the innermost package file and line). CuPy also synchronises
  inside ops whose *output size* depends on the data (``nonzero``, ``flatnonzero``,
  ``argwhere``, ``unique``, boolean-mask indexing, ...); those are counted apart, in
  ``shape_syncs`` / ``shape_sync_log``.
- **Traced names.** Every attribute taken from the xp module (``xp.linalg``/``xp.random``
  sub-names as ``"linalg.norm"``, ufunc methods as ``"add.at"``) goes to ``xp_names``, with
  the keyword arguments each function got in ``keywords``; NumPy functions reached through
  ``__array_function__`` (``np.concatenate(device_arrays)``) to ``dispatched``; ``ndarray``
  attributes and methods used on device arrays to ``methods``. ``tests/test_device_path.py``
  checks each of them exists in CuPy.
- **Kernels.** Where CuPy runs a GPU kernel (RoIAlign, RoIPool and their backward, NMS), the
  fake device's ``kernels`` hook runs the NumPy implementation on the host data instead,
  without counting a sync (on a GPU no data leaves the device there), after checking that the
  CuPy kernel module has a function of that name; calls are counted in ``kernel_calls``.
"""

from __future__ import annotations

import contextlib
import importlib
import operator
import os
import sys
from collections import Counter, defaultdict
from types import ModuleType

import numpy as np

from mrcnn_edu import backend

NAME = "fake"
# Functions that move host data to the device: they may take host arrays.
TRANSFER = frozenset({"asarray", "array", "asanyarray", "ascontiguousarray"})
# CuPy synchronises inside these to size their output (counted as shape syncs).
SHAPE_SYNC = frozenset(
    {"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract", "bincount"}
)
_NDARRAY_NAMES = frozenset(n for n in dir(np.ndarray) if not n.startswith("_"))
_PATCHED = ("asarray", "array", "asanyarray", "ascontiguousarray")
_REAL = {name: getattr(np, name) for name in _PATCHED}
_SUBMODULES = ("linalg", "random", "fft")


class FakeDevice:
    """What one ``fake_device()`` session saw: names, syncs, kernel calls."""

    def __init__(self):
        self.xp_names: set[str] = set()
        self.keywords: dict[str, set[str]] = defaultdict(set)
        self.dispatched: set[str] = set()
        self.methods: set[str] = set()
        self.sync_log: list[str] = []
        self.shape_sync_log: list[str] = []
        self.kernel_calls: Counter = Counter()

    @property
    def syncs(self) -> int:
        return len(self.sync_log)

    @property
    def shape_syncs(self) -> int:
        return len(self.shape_sync_log)

    def reset_counts(self) -> None:
        """Forget the syncs and kernel calls seen so far (the names stay)."""
        self.sync_log.clear()
        self.shape_sync_log.clear()
        self.kernel_calls.clear()


_STATE = FakeDevice()  # replaced by each fake_device() session


# ----------------------------------------------------------------------------------------------
# Helpers: host/device checks, unwrapping, wrapping
# ----------------------------------------------------------------------------------------------
def _is_host_array(x) -> bool:
    return isinstance(x, np.ndarray) and not isinstance(x, FakeArray) and x.ndim >= 1


def _reject_host(where: str, *values) -> None:
    """TypeError (CuPy's) when a host ndarray of ndim >= 1 is among ``values`` (lists, tuples
    and dict values searched too)."""
    for v in values:
        if isinstance(v, (list, tuple)):
            _reject_host(where, *v)
        elif isinstance(v, dict):
            _reject_host(where, *v.values())
        elif _is_host_array(v):
            raise TypeError(
                f"Unsupported type {type(v)} in {where}: a host NumPy array "
                f"(shape {v.shape}) met device arrays; move it with xp.asarray first"
            )


def _raw(a: FakeArray) -> np.ndarray:
    """The plain ndarray view of a FakeArray (not recorded as a method use)."""
    return np.ndarray.view(a, np.ndarray)


def _plain(x):
    """FakeArrays (also inside lists, tuples, dict values) as plain ndarray views."""
    if isinstance(x, FakeArray):
        return _raw(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _wrap(x):
    """NumPy results as device arrays: ndarrays viewed as FakeArray, NumPy scalars as 0-d
    FakeArrays (CuPy returns 0-d arrays); tuples and lists recurse; anything else as is."""
    if isinstance(x, FakeArray):
        return x
    if isinstance(x, np.ndarray):
        return x.view(FakeArray)
    if isinstance(x, np.generic):
        return _REAL["array"](x).view(FakeArray)
    if isinstance(x, (list, tuple)):
        return type(x)(_wrap(v) for v in x)
    return x


def _caller() -> str:
    """``module.py:line`` of the innermost package frame (mrcnn_edu or its kernels) that led
    here, to say where a sync came from."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        in_package = "/mrcnn_edu/" in path or "/kernels/" in path
        if in_package and not path.endswith("/backend.py"):
            return f"{path.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "outside the package"


def _sync(kind: str) -> None:
    _STATE.sync_log.append(f"{kind} at {_caller()}")


def _function_name(func) -> str:
    module = getattr(func, "__module__", "") or ""
    for sub in _SUBMODULES:
        if module.startswith(f"numpy.{sub}"):
            return f"{sub}.{func.__name__}"
    return func.__name__


def _syncing(kind: str, read):
    """A FakeArray method that counts a ``kind`` sync and returns ``read(host data, *args)``."""

    def method(self, *args):
        _sync(kind)
        return read(_raw(self), *args)

    return method


# ----------------------------------------------------------------------------------------------
# The device array
# ----------------------------------------------------------------------------------------------
class FakeArray(np.ndarray):
    """A NumPy array that acts as a CuPy array (see the module docstring)."""

    def __getattribute__(self, name):
        if name in _NDARRAY_NAMES:
            _STATE.methods.add(name)
        return super().__getattribute__(name)

    # -- array protocols -------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__
        if method == "at":  # ufunc.at(a, indices, b): the indices may come from the host
            _reject_host(where, inputs[0], *inputs[2:], kwargs)
        else:
            _reject_host(where, inputs, kwargs)
        if method not in ("__call__", "reduce", "accumulate"):
            _STATE.dispatched.add(where)
        result = getattr(ufunc, method)(*_plain(inputs), **_plain(kwargs))
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        name = _function_name(func)
        _STATE.dispatched.add(name)
        _reject_host(f"numpy.{name}", args, kwargs)
        if name in SHAPE_SYNC or (name == "where" and len(args) + len(kwargs) == 1):
            _STATE.shape_sync_log.append(f"{name} at {_caller()}")
        return _wrap(func(*_plain(args), **_plain(kwargs)))

    # -- indexing --------------------------------------------------------------------------
    def __getitem__(self, key):
        _count_mask(key)
        return _wrap(super().__getitem__(_plain(key)))

    def __setitem__(self, key, value):
        _reject_host("__setitem__", value)
        _count_mask(key)
        super().__setitem__(_plain(key), _plain(value))

    # -- host syncs: each reads the data on the host, one counted sync ----------------------
    get = _syncing("get", np.ndarray.copy)  # CuPy's .get(): a NumPy copy
    item = _syncing("item", np.ndarray.item)
    tolist = _syncing("tolist", np.ndarray.tolist)
    __float__ = _syncing("float", float)
    __int__ = _syncing("int", int)
    __index__ = _syncing("index", operator.index)
    __bool__ = _syncing("bool", bool)
    __repr__ = _syncing("repr", lambda a: "fake_" + repr(a))
    __str__ = _syncing("str", str)
    __format__ = _syncing("format", format)


def _count_mask(key) -> None:
    """Boolean-mask indexing sizes its result from the data: a shape sync on CuPy."""
    keys = key if isinstance(key, tuple) else (key,)
    for k in keys:
        k = _raw(k) if isinstance(k, FakeArray) else k
        if isinstance(k, np.ndarray) and k.dtype == bool and k.ndim >= 1:
            _STATE.shape_sync_log.append(f"boolean_index at {_caller()}")


# ----------------------------------------------------------------------------------------------
# The array module
# ----------------------------------------------------------------------------------------------
class _TracedFunction:
    """``xp.<name>``: records its use and keywords, refuses host arrays (except transfers),
    runs NumPy on the host data and returns device arrays."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, *args, **kwargs):
        _STATE.keywords[self.name].update(kwargs)
        if self.name.endswith(".at"):  # ufunc.at(a, indices, b): host indices are copied over
            _reject_host(f"xp.{self.name}", args[0], *args[2:], kwargs)
        elif self.name not in TRANSFER:
            _reject_host(f"xp.{self.name}", args, kwargs)
        if self.name in SHAPE_SYNC or (self.name == "where" and len(args) == 1):
            _STATE.shape_sync_log.append(f"{self.name} at {_caller()}")
        from_host = bool(args) and not isinstance(args[0], FakeArray)
        result = self.fn(*_plain(args), **_plain(kwargs))
        if self.name in TRANSFER and from_host and isinstance(result, np.ndarray):
            result = result.copy()  # a transfer copies; later host writes must not show
        if self.name == "count_nonzero" and isinstance(result, int):
            result = np.int64(result)  # CuPy: a 0-d device array
        return _wrap(result)

    def __getattr__(self, attr):
        # ufunc methods: xp.add.at, xp.maximum.reduce ...
        _STATE.xp_names.add(f"{self.name}.{attr}")
        value = getattr(self.fn, attr)
        if callable(value) and isinstance(self.fn, np.ufunc):
            return _TracedFunction(value, f"{self.name}.{attr}")
        return value


class TracingXP(ModuleType):
    """The fake device's array module: NumPy behind a recorder (see the module docstring)."""

    def __init__(self, base=np, prefix: str = ""):
        super().__init__(f"fake_xp{'.' + prefix[:-1] if prefix else ''}")
        self._base, self._prefix = base, prefix

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        full = self._prefix + name
        _STATE.xp_names.add(full)
        if name == "ndarray" and not self._prefix:
            return FakeArray
        value = getattr(self._base, name)
        if isinstance(value, ModuleType):
            return TracingXP(value, full + ".")
        if isinstance(value, type) or not callable(value):
            return value  # dtypes (xp.float32), constants (xp.inf), classes (xp.dtype)
        return _TracedFunction(value, full)


XP = TracingXP()


# ----------------------------------------------------------------------------------------------
# Kernels: the NumPy implementations, on the host data, without a counted sync
# ----------------------------------------------------------------------------------------------
def _host_implementation(family: str, func_name: str):
    from mrcnn_edu import nms
    from mrcnn_edu.roi_ops import align, pool

    table = {
        ("roi_align", "roi_align"): align.roi_align,
        ("roi_align", "roi_align_backward"): align.roi_align_backward,
        ("roi_align", "roi_pool"): pool.roi_pool,
        ("roi_align", "roi_pool_backward"): pool.roi_pool_backward,
        ("nms", "nms"): nms.nms,
        ("nms", "batched_nms"): nms.batched_nms,
    }
    return table[(family, func_name)]


def kernels(family: str, func_name: str):
    """The fake device's ``gpu_kernel``: NotImplementedError where the CuPy kernel module lacks
    ``func_name`` (as ``backend.gpu_kernel`` raises), else the NumPy implementation run on the
    device arrays' host data."""
    module = importlib.import_module(f"mrcnn_edu.kernels.cupy_{family}")
    if not hasattr(module, func_name):
        raise NotImplementedError(f"{func_name} has no cupy kernel")
    host_fn = _host_implementation(family, func_name)

    def run(*args):
        _STATE.kernel_calls[f"{family}.{func_name}"] += 1
        return _wrap(host_fn(*_plain(args)))

    return run


# ----------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------
def _guard(name: str):
    real = _REAL[name]

    def guarded(a, *args, **kwargs):
        values = a if isinstance(a, (list, tuple)) else (a,)
        if any(isinstance(v, FakeArray) for v in values):
            raise TypeError(
                f"np.{name} of a device array: Implicit conversion to a NumPy array is not "
                "allowed. Please use `.get()` to construct a NumPy array explicitly."
            )
        return real(a, *args, **kwargs)

    guarded.__name__ = name
    return guarded


@contextlib.contextmanager
def fake_device():
    """Register the fake device ``"fake"`` and guard ``np.asarray`` & co. for the block; yields
    the ``FakeDevice`` recording it."""
    global _STATE
    previous, _STATE = _STATE, FakeDevice()
    backend.register_array_module(FakeArray, XP, NAME, kernels=kernels)
    for name in _PATCHED:
        setattr(np, name, _guard(name))
    try:
        yield _STATE
    finally:
        for name in _PATCHED:
            setattr(np, name, _REAL[name])
        backend.unregister_array_module(NAME)
        _STATE = previous


def to_fake(a):
    """Host arrays (and containers of them) onto the fake device, as ``backend.to_device``."""
    return backend.to_device(a, NAME)
