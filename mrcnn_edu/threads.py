"""How many BLAS threads a run uses, and the GEMM reference that makes timings comparable.

    mrcnn-edu train --threads 2 ...         # a fixed count for this run
    MRCNN_EDU_THREADS=2 mrcnn-edu demo      # the same through the environment
    mrcnn-edu demo                           # the default policy (below)

Why a policy at all: NumPy's OpenBLAS starts one thread per core, and its threads wait for each
other by spinning. As long as the machine is otherwise idle that is the fastest choice, but as
soon as another process keeps one core busy (a notebook kernel, a test run, a browser), a
thread that lost its core holds up the other at every synchronisation point of every matrix
product: on a 2-core machine a demo step went from ~0.2 s to 0.5-2.9 s with 2 threads, while
with 1 thread it stayed at 0.2-0.3 s (``benchmarks/bench_train.py`` measures it: quiet and
with one busy process, for each choice).

The count, first match wins:

1. ``--threads N`` on ``train``/``demo``/``evaluate``/``predict``;
2. the environment variable ``MRCNN_EDU_THREADS=N``;
3. ``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS`` when the user set them (OpenBLAS reads them
   itself at start; we leave them alone);
4. the default, :func:`default_threads`: ``cores - 1`` for one process, so one core stays free
   for whatever else runs (at least 1: on 2 cores, 1 thread); under ``mpiexec``, each rank gets
   ``max(1, cores // ranks_on_this_node)``.

The count is set at run time with ``threadpoolctl`` (imported only here, only when a count is
applied; it comes with the ``demo`` and ``test`` extras). The count changes the last bits of a
run's numbers (OpenBLAS splits a product differently), never more; a fixed rule, rather than
one that follows the machine's load, keeps a run reproducible.

Several ranks on one node can each be pinned to cores of their own (:func:`pin_rank`, with
``MRCNN_EDU_PIN_CORES=1``, which ``mrcnn-edu demo`` sets for the ranks it starts), so that a
busy program on the machine never leaves two ranks sharing one core.

Which GEMM kernel OpenBLAS runs matters as much as how many threads: where the environment sets
``OPENBLAS_CORETYPE`` to a kernel without AVX-512 on a CPU that has it, the commands say so at
start (:func:`forced_kernel_warning`), since every convolution then runs at about half speed.

:func:`gemm_reference` times 100 float32 GEMMs of 1024x1024x1024 on 2 threads: a machine's
speed in one number, printed by ``bench_train.py`` and at the end of ``mrcnn-edu demo`` so a
time can be given as a multiple of it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

THREADS_ENV = "MRCNN_EDU_THREADS"
# Set by the user, these are honoured as they are (OpenBLAS reads the first it finds).
_BLAS_ENVS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
# The number of ranks an MPI launcher started on this node (MPICH/Hydra, Open MPI, PMIx).
_LOCAL_RANKS_ENVS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE")
_HINT = "a whole number >= 1 (e.g. 1 on a shared 2-core machine)"
_NEEDS_THREADPOOLCTL = (
    "needs threadpoolctl: pip install threadpoolctl (it comes with pip install 'mrcnn-edu[demo]')"
)


@dataclass(frozen=True)
class ThreadChoice:
    """The BLAS thread count of a run and where it came from."""

    threads: int | None  # None: left to OpenBLAS (the user's OPENBLAS_NUM_THREADS/OMP_NUM_THREADS)
    source: str  # "--threads", "MRCNN_EDU_THREADS", "OPENBLAS_NUM_THREADS", ..., or "default"
    why: str = ""  # the default's reason, e.g. "2 core(s), one left free for other processes"


def parse_threads(value, source: str = "--threads") -> int:
    """``value`` (an int or its text) as a thread count >= 1, or a ValueError naming ``source``."""
    text = str(value).strip()
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{source} must be {_HINT}, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{source} must be {_HINT}, got {text}")
    return n


def available_cores(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a
    container started with ``--cpus 2`` sees every core of the host but may use 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        with open(cgroup_cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read
    return max(1, cores)


def local_ranks(environ=None) -> int:
    """The ranks ``mpiexec`` started on this node (1 outside ``mpiexec``); when the launcher does
    not say, all ranks are assumed to share this node."""
    environ = os.environ if environ is None else environ
    for name in _LOCAL_RANKS_ENVS:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    from .distributed import launched_world_size

    return launched_world_size(environ)


def default_threads(cores: int, ranks: int = 1) -> tuple[int, str]:
    """The default count and its reason: ``max(1, cores // ranks)`` for each of several ranks
    on a node, ``max(1, cores - 1)`` for a single process (one core left for other work)."""
    if ranks > 1:
        n = max(1, cores // ranks)
        return n, f"{cores} cores / {ranks} ranks on this node"
    n = max(1, cores - 1)
    return n, f"{cores} core(s), one left free for other processes"


def choose_threads(value=None, environ=None, cores: int | None = None) -> ThreadChoice:
    """The run's count: ``value`` (``--threads``), else ``MRCNN_EDU_THREADS``, else the
    user's ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS`` (left to OpenBLAS), else the default.
    Raises ValueError for a count that is not a whole number >= 1."""
    environ = os.environ if environ is None else environ
    if value is not None:
        return ThreadChoice(parse_threads(value, "--threads"), "--threads")
    if environ.get(THREADS_ENV, "").strip():
        return ThreadChoice(parse_threads(environ[THREADS_ENV], THREADS_ENV), THREADS_ENV)
    for name in _BLAS_ENVS:
        if environ.get(name, "").strip():
            return ThreadChoice(None, name)
    cores = available_cores() if cores is None else cores
    n, why = default_threads(cores, local_ranks(environ))
    return ThreadChoice(n, "default", why)


def apply_threads(n: int) -> None:
    """Set this process's BLAS and OpenMP thread pools to ``n`` threads (threadpoolctl)."""
    import numpy  # noqa: F401 -- threadpoolctl finds only libraries already loaded

    try:
        from threadpoolctl import threadpool_limits
    except ImportError as err:
        raise ImportError(f"setting the BLAS thread count {_NEEDS_THREADPOOLCTL}") from err
    threadpool_limits(limits=parse_threads(n, "the thread count"))


def blas_pools() -> list[dict] | None:
    """threadpoolctl's description of every thread pool loaded in this process (NumPy's BLAS
    among them: ``internal_api``, ``version``, ``architecture``, ``num_threads`` ...); None
    without threadpoolctl."""
    import numpy  # noqa: F401 -- threadpoolctl finds only libraries already loaded

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return threadpool_info()


def blas_threads() -> int | None:
    """The thread count of this process's BLAS (the largest if several); None without
    threadpoolctl or a BLAS it knows."""
    counts = [p["num_threads"] for p in blas_pools() or () if p.get("user_api") == "blas"]
    return max(counts) if counts else None


def configure_threads(value=None, environ=None, say=print) -> ThreadChoice:
    """Choose (``choose_threads``) and apply the run's count, and ``say`` it in one line.

    Without threadpoolctl an explicit count (``--threads``, ``MRCNN_EDU_THREADS``) is an error
    naming the fix; the default is then skipped with a note (OpenBLAS keeps its own count).
    Under ``mpiexec`` only the first rank says it."""
    choice = choose_threads(value, environ)
    from .distributed import launched_rank

    if launched_rank(environ) != 0:
        say = _silent
    if choice.threads is None:
        say(f"BLAS threads: {blas_threads() or '?'} (from {choice.source}, as you set it)")
        return choice
    try:
        apply_threads(choice.threads)
    except ImportError as err:
        if choice.source != "default":
            raise ValueError(f"{choice.source} {choice.threads}: {err}") from None
        say(f"BLAS threads: OpenBLAS's own count ({err})")
        return choice
    why = f"default: {choice.why}; set --threads N to change" if choice.why else choice.source
    say(f"BLAS threads: {choice.threads} ({why})")
    return choice


def say_blas_warnings(environ=None, say=print) -> None:
    """Say :func:`forced_kernel_warning`, if any (under ``mpiexec``, only the first rank)."""
    from .distributed import launched_rank

    warning = forced_kernel_warning(environ)
    if warning and launched_rank(environ) == 0:
        say(warning)


def _silent(line: str) -> None:
    pass


# -- one set of cores per rank ----------------------------------------------------------------
# Several ranks on one node share its cores with whatever else runs there. Left to the Linux
# scheduler, two ranks and one busy program on 2 cores often end up as both ranks on one core
# and the program alone on the other (most likely because a rank that sleeps at the step's
# meeting weighs less in the scheduler's load balance than a program that never waits, so that
# placement looks balanced to it). Each rank then runs at half speed for the whole step. Pinned
# one per core, the busy program shares a core with one rank at a time (measured,
# docs/data_parallel.md).
PIN_ENV = "MRCNN_EDU_PIN_CORES"


def rank_cpus(local_rank: int, ranks: int, allowed) -> list[int] | None:
    """The CPUs of rank ``local_rank`` of the ``ranks`` on a node: the ``allowed`` CPUs in
    order, cut into ``ranks`` equal groups (what is left over stays unused). None when there is
    nothing to share out: one rank, or fewer CPUs than ranks (an oversubscribed node, or a
    launcher that already bound each rank to its own core)."""
    cpus = sorted(allowed)
    per = len(cpus) // ranks if ranks > 1 else 0
    if per < 1 or not 0 <= local_rank < ranks:
        return None
    return cpus[local_rank * per : (local_rank + 1) * per]


def pin_setting(environ=None) -> str:
    """``MRCNN_EDU_PIN_CORES`` as ``"1"``, ``"0"`` or ``""`` (unset); any other value is a
    ValueError naming the variable."""
    environ = os.environ if environ is None else environ
    value = environ.get(PIN_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{PIN_ENV} must be 1 (each rank on cores of its own) or 0, got {value!r}")
    return value


def pin_rank(environ=None, threads: int | None = None) -> list[int] | None:
    """With ``MRCNN_EDU_PIN_CORES=1`` (``mrcnn-edu demo`` sets it for the ranks it starts), bind
    every thread of this rank to its own CPUs (:func:`rank_cpus`) and return them; None when
    the variable is unset or 0, outside a launcher that numbers the ranks on the node, where
    :func:`rank_cpus` has nothing to share out, where the rank's ``threads`` BLAS threads would
    outnumber its CPUs (OpenBLAS's threads spin-wait for each other: on one core they would
    take turns), or where the system has no CPU affinity (not Linux). Call it after
    :func:`configure_threads`, whose default counts the cores before they are shared out. A
    value other than 0 or 1 is a ValueError naming the variable."""
    from .distributed import launched_local_rank

    local = launched_local_rank(environ)
    if pin_setting(environ) != "1" or local is None or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = rank_cpus(local, local_ranks(environ), os.sched_getaffinity(0))
    if cpus is None or (threads is not None and threads > len(cpus)):
        return None
    # Every thread, BLAS's workers included: each has an affinity of its own.
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # the thread has ended meanwhile
            pass
    return cpus


# -- which GEMM kernel OpenBLAS runs --------------------------------------------------------------
# OpenBLAS picks a kernel for the CPU it finds at start, unless OPENBLAS_CORETYPE names one. Some
# machines set that variable for an older OpenBLAS that did not know their CPU; a current one then
# runs the named kernel even where a wider one would be twice as fast (measured on a 2-core AMD
# EPYC, Zen 5, with AVX-512: float32 GEMMs of 1024^3 at 400 GFLOP/s by itself, 205 with
# OPENBLAS_CORETYPE=Haswell). These kernels (threadpoolctl's "architecture") use AVX-512.
_AVX512_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (``avx2``, ``avx512f`` ...); empty where that
    file does not exist (macOS, Windows) or has no flags line."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def openblas_kernel() -> str | None:
    """The kernel NumPy's OpenBLAS runs (``"Haswell"``, ``"SkylakeX"`` ...), as threadpoolctl
    reports it; None without threadpoolctl or with another BLAS."""
    for lib in blas_pools() or ():
        if lib.get("internal_api") == "openblas" and lib.get("architecture"):
            return lib["architecture"]
    return None


def forced_kernel_warning(environ=None, kernel: str | None = None, flags=None) -> str | None:
    """A one-line note when ``OPENBLAS_CORETYPE`` holds OpenBLAS to a kernel without AVX-512 on
    a CPU that has it (so every convolution runs at about half speed); None otherwise.
    ``kernel`` and ``flags`` default to :func:`openblas_kernel` and :func:`cpu_flags`."""
    environ = os.environ if environ is None else environ
    forced = environ.get("OPENBLAS_CORETYPE", "")
    if not forced:
        return None
    kernel = openblas_kernel() if kernel is None else kernel
    flags = cpu_flags() if flags is None else flags
    if not kernel or kernel.lower() in _AVX512_KERNELS or "avx512f" not in flags:
        return None
    return (
        f"note: OPENBLAS_CORETYPE={forced} is set, so OpenBLAS runs its {kernel} kernel and "
        "leaves this CPU's AVX-512 unused; a current NumPy picks a faster kernel by itself "
        "(about 2x faster GEMMs on one machine of ours): run with `env -u OPENBLAS_CORETYPE ...`"
    )


def gemm_reference(repeats: int = 100, size: int = 1024, threads: int | None = 2) -> float:
    """Seconds for ``repeats`` float32 GEMMs of ``size``^3 with NumPy, on ``threads`` BLAS threads
    (restored afterwards; None: the current count), after one warm-up product.

    With the defaults it is the reference of the training-speed targets (issue 15): ~2 s on
    one 2-core machine of ours. Raises ImportError when ``threads`` is given and threadpoolctl
    is missing (the count could not be set)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    limits = _limited(threads)
    with limits:
        np.matmul(a, b, out=out)  # warm-up: thread start, page faults
        t0 = time.perf_counter()
        for _ in range(repeats):
            np.matmul(a, b, out=out)
        return time.perf_counter() - t0


def command_reference() -> float | None:
    """``gemm_reference()`` at the start of a command, for its summary (``reference_summary``);
    None under ``mpiexec`` with several ranks (they share the cores, so it would not be the
    reference) or without threadpoolctl."""
    from .distributed import launched_world_size

    if launched_world_size() > 1:
        return None
    try:
        return gemm_reference()
    except ImportError:
        return None


def reference_summary(seconds: float, reference: float) -> str:
    """``the whole command took 300 s = 150 x the GEMM reference (2.00 s: ...)``."""
    return (
        f"the whole command took {seconds:.0f} s = {seconds / reference:.0f} x the GEMM "
        f"reference ({reference:.2f} s: 100 float32 GEMMs of 1024^3 on 2 threads, measured at "
        "the start)"
    )


def _limited(threads: int | None):
    """A context with the BLAS pools at ``threads`` (None: nothing changes)."""
    import contextlib

    if threads is None:
        return contextlib.nullcontext()
    n = parse_threads(threads, "the thread count")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError as err:
        raise ImportError(f"{n} BLAS threads: {_NEEDS_THREADPOOLCTL}") from err
    return threadpool_limits(limits=n, user_api="blas")
