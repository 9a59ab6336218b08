"""The ``xp`` seam and the device notion: one code path for NumPy and CuPy arrays.

Array code in this package never imports cupy itself. It asks ``get_xp(array)`` for the module
that owns the array and calls ``xp.matmul``, ``xp.zeros`` ... on it. CuPy is imported only when a
GPU path is asked for (``check_device("cuda")``, ``to_device``, ``require_cupy``), so a NumPy-only
install never touches it.

Devices are named by strings: ``"cpu"`` (NumPy), ``"cuda"`` / ``"cuda:N"`` (CuPy on GPU ``N``;
``check_device`` normalises ``"cuda"`` to ``"cuda:<current device>"``), and any name added with
``register_array_module`` -- the tests register a strict fake device (``tests/fake_device.py``)
that runs on the CPU but behaves like CuPy where it matters (no mixing with host arrays, counted
host syncs). ``docs/gpu_kernels.md`` describes the whole device path.
"""

from __future__ import annotations

import contextlib
import sys
from types import ModuleType

import numpy as np

_GPU_HINT = (
    "CuPy is needed for the GPU path but could not be imported ({err}). "
    "Install the GPU extra: pip install 'mrcnn-edu[gpu]' (needs an NVIDIA GPU and CUDA driver)."
)


class _Registered:
    """A device added with ``register_array_module``."""

    def __init__(self, array_type: type, xp: ModuleType, name: str, kernels=None):
        self.array_type, self.xp, self.name, self.kernels = array_type, xp, name, kernels


# name -> _Registered. Empty unless tests add a device, so get_xp stays a short loop.
_REGISTRY: dict[str, _Registered] = {}


def register_array_module(array_type: type, xp_module, name: str, kernels=None) -> None:
    """Add a device ``name`` whose arrays are instances of ``array_type`` and whose array module
    is ``xp_module``; ``get_xp``, ``is_device_array``, ``device_of``, ``check_device`` and
    ``to_device`` then know it. ``kernels(family, func_name)``, when given, returns that
    device's implementation of a GPU kernel (see ``device_kernel``). Its arrays must have
    ``.get()`` returning a NumPy array, as CuPy arrays do."""
    if name == "cpu" or name.split(":")[0] == "cuda":
        raise ValueError(f"device name {name!r} is built in; register another name")
    _REGISTRY[name] = _Registered(array_type, xp_module, name, kernels)


def unregister_array_module(name: str) -> None:
    """Remove a device added with ``register_array_module`` (no error when absent)."""
    _REGISTRY.pop(name, None)


def is_cupy_array(a) -> bool:
    """True when ``a`` is a CuPy array. Never imports cupy: a CuPy array can only exist if cupy
    has already been imported by someone."""
    return type(a).__module__.split(".")[0] == "cupy"


def _registered_for(a) -> _Registered | None:
    for entry in _REGISTRY.values():
        if isinstance(a, entry.array_type):
            return entry
    return None


def is_device_array(a) -> bool:
    """True for an array that lives off the host: CuPy, or a registered device's array."""
    return is_cupy_array(a) or (bool(_REGISTRY) and _registered_for(a) is not None)


def get_xp(*arrays) -> ModuleType:
    """Return ``cupy`` if any argument is a CuPy array (or a registered device's module for its
    arrays), else ``numpy``.

    Non-array arguments (ints, None, lists) are ignored, so ``get_xp(x, None)`` works.
    """
    for a in arrays:
        if is_cupy_array(a):
            return sys.modules["cupy"]
        if _REGISTRY:
            entry = _registered_for(a)
            if entry is not None:
                return entry.xp
    return np


def device_of(a) -> str:
    """The device an array lives on: ``"cpu"`` (also for non-arrays), ``"cuda:N"``, or a
    registered device's name."""
    if is_cupy_array(a):
        return f"cuda:{a.device.id}"
    entry = _registered_for(a) if _REGISTRY else None
    return "cpu" if entry is None else entry.name


