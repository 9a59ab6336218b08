"""benchmarks/bench_train.py cannot rot: its pieces on a tiny run, its tables on hand-made
timings, and (slow) the whole ``--quick`` run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_train as B  # noqa: E402


def test_busy_process_runs_only_inside_the_block():
    with B.BusyProcess() as busy:
        assert busy.proc.poll() is None  # still spinning
    assert busy.proc.poll() is not None


def test_time_steps_on_the_real_trainer(tmp_path):
    trainer = B.demo_trainer(batch=1, size=64, out=str(tmp_path))
    times = B.time_steps(trainer, steps=3, busy=True)
    assert len(times["quiet"]) == 3 and len(times["busy"]) == 3
    assert min(times["quiet"] + times["busy"]) > 0
    assert trainer.step == 2 + 6  # 2 warm-up steps, then the timed ones
    assert len(B.time_steps(trainer, steps=3)["quiet"]) == 3


def fake(quiet, busy=None, world=1, threads=1):
    return {"quiet": quiet, "busy": busy or [], "world": world, "threads": threads}


def test_tables_from_hand_made_timings(capsys):
    results = {
        B.A2: fake([0.2, 0.2, 0.3], [0.5, 0.9, 2.0], threads=2),  # 20 images/s
        B.A1: fake([0.4, 0.4], [0.4, 0.6]),  # 10 images/s
        B.B: fake([0.25, 0.25], [0.3, 0.44], world=2),  # 16 images/s on 2 ranks
        B.B_FREE: fake([0.25], [0.3, 0.55], world=2),  # not in the throughput table
        B.C: {"error": "no GPU"},
        B.D: {"error": "no GPU"},
        B.TIMEOUT: {"error": "exit 1: boom"},
        B.DEFAULT: fake([0.3], [0.25, 0.39]),  # within 2x of the fastest quiet median
    }
    B.print_throughput(results, ref=2.0)
    B.print_contention(results, ref=2.0)
    lines = {line.split("  ")[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    # (b): 4 / 0.25 = 16 images/s = 0.80x of (a) with 2 threads; efficiency 16 / (2 x 10)
    assert lines[B.B][-5:] == ["0.250", "0.125", "16.0", "0.80x", "80%"]
    assert lines[B.A1][-4:] == ["0.400", "0.200", "10.0", "0.50x"]
    assert "no GPU" in " ".join(lines[B.C])
    # quiet median, busy median, slowest busy step, its ratio to the policy's quiet median and
    # to the fastest quiet median (0.2, of 2 threads), verdict, medians over the reference
    assert lines["2 threads"][2:] == ["0.200", "0.900", "2.000", "10.0x", "10.0x", "over", "2x",
                                      "0.100/0.450"]  # fmt: skip
    assert lines["1 thread"][2:] == ["0.400", "0.500", "0.600", "1.5x", "3.0x", "over", "2x",
                                     "0.200/0.250"]  # fmt: skip
    assert lines["default policy (1 thread(s) here)"][-5:-1] == ["0.390", "1.3x", "1.9x", "ok"]
    assert lines["mpiexec -n 2, 1 thread/rank"][-6:-2] == ["0.440", "1.8x", "2.2x", "over"]
    assert lines["mpiexec -n 2, ranks not pinned"][-6:-2] == ["0.550", "2.2x", "2.8x", "over"]
    assert B.B_FREE not in lines  # one row per configuration in the throughput table
    assert "boom" in " ".join(lines[B.TIMEOUT])


@pytest.mark.slow
def test_quick_run(tmp_path):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "benchmarks", "bench_train.py")
    done = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "GEMM reference" in out and "exit" not in out, out
    for name in (B.A2, B.A1, B.B, "default policy"):
        assert name in out
