"""Shared timing helper of the benchmark scripts (run them as ``python benchmarks/bench_x.py``)."""

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
