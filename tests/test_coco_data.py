"""Loading COCO-format instances: masks from polygons and RLE, crowds, category mapping, and
an error that names the file and the problem for every kind of bad input."""

import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("pycocotools")
from PIL import Image  # noqa: E402  (Pillow comes with matplotlib, as pycocotools needs it)
from pycocotools import mask as mask_utils  # noqa: E402

from mrcnn_edu.data.coco import (  # noqa: E402
    CocoDataset,
    find_coco_problems,
    validate_coco_instances,
)
from mrcnn_edu.data.rle import compressed_rle_counts  # noqa: E402
from mrcnn_edu.data.shapes import ShapesDataset, write_coco  # noqa: E402

SQUARE = [10, 10, 30, 10, 30, 30, 10, 30]  # polygon of the 20x20 square [10, 30) x [10, 30)

# pycocotools' own decode warns under NumPy 2 (its RLE object lacks __array__(copy=)).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def make_coco(root, annotations, images=None, categories=None, write_images=True):
    """Write a COCO json (and solid-grey PNGs for its images) under ``root``; return paths."""
    images = images if images is not None else [image_entry(1, 40, 40)]
    categories = categories if categories is not None else [{"id": 1, "name": "thing"}]
    content = {"images": images, "annotations": annotations, "categories": categories}
    image_root = os.path.join(root, "images")
    os.makedirs(image_root, exist_ok=True)
    if write_images:
        for img in images:
            pixels = np.full((img["height"], img["width"], 3), 128, np.uint8)
            Image.fromarray(pixels).save(os.path.join(image_root, img["file_name"]))
    json_path = os.path.join(root, "instances.json")
    with open(json_path, "w") as f:
        json.dump(content, f)
    return json_path, image_root


