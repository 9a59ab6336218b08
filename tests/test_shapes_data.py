"""The synthetic shapes dataset: layout, determinism, exact visible masks, COCO export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mrcnn_edu.data.shapes import (
    ALL_SHAPE_KINDS,
    SHAPE_KINDS,
    ShapesDataset,
    masks_to_boxes,
    shape_mask,
    to_coco_dict,
    write_coco,
)

# pycocotools' own decode warns under NumPy 2 (its RLE object lacks __array__(copy=)).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_items_have_the_documented_layout():
    ds = ShapesDataset(12, image_size=(96, 80), seed=1)
    assert len(ds) == 12
    for i in range(len(ds)):
        item = ds[i]
        g = len(item["labels"])
        assert item["image"].shape == (3, 96, 80) and item["image"].dtype == np.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["boxes"].shape == (g, 4) and item["boxes"].dtype == np.float32
        assert item["labels"].dtype == np.int64
        assert item["masks"].shape == (g, 96, 80) and item["masks"].dtype == np.uint8
        assert set(np.unique(item["masks"])) <= {0, 1}
        assert item["image_id"] == i
        assert 1 <= g <= 4
        assert np.all((item["labels"] >= 1) & (item["labels"] <= 3))


def test_categories_number_the_classes_from_one():
    ds = ShapesDataset(1, classes=("square", "ellipse"))
    assert ds.categories == [{"id": 1, "name": "square"}, {"id": 2, "name": "ellipse"}]
    assert ds.class_names == ("square", "ellipse")
    assert ds.label_to_category_id == {1: 1, 2: 2}


def test_items_are_deterministic_per_seed_and_index_in_any_order():
    a = ShapesDataset(20, seed=7)
    b = ShapesDataset(20, seed=7)
    late_first = b[13]  # b generates item 13 before anything else
    for key in ("image", "boxes", "labels", "masks"):
        np.testing.assert_array_equal(a[13][key], late_first[key])
    np.testing.assert_array_equal(a[13]["image"], a[13]["image"])
    assert not np.array_equal(ShapesDataset(20, seed=8)[13]["image"], a[13]["image"])
    assert not np.array_equal(a[12]["image"], a[13]["image"])
    np.testing.assert_array_equal(a[-1]["image"], a[19]["image"])
    with pytest.raises(IndexError):
        a[20]


def test_boxes_are_tight_around_the_visible_masks():
    ds = ShapesDataset(16, seed=2)
    checked = 0
    for i in range(len(ds)):
        item = ds[i]
        for box, mask in zip(item["boxes"], item["masks"]):
            x1, y1, x2, y2 = (int(v) for v in box)
            assert box.tolist() == [x1, y1, x2, y2]  # whole pixels
            # everything inside the box, and every edge row/column of the box touches the mask
            assert mask[y1:y2, x1:x2].sum() == mask.sum() > 0
            assert mask[y1].any() and mask[y2 - 1].any()
            assert mask[:, x1].any() and mask[:, x2 - 1].any()
            checked += 1
    assert checked > 20


def test_masks_to_boxes_uses_pixel_edges():
    masks = np.zeros((2, 10, 10), np.uint8)
    masks[0, 3, 5] = 1
    masks[1, 2:5, 1:8] = 1
    np.testing.assert_array_equal(masks_to_boxes(masks), [[5, 3, 6, 4], [1, 2, 8, 5]])


def test_masks_are_the_visible_parts_under_later_shapes():
    """Rebuild each image's masks from the drawn shapes: later shapes hide earlier ones."""
    ds = ShapesDataset(30, seed=3, max_objects=5)
    occluded = 0
    for i in range(len(ds)):
        item, layout = ds[i], ds.describe(i)
        h, w = ds.image_size
        full = [shape_mask(s["kind"], h, w, s["cx"], s["cy"], s["r"]) for s in layout]
        assert [s["label"] for s in layout] == item["labels"].tolist()
        for g in range(len(full)):
            covered = np.zeros((h, w), bool)
            for later in full[g + 1 :]:
                covered |= later
            np.testing.assert_array_equal(item["masks"][g], full[g] & ~covered)
            fraction = item["masks"][g].sum() / full[g].sum()
            assert fraction >= 0.4
            assert layout[g]["visible_fraction"] == pytest.approx(fraction)
            occluded += fraction < 1
        # visible parts never overlap
        assert item["masks"].sum(axis=0).max(initial=0) <= 1
    assert occluded >= 3, "the test data should contain some occlusion"


def test_min_visible_one_forbids_any_overlap():
    ds = ShapesDataset(10, seed=4, max_objects=4, min_visible=1.0)
    for i in range(len(ds)):
        assert all(s["visible_fraction"] == 1.0 for s in ds.describe(i))


def test_radii_follow_the_range_and_shapes_fit_in_the_image():
    ds = ShapesDataset(20, seed=5)
    radii = [s["r"] for i in range(len(ds)) for s in ds.describe(i)]
    assert min(radii) >= 8 and max(radii) <= 30
    small = ShapesDataset(10, image_size=(32, 64), seed=5)
    radii = [s["r"] for i in range(len(small)) for s in small.describe(i)]
    assert min(radii) >= 2 and max(radii) <= 7.5  # 8..30 scaled by 32 / 128
    for i in range(len(small)):
        for s in small.describe(i):
            assert s["r"] <= s["cx"] <= 64 - s["r"] and s["r"] <= s["cy"] <= 32 - s["r"]


