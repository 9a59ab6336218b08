"""The BLAS thread policy (mrcnn_edu/threads.py) and ``--threads`` on the command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mrcnn_edu import cli
from mrcnn_edu import threads as T

threadpoolctl = pytest.importorskip("threadpoolctl")

THREAD_VARIABLES = ("MRCNN_EDU_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


@pytest.fixture
def restore_threads():
    """Put this process's BLAS thread counts back after a test that changes them."""
    before = threadpoolctl.threadpool_info()
    yield
    for lib in before:
        threadpoolctl.threadpool_limits(limits=lib["num_threads"], user_api=lib["user_api"])


def blas_count() -> int:
    counts = {p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"}
    assert len(counts) == 1, counts
    return counts.pop()


# -- the policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, n", [("1", 1), ("2", 2), (" 16 ", 16), (3, 3)])
def test_parse_threads(text, n):
    assert T.parse_threads(text) == n


@pytest.mark.parametrize("text", ["0", "-1", "abc", "1.5", ""])
def test_parse_threads_refuses_bad_counts(text):
    with pytest.raises(ValueError, match=r"--threads must be a whole number >= 1"):
        T.parse_threads(text, "--threads")


@pytest.mark.parametrize(
    "cores, ranks, n",
    [(1, 1, 1), (2, 1, 1), (8, 1, 7), (16, 1, 15), (2, 2, 1), (16, 4, 4), (3, 2, 1), (1, 4, 1)],
)
def test_default_threads(cores, ranks, n):
    # one process: cores - 1 (a core left for other work); ranks: cores // ranks; at least 1
    assert T.default_threads(cores, ranks)[0] == n


def test_choose_threads_order():
    env = {"MRCNN_EDU_THREADS": "3", "OPENBLAS_NUM_THREADS": "5"}
    assert T.choose_threads("2", env, cores=8) == T.ThreadChoice(2, "--threads")
    assert T.choose_threads(None, env, cores=8) == T.ThreadChoice(3, "MRCNN_EDU_THREADS")
    # the user's own OpenBLAS/OpenMP variables are left to OpenBLAS
    assert T.choose_threads(None, {"OPENBLAS_NUM_THREADS": "5"}, cores=8).threads is None
    assert T.choose_threads(None, {"OMP_NUM_THREADS": "1"}, cores=8).source == "OMP_NUM_THREADS"
    default = T.choose_threads(None, {}, cores=8)
    assert (default.threads, default.source) == (7, "default")
    assert T.choose_threads(None, {"MRCNN_EDU_THREADS": " "}, cores=2).threads == 1  # blank


def test_choose_threads_under_mpiexec():
    # MPICH's Hydra says how many ranks share this node; without it, all ranks are assumed here
    hydra = {"PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"}
    assert T.choose_threads(None, hydra, cores=16).threads == 8
    assert T.choose_threads(None, {"PMI_SIZE": "4"}, cores=16).threads == 4
    assert T.choose_threads(None, {"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, cores=2).threads == 1
    assert T.local_ranks({}) == 1


def test_choose_threads_bad_environment_value():
    with pytest.raises(ValueError, match=r"MRCNN_EDU_THREADS must be a whole number >= 1.*'x'"):
        T.choose_threads(None, {"MRCNN_EDU_THREADS": "x"})
    with pytest.raises(ValueError, match=r"--threads must be .* got 0"):
        T.choose_threads(0, {})


@pytest.mark.parametrize("content, cap", [("max 100000", None), ("200000 100000", 2),
                                          ("50000 100000", 1), ("garbage", None)])  # fmt: skip
def test_available_cores_follows_a_cgroup_quota(tmp_path, content, cap):
    path = tmp_path / "cpu.max"
    path.write_text(content + "\n")
    affinity = T.available_cores(str(tmp_path / "missing"))
    assert affinity >= 1
    expected = affinity if cap is None else min(affinity, cap)
    assert T.available_cores(str(path)) == expected


# -- applying it ---------------------------------------------------------------------------------
def test_apply_threads_sets_openblas(restore_threads):
    T.apply_threads(1)
    assert blas_count() == 1 == T.blas_threads()
    T.apply_threads(2)
    assert blas_count() == 2 == T.blas_threads()


def test_configure_threads_says_the_count(restore_threads):
    lines = []
    choice = T.configure_threads("1", environ={}, say=lines.append)
    assert choice == T.ThreadChoice(1, "--threads") and blas_count() == 1
    assert lines == ["BLAS threads: 1 (--threads)"]
    lines.clear()
    T.configure_threads(None, environ={}, say=lines.append)  # the default, with its reason
    assert len(lines) == 1 and "default:" in lines[0] and "--threads N" in lines[0]
    lines.clear()
    T.configure_threads(None, environ={"PMI_RANK": "1", "PMI_SIZE": "2"}, say=lines.append)
    assert lines == []  # only the first rank says it


def test_configure_threads_without_threadpoolctl(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import raises ImportError
    with pytest.raises(ValueError, match=r"--threads 2: .*pip install threadpoolctl"):
        T.configure_threads("2", environ={}, say=print)
    lines = []
    assert T.configure_threads(None, environ={}, say=lines.append).source == "default"
    assert "OpenBLAS's own count" in lines[0] and "pip install threadpoolctl" in lines[0]
    with pytest.raises(ImportError, match="threadpoolctl"):
        T.gemm_reference(repeats=1, size=8, threads=2)
    # what the BLAS is cannot be asked: no pools, no count, no kernel (so no kernel note)
    assert T.blas_pools() is None and T.blas_threads() is None and T.openblas_kernel() is None


def test_gemm_reference_restores_the_count(restore_threads):
    T.apply_threads(1)
    seconds = T.gemm_reference(repeats=3, size=64, threads=2)
    assert seconds > 0 and blas_count() == 1
    assert T.reference_summary(300.0, 2.0).startswith(
        "the whole command took 300 s = 150 x the GEMM reference (2.00 s"
    )


# -- the command line ------------------------------------------------------------------------------
@pytest.fixture
def record_evaluate(monkeypatch):
    """``evaluate`` replaced by a stub that records the BLAS thread count it runs with."""
    seen = []
    monkeypatch.setitem(
        cli._COMMANDS, "evaluate", lambda args, parser: seen.append(blas_count()) or 0
    )
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return seen


def test_threads_flag_reaches_threadpoolctl(tmp_path, record_evaluate, restore_threads, capsys):
    assert cli.main(["evaluate", "--run", str(tmp_path), "--threads", "1"]) == 0
    assert cli.main(["evaluate", "--run", str(tmp_path), "--threads", "2"]) == 0
    assert record_evaluate == [1, 2]
    assert "BLAS threads: 2 (--threads)" in capsys.readouterr().out


def test_threads_environment_and_default(
    tmp_path, record_evaluate, restore_threads, monkeypatch, capsys
):
    monkeypatch.setenv("MRCNN_EDU_THREADS", "1")
    cli.main(["evaluate", "--run", str(tmp_path)])
    monkeypatch.delenv("MRCNN_EDU_THREADS")
    monkeypatch.setattr(T, "available_cores", lambda: 3)  # default: 3 - 1 = 2
    cli.main(["evaluate", "--run", str(tmp_path)])
    assert record_evaluate == [1, 2]
    out = capsys.readouterr().out
    assert "BLAS threads: 1 (MRCNN_EDU_THREADS)" in out
    assert "BLAS threads: 2 (default: 3 core(s), one left free" in out


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_threads_is_exit_2(tmp_path, record_evaluate, capsys, value):
    assert cli.main(["evaluate", "--run", str(tmp_path), f"--threads={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mrcnn-edu evaluate: error: --threads must be a whole number >= 1")
    assert "Traceback" not in err and record_evaluate == []


def test_bad_threads_environment_is_exit_2(tmp_path, record_evaluate, monkeypatch, capsys):
    monkeypatch.setenv("MRCNN_EDU_THREADS", "0")
    assert (
        cli.main(["predict", "a.png", "--run", str(tmp_path), "--out", str(tmp_path / "p.png")])
        == 2
    )
    assert "error: MRCNN_EDU_THREADS must be a whole number >= 1" in capsys.readouterr().err


def test_demo_ends_with_the_gemm_reference(tmp_path, monkeypatch, capsys, restore_threads):
    from mrcnn_edu import cli_train

    calls = []
    monkeypatch.setattr(T, "gemm_reference", lambda: calls.append(1) or 0.5)
    status = {"value": 0}
    monkeypatch.setattr(cli_train, "_run", lambda cfg, args, out: status["value"])
    argv = ["demo", "--quick", "--out", str(tmp_path / "run"), "--threads", "1"]
    assert cli.main(argv) == 0 and calls == [1]
    out = capsys.readouterr().out
    assert re.search(r"the whole command took \d+ s = \d+ x the GEMM reference \(0\.50 s", out)
    status["value"] = 130  # interrupted: no summary line
    assert cli.main(argv) == 130
    assert "whole command" not in capsys.readouterr().out
    status["value"] = 0
    monkeypatch.setenv("PMI_SIZE", "2")  # under mpiexec the ranks share the cores: not measured
    assert cli.main(argv) == 0 and calls == [1, 1]
    assert "whole command" not in capsys.readouterr().out


# -- the GEMM kernel -------------------------------------------------------------------------------
def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert T.cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "avx512f"}
    info.write_text("processor\t: 0\n")
    assert T.cpu_flags(str(info)) == frozenset()
    assert T.cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize(
    "environ, kernel, flags, warned",
    [
        ({"OPENBLAS_CORETYPE": "Haswell"}, "Haswell", {"avx2", "avx512f"}, True),
        ({"OPENBLAS_CORETYPE": "zen"}, "Zen", {"avx2", "avx512f"}, True),
        ({}, "Haswell", {"avx2", "avx512f"}, False),  # OpenBLAS chose it itself
        ({"OPENBLAS_CORETYPE": "Haswell"}, "Haswell", {"avx2"}, False),  # no AVX-512 to use
        ({"OPENBLAS_CORETYPE": "SkylakeX"}, "SkylakeX", {"avx2", "avx512f"}, False),
        ({"OPENBLAS_CORETYPE": "Haswell"}, "", {"avx512f"}, False),  # not OpenBLAS
    ],
)
def test_forced_kernel_warning(environ, kernel, flags, warned):
    warning = T.forced_kernel_warning(environ, kernel=kernel, flags=frozenset(flags))
    assert (warning is not None) == warned
    if warned:
        assert f"OPENBLAS_CORETYPE={environ['OPENBLAS_CORETYPE']}" in warning
        assert f"its {kernel} kernel" in warning and "env -u OPENBLAS_CORETYPE" in warning


def test_say_blas_warnings_only_on_the_first_rank(monkeypatch):
    monkeypatch.setattr(T, "openblas_kernel", lambda: "Haswell")
    monkeypatch.setattr(T, "cpu_flags", lambda: frozenset({"avx512f"}))
    lines = []
    T.say_blas_warnings({"OPENBLAS_CORETYPE": "Haswell"}, say=lines.append)
    assert len(lines) == 1 and lines[0].startswith("note: OPENBLAS_CORETYPE=Haswell")
    T.say_blas_warnings({"OPENBLAS_CORETYPE": "Haswell", "PMI_RANK": "1"}, say=lines.append)
    T.say_blas_warnings({}, say=lines.append)
    assert len(lines) == 1


def test_openblas_kernel_names_numpys_kernel():
    import numpy as np

    np.ones(1)  # NumPy (and its BLAS) loaded
    libs = [lib for lib in threadpoolctl.threadpool_info() if lib.get("internal_api") == "openblas"]
    if not libs:
        pytest.skip("NumPy does not use OpenBLAS here")
    assert T.openblas_kernel() == libs[0]["architecture"]


# -- one set of cores per rank ---------------------------------------------------------------------
def test_rank_cpus_shares_the_allowed_cpus_out():
    assert T.rank_cpus(0, 2, {0, 1}) == [0] and T.rank_cpus(1, 2, {1, 0}) == [1]
    assert T.rank_cpus(1, 2, {4, 5, 6, 7, 8}) == [6, 7]  # 2 each in order; CPU 8 left over
    assert T.rank_cpus(2, 3, range(8)) == [4, 5]
    assert T.rank_cpus(0, 1, {0, 1}) is None  # one rank: nothing to share out
    assert T.rank_cpus(1, 2, {3}) is None  # fewer CPUs than ranks: bound already, or oversubscribed
    assert T.rank_cpus(2, 2, {0, 1}) is None  # not one of the ranks


def test_pin_rank_asks_for_the_variable(monkeypatch):
    pinned = []
    monkeypatch.setattr(T.os, "sched_setaffinity", lambda tid, cpus: pinned.append(cpus), False)
    launched = {"MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    assert T.pin_rank(launched) is None  # unset: the scheduler decides
    assert T.pin_rank({**launched, T.PIN_ENV: "0"}) is None
    assert T.pin_rank({T.PIN_ENV: "1"}) is None  # not started by a launcher
    assert pinned == []
    with pytest.raises(ValueError, match=r"MRCNN_EDU_PIN_CORES must be 1 .* or 0, got 'yes'"):
        T.pin_rank({**launched, T.PIN_ENV: "yes"})
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 1})
    # 2 BLAS threads on the one CPU of rank 1 would take turns: left unpinned
    assert T.pin_rank({**launched, T.PIN_ENV: "1"}, threads=2) is None and pinned == []
    assert T.pin_rank({**launched, T.PIN_ENV: "1"}, threads=1) == [1]
    assert pinned and all(cpus == [1] for cpus in pinned)  # every thread of the process


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity (Linux) and at least 2 CPUs",
)
def test_pin_rank_binds_every_thread_of_the_process():
    # in a process of its own: pinning would change this test process for the tests after it
    code = (
        "import json, os, threading\n"
        "from mrcnn_edu import threads as T\n"
        "seen = {}\n"
        "go = threading.Event()\n"
        "def worker():\n"
        "    go.wait(); seen['thread'] = sorted(os.sched_getaffinity(0))\n"
        "t = threading.Thread(target=worker); t.start()\n"
        "cpus = T.pin_rank()\n"
        "go.set(); t.join()\n"
        "print(json.dumps([cpus, sorted(os.sched_getaffinity(0)), seen['thread']]))\n"
    )
    allowed = sorted(os.sched_getaffinity(0))
    env = {**os.environ, T.PIN_ENV: "1", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    per = len(allowed) // 2
    mine = allowed[per : 2 * per]  # rank 1's half
    # what pin_rank returned, the main thread's affinity, the other thread's (started before)
    assert json.loads(done.stdout) == [mine, mine, mine]
