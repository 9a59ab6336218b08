"""``mrcnn-edu inspect``: every problem listed at once with its ids, then statistics checked
against hand counts, the anchor-match share against hand-computed IoUs, and the figure."""

import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from mrcnn_edu import cli  # noqa: E402
from mrcnn_edu.anchors import AnchorGenerator  # noqa: E402
from mrcnn_edu.boxes import box_iou  # noqa: E402
from mrcnn_edu.data.shapes import ShapesDataset, write_coco  # noqa: E402
from mrcnn_edu.inspect_data import (  # noqa: E402
    best_anchor_iou,
    dataset_statistics,
    suggest_anchor_sizes,
)
from mrcnn_edu.inspect_report import format_statistics  # noqa: E402
from mrcnn_edu.mask_rcnn import MaskRCNNConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SMALL_SIZES = ((16,), (32,), (64,), (128,), (256,))  # MaskRCNNConfig.small's anchors


def shapes_export(root, num_images=6, seed=3):
    """A COCO export of shapes data (compressed-RLE masks); returns (json path, image dir)."""
    shapes = ShapesDataset(num_images, image_size=(64, 64), seed=seed, min_objects=2)
    return write_coco(shapes, root), os.path.join(root, "images")


def rewrite(json_path, change):
    with open(json_path) as f:
        content = json.load(f)
    change(content)
    with open(json_path, "w") as f:
        json.dump(content, f)
    return content


def inspect(json_path, image_dir, out, *extra):
    return cli.main(
        ["inspect", "--data", json_path, "--images", image_dir, "--out", out, "--no-progress"]
        + list(extra)
    )


def test_every_problem_is_listed_with_file_image_and_annotation_ids(tmp_path, capsys):
    json_path, image_dir = shapes_export(tmp_path)

    def inject(c):
        anns = c["annotations"]
        assert len(anns) >= 7
        anns[0]["bbox"] = [5, 5, -3, 4]
        anns[1]["category_id"] = 99
        # 4096 = 4 * 32**2 is written "PP4": 5-bit groups 0, 0, 4 as chr(48 + group), with
        # 0x20 added while more groups follow. An empty 64x64 mask is that single run.
        anns[2]["segmentation"]["counts"] = "PP"  # stops inside the number
        anns[3]["segmentation"]["counts"] = "QP4"  # 1 + 4096: one pixel too many
        anns[4]["segmentation"] = {"size": [64, 64], "counts": [100]}
        anns[6]["id"] = anns[5]["id"]

    content = rewrite(json_path, inject)
    os.remove(os.path.join(image_dir, content["images"][2]["file_name"]))
    image = Image.fromarray(np.zeros((64, 50, 3), np.uint8))  # a file of another size
    image.save(os.path.join(image_dir, content["images"][4]["file_name"]))
    out = str(tmp_path / "inspect.png")
    assert inspect(json_path, image_dir, out) == 2
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    anns, img = content["annotations"], content["images"][2]
    where = [
        f"annotations[{i}] (id {a['id']}, image_id {a['image_id']})" for i, a in enumerate(anns)
    ]
    expected = [
        f"images[2] (id {img['id']}): image file {img['file_name']!r} not found",
        f"{where[0]}: bad bbox [5, 5, -3, 4]: negative width",
        f"{where[1]}: refers to category_id 99",
        f"{where[2]}: compressed RLE counts",
        f"{where[3]}: compressed RLE counts",
        f"{where[4]}: uncompressed RLE counts must be non-negative and sum to height * width",
        f"{where[6]}: duplicate annotation id",
        f"images[4] (id {content['images'][4]['id']}): ",
    ]
    assert len(lines) == len(expected)
    for line, want in zip(lines, expected):
        assert line.startswith(str(json_path)) and want in line, (line, want)
    assert "stops in the middle of a number" in lines[3]
    assert "its runs cover 4097 pixels, not height * width = 4096" in lines[4]
    assert "is 64x50 (HxW) but the json says 64x64" in lines[7]
    assert "8 problem(s) found" in printed.err and "mrcnn-edu inspect: error:" in printed.err
    assert not os.path.exists(out)


def test_image_files_of_another_size_or_unreadable_are_problems(tmp_path, capsys):
    json_path, image_dir = shapes_export(tmp_path, num_images=3)
    Image.fromarray(np.zeros((64, 50, 3), np.uint8)).save(os.path.join(image_dir, "000001.png"))
    with open(os.path.join(image_dir, "000002.png"), "w") as f:
        f.write("not a png")
    assert inspect(json_path, image_dir, str(tmp_path / "f.png")) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "images[1] (id 1):" in lines[0] and "is 64x50 (HxW) but the json says 64x64" in lines[0]
    assert "images[2] (id 2): cannot read image file" in lines[1]