def test_objects_contrast_with_the_background():
    ds = ShapesDataset(20, seed=6)
    for i in range(len(ds)):
        item = ds[i]
        image = item["image"].astype(np.float64)
        background = item["masks"].sum(axis=0) == 0
        background_mean = image[:, background].mean(axis=1)
        for mask in item["masks"].astype(bool):
            object_mean = image[:, mask].mean(axis=1)
            assert np.linalg.norm(object_mean - background_mean) > 0.3


def test_object_counts_and_images_without_objects():
    empty = ShapesDataset(5, image_size=(32, 32), min_objects=0, max_objects=0)
    for i in range(len(empty)):
        item = empty[i]
        assert item["boxes"].shape == (0, 4) and item["boxes"].dtype == np.float32
        assert item["labels"].shape == (0,) and item["labels"].dtype == np.int64
        assert item["masks"].shape == (0, 32, 32) and item["masks"].dtype == np.uint8
    mixed = ShapesDataset(40, image_size=(64, 64), min_objects=0, max_objects=2, seed=1)
    counts = [len(mixed[i]["labels"]) for i in range(len(mixed))]
    assert set(counts) == {0, 1, 2}
    three = ShapesDataset(8, min_objects=3, max_objects=3)
    assert all(len(three[i]["labels"]) == 3 for i in range(len(three)))


def test_extra_shape_kinds_have_their_analytic_areas():
    r = 20.0
    # an off-grid centre, so no pixel centre sits exactly on the diamond's edges
    diamond = shape_mask("diamond", 100, 100, 50.3, 49.8, r)
    ellipse = shape_mask("ellipse", 100, 100, 50.3, 49.8, r)
    assert abs(diamond.sum() - 2 * r * r) / (2 * r * r) < 0.03
    assert abs(ellipse.sum() - np.pi * r * 0.55 * r) / (np.pi * r * 0.55 * r) < 0.02
    # the ellipse is wider than tall
    assert np.flatnonzero(ellipse.any(axis=0)).size > 1.5 * np.flatnonzero(ellipse.any(1)).size
    assert SHAPE_KINDS == ("circle", "square", "triangle")  # the toolkit demo's classes
    ds = ShapesDataset(10, classes=ALL_SHAPE_KINDS, seed=2, max_objects=6)
    labels = np.concatenate([ds[i]["labels"] for i in range(len(ds))])
    assert labels.min() >= 1 and labels.max() <= 5 and len(set(labels)) >= 4


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown shape kind 'hexagon'"):
        ShapesDataset(2, classes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        ShapesDataset(2, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="radius_range"):
        ShapesDataset(2, image_size=(32, 32), radius_range=(4, 20))
    with pytest.raises(ValueError, match="num_images"):
        ShapesDataset(-1)
    with pytest.raises(ValueError, match="duplicates"):
        ShapesDataset(2, classes=("circle", "circle"))
    with pytest.raises(ValueError, match="backgrounds"):
        ShapesDataset(2, backgrounds=("plaid",))
    with pytest.raises(RuntimeError, match="could not place 6 shapes"):
        ShapesDataset(1, image_size=(32, 32), min_objects=6, max_objects=6, radius_range=(14, 16))[
            0
        ]


def test_write_coco_reads_back_with_pycocotools(tmp_path):
    pytest.importorskip("pycocotools")
    from PIL import Image
    from pycocotools.coco import COCO

    ds = ShapesDataset(6, image_size=(48, 64), seed=9, min_objects=0, max_objects=3)
    json_path = write_coco(ds, tmp_path)
    assert json_path == os.path.join(str(tmp_path), "annotations.json")
    with open(json_path) as f:
        content = json.load(f)  # plain JSON: RLE counts are strings
    assert content["categories"] == ds.categories
    coco = COCO(json_path)
    assert sorted(coco.imgs) == list(range(6))
    assert min(coco.anns) == 1  # COCOeval reads annotation id 0 as "unmatched"
    for i in range(len(ds)):
        item = ds[i]
        info = coco.imgs[i]
        assert (info["height"], info["width"]) == (48, 64)
        anns = coco.imgToAnns[i]
        assert [a["category_id"] for a in anns] == item["labels"].tolist()
        for ann, box, mask in zip(anns, item["boxes"], item["masks"]):
            np.testing.assert_array_equal(coco.annToMask(ann), mask)
            x1, y1, x2, y2 = box.tolist()
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
        png = np.asarray(Image.open(os.path.join(tmp_path, "images", info["file_name"])))
        np.testing.assert_allclose(png / 255.0, item["image"].transpose(1, 2, 0), atol=0.5 / 255)


def test_to_coco_dict_needs_no_files():
    pytest.importorskip("pycocotools")
    ds = ShapesDataset(3, image_size=(32, 32), seed=0)
    content = to_coco_dict(ds)
    assert len(content["images"]) == 3
    assert len(content["annotations"]) == sum(len(ds[i]["labels"]) for i in range(3))
    assert all(isinstance(a["segmentation"]["counts"], str) for a in content["annotations"])
    json.dumps(content)


def test_importing_the_data_modules_needs_numpy_only():
    code = (
        "import sys; import mrcnn_edu.data.shapes, mrcnn_edu.data.coco, mrcnn_edu.evaluate, "
        "mrcnn_edu.visualize; "
        "bad = [m for m in ('pycocotools', 'matplotlib', 'PIL') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_optional_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(ImportError, match=r"mrcnn-edu\[demo\]"):
        to_coco_dict(ShapesDataset(1, image_size=(16, 16), radius_range=(2, 4)))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"Pillow.*mrcnn-edu\[demo\]"):
        write_coco(ShapesDataset(1, image_size=(16, 16), radius_range=(2, 4)), tmp_path)
