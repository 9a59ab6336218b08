"""``mrcnn-edu demo`` on two cores: the command starts itself again as two MPI ranks.

    mrcnn-edu demo                  # --ranks auto: 2 ranks on a machine with 2+ cores
    mrcnn-edu demo --ranks 1        # one process (one BLAS thread on 2 cores)
    MRCNN_EDU_RANKS=1 mrcnn-edu demo

A single process uses one core well and two cores badly: OpenBLAS's two threads spin-wait for
each other inside every matrix product, so a second program on the machine makes a step up to
15 times slower (``threads.py``), and one BLAS thread leaves the second core idle. Two
processes, each with one thread and half of the batch, use both cores with no fine-grained
waiting at all: they meet once per step to average their gradients (``distributed.py``; the
waiting rank sleeps instead of spinning). ``benchmarks/bench_train.py`` measures it: on an
idle 2-core machine two ranks step the demo about 1.6 times as fast as one process with two
threads.

So ``--ranks auto`` (the default) runs ``mpiexec -n 2 <python> -m mrcnn_edu.cli demo ...``
when the machine has at least 2 cores and the ``dist`` extra (mpi4py, and the ``mpich`` wheel
that brings ``mpiexec``) is installed, and waits for it; otherwise one process, with a note
saying why. The demo is the same experiment at any number of ranks: its batch (4 images) is
split between the ranks and its learning rate divided by their number, so the linear scaling
rule gives back the demo's rate, and each step trains on the same 4 images (rank ``r`` takes
every ``W``-th image of the epoch's order). What differs: each rank averages its losses over its
own images before the gradients are averaged, and each rank samples anchors and RoIs from its
own generator, so the numbers are not those of the one-process run (``docs/data_parallel.md``).

The ranks it starts are pinned, each to cores of its own (``MRCNN_EDU_PIN_CORES=1``, unless
you set it to 0; ``threads.pin_rank``): left to the scheduler, two ranks and one busy program
on 2 cores often end up as both ranks on one core, each at half speed.

Ctrl-C and SIGTERM sent to the command are passed to ``mpiexec`` (which passes them to the
ranks): every rank stops at the same step, the state is saved, and the command exits with the
ranks' status.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

RANKS_ENV = "MRCNN_EDU_RANKS"
# The demo's default number of ranks on a machine with at least this many cores.
AUTO_RANKS = 2
_DIST_HINT = "pip install 'mrcnn-edu[dist]' (mpi4py and the mpich wheel, which brings mpiexec)"


def parse_ranks(value: str, source: str = "--ranks") -> int | None:
    """``"auto"`` -> None, ``"2"`` -> 2; a ValueError naming ``source`` otherwise."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{source} must be 'auto' or a whole number >= 1, got {value!r}")
    return int(text)


def find_mpiexec() -> str | None:
    """The ``mpiexec`` of this Python's environment (the mpich wheel puts it beside
    ``python``), else the first on ``PATH``."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def missing_mpi() -> str | None:
    """What is missing to start ranks (``"mpi4py"``, ``"mpiexec"``), or None."""
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py"
    if find_mpiexec() is None:
        return "mpiexec"
    return None


def plan_ranks(requested: str | None, device: str | None, cores: int, environ=None):
    """``(ranks, note)``: how many ranks the demo starts from a plain command (not under
    ``mpiexec``), and a line to print (or None).

    ``requested`` is ``--ranks`` (None: not given; then ``MRCNN_EDU_RANKS``, then auto). Auto:
    ``AUTO_RANKS`` on a CPU run with at least that many cores and MPI installed, else 1 (a note
    says what is missing). A number is taken as asked; more than 1 without MPI is a ValueError
    naming the extra to install."""
    environ = os.environ if environ is None else environ
    source = "--ranks"
    if requested is None and environ.get(RANKS_ENV, "").strip():
        requested, source = environ[RANKS_ENV], RANKS_ENV
    ranks = parse_ranks(requested if requested is not None else "auto", source)
    on_gpu = device is not None and str(device).split(":")[0] == "cuda"
    if ranks is None:  # auto
        if on_gpu or cores < AUTO_RANKS:
            return 1, None
        missing = missing_mpi()
        if missing is not None:
            return 1, (
                f"note: training in one process: {missing} is not installed; to use "
                f"{AUTO_RANKS} of the {cores} cores, {_DIST_HINT}"
            )
        return AUTO_RANKS, None
    if ranks > 1:
        missing = missing_mpi()
        if missing is not None:
            raise ValueError(f"{source} {ranks} needs {missing}: {_DIST_HINT}")
    note = None
    if ranks > cores:
        note = f"note: {ranks} ranks on {cores} core(s): they will share cores"
    return ranks, note


def check_launched_ranks(requested: str | None, world: int) -> None:
    """Under ``mpiexec -n W`` the launcher decides: ``--ranks`` may only say ``auto`` or W."""
    if requested is None:
        return
    ranks = parse_ranks(requested)
    if ranks is not None and ranks != world:
        raise ValueError(f"--ranks {ranks}, but mpiexec started {world} ranks")


def launch_command(argv: list[str], ranks: int) -> list[str]:
    """``mpiexec -n R python -m mrcnn_edu.cli <argv> --ranks R``."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise ValueError(f"--ranks {ranks} needs mpiexec: {_DIST_HINT}")
    argv = _without_ranks(argv)
    return [mpiexec, "-n", str(ranks), sys.executable, "-m", "mrcnn_edu.cli", *argv,
            "--ranks", str(ranks)]  # fmt: skip


def run_ranks(argv: list[str], ranks: int) -> int:
    """Run ``launch_command`` and wait; SIGINT/SIGTERM/SIGHUP to this process go to
    ``mpiexec`` (started in a session of its own, so a Ctrl-C in the terminal reaches the
    ranks once, through it). Returns the job's exit status (a signal's as 128 + N)."""
    from .threads import PIN_ENV, pin_setting

    # each rank on cores of its own (threads.pin_rank), unless the user says otherwise; a bad
    # value is refused here, before any rank starts
    env = {**os.environ, PIN_ENV: pin_setting() or "1"}
    cmd = launch_command(argv, ranks)
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in caught}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover -- the handler above takes SIGINT
                forward(signal.SIGINT, None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def split_batch(train, world: int, what: str = "the demo"):
    """``train`` (a TrainConfig) for one of ``world`` ranks sharing its batch: ``batch_size /
    world`` images and ``lr / world`` per rank (the trainer multiplies the rate back by the
    number of ranks). A ValueError when the batch does not split evenly."""
    import dataclasses

    if world == 1:
        return train
    if train.batch_size % world:
        raise ValueError(
            f"{what}'s batch of {train.batch_size} images cannot be split evenly over {world} "
            f"ranks; use a number of ranks that divides {train.batch_size} (--ranks), or "
            "`mrcnn-edu train --config` with a per-rank batch of your own"
        )
    return dataclasses.replace(train, batch_size=train.batch_size // world, lr=train.lr / world)


def _without_ranks(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ranks":
            skip = True
        elif not arg.startswith("--ranks="):
            out.append(arg)
    return out
