"""`mrcnn-edu evaluate`/`predict` on a user's COCO data: the run's class names on the figures,
per-class AP in the printed table, and `--json` COCO results with the dataset's own category ids.

The run here is a COCO export whose category ids are 7 and 12 (not 1..K). The model's
``predict`` is replaced by one that returns the ground truth (label 1 = category 7, label 2 =
category 12), so every number is known: a results file with the right image ids, category ids
and masks scores AP 1 against the export, and one with a single id wrong would not.
"""

import json

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from mrcnn_edu import cli, visualize, weights  # noqa: E402
from mrcnn_edu.evaluate import evaluate_coco  # noqa: E402
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig  # noqa: E402
from mrcnn_edu.run_config import DataConfig, RunConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 64
# image id: (background grey, [(category id, x1, y1, x2, y2)])
IMAGES = {
    1: (0.2, [(7, 4, 4, 24, 24), (12, 30, 30, 60, 50)]),
    2: (0.6, [(12, 10, 20, 40, 44)]),
}
CATEGORIES = [{"id": 12, "name": "nucleus"}, {"id": 7, "name": "cell"}]  # labels: cell 1, nucleus 2
LABEL = {7: 1, 12: 2}


def export(root):
    """Write the two images and their COCO json; return (json path, image folder)."""
    images_dir = root / "images"
    images_dir.mkdir()
    images, annotations = [], []
    for image_id, (grey, objects) in IMAGES.items():
        pixels = np.full((SIZE, SIZE, 3), round(grey * 255), np.uint8)
        for _, x1, y1, x2, y2 in objects:
            pixels[y1:y2, x1:x2] = 255
        Image.fromarray(pixels).save(images_dir / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": SIZE,
                       "width": SIZE})  # fmt: skip
        for category_id, x1, y1, x2, y2 in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float((x2 - x1) * (y2 - y1)),
                    "iscrowd": 0,
                }
            )
    path = root / "export.json"
    content = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    path.write_text(json.dumps(content))
    return path, images_dir


