"""Shared pytest setup: headless matplotlib, quick notebook parameters, GPU skip marker."""

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MRCNN_EDU_QUICK", "1")
# `mrcnn-edu demo` called in-process by the tests stays in this process (its default would start
# itself again under mpiexec: tests/test_launch.py covers that path with the variable removed).
os.environ.setdefault("MRCNN_EDU_RANKS", "1")


def _has_cuda_device() -> bool:
    from mrcnn_edu.backend import gpu_available

    return gpu_available()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly (with a reason) on machines without a CUDA device."""
    if not any("gpu" in item.keywords for item in items):
        return
    if _has_cuda_device():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and cupy (pip install 'mrcnn-edu[gpu]')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
