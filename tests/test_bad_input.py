"""Bad input gives a clear error -- never a traceback, never a silent wrong answer (issue 10).

Each case goes through the command line (``cli.main``: exit status 2 and ``mrcnn-edu CMD:
error: ...`` on stderr naming the problem, no traceback) and/or the public API (the exact error
class and message), and where a run folder is involved, checks that none of its files changed
(bytes and modification times).
"""

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import zipfile

import numpy as np
import pytest

from mrcnn_edu import cli, weights
from mrcnn_edu.backbone import BackboneConfig, ResNetConfig
from mrcnn_edu.boxes import box_iou, max_coordinate
from mrcnn_edu.config_checks import ConfigError, check_fields
from mrcnn_edu.data.images import read_image
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.nms import nms
from mrcnn_edu.nn.functional import relu_forward
from mrcnn_edu.nn.module import Module, Param
from mrcnn_edu.nn.utils import NonFiniteError
from mrcnn_edu.roi_heads import RoIHeadsConfig
from mrcnn_edu.roi_ops import roi_align, roi_align_backward
from mrcnn_edu.rpn import RPNConfig
from mrcnn_edu.run_config import DataConfig, RunConfig, build_datasets, demo_train_config
from mrcnn_edu.train import Trainer, TrainingDiverged
from mrcnn_edu.train_checkpoint import load_checkpoint_weights, read_checkpoint
from mrcnn_edu.train_config import TrainConfig, fit_milestones

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("pycocotools")
pytest.importorskip("matplotlib")


def tiny_run_config(**data) -> RunConfig:
    """The demo's small model and schedule (2000 steps, milestones 0.8 and 0.93) on a few
    64x64 images, one image per step, no progress bar."""
    train = demo_train_config(batch_size=1, checkpoint_every=0, progress=False, log_every=1)
    data = {"num_train": 4, "num_val": 2, "image_size": (64, 64), **data}
    return RunConfig(MaskRCNNConfig.small(3), train, DataConfig(**data))


def run_cli(argv, capsys=None):
    """``(exit status, stdout, stderr)`` of ``mrcnn-edu ARGV`` (argparse errors exit via
    SystemExit)."""
    if capsys is None:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _main(argv)
        return code, out.getvalue(), err.getvalue()
    code = _main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _main(argv):
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def assert_cli_error(argv, capsys, pattern):
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    return err


def snapshot(folder) -> dict:
    """Every file under ``folder``: its bytes and modification time."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained by ``mrcnn-edu train --steps 1`` on the demo's milestones (0.8, 0.93),
    which need two distinct steps; ``(folder, stdout, stderr)``."""
    root = tmp_path_factory.mktemp("bad_input")
    config = root / "tiny.json"
    tiny_run_config().save(str(config))
    folder = root / "run"
    code, out, err = run_cli(["train", "--config", config, "--out", folder, "--steps", 1])
    assert code == 0, err
    return folder, out, err


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(path)
    return path


# -- config files: type and range of every field, named by its key path -------------------------
BAD_CONFIGS = [
    ({"train": None}, r"^train must be an object of settings, got null$"),
    ({"data": {"image_size": 64}}, r"^data\.image_size must be a list, got 64$"),
    ({"model": {"num_classes": "3"}}, r"^model\.num_classes must be an integer, got '3'$"),
    ({"model": {"num_classes": 3.0}}, r"^model\.num_classes must be an integer, got 3\.0$"),
    (
        {"model": {"backbone": {"fpn_channels": "x"}}},
        r"^model\.backbone\.fpn_channels must be an integer, got 'x'$",
    ),
    ({"model": {"backbone": 7}}, r"^model\.backbone must be a BackboneConfig .*, got 7$"),
    (
        {"model": {"roi_heads": {"score_thresh": "x"}}},
        r"^model\.roi_heads\.score_thresh must be a number, got 'x'$",
    ),
    (
        {"model": {"rpn": {"nms_thresh": -1}}},
        r"^model\.rpn\.nms_thresh must be in \[0, 1\], got -1$",
    ),
    (
        {"model": {"rpn": {"anchor_sizes": [[16], [32]]}}},
        r"^model\.rpn\.anchor_sizes must have 5 entries",
    ),
    (
        {"model": {"rpn": {"fg_iou_thresh": 0.2}}},
        r"^model\.rpn: need 0 <= bg_iou_thresh <= fg_iou_thresh",
    ),
    (
        {"model": {"backbone": {"resnet": {"blocks": [1, "a", 1, 1]}}}},
        r"^model\.backbone\.resnet\.blocks\[1\] must be an integer, got 'a'$",
    ),
    ({"model": {"image_std": [0.2, 0, 0.2]}}, r"^model\.image_std must hold 3 numbers > 0"),
    ({"model": {"rpn": {"nms": 0.7}}}, r"^model\.rpn has unknown key\(s\) \['nms'\]"),
    ({"train": {"lr": "x"}}, r"^train\.lr must be a number, got 'x'$"),
    ({"train": {"momentum": 1.5}}, r"^train\.momentum must lie in \[0, 1\), got 1\.5$"),
    ({"train": {"progress": "no"}}, r"^train\.progress must be True or False, got 'no'$"),
    ({"data": {"num_val": -1}}, r"^data\.num_val must be >= 0"),
    ({"data": {"source": "voc"}}, r"^data\.source must be one of \['shapes', 'coco', 'pose'\]"),
    ({"data": None}, r"^data must be an object of DataConfig settings, got null$"),
    ([1, 2], r"^a run config must be a JSON object"),
]