def xp_of_device(device: str) -> ModuleType:
    """The array module of a device name (``numpy`` for ``"cpu"``)."""
    device = check_device(device)
    if device == "cpu":
        return np
    if device in _REGISTRY:
        return _REGISTRY[device].xp
    return sys.modules["cupy"]


def require_cupy() -> ModuleType:
    """Import and return cupy, or raise ImportError naming the extra to install."""
    try:
        import cupy
    except Exception as err:  # ImportError, or CUDA errors raised at import
        raise ImportError(_GPU_HINT.format(err=err)) from err
    return cupy


def cuda_device_count() -> int:
    """How many CUDA devices CuPy sees (0 when cupy is missing or no driver/device)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def check_device(name) -> str:
    """Validate a device name and return it normalised: ``"cpu"``, ``"cuda:N"`` (``"cuda"``
    becomes the current CUDA device) or a registered name.

    Raises ValueError naming the problem: an unknown name, cupy missing (install
    ``pip install 'mrcnn-edu[gpu]'``), no visible CUDA device, or ``N`` out of range.
    """
    if not isinstance(name, str):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda', got {name!r}")
    device = name.strip().lower()
    if device == "cpu" or device in _REGISTRY:
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        known = ["cpu", "cuda", "cuda:N", *_REGISTRY]
        raise ValueError(f"unknown device {name!r}; use one of {known}")
    try:
        cupy = require_cupy()
    except ImportError as err:
        raise ValueError(f"device {name!r}: {err}") from None
    count = cuda_device_count()
    if count == 0:
        raise ValueError(
            f"device {name!r}: CuPy imports but sees no CUDA device (no NVIDIA driver, or "
            "CUDA_VISIBLE_DEVICES hides them all); run with --device cpu or on a GPU machine"
        )
    number = int(index) if index else int(cupy.cuda.runtime.getDevice())
    if number >= count:
        raise ValueError(
            f"device {name!r}: only {count} CUDA device(s) are visible (cuda:0 .. cuda:{count - 1})"
        )
    return f"cuda:{number}"


def to_device(a, device: str = "cuda"):
    """Copy a NumPy array (or a nested list/tuple/dict of them) to ``device``.

    ``device`` is any name ``check_device`` accepts; ``"cpu"`` is ``to_host``. Arrays already
    there are returned as they are; non-arrays (numbers, strings, None) pass through.
    """
    device = check_device(device)
    if device == "cpu":
        return to_host(a)
    return _to_device(a, device)


def _to_device(a, device: str):
    if isinstance(a, dict):
        return {k: _to_device(v, device) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return _rebuild(a, [_to_device(v, device) for v in a])
    if not (isinstance(a, np.ndarray) or is_device_array(a)):
        return a
    if device_of(a) == device:
        return a
    if device in _REGISTRY:
        return _REGISTRY[device].xp.asarray(to_host(a))
    cupy = sys.modules["cupy"]
    with cupy.cuda.Device(int(device.partition(":")[2])):
        if is_cupy_array(a):
            return cupy.array(a, copy=True)  # a peer copy from another GPU
        return cupy.asarray(to_host(a))


def to_host(a):
    """Return a NumPy copy of a device array (NumPy arrays pass through; containers recurse)."""
    if isinstance(a, dict):
        return {k: to_host(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return _rebuild(a, [to_host(v) for v in a])
    if is_device_array(a):
        return a.get()
    return a


def _rebuild(a, items: list):
    """A list or tuple of ``a``'s type holding ``items`` (a NamedTuple takes them positionally)."""
    if isinstance(a, tuple) and hasattr(a, "_fields"):
        return type(a)(*items)
    return type(a)(items)


def gpu_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    return cuda_device_count() > 0


# ----------------------------------------------------------------------------------------------
# Value checks without a sync per check
# ----------------------------------------------------------------------------------------------
# The open deferred_checks() blocks, innermost last; each a list of (flag, make_error).
_OPEN_CHECKS: list[list] = []


