"""Training speed of the demo configuration, and what a second busy process does to it.

Everything is timed in this run and also given as a multiple of the GEMM reference measured
first (``mrcnn_edu.threads.gemm_reference``: 100 float32 GEMMs of 1024^3 with NumPy on 2
threads), so numbers from different machines can be compared.

1. Throughput: images/s of one training step of the demo config (small preset, 128x128 shapes,
   batch 4; the real Trainer, SGD and all) for
     (a) NumPy, one process, 2 BLAS threads and 1 BLAS thread;
     (b) ``mpiexec -n 2``, one BLAS thread per rank, each rank half the batch (the real
         MpiCommunicator averages the gradients); target: >= 1.4x the images/s of (a);
     (c) CuPy on one GPU (``--device cuda``) and (d) NCCL over all GPUs, 4 images per GPU
         ("no GPU" without CuPy or a device); target for (c): >= 20x (a) on an H100/H200.
   Scaling efficiency = images/s / (ranks x images/s of one rank alone with the same
   resources): (b) against (a) with 1 thread, (d) against (c).
2. Contention: the median quiet step, and the median and slowest step while another process
   keeps one core busy (a Python loop), for 1 thread, 2 threads, 2 threads with
   OPENBLAS_THREAD_TIMEOUT=4 (OpenBLAS's idle threads stop spinning sooner), the default policy
   (``mrcnn_edu.threads.choose_threads``) and (b), its ranks pinned one per core as the demo
   starts them (``mrcnn_edu.threads.pin_rank``) and left to the scheduler; quiet and busy
   steps alternate in blocks
   within one process. Target: no busy step slower than 2x the quiet step (the slowest busy
   step is compared with the policy's own quiet median and with the fastest of all).

Each configuration runs in a fresh process (OpenBLAS reads its environment when it loads), with
OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and MRCNN_EDU_THREADS removed so the count is the one
asked for. Timings on a machine others are using are noisy: compare ratios within one run, and
rerun on a quiet machine for the record (``uptime`` before and after says how quiet it was).

Usage: python benchmarks/bench_train.py [--steps 10] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _timing import print_blas  # benchmarks/_timing.py

from mrcnn_edu.threads import PIN_ENV  # imports no NumPy: the workers set threads first

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BATCH = 4  # the demo's images per step
# The variables that would override the count a worker is asked to use.
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MRCNN_EDU_THREADS")
# The loop first frees itself of any CPU affinity it inherited from the rank that started it:
# it stands for a program of its own, which the scheduler may put on any core.
BURN = (
    "import os\n"
    "if hasattr(os, 'sched_setaffinity'): os.sched_setaffinity(0, range(os.cpu_count()))\n"
    "while True: pass"
)


# -- one configuration, in its own process ----------------------------------------------------
class BusyProcess:
    """A second process keeping one core busy (a Python loop) while the block runs."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", BURN])
        time.sleep(0.2)  # let it start spinning
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def demo_trainer(batch: int, size: int, out: str, comm=None, device: str | None = None):
    """The real Trainer on the demo config (small preset, shapes of ``size``^2, ``batch``
    images per rank), writing its log into ``out``."""
    import dataclasses

    from mrcnn_edu.mask_rcnn import MaskRCNN
    from mrcnn_edu.run_config import DataConfig, RunConfig, build_datasets
    from mrcnn_edu.train import Trainer

    cfg = RunConfig(data=DataConfig(num_train=64, num_val=0, image_size=(size, size)))
    train_set, _, _ = build_datasets(cfg.data)
    tc = dataclasses.replace(
        cfg.train, batch_size=batch, out_dir=out, progress=False, checkpoint_every=0
    )
    extra = {"device": device} if device else {}
    return Trainer(MaskRCNN(cfg.model, rng=0), train_set, tc, comm=comm, **extra)


