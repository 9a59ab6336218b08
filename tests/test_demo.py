"""The main job end to end (a short run): training lowers the loss, evaluation and pictures
are written, and the CLI's train/evaluate/predict work on the run folder."""

import dataclasses
import json

import numpy as np
import pytest

from mrcnn_edu import cli
from mrcnn_edu.demo import run_demo
from mrcnn_edu.run_config import RunConfig, quick_run_config


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = quick_run_config(str(out))
    cfg.train = dataclasses.replace(cfg.train, progress=False, log_every=1000)
    summary = run_demo(cfg)
    return out, summary


def test_quick_demo_loss_falls_and_writes_everything(quick_run):
    out, summary = quick_run
    rows = (out / "log.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    total = np.array([float(r.split(",")[header.index("total")]) for r in rows[1:]])
    assert len(total) == 60
    assert total[-15:].mean() < 0.8 * total[:15].mean()
    files = ("predictions.png", "loss_curve.png", "config.json", "metrics.json", "last.npz")
    for name in files + ("classes.json",):
        assert (out / name).stat().st_size > 0, name
    # no evaluation during the demo's training: the log has exactly the loss columns
    assert header[-2:] == ["total", "seconds"] and not any("AP" in c for c in header)
    m = summary["metrics"]
    assert set(m) == {"bbox", "segm", "per_class"}
    assert all(0.0 <= m[t]["AP50"] <= 1.0 for t in ("bbox", "segm"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["segm"]["AP"] == m["segm"]["AP"]
    assert list(saved["metrics"]["per_class"]) == ["circle", "square", "triangle"]


def test_cli_evaluate_and_predict_on_the_run(quick_run, tmp_path, capsys):
    out, _ = quick_run
    eval_out = tmp_path / "eval"
    args = ["evaluate", "--run", str(out), "--config", str(out / "config.json")]
    assert cli.main(args + ["--out", str(eval_out)]) == 0
    assert "Average Precision" in capsys.readouterr().out
    assert (eval_out / "eval_predictions.png").stat().st_size > 1000
    from PIL import Image

    from mrcnn_edu.data.shapes import ShapesDataset

    img = ShapesDataset(1, seed=9)[0]["image"]
    png = tmp_path / "shape.png"
    Image.fromarray((img.transpose(1, 2, 0) * 255).astype(np.uint8)).save(png)
    fig = tmp_path / "pred.png"
    assert cli.main(["predict", str(png), "--run", str(out), "--out", str(fig)]) == 0
    assert fig.stat().st_size > 1000


def test_cli_errors_are_named(tmp_path, capsys):
    assert cli.main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "run config not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"learning_rate": 0.1}}))
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_run_config_round_trip(tmp_path):
    cfg = RunConfig()
    path = tmp_path / "config.json"
    cfg.save(str(path))
    again = RunConfig.load(str(path))
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="unknown top-level"):
        RunConfig.from_dict({"optimizer": {}})
    with pytest.raises(ValueError, match="data"):
        RunConfig.from_dict({"data": {"sorce": "shapes"}})


def test_evaluation_draws_no_progress_bar_when_progress_is_off(tmp_path, monkeypatch):
    """``progress: false`` (``--no-progress``) also silences the prediction bar of the final
    evaluation; with progress on, the bar is asked for."""
    from mrcnn_edu import demo
    from mrcnn_edu.data.shapes import ShapesDataset

    class NoDetections:
        def predict(self, images):
            empty = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}
            return [{**empty, "scores": np.zeros(0), "masks": np.zeros((0, 64, 64))}] * len(images)

    asked = []
    monkeypatch.setattr(demo, "progress_bar", lambda *a, **k: asked.append(a) or None)
    data = ShapesDataset(2, image_size=(64, 64), seed=0)
    demo.evaluate_model(NoDetections(), data, data.class_names, str(tmp_path), progress=False)
    assert asked == []
    demo.evaluate_model(NoDetections(), data, data.class_names, str(tmp_path), progress=True)
    assert len(asked) == 1
