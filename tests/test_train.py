"""Trainer: the loop learns, checkpoints resume bit for bit, and failures lose no work.

A toy model stands in for Mask R-CNN. It follows the same protocol (``forward(images, targets)
-> {name: float}``, ``backward()`` with no argument) and, like the real RPN/RoI sampling, draws
random numbers from ``model.rng`` every step, so the generator-restore path is really exercised.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal

import numpy as np
import pytest

from mrcnn_edu import train as train_module
from mrcnn_edu import weights
from mrcnn_edu.nn import layers as L
from mrcnn_edu.nn.losses import smooth_l1, softmax_cross_entropy
from mrcnn_edu.nn.module import Module
from mrcnn_edu.nn.utils import NonFiniteError
from mrcnn_edu.train import (
    TRAJECTORY_FIELDS,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    load_checkpoint_weights,
)
from mrcnn_edu.train_checkpoint import read_run_info
from mrcnn_edu.train_guards import TrainingTerminated
from mrcnn_edu.visualize import plot_training_curves

SIZE = 12


class ToySquares:
    """Dataset protocol: one coloured 4x4 square per image; its colour (R, G or B) is the label."""

    def __init__(self, n: int = 10, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            label = int(rng.integers(0, 3))
            x, y = (int(v) for v in rng.integers(0, SIZE - 4, size=2))
            image = rng.uniform(0, 0.2, (3, SIZE, SIZE)).astype(np.float32)
            image[label, y : y + 4, x : x + 4] = 1.0
            mask = np.zeros((1, SIZE, SIZE), np.uint8)
            mask[0, y : y + 4, x : x + 4] = 1
            self.items.append(
                {
                    "image": image,
                    "boxes": np.array([[x, y, x + 4, y + 4]], np.float32),
                    "labels": np.array([label], np.int64),
                    "masks": mask,
                    "image_id": i,
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class ToyModel(Module):
    """conv3x3 -> ReLU -> maxpool -> two linear heads: colour class (CE) and square centre
    (smooth L1). Inputs get noise drawn from ``self.rng`` (the trainer's generator)."""

    def __init__(self, seed: int = 0, channels: int = 4):
        rng = np.random.default_rng(seed)
        features = channels * (SIZE // 2) ** 2
        self.conv = L.Conv2d(3, channels, 3, padding=1, rng=rng)
        self.relu = L.ReLU()
        self.pool = L.MaxPool2d(2)
        self.flat = L.Flatten()
        self.cls = L.Linear(features, 3, rng=rng)
        self.reg = L.Linear(features, 2, rng=rng)
        self.rng = None
        self.calls = 0  # forward calls on this instance (the failure hooks count them)

    def forward(self, images, targets):
        self.calls += 1
        x = np.stack(images)
        x = x + 0.05 * self.rng.standard_normal(x.shape).astype(np.float32)
        h = self.flat(self.pool(self.relu(self.conv(x))))
        labels = np.array([t["labels"][0] for t in targets])
        centres = np.array([(t["boxes"][0, :2] + t["boxes"][0, 2:]) / (2 * SIZE) for t in targets])
        loss_cls, self._dlogits = softmax_cross_entropy(self.cls(h), labels)
        loss_box, self._dcentres = smooth_l1(self.reg(h), centres, beta=1 / 9, reduction="mean")
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def backward(self):
        dh = self.cls.backward(self._dlogits) + self.reg.backward(self._dcentres)
        self.conv.backward(self.relu.backward(self.pool.backward(self.flat.backward(dh))))


class FailingModel(ToyModel):
    """On its ``fail_at``-th forward call: raises KeyboardInterrupt (``how="interrupt"``) or
    NonFiniteError (``"refuse"``, an op refusing NaN features), or returns a NaN loss
    (``"nan"``); with ``"extra_loss"``, returns one more loss from that call on."""

    def __init__(self, fail_at: int, how: str, **kw):
        super().__init__(**kw)
        self.fail_at, self.how = fail_at, how

    def forward(self, images, targets):
        losses = super().forward(images, targets)
        if self.how == "extra_loss" and self.calls >= self.fail_at:
            return {**losses, "loss_extra": 0.0}
        if self.calls == self.fail_at:
            if self.how == "interrupt":
                raise KeyboardInterrupt
            if self.how == "refuse":
                raise NonFiniteError("the toy's features hold NaN")
            losses["loss_box"] = float("nan")
        return losses


class InfGradModel(ToyModel):
    def __init__(self, fail_at: int, **kw):
        super().__init__(**kw)
        self.fail_at = fail_at

    def backward(self):
        super().backward()
        if self.calls == self.fail_at:
            self.reg.bias.grad[1] = np.inf


def config(tmp_path, name="run", **overrides) -> TrainConfig:
    base = dict(
        lr=0.05,
        batch_size=4,
        max_steps=6,
        warmup_iters=2,
        warmup_factor=0.1,
        milestones=(0.5,),
        checkpoint_every=3,
        log_every=2,
        out_dir=str(tmp_path / name),
        progress=False,
    )
    return TrainConfig(**{**base, **overrides})


def params(model: Module) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in model.state_dict().items()}


def assert_params_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs"


def read_log(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """Drawing the PNG takes ~0.15 s per checkpoint; only the tests about it draw it."""
    monkeypatch.setattr(train_module, "plot_training_curves", lambda *args, **kwargs: None)


@pytest.fixture
def real_plots(monkeypatch):
    monkeypatch.setattr(train_module, "plot_training_curves", plot_training_curves)


@pytest.fixture
def reference(tmp_path):
    """An uninterrupted 6-step run: (final params, log rows)."""
    trainer = Trainer(ToyModel(), ToySquares(), config(tmp_path, "reference"))
    trainer.train()
    return params(trainer.model), read_log(trainer.log_path)


# -- learning ------------------------------------------------------------------------------------


def test_loss_falls_over_50_steps(tmp_path):
    cfg = config(tmp_path, max_steps=50, checkpoint_every=0, log_every=50, milestones=(0.8,))
    result = Trainer(ToyModel(), ToySquares(n=24), cfg).train()
    rows = read_log(result["log"])
    totals = np.array([float(r["total"]) for r in rows])
    assert [int(r["step"]) for r in rows] == list(range(1, 51))
    assert totals[-10:].mean() < 0.5 * totals[:10].mean()
    assert result["step"] == 50 and set(result["losses"]) == {"loss_cls", "loss_box"}


def test_schedule_drives_the_optimizer_and_the_log(tmp_path):
    trainer = Trainer(ToyModel(), ToySquares(), config(tmp_path))
    trainer.train()
    rows = read_log(trainer.log_path)
    # warm-up from 0.1 lr over 2 steps, then lr; round(0.5 * 6) = 3 steps at the higher rate
    expected = [0.005, 0.0275, 0.05, 0.005, 0.005, 0.005]
    assert [float(r["lr"]) for r in rows] == [trainer.scheduler.lr_at(i) for i in range(6)]
    np.testing.assert_allclose([float(r["lr"]) for r in rows], expected, rtol=1e-12)
    for r in rows:
        assert float(r["total"]) == pytest.approx(float(r["loss_cls"]) + float(r["loss_box"]))
    assert list(rows[0]) == ["step", "lr", "loss_cls", "loss_box", "total", "seconds"]


def test_data_order_is_epoch_permutations(tmp_path):
    ds = ToySquares(n=10)
    trainer = Trainer(ToyModel(), ds, config(tmp_path, batch_size=4))
    seen = []
    for _ in range(5):  # 20 items = two full epochs
        _, targets = trainer._next_batch()
        seen += [t["image_id"] for t in targets]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a fresh permutation each epoch


# -- checkpoints and exact resume ----------------------------------------------------------------


def test_resume_from_until_is_bit_identical(tmp_path, reference):
    ref_params, ref_rows = reference
    first = Trainer(ToyModel(), ToySquares(), config(tmp_path, "split"))
    assert first.train(until=3)["step"] == 3
    # A different initialisation: everything must come from the checkpoint.
    second = Trainer(ToyModel(seed=99), ToySquares(), config(tmp_path, "split"))
    second.train(resume=first.last_checkpoint_path)
    assert_params_identical(params(second.model), ref_params)
    assert without_seconds(read_log(second.log_path)) == without_seconds(ref_rows)


def test_resume_is_sensitive_to_the_model_rng(tmp_path, reference):
    """Negative control: without the model generator's state the run is not the same, so the
    bit-identical test above really depends on saving it."""
    ref_params, _ = reference
    first = Trainer(ToyModel(), ToySquares(), config(tmp_path, "split"))
    first.train(until=3)
    second = Trainer(ToyModel(), ToySquares(), config(tmp_path, "split"))
    second.resume(first.last_checkpoint_path)
    second.model_rng.bit_generator.state = np.random.default_rng(5).bit_generator.state
    second.train()
    assert not all(np.array_equal(v, ref_params[k]) for k, v in params(second.model).items())


def test_periodic_checkpoint_resume_drops_later_log_rows(tmp_path, reference):
    ref_params, ref_rows = reference
    cfg = config(tmp_path, "crashed")
    Trainer(ToyModel(), ToySquares(), cfg).train(until=5)  # rows 1..5, checkpoint_3 on disk
    assert len(read_log(os.path.join(cfg.out_dir, "log.csv"))) == 5
    resumed = Trainer(ToyModel(), ToySquares(), cfg)
    resumed.train(resume=os.path.join(cfg.out_dir, "checkpoint_3.npz"))
    rows = read_log(resumed.log_path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert without_seconds(rows) == without_seconds(ref_rows)
    assert_params_identical(params(resumed.model), ref_params)


def test_resume_from_run_folder_uses_last(tmp_path, reference):
    cfg = config(tmp_path, "folder")
    Trainer(ToyModel(), ToySquares(), cfg).train(until=4)
    resumed = Trainer(ToyModel(), ToySquares(), cfg)
    resumed.train(resume=cfg.out_dir)
    assert_params_identical(params(resumed.model), reference[0])


def test_checkpoint_files_are_complete_and_loadable(tmp_path, real_plots):
    trainer = Trainer(ToyModel(), ToySquares(), config(tmp_path))
    trainer.train()
    names = set(os.listdir(trainer.config.out_dir)) - {"loss_curve.png"}  # no temp files left
    assert names == {"checkpoint_3.npz", "checkpoint_6.npz", "last.npz", "log.csv"}
    ckpt = weights.load(trainer.checkpoint_path(3), nested=True)
    assert int(ckpt["step"]) == 3 and str(ckpt["model_class"]) == "ToyModel"
    assert TrainConfig.from_dict(json.loads(str(ckpt["config"]))) == trainer.config
    assert set(ckpt["model"]) == set(trainer.model.state_dict())
    assert len(ckpt["optimizer"]["momentum_buffers"]) == len(trainer.model.parameters())
    assert int(ckpt["scheduler"]["iteration"]) == 3
    assert json.loads(str(ckpt["rng"]["data"]))["bit_generator"] == "PCG64"
    assert sorted(ckpt["data"]["order"].tolist()) == list(range(10))
    last = weights.load(trainer.last_checkpoint_path, nested=True)
    assert int(last["step"]) == 6
    assert_params_identical(last["model"], params(trainer.model))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    with open(trainer.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_load_checkpoint_weights_into_a_fresh_model(tmp_path):
    trainer = Trainer(ToyModel(), ToySquares(), config(tmp_path))
    trainer.train(until=2)
    fresh = load_checkpoint_weights(ToyModel(seed=7), trainer.last_checkpoint_path)
    assert_params_identical(params(fresh), params(trainer.model))
    bare = str(tmp_path / "bare.npz")
    weights.save(bare, trainer.model.state_dict())
    assert_params_identical(params(load_checkpoint_weights(ToyModel(seed=7), bare)), params(fresh))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint_weights(ToyModel(channels=5), bare)


# -- failures lose no work -----------------------------------------------------------------------


def test_keyboard_interrupt_saves_last_good_state(tmp_path, reference):
    cfg = config(tmp_path, "interrupted")
    trainer = Trainer(FailingModel(fail_at=5, how="interrupt"), ToySquares(), cfg)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    ckpt = weights.load(trainer.last_checkpoint_path, nested=True)
    assert int(ckpt["step"]) == 4
    resumed = Trainer(ToyModel(), ToySquares(), cfg)
    resumed.train(resume=trainer.last_checkpoint_path)
    assert_params_identical(params(resumed.model), reference[0])
    assert without_seconds(read_log(resumed.log_path)) == without_seconds(reference[1])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_update_finishes_the_step_first(tmp_path, reference, signum):
    """A real SIGINT (Ctrl-C) or SIGTERM sent while SGD updates the parameters is held back
    until the step (update, counter, log row) is complete; the checkpoint is then the state
    after that step."""
    if signum == signal.SIGTERM:
        needs_default_sigterm()
    cfg = config(tmp_path, "signal")
    trainer = Trainer(ToyModel(), ToySquares(), cfg)
    original_step = trainer.optimizer.step

    def step_with_signal():
        if trainer.optimizer.step_count == 3:  # the 4th update
            os.kill(os.getpid(), signum)
        original_step()

    trainer.optimizer.step = step_with_signal
    raised = TrainingTerminated if signum == signal.SIGTERM else KeyboardInterrupt
    with pytest.raises(raised):
        trainer.train()
    assert trainer.step == 4
    assert int(weights.load(trainer.last_checkpoint_path)["step"]) == 4
    assert [int(r["step"]) for r in read_log(trainer.log_path)] == [1, 2, 3, 4]
    resumed = Trainer(ToyModel(), ToySquares(), cfg)
    resumed.train(resume=cfg.out_dir)
    assert_params_identical(params(resumed.model), reference[0])


def test_nan_loss_stops_without_applying_the_update(tmp_path, capsys):
    cfg = config(tmp_path, "nan")
    trainer = Trainer(FailingModel(fail_at=4, how="nan"), ToySquares(), cfg)
    good = Trainer(ToyModel(), ToySquares(), config(tmp_path, "good"))
    good.train(until=3)
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    err = info.value
    assert (err.step, err.quantity) == (4, "loss_box") and np.isnan(err.value)
    assert "step 4" in str(err) and "loss_box" in str(err) and "last.npz" in str(err)
    assert err.checkpoint == trainer.last_checkpoint_path
    assert "training diverged at step 4" in capsys.readouterr().out
    # the parameters are those after step 3, in memory and on disk
    assert trainer.step == 3
    assert_params_identical(params(trainer.model), params(good.model))
    ckpt = weights.load(trainer.last_checkpoint_path, nested=True)
    assert int(ckpt["step"]) == 3
    assert_params_identical(ckpt["model"], params(good.model))
    # the saved generators are those before the failed step: the same as the good run's
    good_ckpt = weights.load(good.last_checkpoint_path, nested=True)
    assert str(ckpt["rng"]["model"]) == str(good_ckpt["rng"]["model"])
    assert str(ckpt["rng"]["data"]) == str(good_ckpt["rng"]["data"])
    assert [int(r["step"]) for r in read_log(trainer.log_path)] == [1, 2, 3]


def test_infinite_gradient_is_caught_before_the_update(tmp_path):
    trainer = Trainer(InfGradModel(fail_at=2), ToySquares(), config(tmp_path))
    with pytest.raises(TrainingDiverged, match="gradient of reg.bias") as info:
        trainer.train()
    assert info.value.step == 2 and info.value.value == np.inf
    assert int(weights.load(trainer.last_checkpoint_path)["step"]) == 1


def test_resume_after_divergence_with_a_lower_lr_needs_strict_false(tmp_path):
    cfg = config(tmp_path, "nan")
    with pytest.raises(TrainingDiverged):
        Trainer(FailingModel(fail_at=4, how="nan"), ToySquares(), cfg).train()
    lower = dataclasses.replace(cfg, lr=0.01)
    with pytest.raises(ValueError, match="lr: checkpoint 0.05, now 0.01"):
        Trainer(ToyModel(), ToySquares(), lower).resume(cfg.out_dir)
    trainer = Trainer(ToyModel(), ToySquares(), lower).resume(cfg.out_dir, strict=False)
    assert trainer.step == 3 and trainer.optimizer.lr == pytest.approx(0.001)  # after milestone
    assert trainer.train()["step"] == 6


# -- clear errors on resume ----------------------------------------------------------------------


def test_resume_rejects_a_different_model(tmp_path):
    cfg = config(tmp_path)
    Trainer(ToyModel(), ToySquares(), cfg).train(until=1)
    with pytest.raises(ValueError, match="does not fit this ToyModel.*shape mismatch"):
        Trainer(ToyModel(channels=5), ToySquares(), cfg).resume(cfg.out_dir)


def test_resume_rejects_a_different_dataset_size(tmp_path):
    cfg = config(tmp_path)
    Trainer(ToyModel(), ToySquares(), cfg).train(until=1)
    with pytest.raises(ValueError, match="dataset of 10 items, this one has 12"):
        Trainer(ToyModel(), ToySquares(n=12), cfg).resume(cfg.out_dir)


def test_resume_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    path = str(tmp_path / "weights.npz")
    weights.save(path, ToyModel().state_dict())
    with pytest.raises(ValueError, match="not a Trainer checkpoint"):
        Trainer(ToyModel(), ToySquares(), config(tmp_path)).resume(path)


def test_resume_allows_changing_where_and_how_often_to_write(tmp_path, reference):
    cfg = config(tmp_path, "a")
    Trainer(ToyModel(), ToySquares(), cfg).train(until=3)
    moved = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), log_every=1, checkpoint_every=0)
    trainer = Trainer(ToyModel(), ToySquares(), moved)
    trainer.train(resume=cfg.out_dir)
    assert_params_identical(params(trainer.model), reference[0])
    assert [int(r["step"]) for r in read_log(trainer.log_path)] == [4, 5, 6]


# -- progress and logs ---------------------------------------------------------------------------


def test_plain_log_lines_every_log_every(tmp_path, capsys):
    Trainer(ToyModel(), ToySquares(), config(tmp_path, max_steps=5, log_every=2)).train()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/5", "4/5", "5/5"]
    assert "loss_cls" in lines[0] and "total" in lines[0]


def test_progress_bar_shows_losses(tmp_path, capsys):
    pytest.importorskip("tqdm")
    Trainer(ToyModel(), ToySquares(), config(tmp_path, progress=True)).train()
    captured = capsys.readouterr()
    assert "loss_cls=" in captured.err and "6/6" in captured.err
    assert "step 2/6" not in captured.out  # the bar replaces the plain lines


def test_a_failing_plot_does_not_stop_training(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(train_module, "plot_training_curves", broken)
    trainer = Trainer(ToyModel(), ToySquares(), config(tmp_path))
    result = trainer.train()
    assert result["step"] == 6 and result["plot"] is None
    assert "loss curve not drawn: RuntimeError: no fonts" in capsys.readouterr().out
    assert not any(n.endswith(".png") for n in os.listdir(trainer.config.out_dir))


def test_until_must_lie_between_step_and_max_steps(tmp_path):
    trainer = Trainer(ToyModel(), ToySquares(), config(tmp_path))
    with pytest.raises(ValueError, match="until=7 must lie between"):
        trainer.train(until=7)
    trainer.train(until=2)
    with pytest.raises(ValueError, match="until=1 must lie between the current step 2"):
        trainer.train(until=1)


def test_model_must_return_a_loss_dict(tmp_path):
    class Bad(ToyModel):
        def forward(self, images, targets):
            return sum(super().forward(images, targets).values())

    with pytest.raises(ValueError, match="must return a non-empty dict"):
        Trainer(Bad(), ToySquares(), config(tmp_path)).train()


# -- configuration -------------------------------------------------------------------------------


def test_config_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.lr, c.batch_size, c.max_steps, c.momentum, c.weight_decay) == (
        0.02,
        16,
        160_000,
        0.9,
        1e-4,
    )
    assert c.milestone_steps() == [120_000] and c.gamma == 0.1


def test_config_from_dict_round_trips_and_rejects_unknown_keys():
    c = TrainConfig.from_dict(
        {"lr": 0.01, "milestones": [0.5, 0.9], "max_steps": 100, "warmup_iters": 10}
    )
    assert c.milestones == (0.5, 0.9) and c.milestone_steps() == [50, 90]
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['lrr'\]; valid keys are"):
        TrainConfig.from_dict({"lrr": 0.1})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", 0, "lr must be > 0"),
        ("lr", float("nan"), "lr must be finite"),
        ("lr", "0.1", "lr must be a number"),
        ("momentum", 1.0, "momentum must lie in"),
        ("weight_decay", -1e-4, "weight_decay must be >= 0"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("batch_size", 2.5, "batch_size must be an integer"),
        ("max_steps", True, "max_steps must be an integer"),
        ("warmup_iters", 200, "exceeds max_steps"),
        ("warmup_factor", 0.0, "warmup_factor must lie in"),
        ("milestones", (0.8, 0.5), "strictly increasing"),
        ("milestones", (120,), "fractions of max_steps"),
        ("milestones", (0.5, 0.501), "give steps"),
        ("milestones", 0.75, "must be a list"),
        ("gamma", 0.0, "gamma must lie in"),
        ("checkpoint_every", -1, "checkpoint_every must be >= 0"),
        ("log_every", 0, "log_every must be >= 1"),
        ("seed", -1, "seed must be >= 0"),
        ("out_dir", "", "out_dir must be a non-empty path"),
        ("progress", "yes", "progress must be True or False"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"max_steps": 100, "warmup_iters": 10, field: value})


def test_trajectory_fields_are_config_fields():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(TRAJECTORY_FIELDS) <= names
    assert names - set(TRAJECTORY_FIELDS) == {
        "checkpoint_every",
        "log_every",
        "eval_every",
        "out_dir",
        "progress",
    }


# -- SIGTERM and the message of an early stop ---------------------------------------------------


def needs_default_sigterm():
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM has a handler in this process; the trainer leaves it alone")


class TerminatedModel(ToyModel):
    """Sends SIGTERM to its own process during its ``at``-th forward call."""

    def __init__(self, at: int, **kw):
        super().__init__(**kw)
        self.at = at

    def forward(self, images, targets):
        losses = super().forward(images, targets)
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses


def test_sigterm_saves_the_state_like_ctrl_c(tmp_path, reference):
    needs_default_sigterm()
    cfg = config(tmp_path, "terminated")
    trainer = Trainer(TerminatedModel(at=5), ToySquares(), cfg)
    with pytest.raises(TrainingTerminated):
        trainer.train()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    assert int(weights.load(trainer.last_checkpoint_path)["step"]) == 4
    resumed = Trainer(ToyModel(), ToySquares(), cfg)
    resumed.train(resume=cfg.out_dir)
    assert_params_identical(params(resumed.model), reference[0])
    assert without_seconds(read_log(resumed.log_path)) == without_seconds(reference[1])


def test_one_message_names_how_to_continue(tmp_path, capsys):
    cfg = config(tmp_path, "stopped")
    command = "mrcnn-edu train --resume runs/x"
    trainer = Trainer(FailingModel(fail_at=5, how="interrupt"), ToySquares(), cfg)
    trainer.resume_command = command
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.train()
    assert info.value.saved_checkpoint == trainer.last_checkpoint_path
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "saved" in ln]
    assert lines == [
        f"interrupted (Ctrl-C): the state after step 4 is saved in {trainer.last_checkpoint_path}"
        f"; continue exactly where it stopped with `{command}`"
    ]
    diverging = Trainer(FailingModel(fail_at=2, how="nan"), ToySquares(), config(tmp_path, "nan"))
    diverging.resume_command = command
    with pytest.raises(TrainingDiverged):
        diverging.train()
    said = capsys.readouterr().out
    assert said.count("training diverged") == 1
    assert f"`{command} --lr 0.025` (half the rate" in said and "non-strict" in said
    api = Trainer(FailingModel(fail_at=2, how="interrupt"), ToySquares(), config(tmp_path, "api"))
    with pytest.raises(KeyboardInterrupt):
        api.train()
    assert f"trainer.train(resume={api.last_checkpoint_path!r})" in capsys.readouterr().out


# -- evaluation during training ------------------------------------------------------------------


class ScriptedEvaluation:
    """An evaluate callable that, like a real one, runs the model (which draws from model.rng)
    and draws numbers itself; returns the next scripted score and records the model's mode."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.modes: list[bool] = []
        self.batch = ToySquares(n=2, seed=5).items

    def __call__(self, model):
        self.modes.append(model.training)
        model.rng.standard_normal(7)
        losses = model.forward([it["image"] for it in self.batch], self.batch)
        return {"score": self.scores.pop(0), "val_loss": sum(losses.values())}


def eval_trainer(tmp_path, name, scores, **overrides):
    cfg = config(tmp_path, name, **{"eval_every": 2, **overrides})
    evaluate = ScriptedEvaluation(scores)
    trainer = Trainer(
        ToyModel(), ToySquares(), cfg, evaluate=evaluate, metrics=("score", "val_loss")
    )
    return trainer, evaluate


def test_evaluation_does_not_change_the_run(tmp_path, reference):
    first, evaluate = eval_trainer(tmp_path, "eval", [0.1, 0.2, 0.3])
    first.train(until=3)
    assert evaluate.modes == [False] and first.model.training  # eval mode, then back
    second, _ = eval_trainer(tmp_path, "eval", [0.2, 0.3])
    second.train(resume=first.last_checkpoint_path)
    assert_params_identical(params(second.model), reference[0])  # as if never evaluated
    rows = read_log(second.log_path)
    losses = [{k: r[k] for k in ("step", "lr", "loss_cls", "loss_box", "total")} for r in rows]
    assert losses == [{k: r[k] for k in losses[0]} for r in reference[1]]
    assert [r["score"] for r in rows] == ["", "0.1", "", "0.2", "", "0.3"]
    assert list(rows[0])[-2:] == ["score", "val_loss"]


def test_best_checkpoint_keeps_the_highest_score_across_a_resume(tmp_path, capsys):
    first, _ = eval_trainer(tmp_path, "best", [0.1, 0.5])
    first.train(until=4)
    assert int(weights.load(first.best_checkpoint_path)["step"]) == 4
    best = first.best_checkpoint_path
    second, _ = eval_trainer(tmp_path, "best", [0.3])
    result = second.train(resume=first.last_checkpoint_path)
    assert int(weights.load(best)["step"]) == 4  # 0.3 at step 6 is not better than 0.5
    assert result["best"] == best and result["evaluation"]["score"] == 0.3
    said = capsys.readouterr().out
    assert "eval at step 6: score 0.3000" in said
    assert "validation: best score 0.5000 at step 4, kept in best.npz; last score 0.3000" in said


def test_evaluation_needs_an_evaluate_returning_the_metrics(tmp_path):
    with pytest.raises(ValueError, match="eval_every=2 needs an evaluate callable"):
        Trainer(ToyModel(), ToySquares(), config(tmp_path, eval_every=2))
    trainer = Trainer(
        ToyModel(),
        ToySquares(),
        config(tmp_path, eval_every=2),
        evaluate=lambda model: {"other": 1.0},
        metrics=("score",),
    )
    with pytest.raises(ValueError, match=r"must return a dict with the metrics \['score'\]"):
        trainer.train()


def test_log_gains_score_columns_when_a_resumed_run_evaluates(tmp_path):
    cfg = config(tmp_path, "late")
    Trainer(ToyModel(), ToySquares(), cfg).train(until=3)
    later, _ = eval_trainer(tmp_path, "late", [0.4, 0.6], eval_every=4)
    later.train(resume=cfg.out_dir)
    rows = read_log(later.log_path)
    assert [r["score"] for r in rows] == ["", "", "", "0.4", "", "0.6"]


def test_training_curves_get_a_score_panel():
    from mrcnn_edu.visualize import _training_curves_figure

    log = {
        "step": np.arange(1.0, 7.0),
        "lr": np.full(6, 0.1),
        "loss_cls": np.linspace(1.0, 0.5, 6),
        "segm_AP": np.array([np.nan, 0.1, np.nan, 0.3, np.nan, 0.4]),
    }
    pytest.importorskip("matplotlib")
    fig = _training_curves_figure(log, "step")
    losses, scores, lr = fig.axes
    assert [ln.get_label() for ln in losses.lines] == ["loss_cls"]
    (line,) = scores.lines
    assert line.get_label() == "segm_AP" and list(line.get_xdata()) == [2.0, 4.0, 6.0]
    no_scores = {k: v for k, v in log.items() if k != "segm_AP"}
    assert len(_training_curves_figure(no_scores, "step").axes) == 2  # losses and the lr axis


# -- what a checkpoint records, and leftovers ----------------------------------------------------


def test_resume_refuses_another_data_fingerprint(tmp_path):
    cfg = config(tmp_path)
    Trainer(ToyModel(), ToySquares(), cfg, data_fingerprint="shapes seed=1").train(until=2)
    other = Trainer(ToyModel(), ToySquares(), cfg, data_fingerprint="shapes seed=2")
    with pytest.raises(
        ValueError, match=r"other data \(shapes seed=1\), this run has shapes seed=2"
    ):
        other.resume(cfg.out_dir)
    Trainer(ToyModel(), ToySquares(), cfg).resume(cfg.out_dir)  # no fingerprint: not compared


def test_an_incomplete_checkpoint_names_what_it_lacks(tmp_path):
    trainer = Trainer(ToyModel(), ToySquares(), config(tmp_path))
    state = trainer.state_dict()
    del state["rng"], state["step"]
    path = str(tmp_path / "incomplete.npz")
    weights.save(path, state)
    with pytest.raises(ValueError, match=r"lacks \['step', 'rng/data', 'rng/model'\]"):
        trainer.resume(path)


def test_run_info_is_kept_and_read_without_the_parameters(tmp_path):
    cfg = config(tmp_path)
    trainer = Trainer(ToyModel(), ToySquares(), cfg, run_info={"config": '{"a": 1}', "note": "x"})
    trainer.train(until=1)
    assert read_run_info(cfg.out_dir) == {"config": '{"a": 1}', "note": "x"}
    bare = str(tmp_path / "bare.npz")
    weights.save(bare, trainer.model.state_dict())
    assert read_run_info(bare) == {}


def test_leftover_temp_files_are_removed_when_training_starts(tmp_path, capsys):
    cfg = config(tmp_path)
    os.makedirs(cfg.out_dir)
    leftovers = [
        ".last.npz.4194305.abcdef12.tmp",
        ".log.csv.4194305.abcdef12.tmp",
        ".abcdef12.loss_curve.png",
    ]
    for name in leftovers + ["keep.tmp"]:
        open(os.path.join(cfg.out_dir, name), "w").close()
    Trainer(ToyModel(), ToySquares(), cfg).train(until=1)
    names = set(os.listdir(cfg.out_dir))
    assert "keep.tmp" in names and not set(leftovers) & names
    assert "removed temporary files of interrupted writes" in capsys.readouterr().out


def test_a_checkpoint_without_the_optional_entries_still_resumes(tmp_path, reference):
    """Checkpoints written before the data fingerprint and run records existed."""
    cfg = config(tmp_path, "older")
    first = Trainer(ToyModel(), ToySquares(), cfg, data_fingerprint="f", run_info={"a": "b"})
    first.train(until=3)
    state = weights.load(first.last_checkpoint_path, nested=True)
    del state["data"]["fingerprint"], state["run"]
    weights.save(first.last_checkpoint_path, state)
    resumed = Trainer(ToyModel(), ToySquares(), cfg, data_fingerprint="f")
    resumed.train(resume=cfg.out_dir)
    assert_params_identical(params(resumed.model), reference[0])