def image_entry(image_id, height, width):
    return {"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width}


def ann(ann_id, segmentation, bbox, image_id=1, category_id=1, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "bbox": bbox,
        "iscrowd": iscrowd,
        "area": 0.0,
    }


def test_round_trip_through_write_coco(tmp_path):
    shapes = ShapesDataset(5, image_size=(40, 56), seed=4, min_objects=0, max_objects=3)
    json_path = write_coco(shapes, tmp_path)
    coco = CocoDataset(json_path, os.path.join(tmp_path, "images"))
    assert len(coco) == len(shapes)
    assert coco.categories == shapes.categories
    assert coco.label_to_category_id == {1: 1, 2: 2, 3: 3}
    for i in range(len(shapes)):
        want, got = shapes[i], coco[i]
        assert got["image_id"] == want["image_id"] and got["orig_size"] == (40, 56)
        assert got["image"].dtype == np.float32 and got["image"].shape == (3, 40, 56)
        # PNG stores 8 bits: the image comes back within half a grey level
        np.testing.assert_allclose(got["image"], want["image"], atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(got["boxes"], want["boxes"])
        np.testing.assert_array_equal(got["labels"], want["labels"])
        np.testing.assert_array_equal(got["masks"], want["masks"])
        assert got["masks"].dtype == np.uint8 and got["labels"].dtype == np.int64
        assert got["crowd_boxes"].shape == (0, 4)


def test_polygon_square_gives_the_exact_mask(tmp_path):
    json_path, root = make_coco(tmp_path, [ann(1, [SQUARE], [10, 10, 20, 20])])
    item = CocoDataset(json_path, root)[0]
    mask = item["masks"][0]
    # pixels whose centres lie inside the square: rows and columns 10..29
    assert mask.sum() == 400 and mask[10:30, 10:30].all()
    np.testing.assert_array_equal(item["boxes"], [[10, 10, 30, 30]])
    np.testing.assert_array_equal(item["labels"], [1])


def test_uncompressed_and_compressed_rle(tmp_path):
    expected = np.zeros((4, 5), np.uint8)
    expected[1:4, 1] = 1
    expected[0, 3] = 1
    # runs go down the columns, starting with zeros: 5 zeros (column 0 and the top of column 1),
    # 3 ones, 4 zeros (column 2), 1 one (top of column 3), 7 zeros (the rest)
    uncompressed = {"size": [4, 5], "counts": [5, 3, 4, 1, 7]}
    compressed = mask_utils.encode(np.asfortranarray(expected))
    compressed = {"size": [4, 5], "counts": compressed["counts"].decode()}
    annotations = [ann(1, uncompressed, [1, 0, 3, 4]), ann(2, compressed, [1, 0, 3, 4])]
    json_path, root = make_coco(tmp_path, annotations, images=[image_entry(1, 4, 5)])
    item = CocoDataset(json_path, root)[0]
    np.testing.assert_array_equal(item["masks"][0], expected)
    np.testing.assert_array_equal(item["masks"][1], expected)


def test_non_contiguous_category_ids_map_to_labels_and_back(tmp_path):
    categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    annotations = [
        ann(1, [SQUARE], [10, 10, 20, 20], category_id=7),
        ann(2, [[0, 0, 5, 0, 5, 5, 0, 5]], [0, 0, 5, 5], category_id=3),
    ]
    json_path, root = make_coco(tmp_path, annotations, categories=categories)
    ds = CocoDataset(json_path, root)
    assert ds.category_id_to_label == {3: 1, 7: 2}  # sorted by id
    assert ds.label_to_category_id == {1: 3, 2: 7}
    assert ds.class_names == ("three", "seven")
    assert ds.categories == [{"id": 1, "name": "three"}, {"id": 2, "name": "seven"}]
    np.testing.assert_array_equal(ds[0]["labels"], [2, 1])


def test_crowd_regions_are_reported_not_trained_on(tmp_path):
    crowd = {"size": [40, 40], "counts": [0, 40 * 40]}  # runs start with zeros: 0 of them
    annotations = [
        ann(1, [SQUARE], [10, 10, 20, 20]),
        ann(2, crowd, [0, 0, 40, 40], iscrowd=1),
    ]
    json_path, root = make_coco(tmp_path, annotations)
    ds = CocoDataset(json_path, root)
    item = ds[0]
    assert len(item["labels"]) == 1 and item["masks"].shape == (1, 40, 40)
    np.testing.assert_array_equal(item["crowd_boxes"], [[0, 0, 40, 40]])
    assert ds.num_crowd == 1 and "1 crowd" in repr(ds)
    assert len(ds.coco.anns) == 2  # kept for evaluation, where crowds excuse detections


def test_empty_boxes_are_skipped_and_counted(tmp_path):
    annotations = [ann(1, [SQUARE], [10, 10, 20, 20]), ann(2, [SQUARE], [10, 10, 0, 20])]
    json_path, root = make_coco(tmp_path, annotations)
    ds = CocoDataset(json_path, root)
    assert len(ds[0]["labels"]) == 1 and ds.num_degenerate == 1


def test_images_without_annotations_are_kept_unless_skip_empty(tmp_path):
    images = [image_entry(1, 40, 40), image_entry(5, 20, 30)]
    json_path, root = make_coco(tmp_path, [ann(1, [SQUARE], [10, 10, 20, 20])], images=images)
    ds = CocoDataset(json_path, root)
    assert ds.image_ids == [1, 5]
    empty = ds[1]
    assert empty["image_id"] == 5 and empty["orig_size"] == (20, 30)
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 20, 30)
    assert CocoDataset(json_path, root, skip_empty=True).image_ids == [1]


def test_grey_images_load_as_rgb(tmp_path):
    json_path, root = make_coco(tmp_path, [ann(1, [SQUARE], [10, 10, 20, 20])])
    Image.fromarray(np.full((40, 40), 51, np.uint8), mode="L").save(os.path.join(root, "1.png"))
    image = CocoDataset(json_path, root)[0]["image"]
    assert image.shape == (3, 40, 40)
    np.testing.assert_allclose(image, 0.2, atol=1e-6)


# ---- malformed input: every error names the file and the problem ---------------------------


def write_json(tmp_path, content, name="bad.json"):
    path = os.path.join(tmp_path, name)
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return path


def good_content():
    return {
        "images": [image_entry(1, 40, 40)],
        "annotations": [ann(1, [SQUARE], [10, 10, 20, 20])],
        "categories": [{"id": 1, "name": "thing"}],
    }


def test_error_for_a_file_that_is_not_json(tmp_path):
    path = write_json(tmp_path, "{'images': [")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        CocoDataset(path, tmp_path)


def test_error_for_a_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.json.*does not exist"):
        CocoDataset(os.path.join(tmp_path, "nothere.json"), tmp_path)


def test_error_for_a_top_level_that_is_not_an_object(tmp_path):
    path = write_json(tmp_path, [1, 2])
    with pytest.raises(ValueError, match=r"bad\.json: the top level must be a JSON object"):
        CocoDataset(path, tmp_path)


def test_error_names_the_missing_top_level_keys(tmp_path):
    content = good_content()
    del content["annotations"], content["categories"]
    path = write_json(tmp_path, content)
    with pytest.raises(ValueError, match=r"bad\.json: missing required key\(s\) \['annotations', "):
        CocoDataset(path, tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["annotations"][0].update(image_id=9), r"annotations\[0\].*image_id 9"),
        (lambda c: c["annotations"][0].update(category_id=4), r"category_id 4.*known ids: \[1\]"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), r"bad bbox \[1, 2, 3\]"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, "3", 4]), r"bad bbox"),
        (lambda c: c["annotations"][0].update(bbox=[30, 30, -20, 5]), r"negative width"),
        (lambda c: c["annotations"][0].pop("segmentation"), r"missing key\(s\) \['segmentation'\]"),
        (lambda c: c["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), r"at least 3 points"),
        (lambda c: c["annotations"][0].update(segmentation=[]), r"empty 'segmentation'"),
        (
            lambda c: c["annotations"][0].update(segmentation={"size": [4, 4], "counts": [16]}),
            r"RLE size \[4, 4\] is not the image's \[height, width\] \[40, 40\]",
        ),
        (
            lambda c: c["annotations"][0].update(segmentation={"size": [40, 40], "counts": [5]}),
            r"sum to height \* width = 1600",
        ),
        (lambda c: c["annotations"][0].update(id=0), r"annotation ids must be positive"),
        (lambda c: c["annotations"].append(dict(c["annotations"][0])), r"duplicate annotation id"),
        (lambda c: c["annotations"][0].update(iscrowd=2), r"'iscrowd' must be 0 or 1"),
        (lambda c: c["images"].append(dict(c["images"][0])), r"images\[1\]: duplicate image id 1"),
        (lambda c: c["images"][0].pop("width"), r"images\[0\]: missing key\(s\) \['width'\]"),
        (lambda c: c["images"][0].update(height=0), r"'height' must be a positive integer"),
        (lambda c: c["categories"][0].pop("name"), r"categories\[0\]: missing key\(s\)"),
        (lambda c: c.update(annotations={}), r"'annotations' must be a list"),
    ],
)
def test_error_names_the_bad_entry(tmp_path, change, message):
    content = good_content()
    change(content)
    path = write_json(tmp_path, content)
    with pytest.raises(ValueError, match=message) as info:
        CocoDataset(path, tmp_path)
    assert "bad.json" in str(info.value)