def hand_dataset(root):
    """Three 64x64 images: two 'a' objects on the first, one 'b' on the second, none on the
    third; plus a crowd region and an empty box, which are not instances."""
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (10, 11, 12)]
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for img in images:
        pixels = np.full((64, 64, 3), 90, np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "images", img["file_name"]))

    def ann(ann_id, image_id, category_id, box, iscrowd=0):
        x, y, w, h = box
        polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
        return {
            "id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": box,
            "segmentation": [polygon], "iscrowd": iscrowd, "area": w * h,
        }  # fmt: skip

    annotations = [
        ann(1, 10, 7, [8, 8, 16, 16]),  # exactly a 16-px anchor of stride 4 (see below)
        ann(2, 10, 7, [40, 40, 2, 2]),  # 2 px: no anchor of area within 2x of 4 px^2
        ann(3, 11, 3, [10, 8, 16, 16]),  # the 16-px anchor moved 2 px right
        ann(4, 11, 3, [0, 0, 64, 64], iscrowd=1),
        ann(5, 12, 3, [30, 30, 0, 5]),  # empty box
    ]
    content = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "a"}, {"id": 3, "name": "b"}],
    }
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(content, f)
    return content, os.path.join(root, "data.json"), os.path.join(root, "images")


def test_statistics_of_a_hand_made_dataset(tmp_path):
    content, _, _ = hand_dataset(tmp_path)
    stats = dataset_statistics(content, MaskRCNNConfig.small(2))
    assert stats["num_images"] == 3 and stats["num_images_empty"] == 1
    assert stats["num_instances"] == 3
    assert stats["num_crowd"] == 1 and stats["num_degenerate"] == 1
    assert stats["class_names"] == ["b", "a"]  # sorted by category id, as the labels are
    assert stats["instances_per_class"] == {"b": 1, "a": 2}
    np.testing.assert_array_equal(stats["instances_per_image"], [2, 1, 0])
    np.testing.assert_allclose(stats["object_sizes"], [16, 2, 16])
    assert stats["size_buckets"] == {"small": 3, "medium": 0, "large": 0}
    # anchor (16, ratio 1) at grid position (4, 4) of stride 4 is [-8, -8, 8, 8] + 16 = the box
    # exactly; the shifted box overlaps its neighbours by 14 x 16: 224 / (256 + 256 - 224)
    # (the ratio 0.5 and 2 anchors, 22 x 12, reach at most 192 / 328)
    np.testing.assert_allclose(stats["best_anchor_iou"], [1.0, 0.0, 224 / 288])
    assert stats["unmatched_share"] == pytest.approx(1 / 3)


def test_with_a_resizing_model_objects_are_compared_at_its_input_scale(tmp_path):
    content, _, _ = hand_dataset(tmp_path)
    config = dataclasses.replace(MaskRCNNConfig.small(2), min_size=128, max_size=256)
    stats = dataset_statistics(content, config)
    assert stats["input_resize"] == (128, 256)  # 64 x 64 images become 128 x 128
    np.testing.assert_allclose(stats["object_sizes"], [16, 2, 16])  # the file's pixels
    np.testing.assert_allclose(stats["input_object_sizes"], [32, 4, 32])
    # doubled, the first box is the 32-px anchor [-16, -16, 16, 16] at (32, 32) (stride 8); the
    # third, [20, 16, 52, 48], overlaps it and its right neighbour by 28 x 32: 896 / 1152
    np.testing.assert_allclose(stats["best_anchor_iou"], [1.0, 0.0, 896 / 1152])
    assert "model input: shorter side 128, longer at most 256" in format_statistics(stats)


def test_unmatched_share_is_zero_for_anchor_sized_objects_and_one_for_tiny_ones():
    sizes = np.array([[64, 64]])
    # cell anchors: 16 -> [-8, -8, 8, 8] (stride 4), 32 at ratio 0.5 -> [-23, -11, 23, 11] and
    # 32 at ratio 1 -> [-16, -16, 16, 16] (stride 8); placed at (32, 32), (32, 24), (32, 32)
    anchor_sized = np.array([[24, 24, 40, 40], [9, 13, 55, 35], [16, 16, 48, 48]], float)
    best = best_anchor_iou(anchor_sized, [0, 0, 0], sizes, SMALL_SIZES)
    np.testing.assert_array_equal(best, 1.0)
    tiny = np.array([[3, 3, 6, 6], [50, 20, 52, 23]], float)
    assert np.all(best_anchor_iou(tiny, [0, 0], sizes, SMALL_SIZES) < 0.5)