@pytest.mark.parametrize("bad, message", BAD_CONFIGS)
def test_bad_config_values_are_named_by_key_path(bad, message, run, tmp_path, capsys):
    with pytest.raises(ValueError, match=message) as info:
        RunConfig.from_dict(bad)
    if isinstance(bad, dict) and message != r"^a run config must be a JSON object":
        assert isinstance(info.value, ConfigError)
    folder = run[0]
    before = snapshot(folder)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    err = assert_cli_error(
        ["train", "--config", path, "--out", folder, "--overwrite"], capsys, "error: "
    )
    assert re.search(message, err.split("error: ", 1)[1].strip()), err
    assert snapshot(folder) == before  # refused before anything touched the run


def test_every_config_class_checks_its_fields_when_built():
    cases = [
        (lambda: RPNConfig(nms_thresh=-1), r"^nms_thresh must be in \[0, 1\], got -1$"),
        (lambda: RoIHeadsConfig(score_thresh="x"), r"^score_thresh must be a number"),
        (lambda: BackboneConfig(fpn_channels=0), r"^fpn_channels must be >= 1, got 0$"),
        (lambda: ResNetConfig(widths=(1, 2, 3)), r"^widths must hold 4 values"),
        (lambda: MaskRCNNConfig(num_classes=True), r"^num_classes must be an integer, got True"),
        (lambda: DataConfig(image_size=(64, 4)), r"^image_size must be \[height, width\], both"),
        (lambda: TrainConfig(lr=float("inf")), r"^lr must be finite, got inf$"),
        (lambda: RunConfig(model=3), r"^model must be a MaskRCNNConfig"),
    ]
    for build, message in cases:
        with pytest.raises(ConfigError, match=message):
            build()
    # lists become tuples, ints become floats where the hint says float: a JSON round trip
    # gives back an equal config
    rpn = RPNConfig(anchor_sizes=[[8], [16]], nms_thresh=1)
    assert rpn.anchor_sizes == ((8,), (16,)) and rpn.nms_thresh == 1.0
    assert type(rpn.nms_thresh) is float
    cfg = tiny_run_config()
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_the_checker_reads_the_type_hints_of_fields_it_has_no_rule_for():
    @dataclasses.dataclass
    class Inner:
        k: int = 1

        def __post_init__(self):
            check_fields(self)

    @dataclasses.dataclass
    class Settings:
        size: int | tuple[int, ...] | None = None
        scales: tuple[float, ...] = (1.0,)
        inner: Inner | None = None
        names: list = dataclasses.field(default_factory=list)

        def __post_init__(self):
            check_fields(self)

    assert Settings(size=[3, 4]).size == (3, 4) and Settings(scales=[2]).scales == (2.0,)
    with pytest.raises(
        ConfigError, match=r"^size must be an integer, a list or null \(None\), got .big.$"
    ):
        Settings(size="big")
    with pytest.raises(ConfigError, match=r"^scales\[1\] must be a number, got 'x'$"):
        Settings(scales=(1, "x"))
    with pytest.raises(ConfigError, match=r"^inner must be a Inner"):
        Settings(inner={"k": 2})
    with pytest.raises(ConfigError, match=r"^names must be a list"):
        Settings(names="abc")


def test_progress_false_in_the_config_is_respected(run):
    _, out, _ = run
    # plain log lines are what the trainer prints instead of a progress bar
    assert "step 1/1  lr" in out