def test_error_lists_the_first_missing_images(tmp_path):
    images = [image_entry(i, 8, 8) for i in range(1, 8)]
    json_path, root = make_coco(tmp_path, [], images=images, write_images=False)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, "3.png"))
    with pytest.raises(FileNotFoundError) as info:
        CocoDataset(json_path, root)
    message = str(info.value)
    assert "6 of 7 images listed in" in message and "instances.json" in message
    assert "'1.png', '2.png', '4.png', '5.png', '6.png' and 1 more" in message
    assert "'3.png'" not in message


def test_error_for_a_missing_image_folder(tmp_path):
    json_path, _ = make_coco(tmp_path, [ann(1, [SQUARE], [10, 10, 20, 20])])
    with pytest.raises(FileNotFoundError, match=r"image folder .*elsewhere.* does not exist"):
        CocoDataset(json_path, os.path.join(tmp_path, "elsewhere"))


def test_error_when_an_image_has_a_different_size_than_the_json_says(tmp_path):
    json_path, root = make_coco(tmp_path, [ann(1, [SQUARE], [10, 10, 20, 20])])
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(os.path.join(root, "1.png"))
    ds = CocoDataset(json_path, root)
    with pytest.raises(ValueError, match=r"1\.png.* is 30x40 \(HxW\) but .* says 40x40"):
        ds[0]


def test_error_for_an_unreadable_image(tmp_path):
    json_path, root = make_coco(tmp_path, [ann(1, [SQUARE], [10, 10, 20, 20])])
    with open(os.path.join(root, "1.png"), "w") as f:
        f.write("not a png")
    with pytest.raises(ValueError, match=r"cannot read image file .*1\.png"):
        CocoDataset(json_path, root)[0]


# ---- compressed RLE strings are decoded when the file loads ---------------------------------
# The 4x5 mask of test_uncompressed_and_compressed_rle has runs [5, 3, 4, 1, 7]; pycocotools
# writes them "534N3": 5, 3, 4 as themselves (chr(48 + n)); from the fourth on, the difference
# with the count two before: 1 - 3 = -2 is 30 ('N', 5 bits with the sign bit 0x10 set, 30 - 32),
# and 7 - 4 = 3.


def test_compressed_rle_counts_decodes_the_hand_written_string():
    assert compressed_rle_counts("534N3").tolist() == [5, 3, 4, 1, 7]
    assert compressed_rle_counts("534N").tolist() == [5, 3, 4, 1]
    assert compressed_rle_counts("PP4").tolist() == [4096]  # groups 0, 0, 4; 0x20: more follow
    with pytest.raises(ValueError, match=r"'5N'.*a run length is negative"):
        compressed_rle_counts("5N")  # the second count is written as is: -2