def time_steps(trainer, steps: int, busy: bool = False, spawn: bool = True) -> dict:
    """2 warm-up steps, then ``steps`` timed quiet steps; with ``busy`` also ``steps`` timed
    steps beside a BusyProcess (started here if ``spawn``: by one rank of several), in
    alternating blocks (quiet, busy, quiet, busy) so both see the same background load.
    ``{"quiet": [s, ...], "busy": [s, ...]}``."""
    for _ in range(2):
        trainer.train_step()
    times = {"quiet": [], "busy": []}
    blocks = ["quiet", "busy"] * 2 if busy else ["quiet"] * 2
    for i, block in enumerate(blocks):
        n = (steps + (i < 2)) // 2 if busy else (steps + (i == 0)) // 2
        with BusyProcess() if block == "busy" and spawn else contextlib.nullcontext():
            for _ in range(n):
                t0 = time.perf_counter()
                trainer.train_step()  # returns logged floats: a GPU step has finished here
                times[block].append(time.perf_counter() - t0)
    return times


def worker(threads: str, steps: int, batch: int, size: int, busy: bool, device=None) -> dict:
    """This process's (this rank's) step times, with ``threads`` BLAS threads ("default": the
    policy's): ``time_steps``'s dict plus ``world``, ``rank`` and ``threads``."""
    from mrcnn_edu import threads as T
    from mrcnn_edu.distributed import get_communicator

    choice = T.configure_threads(None if threads == "default" else threads, say=lambda line: None)
    T.pin_rank(threads=choice.threads)  # with MRCNN_EDU_PIN_CORES=1 under mpiexec, as the demo
    comm = get_communicator(device=device) if device else get_communicator()
    with tempfile.TemporaryDirectory() as out:
        trainer = demo_trainer(batch, size, out, comm, device)
        times = time_steps(trainer, steps, busy, spawn=comm.rank == 0)
    return {**times, "world": comm.world_size, "rank": comm.rank, "threads": T.blas_threads()}


def run_worker(threads, steps, size, batch=BATCH, busy=False, ranks=1, device=None, env=None):
    """``worker`` in a fresh process (``mpiexec -n ranks`` when ranks > 1) with ``env`` added
    to a copy of this environment less the thread variables: its rank 0's result, or
    ``{"error": ...}``."""
    full_env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARIABLES}
    full_env.update(env or {})
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(threads)]
    cmd += ["--steps", str(steps), "--batch", str(batch), "--size", str(size)]
    cmd += (["--busy"] if busy else []) + (["--device", device] if device else [])
    if ranks > 1:
        mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
        if mpiexec is None and shutil.which("mpiexec") is None:
            return {"error": "no mpiexec (pip install 'mrcnn-edu[dist]' brings one)"}
        cmd = [mpiexec or "mpiexec", "-n", str(ranks)] + cmd
    done = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:100]}"}
    return json.loads(lines[-1])


