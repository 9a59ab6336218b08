"""``mrcnn-edu demo --pose --quick`` end to end: the keypoint loss falls, keypoint AP (OKS) is
evaluated beside box and mask AP, skeletons are drawn, and the run folder is an ordinary run
(``evaluate --run`` scores its keypoints again). Also: the pose run's trainer flips with the
left/right swap map."""

import json

import numpy as np
import pytest

pytest.importorskip("pycocotools")
from mrcnn_edu import cli  # noqa: E402
from mrcnn_edu.data.pose import FLIP_INDEX, PoseDataset  # noqa: E402
from mrcnn_edu.demo import _make_trainer  # noqa: E402
from mrcnn_edu.mask_rcnn import MaskRCNN  # noqa: E402
from mrcnn_edu.run_config import RunConfig, pose_run_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def pose_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pose") / "run"
    code = cli.main(["demo", "--pose", "--quick", "--out", str(out), "--no-progress"])
    return out, code


def test_quick_pose_demo_trains_evaluates_and_draws(pose_run, capsys):
    out, code = pose_run
    assert code == 0
    rows = (out / "log.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    loss = np.array([float(r.split(",")[header.index("loss_keypoint")]) for r in rows[1:]])
    assert len(loss) == 40 and loss[-10:].mean() < 0.97 * loss[:10].mean()
    assert loss[0] == pytest.approx(np.log(56 * 56), abs=0.5)  # a softmax over 56^2 at start
    saved = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"bbox", "segm", "keypoints"} <= set(saved)
    assert all(0.0 <= saved["keypoints"][k] <= 1.0 for k in ("AP", "AP50", "AR"))
    for name in ("predictions.png", "loss_curve.png", "config.json", "last.npz"):
        assert (out / name).stat().st_size > 0, name
    config = RunConfig.load(str(out / "config.json"))
    assert config.data.source == "pose" and config.model.num_keypoints == 14
    assert config.data.augment.hflip


def test_evaluate_command_scores_the_pose_run_again(pose_run, tmp_path, capsys):
    out, _ = pose_run
    results = tmp_path / "results.json"
    assert cli.main(["evaluate", "--run", str(out), "--out", str(tmp_path), "--json",
                     str(results)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "COCO keypoints evaluation (8 images, OKS)" in printed
    records = json.loads(results.read_text())
    assert records and all(len(r["keypoints"]) == 3 * 14 for r in records)
    assert (tmp_path / "eval_predictions.png").stat().st_size > 0


def test_pose_trainer_swaps_left_and_right_when_flipping(tmp_path):
    cfg = pose_run_config(str(tmp_path / "run"), quick=True)
    train_set = PoseDataset(4, seed=1)
    trainer = _make_trainer(cfg, MaskRCNN(cfg.model, rng=0), train_set, None)
    assert trainer.augment.config.hflip
    assert list(trainer.augment.keypoint_flip) == list(FLIP_INDEX)


def test_pose_and_toolkit_demos_do_not_mix(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--pose", "--toolkit"])
    assert "choose one" in capsys.readouterr().err