# -- short runs: tiny step counts, no held-out set, divergence -----------------------------------
def test_steps_shorter_than_the_milestones_keep_the_milestones_that_fit(run):
    folder, out, _ = run
    assert "--steps 1 is too short for the lr milestones [0.8, 0.93]; using [0.8]" in out
    saved = RunConfig.load(str(folder / "config.json")).train
    assert saved.max_steps == 1 and saved.milestones == (0.8,)
    assert int(weights.load(str(folder / "last.npz"))["step"]) == 1
    assert fit_milestones((0.8, 0.93), 2) == (0.8,)  # round(1.6) = round(1.86) = 2
    assert fit_milestones((0.8, 0.93), 100) == (0.8, 0.93)  # steps 80 and 93: unchanged
    assert fit_milestones((0.3, 0.6), 1) == (0.6,)  # round(0.3) = 0 is no step


def test_no_held_out_set_trains_and_skips_evaluation(tmp_path):
    assert build_datasets(DataConfig(num_val=0))[1] is None
    config = tmp_path / "c.json"
    tiny_run_config(num_val=0).save(str(config))
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--config", config, "--out", out, "--steps", 1])
    assert code == 0, err
    assert "evaluation skipped" in stdout
    assert (out / "last.npz").is_file() and not (out / "predictions.png").exists()


class _RaisesInForward(Module):
    def __init__(self):
        self.w = Param(np.ones(2))

    def forward(self, images, targets):
        raise NonFiniteError("input contains NaN or inf; RoIAlign needs finite features")

    def backward(self):
        pass


def test_nonfinite_features_inside_a_step_are_a_divergence(tmp_path):
    dataset = [{"image": np.zeros((3, 8, 8), np.float32)}] * 2
    trainer = Trainer(_RaisesInForward(), dataset, TrainConfig(out_dir=str(tmp_path)))
    with pytest.raises(TrainingDiverged, match="training diverged at step 1: a feature map"):
        trainer.train_step()
    assert trainer.step == 0 and np.array_equal(trainer.model.w.data, np.ones(2))


def test_lr_100_stops_with_the_divergence_message(tmp_path):
    cfg = tiny_run_config(num_train=4, num_val=0)
    cfg.train = dataclasses.replace(cfg.train, lr=100.0, warmup_iters=0, max_steps=8)
    config = tmp_path / "c.json"
    cfg.save(str(config))
    with np.errstate(all="ignore"):
        code, out, err = run_cli(["train", "--config", config, "--out", tmp_path / "run"])
    assert code != 0
    assert "training diverged at step" in out + err
    assert "RoIAlign needs finite features" not in out + err and "Traceback" not in err


# -- images: scaled by their bit depth -----------------------------------------------------------
def test_images_are_scaled_by_their_bit_depth(tmp_path):
    gray16 = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")  # mode I;16
    want = gray16.astype(np.float32) / np.float32(65535)
    got = read_image(tmp_path / "g16.png")
    assert got.shape == (3, 1, 4) and got.dtype == np.float32
    assert np.array_equal(got, np.broadcast_to(want, (3, 1, 4)))
    assert got.max() == 1.0 and 0.49 < got[0, 0, 2] < 0.51  # not saturated to 1.0

    rgba = np.array([[[255, 0, 51, 7]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png")[:, 0, 0], np.float32([1, 0, 0.2]))
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 102, 0] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(read_image(tmp_path / "p.png")[:, 0, 1], np.float32([1, 0.4, 0]))
    Image.fromarray(np.array([[51]], np.uint8), "L").save(tmp_path / "l.png")
    assert np.array_equal(read_image(tmp_path / "l.png")[:, 0, 0], np.float32([0.2] * 3))

    Image.fromarray(np.array([[70000]], np.int32)).save(tmp_path / "i32.tif")  # mode I
    with pytest.raises(ValueError, match=r"32-bit integer image with values in \[70000, 70000\]"):
        read_image(tmp_path / "i32.tif")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        read_image(tmp_path / "missing.png")


def test_predict_reads_16_bit_images_by_their_bit_depth(run, tmp_path, monkeypatch, capsys):
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(tmp_path / "g16.png")
    seen = []
    real_predict = MaskRCNN.predict

    def recording_predict(self, images, *args, **kwargs):
        seen.extend(images)
        return real_predict(self, images, *args, **kwargs)

    monkeypatch.setattr(MaskRCNN, "predict", recording_predict)
    figure = tmp_path / "pred.png"
    code, out, err = run_cli(
        ["predict", tmp_path / "g16.png", "--run", run[0], "--out", figure], capsys
    )
    assert code == 0, err
    assert np.array_equal(seen[0], np.full((3, 64, 64), np.float32(32768) / np.float32(65535)))
    assert f"figure: {figure}" in out and figure.is_file()


# -- weights: NaN refused, NaN not hidden, corrupt files named ----------------------------------
def test_relu_keeps_nan_and_is_bit_identical_on_finite_values():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(1000), [0.0, -0.0, 1e-45, -np.inf, np.inf]])
    x = x.astype(np.float32)
    y, mask = relu_forward(x)
    old = np.where(x > 0, x, np.float32(0))  # the previous formula, right on non-NaN input
    assert np.array_equal(y.view(np.uint32), old.view(np.uint32))
    assert np.array_equal(mask, x > 0)
    y, mask = relu_forward(np.array([np.nan, -1.0, 2.0]))
    assert np.isnan(y[0]) and y[1] == 0 and y[2] == 2 and mask.tolist() == [True, False, True]