def gpu_count() -> int:
    """CUDA devices CuPy sees (0 without CuPy or a device)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no cupy, no driver, no device
        return 0


# -- the tables --------------------------------------------------------------------------------
A2, A1 = "(a) NumPy, 1 process, 2 threads", "(a) NumPy, 1 process, 1 thread"
B, C, D = "(b) mpiexec -n 2, 1 thread/rank", "(c) CuPy, 1 GPU", "(d) NCCL, all GPUs"
B_FREE = "(b) mpiexec -n 2, ranks not pinned"
TIMEOUT, DEFAULT = "2 threads, OPENBLAS_THREAD_TIMEOUT=4", "default policy"


def measure(steps: int, size: int) -> dict:
    """Every configuration, each in a fresh process: ``{name: worker result}`` (rows (a) and
    the policy rows with busy steps too)."""
    gpus = gpu_count()
    runs = {
        A2: dict(threads=2, busy=True),
        A1: dict(threads=1, busy=True),
        # each rank pinned to its own core, as `mrcnn-edu demo` starts them; then left free
        B: dict(threads=1, ranks=2, batch=BATCH // 2, busy=True, env={PIN_ENV: "1"}),
        B_FREE: dict(threads=1, ranks=2, batch=BATCH // 2, busy=True, env={PIN_ENV: "0"}),
        C: dict(threads=1, device="cuda"),
        D: dict(threads=1, device="cuda", ranks=gpus, batch=BATCH),
        TIMEOUT: dict(threads=2, busy=True, env={"OPENBLAS_THREAD_TIMEOUT": "4"}),
        DEFAULT: dict(threads="default", busy=True),
    }
    results = {}
    for name, kw in runs.items():
        if "device" in kw and not gpus:
            results[name] = {"error": "no GPU"}
        else:
            results[name] = run_worker(steps=steps, size=size, **kw)
    return results


def print_throughput(results: dict, ref: float) -> None:
    """Images/s of (a)-(d), against (a) with 2 threads, with the scaling efficiency."""
    print(
        f"\n{'configuration':34s} {'step s':>7s} {'x ref':>6s} {'images/s':>9s} "
        f"{'vs (a) 2t':>9s} {'efficiency':>10s}"
    )
    rates = {}
    for name in (A2, A1, B, C, D):
        r = results[name]
        if "error" in r:
            print(f"{name:34s} {r['error']}")
            continue
        step = statistics.median(r["quiet"])
        images = BATCH * (r["world"] if name == D else 1)  # (d): 4 images per GPU
        rates[name] = images / step
        alone = {B: A1, D: C}.get(name)  # one rank alone with the same resources
        eff = f"{rates[name] / (r['world'] * rates[alone]):.0%}" if alone in rates else ""
        versus = f"{rates[name] / rates[A2]:.2f}x" if A2 in rates else ""
        label = name if name != D else f"(d) NCCL, {r['world']} GPU(s)"
        print(
            f"{label:34s} {step:7.3f} {step / ref:6.3f} {rates[name]:9.1f} {versus:>9s} {eff:>10s}"
        )


def print_contention(results: dict, ref: float) -> None:
    """Quiet and busy step times of each thread policy; the slowest busy step against the
    policy's own quiet median and against the fastest quiet median of all policies (the
    machine's quiet step); target: both <= 2x."""
    print(
        f"\n{'thread policy':38s} {'quiet s':>7s} {'busy s':>7s} {'slowest':>7s} "
        f"{'/own quiet':>10s} {'/fastest':>8s} {'':7s} {'x ref quiet/busy':>16s}"
    )
    rows = (A1, A2, TIMEOUT, DEFAULT, B, B_FREE)
    policies = [n for n in rows if results[n].get("busy")]
    fastest = min((statistics.median(results[n]["quiet"]) for n in policies), default=None)
    for name in rows:
        r = results[name]
        label = name.removeprefix("(a) NumPy, 1 process, ").removeprefix("(b) ")
        if name not in policies:
            print(f"{label:38s} {r.get('error', 'not measured')}")
            continue
        if name == DEFAULT:
            label += f" ({r['threads']} thread(s) here)"
        quiet, busy = statistics.median(r["quiet"]), statistics.median(r["busy"])
        slowest = max(r["busy"])
        verdict = "ok" if slowest <= 2 * fastest else "over 2x"
        print(
            f"{label:38s} {quiet:7.3f} {busy:7.3f} {slowest:7.3f} {slowest / quiet:9.1f}x "
            f"{slowest / fastest:7.1f}x {verdict:>7s} {quiet / ref:9.3f}/{busy / ref:.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 steps of 64x64 images")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        result = worker(args.worker, args.steps, args.batch, args.size, args.busy, args.device)
        if result.pop("rank") == 0:
            print(json.dumps(result))
        return
    from mrcnn_edu.threads import available_cores, gemm_reference

    steps, size = (2, 64) if args.quick else (args.steps, 128)
    repeats = 10 if args.quick else 100
    ref = gemm_reference(repeats=repeats) * 100 / repeats
    print(
        f"GEMM reference: 100 float32 GEMMs of 1024x1024x1024, NumPy, 2 threads: {ref:.2f} s"
        + (" (estimated from 10)" if args.quick else "")
    )
    print_blas()
    print(
        f"{available_cores()} cores; {steps} timed steps per configuration, {size}x{size} "
        f"images; 'x ref' = seconds / the reference"
    )
    results = measure(steps, size)
    print_throughput(results, ref)
    print_contention(results, ref)
    print("\ntarget: (b) >= 1.4x (a) 2 threads; (c) >= 20x (a); busy slowest <= 2x quiet")


if __name__ == "__main__":
    main()
