"""The ``xp`` seam: one code path for NumPy and CuPy arrays.

Array code in this package never imports cupy itself. It asks ``get_xp(array)`` for the module
that owns the array and calls ``xp.matmul``, ``xp.zeros`` ... on it. CuPy is imported only when a
GPU path is asked for (``to_device``, ``require_cupy``), so a NumPy-only install never touches it.
"""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np

_GPU_HINT = (
    "CuPy is needed for the GPU path but could not be imported ({err}). "
    "Install the GPU extra: pip install 'mrcnn-edu[gpu]' (needs an NVIDIA GPU and CUDA driver)."
)


def is_cupy_array(a) -> bool:
    """True when ``a`` is a CuPy array. Never imports cupy: a CuPy array can only exist if cupy
    has already been imported by someone."""
    return type(a).__module__.split(".")[0] == "cupy"


def get_xp(*arrays) -> ModuleType:
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``.

    Non-array arguments (ints, None, lists) are ignored, so ``get_xp(x, None)`` works.
    """
    for a in arrays:
        if is_cupy_array(a):
            return sys.modules["cupy"]
    return np


def require_cupy() -> ModuleType:
    """Import and return cupy, or raise ImportError naming the extra to install."""
    try:
        import cupy
    except Exception as err:  # ImportError, or CUDA errors raised at import
        raise ImportError(_GPU_HINT.format(err=err)) from err
    return cupy


def to_device(a):
    """Copy a NumPy array (or a nested list/tuple/dict of them) to the current GPU."""
    cp = require_cupy()
    if isinstance(a, dict):
        return {k: to_device(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(to_device(v) for v in a)
    if isinstance(a, np.ndarray) or is_cupy_array(a):
        return cp.asarray(a)
    return a


def to_host(a):
    """Return a NumPy copy of a CuPy array (NumPy arrays pass through; containers recurse)."""
    if isinstance(a, dict):
        return {k: to_host(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(to_host(v) for v in a)
    if is_cupy_array(a):
        return a.get()
    return a


def gpu_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


KERNEL_ENV = "MRCNN_EDU_KERNELS"
KERNEL_CHOICES = ("cupy", "numba")


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
