"""Augmentation: every flip and rotation keeps image, boxes, masks and keypoints aligned; the
trainer draws it from a third generator that checkpoints save, so resumed runs stay exact.

Alignment is checked by construction: an item's image is drawn from its masks (channel 0 is
``sum_g (g + 1) * mask_g``) and its boxes are the tight boxes of the masks, so after a transform
the image must still be drawn from the transformed masks, and each transformed box must be the
tight box of its transformed mask.
"""

import io
import json
import os
from contextlib import redirect_stdout

import numpy as np
import pytest
from test_train import (
    FailingModel,
    ToyModel,
    ToySquares,
    assert_params_identical,
    config,
    no_plots,  # noqa: F401  (autouse: no loss-curve PNGs in these tests either)
    params,
    read_log,
    without_seconds,
)

from mrcnn_edu import cli, cli_train, weights
from mrcnn_edu.config_checks import ConfigError
from mrcnn_edu.data.transforms import (
    Augment,
    AugmentConfig,
    build_augment,
    hflip,
    keypoint_flip_index,
    rot90,
    vflip,
)
from mrcnn_edu.run_config import RunConfig
from mrcnn_edu.train import Trainer

H, W = 5, 8  # not square, so a rotation that confused H and W would fail


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # continuous pixel edges


def drawn(masks):
    return sum((g + 1) * m.astype(np.float32) for g, m in enumerate(masks))