def perfect_prediction(image):
    """The ground truth of the image with this background, as the model's predict returns."""
    grey = float(image[0, 0, 0])
    (image_id,) = [i for i, (g, _) in IMAGES.items() if abs(g - grey) < 0.01]
    objects = IMAGES[image_id][1]
    masks = np.zeros((len(objects), SIZE, SIZE), np.uint8)
    for d, (_, x1, y1, x2, y2) in enumerate(objects):
        masks[d, y1:y2, x1:x2] = 1
    return {
        "boxes": np.array([o[1:] for o in objects], np.float32),
        "labels": np.array([LABEL[o[0]] for o in objects], np.int64),
        "scores": np.linspace(0.9, 0.8, len(objects)).astype(np.float32),
        "masks": masks,
    }


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run folder trained (nominally) on the export, with a predict that returns the truth.
    Returns (run folder, export json, image folder, predicted image ids, drawn class names)."""
    json_path, images_dir = export(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = DataConfig(source="coco", annotations=str(json_path), images=str(images_dir),
                      val_annotations=str(json_path))  # fmt: skip
    cfg = RunConfig(model=MaskRCNNConfig.small(2), data=data)
    cfg.save(str(run_dir / "config.json"))
    weights.save(run_dir / "last.npz", MaskRCNN(cfg.model, rng=0).state_dict())
    predicted, drawn = [], []

    def predict(self, images, mask_threshold=0.5):
        out = [perfect_prediction(image) for image in images]
        predicted.extend(int(round(float(im[0, 0, 0]) * 10)) for im in images)
        return out

    original_figure = visualize.save_predictions_figure

    def figure(*args, **kwargs):
        drawn.append(kwargs.get("class_names"))
        return original_figure(*args, **kwargs)

    monkeypatch.setattr(MaskRCNN, "predict", predict)
    monkeypatch.setattr(visualize, "save_predictions_figure", figure)
    return run_dir, json_path, images_dir, predicted, drawn


def test_predict_json_has_the_datasets_category_ids_and_file_order_image_ids(run, tmp_path):
    run_dir, json_path, images_dir, _, drawn = run
    files = [str(images_dir / "1.png"), str(images_dir / "2.png")]
    out = tmp_path / "results.json"
    args = ["predict", *files, "--run", str(run_dir), "--out", str(tmp_path / "p.png")]
    assert cli.main(args + ["--json", str(out)]) == 0
    assert drawn == [("cell", "nucleus")]
    results = json.loads(out.read_text())
    assert len(results) == 3
    assert [r["category_id"] for r in results] == [7, 12, 12]  # not labels 1, 2, 2
    assert [(r["image_id"], r["file_name"]) for r in results] == [
        (1, files[0]), (1, files[0]), (2, files[1])]  # fmt: skip
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    # The export is a ground truth for the same images (ids 1, 2 in this file order).
    gt = COCO(str(json_path))
    assert len(gt.loadRes(str(out)).anns) == 3
    metrics = evaluate_coco(str(json_path), str(out), print_table=False)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)


def test_predict_json_keeps_only_detections_above_the_threshold(run, tmp_path):
    run_dir, _, images_dir, _, _ = run
    out = tmp_path / "r.json"
    files = [str(images_dir / "2.png"), str(images_dir / "1.png")]  # image id 1 is 2.png now
    args = ["predict", *files, "--run", str(run_dir), "--out", str(tmp_path / "p.png")]
    assert cli.main(args + ["--score-threshold", "0.85", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    # 2.png: one object, score 0.9; 1.png: scores 0.9 and 0.8, the second dropped
    assert [(r["image_id"], r["file_name"], r["category_id"]) for r in results] == [
        (1, files[0], 12), (2, files[1], 7)]  # fmt: skip


def test_evaluate_prints_per_class_ap_and_writes_json(run, tmp_path, capsys):
    run_dir, json_path, _, predicted, drawn = run
    out = tmp_path / "eval.json"
    args = ["evaluate", "--run", str(run_dir), "--out", str(tmp_path / "ev")]
    assert cli.main(args + ["--json", str(out)]) == 0
    assert sorted(predicted) == [2, 6]  # both held-out images, once each
    assert drawn == [("cell", "nucleus")]
    printed = capsys.readouterr().out
    table = printed[printed.index("per-class AP (2 classes):") :].splitlines()
    assert table[1].split() == ["class", "bbox", "AP", "bbox", "AP50", "segm", "AP", "segm",
                                "AP50", "instances"]  # fmt: skip
    assert table[2].split() == ["cell", "1.000", "1.000", "1.000", "1.000", "1"]
    assert table[3].split() == ["nucleus", "1.000", "1.000", "1.000", "1.000", "2"]
    results = json.loads(out.read_text())
    assert sorted(r["category_id"] for r in results) == [7, 12, 12]
    assert len(COCO(str(json_path)).loadRes(results).anns) == 3


def test_evaluate_refuses_data_with_other_classes(run, tmp_path, capsys):
    run_dir, json_path, images_dir, predicted, _ = run
    other = json.loads(json_path.read_text())
    other["categories"] = [{"id": 7, "name": "cell"}, {"id": 12, "name": "nucleolus"}]
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    args = ["evaluate", "--run", str(run_dir), "--data", str(other_path)]
    assert cli.main(args + ["--images", str(images_dir), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "error: the run was trained on classes ['cell', 'nucleus']" in err
    assert "['cell', 'nucleolus']" in err and "Traceback" not in err
    assert predicted == []


def test_json_into_a_missing_folder_fails_before_predicting(run, tmp_path, capsys):
    run_dir, _, images_dir, predicted, _ = run
    bad = tmp_path / "no" / "such" / "r.json"
    common = ["--run", str(run_dir), "--json", str(bad)]
    assert cli.main(["predict", str(images_dir / "1.png"), *common]) == 2
    assert cli.main(["evaluate", *common, "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.count("does not exist") == 2 and "mrcnn-edu predict: error: cannot write" in err
    assert predicted == [] and not bad.parent.exists()


def test_predict_json_refuses_when_the_runs_categories_are_unknown(run, tmp_path, capsys):
    run_dir, json_path, images_dir, predicted, drawn = run
    image = str(images_dir / "1.png")
    json_path.unlink()  # the run's data json is gone: its category ids are unknown
    out = tmp_path / "r.json"
    args = ["predict", image, "--run", str(run_dir), "--out", str(tmp_path / "p.png")]
    assert cli.main(args + ["--json", str(out)]) == 2
    assert "--json needs the run's category ids" in capsys.readouterr().err
    assert predicted == [] and not out.exists()
    assert cli.main(args) == 0  # the figure alone still works, labelled with label numbers
    assert drawn == [None]


def test_predict_uses_the_classes_the_run_recorded(run, tmp_path):
    from mrcnn_edu.run_config import save_run_classes

    run_dir, json_path, images_dir, _, drawn = run
    save_run_classes(str(run_dir), {"class_names": ["cell", "nucleus"], "category_ids": [7, 12]})
    json_path.unlink()  # the training json is gone, the run's own record remains
    out = tmp_path / "r.json"
    args = ["predict", str(images_dir / "1.png"), "--run", str(run_dir), "--json", str(out)]
    assert cli.main(args + ["--out", str(tmp_path / "p.png")]) == 0
    assert drawn == [("cell", "nucleus")]
    assert [r["category_id"] for r in json.loads(out.read_text())] == [7, 12]