def test_best_anchor_iou_equals_brute_force_over_every_anchor():
    """The level and window pruning drops no anchor that reaches IoU 0.5."""
    sizes = np.array([(64, 96), (100, 70)])
    items = [ShapesDataset(4, image_size=s, seed=5, min_objects=3)[1] for s in sizes]
    boxes = np.concatenate([it["boxes"] for it in items]).astype(np.float64)
    boxes = np.concatenate([boxes, [[0, 0, 96, 64], [30, 5, 33, 90], [2, 2, 9, 6]]])
    rows = np.concatenate([np.zeros(len(items[0]["boxes"])), np.ones(len(items[1]["boxes"]))])
    rows = np.concatenate([rows, [0, 1, 1]]).astype(int)
    generator = AnchorGenerator(SMALL_SIZES)
    got = best_anchor_iou(boxes, rows, sizes, SMALL_SIZES)
    for row, padded in enumerate([(64, 96), (128, 96)]):
        shapes = [(math.ceil(padded[0] / s), math.ceil(padded[1] / s)) for s in (4, 8, 16, 32, 64)]
        anchors = generator(padded, shapes, np.float64)
        want = box_iou(boxes[rows == row], anchors).max(axis=1)
        reached = want >= 0.5
        np.testing.assert_allclose(got[rows == row][reached], want[reached], rtol=1e-12)
        assert np.all(got[rows == row][~reached] < 0.5)
    assert got.min() < 0.5 < got.max()  # both cases occur


def test_suggested_sizes_cover_the_object_sizes():
    rng = np.random.default_rng(0)
    object_sizes = np.exp(rng.uniform(np.log(12), np.log(300), 400))
    sizes, note = suggest_anchor_sizes(object_sizes)
    flat = [s[0] for s in sizes]
    assert len(flat) == 5 and note == ""
    assert all(b == 2 * a for a, b in zip(flat, flat[1:]))
    p5, p95 = np.percentile(object_sizes, [5, 95])
    inside = object_sizes[(object_sizes >= p5) & (object_sizes <= p95)]
    # each object within a factor sqrt(2) of some size: a square of twice the area has IoU 0.5
    ratio = np.abs(np.log2(inside[:, None] / np.array(flat)[None, :])).min(axis=1)
    assert ratio.max() <= 0.5 + 1e-9


def test_too_wide_a_range_says_so():
    _, note = suggest_anchor_sizes(np.geomspace(2, 2000, 100))
    assert "span more than the 32x" in note


def test_clean_dataset_prints_statistics_and_writes_the_figure(tmp_path, capsys):
    _, json_path, image_dir = hand_dataset(tmp_path)
    out = str(tmp_path / "figure.png")
    assert inspect(json_path, image_dir, out) == 0
    printed = capsys.readouterr().out
    assert "no problems (3 images, 5 annotations, 2 categories)" in printed
    assert "images: 3 (1 without instances)" in printed
    assert "instances: 3 (not counted: 1 crowd, 1 with an empty box)" in printed
    assert "  b                    1\n  a                    2" in printed
    assert "instances per image: min 0, median 1, max 2" in printed
    assert "objects no anchor matches at IoU >= 0.5: 1 of 3 (33.3%), sizes 2.0-2.0 px" in printed
    # the suggestion is given as the train flag that applies it, and as the config setting
    suggested = re.search(r"train with --anchor-sizes (\S+) \(a run config: ", printed)
    assert suggested and len(suggested.group(1).split(",")) == 5
    assert "model.rpn.anchor_sizes [[" in printed
    with Image.open(out) as figure:
        assert figure.size[0] > 800
    # a second run refuses to replace the figure, unless asked
    assert inspect(json_path, image_dir, out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert inspect(json_path, image_dir, out, "--overwrite") == 0
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_the_config_anchors_are_the_ones_compared(tmp_path, capsys):
    _, json_path, image_dir = hand_dataset(tmp_path)
    config = tmp_path / "run.json"
    sizes = [[200], [400], [800], [1600], [3200]]  # far from every object
    config.write_text(json.dumps({"model": {"num_classes": 2, "rpn": {"anchor_sizes": sizes}}}))
    assert inspect(json_path, image_dir, str(tmp_path / "f.png"), "--config", str(config)) == 0
    printed = capsys.readouterr().out
    assert "anchor sizes: 200, 400, 800, 1600, 3200 on strides 4, 8, 16, 32, 64" in printed
    assert "objects no anchor matches at IoU >= 0.5: 3 of 3 (100.0%)" in printed


@pytest.mark.parametrize(
    "name, message",
    [("figure", "needs an image extension"), ("missing/f.png", "does not exist; create it")],
)
def test_a_bad_figure_path_is_refused_before_any_work(tmp_path, capsys, name, message):
    _, json_path, image_dir = hand_dataset(tmp_path)
    assert inspect(json_path, image_dir, str(tmp_path / name)) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "no problems" not in captured.out