def make_item(seed=0, objects=3):
    """Irregular masks, their tight boxes, an image drawn from them, one keypoint per object at
    the centre of a pixel of its mask (and one invisible keypoint)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((objects, H, W), np.uint8)
    keypoints = np.zeros((objects, 2, 3), np.float32)
    for g in range(objects):
        y, x = int(rng.integers(0, H - 2)), int(rng.integers(0, W - 3))
        masks[g, y : y + 2, x : x + 3] = 1
        masks[g, y + 1 : y + 3, x + 1] = 1  # an L-ish shape, not a rectangle
        keypoints[g, 0] = (x + 0.5, y + 0.5, 2)  # centre of pixel (row y, column x)
    image = np.stack([drawn(masks), rng.random((H, W)), rng.random((H, W))]).astype(np.float32)
    boxes = np.array([tight_box(m) for m in masks], np.float32)
    return {
        "image": image,
        "boxes": boxes,
        "crowd_boxes": boxes[:1].copy(),
        "labels": np.arange(1, objects + 1),
        "masks": masks,
        "keypoints": keypoints,
        "image_id": 7,
        "orig_size": (H, W),
    }


SWAP = [1, 0]  # keypoint 0 "left_thing" <-> keypoint 1 "right_thing"
TRANSFORMS = {
    "hflip": lambda it: hflip(it, SWAP),
    "vflip": lambda it: vflip(it, SWAP),
    "rot90": lambda it: rot90(it, 1),
    "rot180": lambda it: rot90(it, 2),
    "rot270": lambda it: rot90(it, 3),
    "hflip+rot90": lambda it: rot90(hflip(it, SWAP), 1),
    "vflip+hflip+rot270": lambda it: rot90(hflip(vflip(it, SWAP), SWAP), 3),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_boxes_masks_and_image_stay_aligned(name):
    item = make_item()
    out = TRANSFORMS[name](item)
    h, w = out["image"].shape[1:]
    assert out["masks"].shape == (3, h, w)
    np.testing.assert_array_equal(out["image"][0], drawn(out["masks"]))
    for g in range(3):
        assert out["boxes"][g].tolist() == tight_box(out["masks"][g])
    assert out["crowd_boxes"][0].tolist() == out["boxes"][0].tolist()
    assert out["boxes"].dtype == np.float32 and out["orig_size"] == (h, w)
    assert out["labels"] is item["labels"] and out["image_id"] == 7


@pytest.mark.parametrize("name", TRANSFORMS)
def test_keypoints_stay_on_their_pixel_and_invisible_ones_at_zero(name):
    item = make_item()
    marked = np.zeros((3, H, W), np.uint8)  # the pixel each visible keypoint sits on
    for g, (x, y, _) in enumerate(item["keypoints"][:, 0]):
        marked[g, int(y), int(x)] = 1
    out = TRANSFORMS[name]({**item, "masks": marked, "boxes": item["boxes"]})
    mirrored = name.count("flip") % 2 == 1
    visible, hidden = (1, 0) if mirrored else (0, 1)
    for g in range(3):
        x, y, v = out["keypoints"][g, visible]
        assert v == 2 and out["masks"][g, int(y), int(x)] == 1
        assert (x % 1, y % 1) == (0.5, 0.5)
        assert out["keypoints"][g, hidden].tolist() == [0, 0, 0]


def test_transforms_by_hand():
    item = make_item()
    item["boxes"] = np.array([[1, 2, 3, 4]], np.float32)
    np.testing.assert_array_equal(hflip(item, SWAP)["boxes"], [[5, 2, 7, 4]])  # x -> 8 - x
    np.testing.assert_array_equal(vflip(item, SWAP)["boxes"], [[1, 1, 3, 3]])  # y -> 5 - y
    # rot90: (x, y) -> (y, W - x); corners (1, 2), (3, 4) -> (2, 7), (4, 5)
    out = rot90(item, 1)
    np.testing.assert_array_equal(out["boxes"], [[2, 5, 4, 7]])
    assert out["image"].shape == (3, W, H) and out["masks"].shape == (3, W, H)
    # pixel (row 0, column W - 1) is the top-right one; a quarter turn left puts it top-left
    np.testing.assert_array_equal(out["image"][:, 0, 0], item["image"][:, 0, W - 1])
    np.testing.assert_array_equal(rot90(item, 4)["image"], item["image"])


def test_items_are_not_changed_in_place():
    item = make_item()
    before = {k: np.copy(v) for k, v in item.items() if isinstance(v, np.ndarray)}
    for transform in TRANSFORMS.values():
        transform(item)
    for k, v in before.items():
        np.testing.assert_array_equal(item[k], v)


def test_keypoint_flip_index_and_its_need():
    names = ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]
    assert keypoint_flip_index(names) == [0, 2, 1, 4, 3]
    with pytest.raises(ValueError, match="no left/right partner"):
        keypoint_flip_index(["nose", "left_eye"])
    with pytest.raises(ValueError, match="left/right swap map"):
        hflip(make_item())
    assert rot90(make_item(), 1)["keypoints"].shape == (3, 2, 3)  # rotations need no map


# -- the augment callable -------------------------------------------------------------------------


def test_augment_draws_only_for_enabled_transforms():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    item = make_item()
    assert build_augment(AugmentConfig()) is None
    assert Augment(AugmentConfig())(item, rng) is item and rng.bit_generator.state == state
    # hflip alone: flipped exactly when the draw is below 0.5
    augment = Augment(AugmentConfig(hflip=True), keypoint_flip=SWAP)
    twin = np.random.default_rng(0)
    flips = 0
    for _ in range(20):
        flipped = twin.random() < 0.5
        out = augment(item, rng)
        expected = hflip(item, SWAP) if flipped else item
        np.testing.assert_array_equal(out["image"], expected["image"])
        flips += flipped
    assert 0 < flips < 20


def test_augment_all_three_in_order():
    config = AugmentConfig(hflip=True, vflip=True, rot90=True)
    assert config.active == ("hflip", "vflip", "rot90")
    rng, twin = np.random.default_rng(4), np.random.default_rng(4)
    item = make_item()
    for _ in range(8):
        out = Augment(config, SWAP)(item, rng)
        expected = item
        if twin.random() < 0.5:
            expected = hflip(expected, SWAP)
        if twin.random() < 0.5:
            expected = vflip(expected, SWAP)
        expected = rot90(expected, int(twin.integers(4)))
        np.testing.assert_array_equal(out["image"], expected["image"])
        np.testing.assert_array_equal(out["boxes"], expected["boxes"])


def test_augment_config_from_names_and_from_a_run_config():
    assert AugmentConfig.from_names("hflip, rot90") == AugmentConfig(hflip=True, rot90=True)
    assert AugmentConfig.from_names("none") == AugmentConfig()
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['flip'\]"):
        AugmentConfig.from_names("hflip,flip")
    cfg = RunConfig.from_dict({"data": {"augment": {"vflip": True}}})
    assert cfg.data.augment == AugmentConfig(vflip=True)
    assert RunConfig.from_dict(cfg.to_dict()).data.augment == cfg.data.augment
    assert RunConfig().data.augment == AugmentConfig()  # off for the shapes demo
    with pytest.raises(ConfigError, match=r"data.augment has unknown key\(s\) \['flip'\]"):
        RunConfig.from_dict({"data": {"augment": {"flip": True}}})
    with pytest.raises(ConfigError, match="data.augment.hflip must be True or False"):
        RunConfig.from_dict({"data": {"augment": {"hflip": 1}}})


# -- the trainer: a third generator, saved and restored -------------------------------------------

ALL = AugmentConfig(hflip=True, vflip=True, rot90=True)


def augmented_trainer(tmp_path, name, model=None, **overrides):
    cfg = config(tmp_path, name, **overrides)
    return Trainer(model or ToyModel(), ToySquares(), cfg, augment=Augment(ALL))


def differs(params_a: dict, params_b: dict) -> bool:
    return any(not np.array_equal(v, params_b[k]) for k, v in params_a.items())


@pytest.fixture
def augmented_reference(tmp_path):
    trainer = augmented_trainer(tmp_path, "reference")
    trainer.train()
    return params(trainer.model), read_log(trainer.log_path)


def test_augmented_resume_is_bit_identical(tmp_path, augmented_reference):
    ref_params, ref_rows = augmented_reference
    first = augmented_trainer(tmp_path, "split")
    first.train(until=3)
    second = augmented_trainer(tmp_path, "split", model=ToyModel(seed=99))
    second.train(resume=first.last_checkpoint_path)
    assert_params_identical(params(second.model), ref_params)
    assert without_seconds(read_log(second.log_path)) == without_seconds(ref_rows)


def test_augmented_resume_depends_on_the_saved_augment_stream(tmp_path, augmented_reference):
    """Negative controls: augmentation changes the run, and a resume whose augment stream is
    not the saved one ends elsewhere."""
    ref_params, _ = augmented_reference
    plain = Trainer(ToyModel(), ToySquares(), config(tmp_path, "plain"))
    plain.train()
    assert differs(params(plain.model), ref_params)
    first = augmented_trainer(tmp_path, "split")
    first.train(until=3)
    second = augmented_trainer(tmp_path, "split").resume(first.last_checkpoint_path)
    second.augment_rng = np.random.default_rng(5)  # everything else as saved
    second.train()
    assert differs(params(second.model), ref_params)


def test_interrupted_augmented_step_rewinds_the_augment_stream(tmp_path, augmented_reference):
    ref_params, ref_rows = augmented_reference
    trainer = augmented_trainer(tmp_path, "crash", model=FailingModel(fail_at=5, how="interrupt"))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    resumed = augmented_trainer(tmp_path, "crash")
    resumed.train(resume=trainer.last_checkpoint_path)
    assert_params_identical(params(resumed.model), ref_params)
    assert without_seconds(read_log(resumed.log_path)) == without_seconds(ref_rows)


def test_the_data_and_model_streams_are_those_of_two_streams(tmp_path):
    trainer = augmented_trainer(tmp_path, "seeds", seed=11)
    data_seed, model_seed = np.random.SeedSequence(11).spawn(2)
    assert (
        trainer.data_rng.bit_generator.state == np.random.default_rng(data_seed).bit_generator.state
    )
    assert (
        trainer.model_rng.bit_generator.state
        == np.random.default_rng(model_seed).bit_generator.state
    )
    saved = weights.load(trainer.save_checkpoint(), nested=True)
    assert json.loads(str(saved["rng"]["augment"])) == trainer.augment_rng.bit_generator.state


def test_checkpoint_without_augment_stream_resumes_with_a_fresh_one(tmp_path, capsys):
    first = augmented_trainer(tmp_path, "old")
    first.train(until=2)
    state = first.state_dict()
    del state["rng"]["augment"]  # as written before the augment stream existed
    old = os.path.join(first.config.out_dir, "old.npz")
    weights.save(old, state)
    capsys.readouterr()
    second = augmented_trainer(tmp_path, "old")
    second.augment_rng.random(3)  # moved, so the reset is visible
    second.resume(old)
    fresh = np.random.default_rng(np.random.SeedSequence(first.config.seed).spawn(3)[2])
    assert second.augment_rng.bit_generator.state == fresh.bit_generator.state
    assert "no augmentation generator" in capsys.readouterr().out
    assert second.step == 2


def test_augment_must_be_callable(tmp_path):
    with pytest.raises(ValueError, match="augment must be a callable"):
        Trainer(ToyModel(), ToySquares(), config(tmp_path), augment="hflip")


# -- the CLI --------------------------------------------------------------------------------------


@pytest.fixture
def captured_run(monkeypatch):
    """Replace the training itself: keep the RunConfig the train command built."""
    seen = {}

    def fake_run(cfg, args, out):
        seen["cfg"] = cfg
        return 0

    monkeypatch.setattr(cli_train, "_run", fake_run)
    return seen


def train_cli(*argv):
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["train", *argv])
    return code, out.getvalue()


@pytest.fixture
def coco_export(tmp_path):
    pytest.importorskip("pycocotools")
    from mrcnn_edu.data.shapes import ShapesDataset, write_coco

    root = tmp_path / "export"
    return write_coco(ShapesDataset(2, image_size=(32, 32), seed=0), root), str(root / "images")


def test_cli_flags_set_augment_and_sizes(tmp_path, captured_run):
    code, out = train_cli("--augment", "vflip,rot90", "--min-size", "96,112,128", "--max-size",
                          "200", "--out", str(tmp_path / "r"))  # fmt: skip
    cfg = captured_run["cfg"]
    assert code == 0 and cfg.data.augment == AugmentConfig(vflip=True, rot90=True)
    assert cfg.model.min_size == (96, 112, 128) and cfg.model.max_size == 200
    assert "augmentation: vflip, rot90" in out and "one of [96, 112, 128]" in out
    code, out = train_cli("--out", str(tmp_path / "r2"))
    cfg = captured_run["cfg"]
    assert cfg.data.augment == AugmentConfig() and cfg.model.min_size is None
    assert "augmentation: none; image size: native" in out


def test_cli_coco_data_gets_hflip_unless_told_otherwise(tmp_path, captured_run, coco_export):
    json_path, images = coco_export
    train_cli("--data", json_path, "--images", images, "--out", str(tmp_path / "a"))
    assert captured_run["cfg"].data.augment == AugmentConfig(hflip=True)
    train_cli(
        "--data", json_path, "--images", images, "--augment", "none", "--out", str(tmp_path / "b")
    )
    assert captured_run["cfg"].data.augment == AugmentConfig()
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps({"data": {"augment": {"rot90": True}}}))
    train_cli("--config", str(config_path), "--data", json_path, "--images", images, "--out",
              str(tmp_path / "c"))  # fmt: skip
    assert captured_run["cfg"].data.augment == AugmentConfig(rot90=True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--augment", "hflip,spin"], "unknown augmentation(s) ['spin']"),
        (["--min-size", "800"], "--min-size and --max-size go together"),
        (["--min-size", "8x0", "--max-size", "900"], "--min-size takes whole numbers"),
        (["--min-size", "900", "--max-size", "800"], "min_size must not exceed max_size=800"),
    ],
)
def test_cli_bad_flags_are_clear_errors(tmp_path, captured_run, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        code = cli.main(["train", *argv, "--out", str(tmp_path / "r")])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert "cfg" not in captured_run


def test_cli_says_when_large_images_would_train_at_their_own_size(tmp_path, captured_run):
    """A COCO set of 1100x1000 images without --min-size: a note names the flags; with them,
    or with small images, no note."""
    pytest.importorskip("pycocotools")
    from mrcnn_edu.data.shapes import ShapesDataset, write_coco

    big = write_coco(ShapesDataset(1, image_size=(1100, 1000), seed=0), tmp_path / "big")
    images = str(tmp_path / "big" / "images")
    _, out = train_cli("--data", big, "--images", images, "--out", str(tmp_path / "a"))
    assert "1100x1000 will be trained at their own size" in out and "--min-size" in out
    _, out = train_cli("--data", big, "--images", images, "--min-size", "800", "--max-size",
                       "1333", "--out", str(tmp_path / "b"))  # fmt: skip
    assert "own size" not in out
    small = write_coco(ShapesDataset(1, image_size=(64, 64), seed=0), tmp_path / "small")
    _, out = train_cli("--data", small, "--images", str(tmp_path / "small" / "images"),
                       "--out", str(tmp_path / "c"))  # fmt: skip
    assert "own size" not in out


def test_cli_anchor_sizes_flag_sets_one_size_per_level(tmp_path, captured_run):
    """``--anchor-sizes``, the form in which ``mrcnn-edu inspect`` suggests sizes."""
    code, out = train_cli("--anchor-sizes", "19,38,76,152,304", "--out", str(tmp_path / "r"))
    rpn = captured_run["cfg"].model.rpn
    assert code == 0 and rpn.anchor_sizes == ((19,), (38,), (76,), (152,), (304,))
    assert "anchor sizes: 19, 38, 76, 152, 304" in out
    for bad in ("19,38,76", "19,38,x,152,304", "0,38,76,152,304"):
        with pytest.raises(SystemExit) as exit_info:
            train_cli("--anchor-sizes", bad, "--out", str(tmp_path / "r2"))
        assert exit_info.value.code == 2