def raise_if(bad, make_error) -> None:
    """Raise ``make_error()`` when the 0-d boolean ``bad`` is True.

    On NumPy (and for Python bools) at once. A device flag would cost a host sync to read, so
    inside a ``deferred_checks()`` block it is queued instead, and read together with the
    step's loss scalars in one transfer (``DeferredChecks.fetch``); outside one it is read now.
    ``make_error`` builds the exception only when it is raised (its message may read arrays).
    """
    if is_device_array(bad) and _OPEN_CHECKS:
        _OPEN_CHECKS[-1].append((bad, make_error))
    elif bool(bad):
        raise make_error()


class DeferredChecks:
    """The checks ``raise_if`` queued in a ``deferred_checks()`` block (see there)."""

    def __init__(self):
        self.pending: list = []

    def fetch(self, values: dict) -> dict:
        """``values`` (``{name: number or 0-d array}``) as Python floats, and every queued
        check, in one device-to-host transfer; raises the first failed check's error."""
        pending, self.pending[:] = list(self.pending), []
        flags = [flag for flag, _ in pending]
        on_device = [v for v in values.values() if is_device_array(v)]
        host = iter(())
        if flags or on_device:
            xp = get_xp(*flags, *on_device)
            stacked = xp.stack([xp.asarray(v).astype(xp.float64) for v in flags + on_device])
            host = iter(to_host(stacked).tolist())
        for (_, make_error), failed in zip(pending, [next(host) for _ in pending]):
            if failed:
                raise make_error()
        return {k: next(host) if is_device_array(v) else float(v) for k, v in values.items()}


@contextlib.contextmanager
def deferred_checks():
    """A block (one training step's forward) whose device-side ``raise_if`` checks are queued
    and read with ``checks.fetch(losses)`` in one transfer. Checks still queued at the end are
    read then (one sync); when the block raises, a failed queued check, the likelier cause, is
    raised instead (chained to the original error)."""
    checks = DeferredChecks()
    _OPEN_CHECKS.append(checks.pending)
    try:
        yield checks
    except Exception as err:
        _OPEN_CHECKS.pop()
        if checks.pending:
            try:
                checks.fetch({})
            except Exception as queued:
                raise queued from err
        raise
    _OPEN_CHECKS.pop()
    if checks.pending:
        checks.fetch({})


KERNEL_ENV = "MRCNN_EDU_KERNELS"
KERNEL_CHOICES = ("cupy", "numba")


def device_kernel(array, family: str, func_name: str):
    """The kernel ``func_name`` of ``family`` for the device ``array`` lives on: ``gpu_kernel``
    for CuPy arrays, the registered device's ``kernels`` otherwise. Core ops call this only when
    ``is_device_array`` is True."""
    if is_cupy_array(array):
        return gpu_kernel(family, func_name)
    entry = _registered_for(array)
    if entry is None or entry.kernels is None:
        raise NotImplementedError(f"no {family} kernel {func_name!r} for {type(array)}")
    return entry.kernels(family, func_name)


def gpu_kernel(family: str, func_name: str):
    """The GPU implementation of ``func_name`` from ``mrcnn_edu.kernels.<choice>_<family>``.

    ``choice`` comes from the environment variable ``MRCNN_EDU_KERNELS`` (``cupy`` by default,
    or ``numba``). Core ops call this only when handed CuPy arrays, so the NumPy path never
    imports a GPU library. Example: ``gpu_kernel("roi_align", "roi_align")`` is
    ``mrcnn_edu.kernels.cupy_roi_align.roi_align`` by default.
    """
    import importlib
    import os

    choice = os.environ.get(KERNEL_ENV, "cupy").strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV}={choice!r} is not one of {KERNEL_CHOICES}")
    module = importlib.import_module(f"mrcnn_edu.kernels.{choice}_{family}")
    try:
        return getattr(module, func_name)
    except AttributeError:
        raise NotImplementedError(
            f"{func_name} has no {choice} GPU kernel (mrcnn_edu.kernels.{choice}_{family}); "
            f"set {KERNEL_ENV}={'numba' if choice == 'cupy' else 'cupy'} to use the other one"
        ) from None
