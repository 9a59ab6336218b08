"""Training on a device: the Trainer and the command line with ``device=`` / ``--device``.

There is no GPU in CI, so the device is the strict fake one of ``tests/fake_device.py``: NumPy
underneath (the numbers are those of the host, bit for bit), CuPy's rules on top (no host
array mixed in, every host sync counted). What is checked: the model trains on the device and
ends where a host run ends; checkpoints hold host arrays, so a run moves between devices at a
resume; one training step syncs the host twice (the losses, the gradient check); ``--device``
is refused before anything is written when the device is missing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os

import numpy as np
import pytest
from fake_device import fake_device
from test_train import SIZE, ToySquares

from mrcnn_edu import cli, weights
from mrcnn_edu.backend import (
    device_of,
    get_xp,
    gpu_available,
    is_device_array,
    to_device,
    to_host,
)
from mrcnn_edu.nn.module import Module, Param
from mrcnn_edu.train import TrainConfig, Trainer, TrainingDiverged


class Regressor(Module):
    """The square's centre from the pixels, ``y = x W + b``, with two squared-error losses
    kept on the model's device as 0-d arrays (what a model that never syncs returns). Inputs
    get noise from ``self.rng`` (the trainer's generator), drawn on the host."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        features = 3 * SIZE * SIZE
        self.weight = Param((0.01 * rng.standard_normal((features, 2))).astype(np.float32))
        self.bias = Param(np.zeros(2, np.float32))
        self.rng = None
        self.poison_at = 0  # the forward call whose gradient gets an inf (0: none)
        self.calls = 0

    def forward(self, images, targets):
        self.calls += 1
        device = device_of(self.weight.data)
        x = np.stack(images).reshape(len(images), -1)
        x = x + 0.05 * self.rng.standard_normal(x.shape).astype(np.float32)
        t = np.array([(t["boxes"][0, :2] + t["boxes"][0, 2:]) / (2 * SIZE) for t in targets])
        x, t = to_device(x, device), to_device(t.astype(np.float32), device)
        err = x @ self.weight.data + self.bias.data - t
        self.cache = (x, err)
        xp = get_xp(err)
        return {"loss_x": xp.mean(err[:, 0] ** 2), "loss_y": xp.mean(err[:, 1] ** 2)}

    def backward(self):
        x, err = self.forward_cache()
        g = 2 * err / err.shape[0]  # d/d err of mean(err[:, 0]^2) + mean(err[:, 1]^2)
        self.weight.grad += x.T @ g
        self.bias.grad += g.sum(axis=0)
        if self.calls == self.poison_at:
            self.weight.grad[5, 1] = np.inf


def config(tmp_path, name, **overrides) -> TrainConfig:
    base = dict(lr=0.01, batch_size=3, max_steps=6, warmup_iters=2, milestones=(0.5,),
                checkpoint_every=3, out_dir=str(tmp_path / name), progress=False)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def host_params(model) -> dict:
    """Copies of the parameters, on the host."""
    return {k: np.array(to_host(v)) for k, v in model.state_dict().items()}


def log_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.fixture
def host_run(tmp_path):
    """An uninterrupted 6-step run on the host: (params, log rows without seconds)."""
    trainer = Trainer(Regressor(), ToySquares(), config(tmp_path, "host"))
    trainer.train()
    return host_params(trainer.model), log_rows(trainer.log_path)


def test_training_on_the_device_ends_where_the_host_run_ends(tmp_path, host_run):
    params, rows = host_run
    assert float(rows[-1]["total"]) < 0.5 * float(rows[0]["total"])  # it learns
    with fake_device():
        trainer = Trainer(Regressor(), ToySquares(), config(tmp_path, "dev"), device="fake")
        assert trainer.device == "fake" and is_device_array(trainer.model.weight.data)
        trainer.train()
        assert is_device_array(trainer.model.weight.data)  # it trained there
        assert all(is_device_array(b) for b in trainer.optimizer.momentum_buffers)
        got = host_params(trainer.model)
    for k in params:
        assert np.array_equal(got[k], params[k]), k
    assert log_rows(trainer.log_path) == rows
    saved = weights.load(str(tmp_path / "dev" / "checkpoint_3.npz"), nested=True)
    for part in (saved["model"], saved["optimizer"]["momentum_buffers"]):
        assert part and all(type(v) is np.ndarray for v in part.values())


@pytest.mark.parametrize("first, then", [("fake", "cpu"), ("cpu", "fake")])
def test_a_run_resumes_exactly_on_the_other_device(tmp_path, host_run, first, then):
    with fake_device():
        cfg = config(tmp_path, "split")
        Trainer(Regressor(), ToySquares(), cfg, device=first).train(until=3)
        trainer = Trainer(Regressor(seed=9), ToySquares(), cfg, device=then)
        trainer.train(resume=cfg.out_dir)
        assert device_of(trainer.model.weight.data) == then
        got = host_params(trainer.model)
    params, rows = host_run
    for k in params:
        assert np.array_equal(got[k], params[k]), k
    assert log_rows(trainer.log_path) == rows


def test_one_training_step_syncs_the_host_twice(tmp_path):
    """The losses come over in one transfer, the gradient check in another; nothing else."""
    with fake_device() as dev:
        trainer = Trainer(Regressor(), ToySquares(), config(tmp_path, "s"), device="fake")
        trainer.train_step()  # the first step creates the momentum buffers
        dev.reset_counts()
        losses = trainer.train_step()
        assert dev.syncs == 2 and all(s.startswith("get ") for s in dev.sync_log), dev.sync_log
        assert set(losses) == {"loss_x", "loss_y"}
        assert all(type(v) is float for v in losses.values())


def test_a_nonfinite_gradient_on_the_device_stops_before_the_update(tmp_path):
    with fake_device():
        model = Regressor()
        model.poison_at = 2
        trainer = Trainer(model, ToySquares(), config(tmp_path, "nan"), device="fake")
        trainer.train_step()
        before = host_params(trainer.model)
        with pytest.raises(TrainingDiverged) as info:
            trainer.train_step()
        assert info.value.quantity == "gradient of weight" and info.value.value == np.inf
        after = host_params(trainer.model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


# -- the command line ---------------------------------------------------------------------------
def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


MISSING = ["cuda:99", "tpu"] + ([] if gpu_available() else ["cuda"])


@pytest.mark.parametrize("device", MISSING)
@pytest.mark.parametrize("command", ["train", "demo", "evaluate", "predict"])
def test_a_missing_device_is_refused_before_anything_is_written(tmp_path, command, device):
    out = tmp_path / "run"
    argv = {
        "train": ["train", "--out", out],
        "demo": ["demo", "--quick", "--out", out],
        "evaluate": ["evaluate", "--run", out, "--out", tmp_path / "ev"],
        "predict": ["predict", "img.png", "--run", out, "--out", tmp_path / "p.png"],
    }[command]
    code, stdout, stderr = run_cli(argv + ["--device", device])
    assert code == 2
    assert stderr.startswith(f"mrcnn-edu {command}: error: --device {device}: ")
    assert "Traceback" not in stderr and stdout == ""
    assert os.listdir(tmp_path) == []  # no run folder, no figure


def tiny_config(path) -> str:
    """A run config: the small model on six 64x64 shapes images (two held out), one image per
    step."""
    from mrcnn_edu.mask_rcnn import MaskRCNNConfig
    from mrcnn_edu.run_config import DataConfig, RunConfig, demo_train_config

    train = demo_train_config(batch_size=1, checkpoint_every=2, progress=False, log_every=1)
    data = DataConfig(num_train=4, num_val=2, image_size=(64, 64))
    RunConfig(MaskRCNNConfig.small(3), train, data).save(str(path))
    return str(path)


def test_cli_trains_on_the_device_and_resumes_on_the_cpu(tmp_path):
    """``train --device``: the real model trains and evaluates on the (fake) device, prints
    it, writes host checkpoints; ``--resume`` on the CPU continues the same run."""
    run = tmp_path / "run"
    config = tiny_config(tmp_path / "run.json")
    with fake_device():
        code, out, err = run_cli(["train", "--config", config, "--out", run, "--steps", 4,
                                  "--device", "fake"])  # fmt: skip
        assert code == 0, err
        code, out, err = run_cli(["train", "--config", config, "--out", tmp_path / "part",
                                  "--steps", 4, "--device", "fake", "--eval-every", 2])  # fmt: skip
        assert code == 0, err
    assert "device: fake" in out
    state = weights.load(str(run / "last.npz"), nested=True)
    assert int(state["step"]) == 4 and type(state["model"]["rpn.head.conv.weight"]) is np.ndarray
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["segm"]["AP"] <= 1
    # the second run evaluated on the device at step 2 (a segm_AP in its log), then stopped
    rows = log_rows(tmp_path / "part" / "log.csv")
    assert rows[1]["segm_AP"] != "" and rows[0]["segm_AP"] == ""
    # continue a 2-step checkpoint of the device run on the CPU, up to the same step 4
    os.remove(tmp_path / "part" / "last.npz")
    os.replace(tmp_path / "part" / "checkpoint_2.npz", tmp_path / "part" / "last.npz")
    code, out, err = run_cli(["train", "--resume", tmp_path / "part", "--device", "cpu"])
    assert code == 0, err
    assert "device: cpu" in out and "resumed from" in out
    resumed = weights.load(str(tmp_path / "part" / "last.npz"), nested=True)
    assert int(resumed["step"]) == 4
    for k, v in state["model"].items():
        np.testing.assert_allclose(resumed["model"][k], v, rtol=1e-4, atol=1e-5, err_msg=k)
