"""Shared helpers of the benchmark scripts (run them as ``python benchmarks/bench_x.py``): the
median timer, and which BLAS (library, kernel, threads) the figures were measured with."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None):
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call.

    ``sync`` (e.g. a CUDA device synchronise) runs before each timer read, so asynchronous GPU
    work is counted in the call that launched it.
    """
    sync = sync or (lambda: None)
    fn()  # warm-up: allocations, BLAS threads, kernel compilation
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def blas_info() -> str:
    """``openblas 0.3.31 SkylakeX threads=2``-style description of the loaded BLAS libraries."""
    from mrcnn_edu.threads import blas_pools

    pools = blas_pools()
    if pools is None:
        return "threadpoolctl not installed (threads set by environment variables)"
    return "; ".join(
        f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
        f"threads={i.get('num_threads')}"
        for i in pools
    )


def print_blas() -> None:
    """Print :func:`blas_info` and, when ``OPENBLAS_CORETYPE`` holds OpenBLAS to a kernel
    without this CPU's AVX-512, the note that says so: the kernel changes every ratio."""
    from mrcnn_edu.threads import forced_kernel_warning

    print(f"BLAS: {blas_info()}")
    warning = forced_kernel_warning()
    if warning:
        print(warning)