def runs_by_definition(mask):
    """Run lengths of a mask read column by column, starting with a (possibly empty) run of 0."""
    pixels = np.concatenate([[0], mask.ravel(order="F"), [2]])  # 2: closes the last run
    changes = np.flatnonzero(pixels[1:] != pixels[:-1])
    runs = np.diff(np.concatenate([[0], changes]))
    return runs.tolist()


def test_compressed_rle_counts_of_pycocotools_strings_are_the_masks_runs():
    rng = np.random.default_rng(0)
    for trial in range(40):
        height, width = rng.integers(1, 30, size=2)
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        if trial % 2:  # long runs too, whose differences take several characters
            mask = np.zeros((height * 40, width * 40), np.uint8)
            mask[rng.integers(0, height * 40) :, rng.integers(0, width * 40) :] = 1
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
        assert compressed_rle_counts(counts).tolist() == runs_by_definition(mask)


@pytest.mark.parametrize(
    "counts, reason",
    [
        ("534N", r"its runs cover 13 pixels, not height \* width = 20"),  # one run short
        ("534N31", r"its runs cover 22 pixels, not height \* width = 20"),  # a sixth run, 1 + 1
        ("534N3z", r"character 'z' is not in '0'..'o'"),
        ("534NP", r"stops in the middle of a number"),  # 'P' = 0x20: more should follow
        ("534N3ooooooooP0", r"a number is longer than 7 characters"),
        ("é", r"non-ASCII"),
    ],
)
def test_undecodable_compressed_rle_fails_at_load_naming_file_image_and_annotation(
    tmp_path, counts, reason
):
    good = {"size": [4, 5], "counts": "534N3"}
    annotations = [
        ann(1, good, [1, 0, 3, 4], image_id=3),
        ann(7, {"size": [4, 5], "counts": counts}, [1, 0, 3, 4], image_id=3),
    ]
    json_path, root = make_coco(tmp_path, annotations, images=[image_entry(3, 4, 5)])
    with pytest.raises(
        ValueError, match=r"annotations\[1\] \(id 7, image_id 3\): compressed RLE"
    ) as info:
        CocoDataset(json_path, root)
    assert "instances.json" in str(info.value) and "cannot be decoded" in str(info.value)
    assert re.search(reason, str(info.value))


def test_find_coco_problems_lists_all_and_validate_raises_the_first():
    content = good_content()
    content["annotations"] += [
        ann(2, {"size": [40, 40], "counts": "PP4"}, [0, 0, 5, 5]),  # 4096 pixels, not 1600
        ann(3, [SQUARE], [1, 2, 3]),
        ann(4, {"size": 40, "counts": "x"}, [0, 0, 5, 5], image_id=[1]),
    ]
    content["images"].append({"id": [2], "file_name": "2.png", "width": 4, "height": 4})
    content["categories"].append({"id": {"a": 1}, "name": "odd"})
    problems = find_coco_problems(content, source="mine.json")
    assert [p.split(": ")[1] for p in problems] == [
        "images[1]",
        "categories[1]",
        "annotations[1] (id 2, image_id 1)",
        "annotations[2] (id 3, image_id 1)",
        "annotations[3] (id 4, image_id [1])",
    ]
    assert "image id must be an integer, got [2]" in problems[0]
    assert "category id must be an integer" in problems[1]
    assert "its runs cover 4096 pixels, not height * width = 1600" in problems[2]
    assert "bad bbox [1, 2, 3]" in problems[3]
    assert "refers to image_id [1], not in 'images'" in problems[4]
    with pytest.raises(ValueError) as info:
        validate_coco_instances(content, source="mine.json")
    assert str(info.value) == problems[0]
    assert find_coco_problems(good_content()) == []


def test_find_coco_problems_names_each_missing_image_file(tmp_path):
    images = [image_entry(i, 8, 8) for i in (4, 5, 6)]
    json_path, root = make_coco(tmp_path, [], images=images, write_images=False)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, "5.png"))
    with open(json_path) as f:
        problems = find_coco_problems(json.load(f), root, source="x.json")
    assert problems == [
        f"x.json: images[0] (id 4): image file '4.png' not found under {root!r}",
        f"x.json: images[2] (id 6): image file '6.png' not found under {root!r}",
    ]
    assert find_coco_problems(
        {"images": [], "annotations": [], "categories": []}, tmp_path / "no"
    ) == [f"<dict>: image folder {os.fspath(tmp_path / 'no')!r} does not exist"]
