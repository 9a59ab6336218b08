"""torchvision Mask R-CNN weights -> ours: every parameter lands where the key table says,
the result loads strictly, both torchvision key layouts and both file formats are read, and
unknown / missing keys and shape mismatches are listed."""

import re

import numpy as np
import pytest

from mrcnn_edu import weights
from mrcnn_edu.cli import main
from mrcnn_edu.convert import from_torchvision
from mrcnn_edu.mask_rcnn import MaskRCNN, MaskRCNNConfig
from mrcnn_edu.train_checkpoint import load_checkpoint_weights

MASK_LOGITS = "roi_heads.mask_predictor.mask_fcn_logits."


def _ours_to_torchvision_new(name):
    """The key table of docs/weights.md, written out independently of convert.py: our name ->
    torchvision >= 0.13's name."""
    m = re.fullmatch(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(weight|bias)", name)
    if m:
        return f"backbone.fpn.{m[1]}_blocks.{m[2]}.0.{m[3]}"
    m = re.fullmatch(r"rpn\.head\.conv\.(weight|bias)", name)
    if m:
        return f"rpn.head.conv.0.0.{m[1]}"
    m = re.fullmatch(r"roi_heads\.mask_head\.mask_fcn(\d)\.(weight|bias)", name)
    if m:
        return f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"
    return name


def _expected(ours_name, tv_state):
    """The array our parameter must equal, read off the torchvision state by the table."""
    value = np.asarray(tv_state[_ours_to_torchvision_new(ours_name)])
    return value[1:] if ours_name.startswith(MASK_LOGITS) else value  # drop background mask


@pytest.fixture(scope="module")
def our_keys():
    return {
        k: v.shape for k, v in MaskRCNN(MaskRCNNConfig.resnet50_fpn(), rng=0).state_dict().items()
    }


def _torchvision_layout_from_ours(seed=0):
    """A torchvision-named NumPy state dict built from our model, every entry distinct random
    values (so a swapped pair of keys would show), with the extras torchvision has."""
    rng = np.random.default_rng(seed)
    ours = MaskRCNN(MaskRCNNConfig.resnet50_fpn(), rng=0).state_dict()
    tv = {}
    for name, value in ours.items():
        shape = (
            (value.shape[0] + 1,) + value.shape[1:] if name.startswith(MASK_LOGITS) else value.shape
        )
        tv[_ours_to_torchvision_new(name)] = rng.standard_normal(shape).astype(np.float32)
        if name.endswith(".running_var"):
            tv[name.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return tv


def test_preset_is_torchvision_v1():
    cfg = MaskRCNNConfig.resnet50_fpn()
    assert cfg.num_classes == 90  # torchvision's 91 counts the background
    r = cfg.backbone.resnet
    assert (r.blocks, r.norm, r.frozen_stages) == ((3, 4, 6, 3), "frozen_bn", 2)
    assert cfg.rpn.objectness_loss == "sigmoid" and cfg.rpn.logits_per_anchor == 1
    assert (cfg.rpn.pre_nms_top_n_train, cfg.rpn.post_nms_top_n_train) == (2000, 2000)
    assert (cfg.rpn.pre_nms_top_n_test, cfg.rpn.post_nms_top_n_test) == (1000, 1000)
    h = cfg.roi_heads
    assert (h.score_thresh, h.nms_thresh, h.detections_per_img) == (0.05, 0.5, 100)
    assert cfg.image_mean == (0.485, 0.456, 0.406) and cfg.image_std == (0.229, 0.224, 0.225)
    assert (cfg.min_size, cfg.max_size, h.mask_paste) == ((800,), 1333, "torchvision")


def test_conversion_without_torch_puts_every_array_in_its_place(our_keys):
    tv = _torchvision_layout_from_ours()
    converted = from_torchvision({"model": tv, "epoch": np.array(3)})
    assert list(converted) == list(our_keys)
    for name, value in converted.items():
        assert value.dtype == np.float32 and value.shape == our_keys[name]
        np.testing.assert_array_equal(value, _expected(name, tv), err_msg=name)


def test_missing_unknown_and_misshapen_keys_are_all_listed():
    tv = _torchvision_layout_from_ours()
    tv["roi_heads.box_head.fc8.weight"] = np.zeros((3, 3), np.float32)
    tv["backbone.extra.bias"] = np.zeros(2, np.float32)
    del tv["rpn.head.conv.0.0.weight"], tv["backbone.body.layer2.1.bn2.running_mean"]
    tv["backbone.fpn.layer_blocks.2.0.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ValueError) as err:
        from_torchvision(tv)
    msg = str(err.value)
    assert "2 unknown keys" in msg and "'roi_heads.box_head.fc8.weight'" in msg
    assert "'backbone.extra.bias'" in msg
    assert "2 missing keys" in msg and "'rpn.head.conv.weight'" in msg
    assert "'backbone.body.layer2.1.bn2.running_mean'" in msg
    assert "1 shape mismatches" in msg and "(7,) vs (256,)" in msg


def test_a_key_in_both_layouts_and_integer_parameters_are_refused():
    tv = _torchvision_layout_from_ours()
    tv["rpn.head.conv.weight"] = tv["rpn.head.conv.0.0.weight"]  # old and new name at once
    tv["rpn.head.cls_logits.bias"] = tv["rpn.head.cls_logits.bias"].astype(np.int32)
    with pytest.raises(ValueError) as err:
        from_torchvision(tv)
    assert "both map to 'rpn.head.conv.weight'" in str(err.value)
    assert "'rpn.head.cls_logits.bias' has dtype int32" in str(err.value)


def test_num_classes_follows_the_class_logits():
    tv = _torchvision_layout_from_ours()
    k = 4
    for name in list(tv):
        if name.startswith(("roi_heads.box_predictor.", MASK_LOGITS)):
            per_class = 4 if "bbox_pred" in name else 1
            tv[name] = tv[name][: (k + 1) * per_class]
    converted = from_torchvision(tv)
    assert converted[MASK_LOGITS + "weight"].shape == (k, 256, 1, 1)
    MaskRCNN(MaskRCNNConfig.resnet50_fpn(num_classes=k), rng=0).load_state_dict(converted)


# -- with torchvision: a randomly initialised maskrcnn_resnet50_fpn saved by torch ---------


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    torch = pytest.importorskip("torch")
    detection = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    model = detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    state = model.state_dict()
    with torch.no_grad():  # distinct values everywhere, BN statistics included
        for t in state.values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    path = tmp_path_factory.mktemp("tv") / "maskrcnn.pth"
    torch.save(state, path)
    return path, state


def test_every_parameter_equals_the_torch_tensor_it_maps_from(torchvision_file, our_keys):
    path, state = torchvision_file
    assert "backbone.fpn.inner_blocks.0.0.weight" in state  # this torchvision's layout
    converted = from_torchvision(path)
    assert list(converted) == list(our_keys)
    used = {_ours_to_torchvision_new(k) for k in converted}
    dropped = set(state) - used
    assert dropped and all(k.endswith(".num_batches_tracked") for k in dropped)
    for name, value in converted.items():
        np.testing.assert_array_equal(value, _expected(name, state), err_msg=name)
    model = MaskRCNN(MaskRCNNConfig.resnet50_fpn(), rng=1)
    model.load_state_dict(converted)  # strict
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, converted[name], err_msg=name)


def test_old_torchvision_layout_in_a_legacy_file_converts_the_same(torchvision_file, tmp_path):
    torch = pytest.importorskip("torch")
    path, state = torchvision_file
    old = {}
    for k, v in state.items():  # the pre-0.13 names, as in torchvision's 2019 weights file
        k = re.sub(r"^(backbone\.fpn\.\w+_blocks\.\d)\.0\.", r"\1.", k)
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        k = re.sub(r"mask_head\.(\d)\.0\.", lambda m: f"mask_head.mask_fcn{int(m[1]) + 1}.", k)
        if not k.endswith("num_batches_tracked"):  # FrozenBN has no counter
            old[k] = v
    assert "backbone.fpn.inner_blocks.0.weight" in old and "rpn.head.conv.weight" in old
    legacy = tmp_path / "maskrcnn_2019_style.pth"
    torch.save(old, legacy, _use_new_zipfile_serialization=False)
    new = from_torchvision(path)
    got = from_torchvision(legacy)
    assert list(got) == list(new)
    for k in new:
        np.testing.assert_array_equal(got[k], new[k], err_msg=k)


def test_a_state_dict_of_torch_tensors_in_memory(torchvision_file):
    path, state = torchvision_file
    from_file = from_torchvision(path)
    in_memory = from_torchvision(state)
    for k in from_file:
        np.testing.assert_array_equal(in_memory[k], from_file[k], err_msg=k)


def test_cli_convert_writes_weights_the_model_loads(torchvision_file, tmp_path, capsys):
    path, state = torchvision_file
    out = tmp_path / "coco_r50.npz"
    assert main(["convert", "torchvision", str(path), str(out)]) == 0
    assert "num_classes=90" in capsys.readouterr().out
    model = load_checkpoint_weights(MaskRCNN(MaskRCNNConfig.resnet50_fpn(), rng=1), out)
    w = model.roi_heads.mask_predictor.mask_fcn_logits.weight.data
    np.testing.assert_array_equal(w, state[MASK_LOGITS + "weight"].numpy()[1:])
    assert set(weights.load(out)) == set(model.state_dict())


def test_cli_convert_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    assert main(["convert", "torchvision", str(bad), str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mrcnn-edu convert: error: cannot read") and "notes.pth" in err
    assert "Traceback" not in err
    assert main(["convert", "torchvision", str(tmp_path / "missing.pth"), "o.npz"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()
