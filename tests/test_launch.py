"""``mrcnn-edu demo --ranks``: how many ranks, the command that starts them, the shared batch,
and a real two-rank demo started by the plain command (launch.py)."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mrcnn_edu import launch
from mrcnn_edu.run_config import demo_train_config
from mrcnn_edu.threads import PIN_ENV
from mrcnn_edu.train_parallel import images_word

BIN = os.path.dirname(sys.executable)
MPIEXEC = shutil.which("mpiexec", path=BIN) or shutil.which("mpiexec")


def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'mrcnn-edu[dist]')"
    return None if MPIEXEC else "no mpiexec on PATH (pip install mpich)"


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


@pytest.fixture
def mpi_installed(monkeypatch):
    monkeypatch.setattr(launch, "missing_mpi", lambda: None)


def test_parse_ranks():
    assert launch.parse_ranks("auto") is None and launch.parse_ranks(" AUTO ") is None
    assert launch.parse_ranks("2") == 2 and launch.parse_ranks(1) == 1
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="MRCNN_EDU_RANKS must be 'auto' or a whole number"):
            launch.parse_ranks(bad, "MRCNN_EDU_RANKS")


def test_auto_is_two_ranks_on_two_cores_with_mpi_and_one_otherwise(mpi_installed):
    env = {}
    assert launch.plan_ranks(None, None, cores=2, environ=env) == (2, None)
    assert launch.plan_ranks("auto", None, cores=8, environ=env) == (2, None)
    assert launch.plan_ranks(None, None, cores=1, environ=env) == (1, None)
    # a GPU does the work of the step: one process
    assert launch.plan_ranks(None, "cuda", cores=16, environ=env) == (1, None)
    assert launch.plan_ranks(None, "cuda:1", cores=16, environ=env) == (1, None)


def test_auto_without_mpi_trains_in_one_process_and_says_what_to_install(monkeypatch):
    monkeypatch.setattr(launch, "missing_mpi", lambda: "mpi4py")
    ranks, note = launch.plan_ranks(None, None, cores=2, environ={})
    assert ranks == 1
    assert note.startswith("note: training in one process: mpi4py is not installed")
    assert "pip install 'mrcnn-edu[dist]'" in note
    # asked for explicitly, it is an error that names the extra
    needs = r"--ranks 2 needs mpi4py: pip install 'mrcnn-edu\[dist\]'"
    with pytest.raises(ValueError, match=needs):
        launch.plan_ranks("2", None, cores=2, environ={})
    assert launch.plan_ranks("1", None, cores=2, environ={}) == (1, None)


def test_environment_variable_and_flag(mpi_installed):
    assert launch.plan_ranks(None, None, cores=2, environ={"MRCNN_EDU_RANKS": "1"}) == (1, None)
    # the flag wins over the environment
    assert launch.plan_ranks("2", None, cores=2, environ={"MRCNN_EDU_RANKS": "1"}) == (2, None)
    with pytest.raises(ValueError, match="MRCNN_EDU_RANKS must be"):
        launch.plan_ranks(None, None, cores=2, environ={"MRCNN_EDU_RANKS": "many"})
    ranks, note = launch.plan_ranks("4", None, cores=2, environ={})
    assert ranks == 4 and note == "note: 4 ranks on 2 core(s): they will share cores"


def test_under_mpiexec_the_launcher_decides():
    launch.check_launched_ranks(None, 2)
    launch.check_launched_ranks("auto", 2)
    launch.check_launched_ranks("2", 2)
    with pytest.raises(ValueError, match="--ranks 1, but mpiexec started 2 ranks"):
        launch.check_launched_ranks("1", 2)


def test_launch_command_reruns_this_python_with_the_same_arguments(monkeypatch):
    monkeypatch.setattr(launch, "find_mpiexec", lambda: "/opt/mpi/bin/mpiexec")
    argv = ["demo", "--ranks", "auto", "--out", "runs/x", "--ranks=3", "--steps", "5"]
    assert launch.launch_command(argv, 2) == [
        "/opt/mpi/bin/mpiexec", "-n", "2", sys.executable, "-m", "mrcnn_edu.cli",
        "demo", "--out", "runs/x", "--steps", "5", "--ranks", "2",
    ]  # fmt: skip
    monkeypatch.setattr(launch, "find_mpiexec", lambda: None)
    with pytest.raises(ValueError, match="needs mpiexec"):
        launch.launch_command(argv, 2)


def test_the_demo_batch_and_rate_are_shared_by_the_ranks():
    train = demo_train_config()
    assert launch.split_batch(train, 1) is train
    two = launch.split_batch(train, 2)
    # per rank: half the images and half the rate; the trainer scales the rate back by 2
    assert (two.batch_size, two.lr) == (train.batch_size // 2, train.lr / 2)
    assert two.batch_size * 2 == train.batch_size and two.lr * 2 == train.lr
    assert (two.max_steps, two.warmup_iters, two.milestones) == (
        train.max_steps, train.warmup_iters, train.milestones)  # fmt: skip
    four = launch.split_batch(train, 4)
    assert (four.batch_size, four.lr * 4) == (1, train.lr)
    with pytest.raises(ValueError, match="batch of 4 images cannot be split evenly over 3 ranks"):
        launch.split_batch(train, 3)


def test_images_word():
    assert images_word(1) == "1 image" and images_word(4) == "4 images"


def _demo_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (launch.RANKS_ENV, PIN_ENV)}
    return {**env, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@needs_mpi
def test_the_plain_command_starts_two_ranks_that_train_one_run(tmp_path):
    out = tmp_path / "run"
    cmd = [os.path.join(BIN, "mrcnn-edu"), "demo", "--quick", "--steps", "3", "--ranks", "2",
           "--out", str(out), "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_demo_env())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("training on 2 ranks, one per core: ")
    assert lines[0].endswith(" -m mrcnn_edu.cli demo --quick --steps 3 --out "
                             f"{out} --no-progress --ranks 2")  # fmt: skip
    assert "data parallel: 2 ranks x 1 image per rank = effective batch 2" in lines
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(allowed) >= 2:  # the ranks share the CPUs out; rank 0 says which it has
        first = ", ".join(map(str, allowed[: len(allowed) // 2]))
        assert f"cores: each rank pinned to its own (rank 0: CPU {first}; " in done.stdout
    assert done.stdout.count("training 3 steps of 1 image per rank") == 1  # rank 0 only
    with open(out / "log.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3"]
    assert (out / "metrics.json").exists() and (out / "predictions.png").exists()


@needs_mpi
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_command_reaches_the_ranks_once(tmp_path, signum):
    """Ctrl-C or SIGTERM sent to ``mrcnn-edu demo`` (not to mpiexec, which runs in a session
    of its own) is passed on: both ranks stop at one step, one checkpoint is written, and the
    command exits with the ranks' status."""
    out = tmp_path / "run"
    cmd = [os.path.join(BIN, "mrcnn-edu"), "demo", "--quick", "--steps", "400", "--ranks", "2",
           "--out", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_demo_env())  # fmt: skip
    log = out / "log.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if log.exists() and sum(1 for _ in open(log)) > 3:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), stderr
    with open(log) as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(1, len(steps) + 1)) and 3 <= len(steps) < 400
    from mrcnn_edu import weights

    saved = weights.load(str(out / "last.npz"), nested=True)
    assert int(saved["step"]) == len(steps)
    assert stdout.count(f"the state after step {len(steps)} is saved in") == 1
    # and the command that continues it exactly: the same number of ranks
    assert f"`mpiexec -n 2 mrcnn-edu train --resume {out}`" in stdout
    assert "Traceback" not in stderr


def test_a_bad_pin_setting_is_refused_before_the_ranks_start(
    tmp_path, monkeypatch, mpi_installed, capsys
):
    from mrcnn_edu import cli

    monkeypatch.setenv(PIN_ENV, "yes")
    monkeypatch.setattr(launch, "run_ranks", lambda argv, ranks: pytest.fail("ranks started"))
    out = tmp_path / "run"
    assert cli.main(["demo", "--quick", "--ranks", "2", "--out", str(out)]) == 2
    assert "MRCNN_EDU_PIN_CORES must be 1 (each rank on cores of its own) or 0, got 'yes'" in (
        capsys.readouterr().err
    )
    assert not out.exists()
