"""Never lose a run: the CLI's run folder under refused resumes, reused folders, signals,
divergence, leftover temporary files and resumes on other data; training with a validation set;
the class names a run records.

Every run here is the real pipeline (``mrcnn-edu train``/``run_demo``) on a tiny config: the
small model on a few 64x64 shapes images, a handful of steps.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mrcnn_edu import cli, weights
from mrcnn_edu.data.shapes import ShapesDataset, write_coco
from mrcnn_edu.demo import run_demo
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.run_config import DataConfig, RunConfig, demo_train_config, load_run_classes
from mrcnn_edu.train_log import has_rows

pytest.importorskip("pycocotools")


def tiny_config(out, steps: int = 4, **train) -> RunConfig:
    """The small model on four 64x64 shapes images (two held out), a few steps of one image."""
    schedule = dict(max_steps=steps, batch_size=1, lr=0.002, warmup_iters=1, milestones=(0.5,))
    files = dict(out_dir=str(out), checkpoint_every=2, log_every=1, progress=False)
    return RunConfig(
        model=MaskRCNNConfig.small(3),
        train=demo_train_config(**{**schedule, **files, **train}),
        data=DataConfig(num_train=4, num_val=2, image_size=(64, 64)),
    )


def write_config(path, cfg: RunConfig) -> str:
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


def read_log(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def files_and_bytes(folder) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_demo(tiny_config(out))
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
    """A COCO export of 6 shapes images with category ids 3, 7, 9 (not 1..K)."""
    root = tmp_path_factory.mktemp("coco")
    json_path = write_coco(ShapesDataset(6, image_size=(64, 64), seed=4), root)
    content = json.loads(open(json_path).read())
    remap = {1: 3, 2: 7, 3: 9}
    for c in content["categories"]:
        c["id"] = remap[c["id"]]
    for a in content["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    with open(json_path, "w") as f:
        json.dump(content, f)
    return json_path, str(root / "images"), [c["name"] for c in content["categories"]]


# -- a refused resume changes nothing; a checkpoint alone describes its run ----------------------


def test_refused_resume_leaves_the_run_as_it_was(run, tmp_path, capsys):
    before = files_and_bytes(run)
    other = tiny_config(run)
    other.model = MaskRCNNConfig.from_dict(
        {**other.model.to_dict(), "rpn": {**other.model.to_dict()["rpn"], "nms_thresh": 0.6}}
    )
    args = ["train", "--resume", str(run), "--config", write_config(tmp_path / "o.json", other)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "config differs from this run's (model.rpn.nms_thresh: was 0.7, now 0.6)" in err
    assert files_and_bytes(run) == before  # config.json above all: evaluate still works
    assert cli.main(["evaluate", "--run", str(run)]) == 0


def test_evaluate_and_predict_from_a_checkpoint_alone(run, tmp_path, capsys):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "last.npz", alone / "last.npz")
    assert cli.main(["evaluate", "--run", str(alone)]) == 0
    assert "Average Precision" in capsys.readouterr().out
    from PIL import Image

    image = ShapesDataset(1, image_size=(64, 64), seed=9)[0]["image"]
    png = tmp_path / "shape.png"
    Image.fromarray((image.transpose(1, 2, 0) * 255).astype(np.uint8)).save(png)
    figure = tmp_path / "pred.png"
    assert cli.main(["predict", str(png), "--run", str(alone), "--out", str(figure)]) == 0
    assert figure.stat().st_size > 1000


def test_checkpoints_carry_the_run_config_and_classes(run):
    saved = weights.load(run / "checkpoint_2.npz", nested=True)
    config = json.loads(str(saved["run"]["config"]))
    assert RunConfig.from_dict(config).model == tiny_config(run).model
    classes = json.loads(str(saved["run"]["classes"]))
    assert classes == {"class_names": ["circle", "square", "triangle"], "category_ids": [1, 2, 3]}
    assert json.loads((run / "classes.json").read_text()) == classes
    assert str(saved["data"]["fingerprint"]) == "shapes num_train=4 train_seed=1 size=64x64"


# -- a folder holding a run is only reused on purpose --------------------------------------------


@pytest.mark.parametrize("marker", ["config.json", "log.csv", "mine.npz"])
def test_train_refuses_a_folder_that_holds_a_run(tmp_path, marker, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("an earlier run's file")
    config = write_config(tmp_path / "c.json", tiny_config(out))
    assert cli.main(["train", "--config", config, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and marker in err and "--overwrite" in err
    assert os.listdir(out) == [marker] and (out / marker).read_text() == "an earlier run's file"


def test_demo_refuses_a_folder_that_holds_a_run(run, capsys):
    before = files_and_bytes(run)
    assert cli.main(["demo", "--quick", "--out", str(run), "--no-progress"]) == 2
    assert f"mrcnn-edu train --resume {run}" in capsys.readouterr().err
    assert files_and_bytes(run) == before


def test_overwrite_deletes_the_old_runs_files_only(run, tmp_path):
    (run / "notes.txt").write_text("mine")
    (run / "checkpoint_100.npz").write_bytes((run / "last.npz").read_bytes())
    cfg = tiny_config(run, steps=3, checkpoint_every=0)
    config = write_config(tmp_path / "c.json", cfg)
    assert cli.main(["train", "--config", config, "--overwrite"]) == 0
    names = set(os.listdir(run))
    assert "notes.txt" in names  # not a run's file: kept
    assert not {"checkpoint_2.npz", "checkpoint_4.npz", "checkpoint_100.npz"} & names
    assert [int(r["step"]) for r in read_log(run / "log.csv")] == [1, 2, 3]
    assert int(weights.load(run / "last.npz")["step"]) == 3


def test_resume_and_overwrite_exclude_each_other(run, capsys):
    assert cli.main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_resume_into_a_folder_holding_another_run_is_refused(run, finished_run, capsys):
    assert cli.main(["train", "--resume", str(finished_run), "--out", str(run)]) == 2
    assert "another run than the one resumed" in capsys.readouterr().err


# -- signals and divergence: the state saved, one message, the exit status ----------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 12-step run the signal tests interrupt, run without interruption."""
    out = tmp_path_factory.mktemp("whole") / "run"
    run_demo(tiny_config(out, steps=12, checkpoint_every=0))
    return out


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_state_and_resume_finishes_exactly(
    tmp_path, uninterrupted, signum, status
):
    out = tmp_path / "run"
    cfg = tiny_config(out, steps=12, checkpoint_every=0)
    command = [sys.executable, "-m", "mrcnn_edu.cli", "train", "--no-progress"]
    command += ["--config", write_config(tmp_path / "c.json", cfg)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Python turns SIGINT into KeyboardInterrupt only if it is not ignored at start.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not has_rows(str(out / "log.csv")):  # the first step is logged
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no step logged in 2 minutes"
        time.sleep(0.01)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr
    assert "Traceback" not in stdout + stderr
    step = int(weights.load(out / "last.npz")["step"])
    assert 1 <= step < 12
    said = [line for line in stdout.splitlines() if "--resume" in line]
    assert len(said) == 1 and f"state after step {step} is saved" in said[0]
    assert f"`mrcnn-edu train --resume {out}`" in said[0]
    assert ("SIGTERM" in said[0]) == (signum == signal.SIGTERM)

    assert cli.main(["train", "--resume", str(out)]) == 0
    rows, reference = read_log(out / "log.csv"), read_log(uninterrupted / "log.csv")
    assert [r["total"] for r in rows] == [r["total"] for r in reference]
    final, whole = (weights.load(p / "last.npz", nested=True) for p in (out, uninterrupted))
    assert all(np.array_equal(final["model"][k], whole["model"][k]) for k in whole["model"])


def test_divergence_exits_1_naming_resume_with_a_lower_lr(tmp_path, monkeypatch, capsys):
    forward, calls = MaskRCNN.forward, []

    def diverging(self, images, targets, proposals=None):
        losses = forward(self, images, targets, proposals)
        calls.append(1)
        return {**losses, "loss_mask": float("nan")} if len(calls) == 3 else losses

    monkeypatch.setattr(MaskRCNN, "forward", diverging)
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.json", tiny_config(out, steps=6))
    assert cli.main(["train", "--config", config]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("training diverged at step 3") == 1 and not captured.err
    assert f"`mrcnn-edu train --resume {out} --lr 0.001`" in captured.out
    assert int(weights.load(out / "last.npz")["step"]) == 2
    monkeypatch.undo()
    assert cli.main(["train", "--resume", str(out), "--lr", "0.001"]) == 0
    assert "with changed lr (not strict" in capsys.readouterr().out
    rows = read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert float(rows[2]["lr"]) == pytest.approx(0.001)  # step 3 at the new rate (no decay yet)


# -- leftovers and other data --------------------------------------------------------------------


def test_leftover_temp_files_are_removed_on_the_next_start(run, capsys):
    leftovers = [
        ".last.npz.4194305.0badf00d.tmp",  # weights.save (a process id above Linux's maximum)
        ".log.csv.4194305.0badf00d.tmp",  # the log's rewrite
        "log.csv.0badf00d.tmp",  # the log's rewrite, earlier name
        ".0badf00d.loss_curve.png",  # the figures (run_folder.atomic_save)
        ".0badf00d.predictions.png",
    ]
    # not temporary names, and a write of a process that is still running (our parent)
    kept = ["notes.tmp", ".hidden.tmp", "my.loss_curve.png", f".x.npz.{os.getppid()}.0badf00d.tmp"]
    for name in leftovers + kept:
        (run / name).write_text("x")
    assert cli.main(["train", "--resume", str(run)]) == 0
    names = set(os.listdir(run))
    assert not set(leftovers) & names and set(kept) <= names
    assert "removed temporary files of interrupted writes" in capsys.readouterr().out


def test_resume_with_another_data_seed_is_refused(run, tmp_path, capsys):
    before = files_and_bytes(run)
    other = tiny_config(run)
    other.data = DataConfig(num_train=4, num_val=2, image_size=(64, 64), train_seed=5)
    args = ["train", "--resume", str(run), "--config", write_config(tmp_path / "c.json", other)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "trained on other data (shapes num_train=4 train_seed=1" in err
    assert "train_seed=5" in err
    assert files_and_bytes(run) == before


def test_resume_with_other_augmentations_is_refused(run, capsys):
    before = files_and_bytes(run)
    assert cli.main(["train", "--resume", str(run), "--augment", "hflip"]) == 2
    assert "data.augment.hflip: was False, now True" in capsys.readouterr().err
    assert files_and_bytes(run) == before


def test_resume_with_an_edited_coco_json_is_refused(coco_data, tmp_path, capsys):
    json_path, images, _ = coco_data
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.json", tiny_config(out, steps=2))
    assert cli.main(["train", "--config", config, "--data", json_path, "--images", images]) == 0
    edited = json.loads(open(json_path).read())
    edited["categories"][0]["name"] = "disc"  # same size, other content
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    args = ["train", "--resume", str(out), "--data", str(tmp_path / "edited.json")]
    assert cli.main(args + ["--images", images]) == 2
    assert "trained on other data (COCO annotations with sha256" in capsys.readouterr().err


# -- validation during training, class names -----------------------------------------------------


def test_training_with_a_validation_set(coco_data, tmp_path, capsys):
    json_path, images, names = coco_data
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.json", tiny_config(out, steps=4, checkpoint_every=0))
    args = ["train", "--config", config, "--data", json_path, "--images", images]
    assert cli.main(args + ["--val-data", json_path, "--eval-every", "2"]) == 0
    printed = capsys.readouterr().out
    rows = read_log(out / "log.csv")
    scores = ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50")
    assert list(rows[0])[-4:] == list(scores)
    assert [[r[k] != "" for k in scores] for r in rows] == [[s % 2 == 0] * 4 for s in (1, 2, 3, 4)]
    for r in (rows[1], rows[3]):
        assert all(0.0 <= float(r[k]) <= 1.0 for k in scores)
    best_step = 2 if float(rows[1]["segm_AP"]) >= float(rows[3]["segm_AP"]) else 4
    assert int(weights.load(out / "best.npz")["step"]) == best_step
    assert (
        f"validation: best segm_AP {float(rows[best_step - 1]['segm_AP']):.4f} at step" in printed
    )
    assert load_run_classes(str(out)) == (tuple(names), [3, 7, 9])
    assert (out / "loss_curve.png").stat().st_size > 1000


def test_val_data_alone_evaluates_at_the_checkpoint_interval(coco_data, tmp_path):
    json_path, images, _ = coco_data
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.json", tiny_config(out, steps=3, checkpoint_every=2))
    args = ["train", "--config", config, "--data", json_path, "--images", images]
    assert cli.main(args + ["--val-data", json_path]) == 0
    rows = read_log(out / "log.csv")
    assert [r["segm_AP"] != "" for r in rows] == [False, True, True]  # step 2 and the end
    assert json.loads((out / "config.json").read_text())["train"]["eval_every"] == 2


def test_load_run_classes_from_the_folder_or_a_checkpoint(coco_data, tmp_path):
    json_path, images, names = coco_data
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.json", tiny_config(out, steps=2))
    assert cli.main(["train", "--config", config, "--data", json_path, "--images", images]) == 0
    expected = (tuple(names), [3, 7, 9])
    assert load_run_classes(str(out)) == expected
    os.remove(out / "classes.json")
    os.remove(out / "config.json")
    assert load_run_classes(str(out)) == expected  # from last.npz
    assert load_run_classes(str(out / "checkpoint_2.npz")) == expected
    (out / "classes.json").write_text(json.dumps({"class_names": ["a"], "category_ids": [1, 2]}))
    with pytest.raises(ValueError, match="one per class"):
        load_run_classes(str(out))
    with pytest.raises(FileNotFoundError, match="run config not found"):
        load_run_classes(str(tmp_path / "empty"))


def test_classes_of_a_run_that_did_not_record_them(run):
    os.remove(run / "classes.json")
    for name in os.listdir(run):
        if name.endswith(".npz"):
            os.remove(run / name)
    assert load_run_classes(str(run)) == (("circle", "square", "triangle"), [1, 2, 3])


def test_atomic_save_leaves_the_old_file_and_no_temporary_when_writing_fails(tmp_path):
    from mrcnn_edu.run_folder import atomic_save

    target = tmp_path / "figure.png"
    target.write_text("old")

    def broken(tmp):
        assert tmp.endswith(".figure.png")  # the extension is kept for savefig
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(target, broken)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["figure.png"]
    assert atomic_save(target, lambda tmp: open(tmp, "w").write("new")) == str(target)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["figure.png"]