def nan_weights(model, name="roi_heads.box_head.fc6.weight"):
    state = {k: v.copy() for k, v in model.state_dict().items()}
    state[name][0, 0] = np.nan
    return state


def test_nan_weights_are_refused_when_loaded(run, png, tmp_path, capsys):
    model = MaskRCNN(tiny_run_config().model, rng=0)
    before = model.state_dict()["roi_heads.box_head.fc6.weight"].copy()
    message = r"parameter 'roi_heads\.box_head\.fc6\.weight' holds 1 NaN or inf value\(s\)"
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(nan_weights(model))
    assert np.array_equal(model.state_dict()["roi_heads.box_head.fc6.weight"], before)
    path = tmp_path / "nan.npz"
    weights.save(str(path), nan_weights(model))
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + " is broken: " + message):
        load_checkpoint_weights(model, path)
    argv = ["predict", png, "--run", run[0], "--weights", path, "--out", tmp_path / "p.png"]
    assert_cli_error(argv, capsys, message)
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "name, where",
    [
        ("backbone.body.conv1.weight", "the feature maps the RPN reads"),
        ("rpn.head.conv.weight", "the RPN head's objectness and box deltas"),
        ("roi_heads.box_head.fc6.weight", "the box head's class logits and box deltas"),
        ("roi_heads.mask_predictor.mask_fcn_logits.weight", "the mask head's logits"),
    ],
)
def test_predict_does_not_hide_nan_weights(name, where):
    cfg = tiny_run_config().model
    cfg.roi_heads = dataclasses.replace(cfg.roi_heads, score_thresh=0.0)  # detections to mask
    model = MaskRCNN(cfg, rng=0)
    params = dict(model.named_parameters())
    assert name in params, sorted(params)
    params[name].data.reshape(-1)[0] = np.nan
    image = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    with np.errstate(invalid="ignore"), pytest.raises(NonFiniteError, match=where):
        model.predict([image])


def forged_npy(shape) -> bytes:
    buf = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + b"\0" * 16


def test_npy_header_claiming_an_absurd_size_is_refused(run, png, tmp_path, capsys):
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("backbone.body.conv1.weight.npy", forged_npy((10**6, 10**6)))
    message = r"member 'backbone\.body\.conv1\.weight' claims a float32 array of shape"
    with pytest.raises(ValueError, match=message + r".*4000000000000 bytes\) but holds 16"):
        weights.load(path)
    argv = ["predict", png, "--run", run[0], "--weights", path, "--out", tmp_path / "p.png"]
    assert_cli_error(argv, capsys, message)


@pytest.mark.parametrize("entry", ["version", "step", "rng", "data"])
def test_checkpoint_missing_an_entry_is_refused(entry, run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(run[0], folder)
    state = weights.load(str(folder / "last.npz"), nested=True)
    del state[entry]
    weights.save(str(folder / "last.npz"), state)
    cfg = RunConfig.load(str(folder / "config.json"))
    rngs = (np.random.default_rng(0), np.random.default_rng(1))
    with pytest.raises(ValueError, match=rf"incomplete Trainer checkpoint: it lacks \[.*'{entry}"):
        read_checkpoint(folder / "last.npz", cfg.train, 4, rngs)
    before = snapshot(folder)
    assert_cli_error(["train", "--resume", folder], capsys, f"lacks .*'{entry}")
    assert snapshot(folder) == before


# -- boxes: NaN, inf and overflowing coordinates ------------------------------------------------
def iou_of(boxes):
    return box_iou(boxes, boxes)


def nms_of(boxes):
    return nms(boxes, np.ones(len(boxes), boxes.dtype), 0.5)


@pytest.mark.parametrize("op", [iou_of, nms_of])
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.nan, "contains NaN or inf coordinates"),
        (np.inf, "contains NaN or inf coordinates"),
        (1e30, r"coordinates beyond \+-4\.61e\+18, where float32 areas .* overflow"),
    ],
)
def test_box_iou_and_nms_refuse_the_same_boxes(op, bad, message):
    boxes = np.array([[0, 0, 10, 10], [0, 0, bad, bad]], np.float32)
    with pytest.raises(ValueError, match=message):
        op(boxes)


def test_large_but_safe_boxes_still_suppress_their_duplicates():
    assert max_coordinate(np.float32) == pytest.approx(np.sqrt(np.finfo(np.float32).max) / 4)
    side = np.float32(1e18)  # area 1e36 < float32 max; two of them sum to 2e36
    boxes = np.array([[0, 0, side, side], [0, 0, side, side], [0, 0, side / 4, side]], np.float32)
    assert np.array_equal(box_iou(boxes[:1], boxes), np.float32([[1, 1, 0.25]]))
    assert nms(boxes, np.float32([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]


# -- RoIAlign: a huge RoI with adaptive sampling ------------------------------------------------
def test_roi_align_refuses_a_huge_roi_with_adaptive_sampling():
    features = np.random.default_rng(0).standard_normal((1, 2, 50, 50)).astype(np.float32)
    huge = np.array([[0, 0, 0, 2e9, 3]], np.float32)  # 2e9 x 3 pixels: 23 GB before
    message = r"rois\[0\] spans 3 x 2e\+09 feature pixels .* adaptive sampling"
    with pytest.raises(ValueError, match=message):
        roi_align(features, huge, 7, 1.0, -1)
    grad = np.ones((1, 2, 7, 7), np.float32)
    with pytest.raises(ValueError, match=message):
        roi_align_backward(grad, huge, features.shape, 7, 1.0, 0)
    assert np.isfinite(roi_align(features, huge, 7, 1.0, 2)).all()  # fixed sampling: fine
    # the limit is 4 x (50 + 1) = 204 feature pixels: a RoI of 200 is still pooled
    wide = np.array([[0, -75, -75, 125, 125]], np.float32)
    assert np.isfinite(roi_align(features, wide, 7, 1.0, -1)).all()


# -- where the output goes ----------------------------------------------------------------------
def out_arguments(run, png):
    """Each command that takes --out, with what it needs besides --out."""
    folder = run[0]
    return {
        "demo": ["demo", "--quick", "--steps", 1],
        "train": ["train", "--steps", 1],
        "evaluate": ["evaluate", "--run", folder],
        "predict": ["predict", png, "--run", folder],
    }


@pytest.mark.parametrize("command", ["demo", "train", "evaluate", "predict"])
def test_out_that_cannot_be_written_is_refused_before_any_work(command, run, png, tmp_path, capsys):
    argv = out_arguments(run, png)[command]
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    if command != "predict":  # a folder is expected
        assert_cli_error(
            argv + ["--out", a_file], capsys, r"'.*taken\.txt' is a file, not a folder"
        )
    assert_cli_error(
        argv + ["--out", a_file / "sub" / "x.png"],
        capsys,
        r"lies under '.*taken\.txt', which is a file",
    )
    assert a_file.read_text() == "keep me"
    before = snapshot(run[0])
    # a read-only folder (os.access says so: the tests may run as root, who may write anyway)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "access", lambda p, mode: real_access(p, mode) and str(p) != str(readonly))
        assert_cli_error(
            argv + ["--out", readonly / "out.png"], capsys, r"cannot write in '.*readonly'"
        )
    assert list(readonly.iterdir()) == [] and snapshot(run[0]) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_out_in_a_really_read_only_folder(run, png, tmp_path, capsys):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        argv = ["evaluate", "--run", run[0], "--out", readonly / "eval"]
        assert_cli_error(argv, capsys, r"cannot write in '.*readonly'")
    finally:
        readonly.chmod(0o755)


def test_predict_out_needs_an_image_extension_and_a_sane_threshold(run, png, tmp_path, capsys):
    argv = ["predict", png, "--run", run[0]]
    assert_cli_error(argv + ["--out", tmp_path / "name"], capsys, r"needs an image extension")
    assert list(tmp_path.glob("name*")) == []
    for threshold in ("nan", "-0.1", "1.5", "x"):
        out = tmp_path / "p.png"
        assert_cli_error(
            argv + ["--out", out, "--score-threshold", threshold], capsys, "--score-threshold"
        )
        assert not out.exists()
    code, out, _ = run_cli(argv + ["--out", tmp_path / "p.jpg"], capsys)
    assert code == 0 and f"figure: {tmp_path / 'p.jpg'}" in out
    assert (tmp_path / "p.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG, at the named path
