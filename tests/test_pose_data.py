"""Synthetic pose data, COCO person keypoints in and out, and OKS evaluation.

The stick figures are checked against their definition (seeded, COCO visibility from the
figures' own masks, masks drawn around the joints), the COCO export is read back by the loader,
the loader accepts a file laid out like COCO's person_keypoints and names every kind of bad
keypoint annotation, and keypoint AP is 1 for perfect predictions and lower for shifted ones.
"""

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("pycocotools")
from PIL import Image  # noqa: E402

from mrcnn_edu.data import pose  # noqa: E402
from mrcnn_edu.data.coco import CocoDataset, find_coco_problems, validate_coco_instances  # noqa: E402
from mrcnn_edu.data.pose import (  # noqa: E402
    FLIP_INDEX,
    KEYPOINT_NAMES,
    KEYPOINT_SIGMAS,
    SKELETON,
    PoseDataset,
    figure_mask,
)
from mrcnn_edu.data.shapes import masks_to_boxes, to_coco_dict, write_coco  # noqa: E402
from mrcnn_edu.data.transforms import Augment, AugmentConfig, hflip  # noqa: E402
from mrcnn_edu.evaluate import (  # noqa: E402
    evaluate_coco,
    predictions_to_coco_results,
    write_coco_results,
)
from mrcnn_edu.evaluate_keypoints import (  # noqa: E402
    COCO_KEYPOINT_SIGMAS,
    evaluate_keypoints,
    keypoint_cocoeval,
    object_keypoint_similarity,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
K = len(KEYPOINT_NAMES)


def pixel(point):
    """(row, column) of the pixel holding a continuous point (x, y)."""
    return int(math.floor(point[1])), int(math.floor(point[0]))


# -- the generator ---------------------------------------------------------------------------


def test_items_are_seeded_and_independent_of_order():
    a, b = PoseDataset(6, seed=3), PoseDataset(6, seed=3)
    later_first = [b[i] for i in (5, 2, 0)]
    for i, item in zip((5, 2, 0), later_first):
        again = a[i]
        for key in ("image", "boxes", "labels", "masks", "keypoints"):
            np.testing.assert_array_equal(again[key], item[key])
    other = PoseDataset(6, seed=4)[0]
    assert not np.array_equal(other["image"], a[0]["image"])


def test_item_layout():
    ds = PoseDataset(8, image_size=(96, 112), seed=1)
    counts = set()
    for i in range(len(ds)):
        item = ds[i]
        g = len(item["labels"])
        counts.add(g)
        assert 1 <= g <= 3 and item["image"].shape == (3, 96, 112)
        assert item["image"].dtype == np.float32 and item["labels"].tolist() == [1] * g
        assert item["masks"].shape == (g, 96, 112) and item["masks"].dtype == np.uint8
        assert item["keypoints"].shape == (g, K, 3) and item["keypoints"].dtype == np.float32
        np.testing.assert_array_equal(item["boxes"], masks_to_boxes(item["masks"]))
        assert item["masks"].reshape(g, -1).sum(1).min() > 0
        assert item["masks"].sum(0).max() <= 1  # visible masks do not overlap
    assert len(counts) > 1


def test_visibility_follows_coco_and_the_figures_in_front():
    """v = 0 exactly for joints outside the image (stored as zeros); v = 2: the joint's pixel
    is on its own figure's visible mask; v = 1: a figure in front covers it."""
    ds = PoseDataset(60, seed=7)
    seen = {0: 0, 1: 0, 2: 0}
    for i in range(len(ds)):
        item, layout = ds[i], ds.describe(i)
        for g, (figure, rows) in enumerate(zip(layout, item["keypoints"])):
            for joint, (x, y, v) in zip(figure["joints"], rows):
                seen[int(v)] += 1
                r, c = pixel(joint)
                if not (0 <= r < 128 and 0 <= c < 128):
                    assert (x, y, v) == (0, 0, 0)
                    continue
                assert (x, y) == pytest.approx(tuple(joint), abs=1e-4)
                on_own = item["masks"][g, r, c] == 1
                in_front = [item["masks"][h, r, c] for h in range(g + 1, len(layout))]
                if v == 2:
                    assert on_own
                else:
                    assert v == 1 and not on_own and any(in_front)
    assert min(seen.values()) > 10  # every case happened


def test_masks_are_drawn_around_the_joints():
    """Every joint's pixel is on its figure; the visible masks are the full figures minus the
    ones drawn later; and one capsule, counted by hand."""
    ds = PoseDataset(20, seed=11)
    for i in range(len(ds)):
        item, layout = ds[i], ds.describe(i)
        full = [figure_mask(f["joints"], f["height"], (128, 128)) for f in layout]
        for g, figure in enumerate(layout):
            for joint in figure["joints"]:
                r, c = pixel(joint)
                if 0 <= r < 128 and 0 <= c < 128:
                    assert full[g][r, c]
            hidden = np.any(full[g + 1 :], axis=0) if g + 1 < len(full) else False
            np.testing.assert_array_equal(item["masks"][g], full[g] & ~hidden)
    # A capsule from (10, 10) to (20, 10) of radius 2: pixel centres x in 10.5..19.5 on the rows
    # with |y - 10| <= 2 (centres 8.5..11.5): 10 x 4 = 40; each round end adds 4 (column 0.5
    # beyond it) + 2 (1.5 beyond, only the rows 0.5 away).
    mask = np.zeros((30, 30), bool)
    pose._draw_capsule(mask, np.array([10.0, 10.0]), np.array([20.0, 10.0]), 2.0)
    assert mask.sum() == 52 and mask[8:12, 10:20].all() and not mask[7].any()


def test_generator_checks_its_settings():
    with pytest.raises(ValueError, match="height_range"):
        PoseDataset(2, height_range=(10, 40))  # limbs thinner than a pixel
    with pytest.raises(ValueError, match="min_figures"):
        PoseDataset(2, min_figures=0)
    with pytest.raises(ValueError, match="image_size"):
        PoseDataset(2, image_size=(16, 16))


def test_flip_map_and_horizontal_flip_keep_figures_frontal():
    """Figures face the camera: the left shoulder is right of the neck in the image. A flip
    that renumbers left/right keeps that true; a plain mirror would not."""
    names = list(KEYPOINT_NAMES)
    for j, name in enumerate(names):
        partner = name.replace("left", "L").replace("right", "left").replace("L", "right")
        assert names[FLIP_INDEX[j]] == partner and FLIP_INDEX[FLIP_INDEX[j]] == j
    ds = PoseDataset(12, seed=5)
    assert tuple(ds.keypoint_flip) == FLIP_INDEX
    augment = Augment(AugmentConfig(hflip=True), keypoint_flip=ds.keypoint_flip)
    rng, flipped, checked = np.random.default_rng(0), 0, 0
    for i in range(len(ds)):
        item = ds[i]
        out = augment(item, rng)
        flipped += not np.array_equal(out["image"], item["image"])
        for rows in (item["keypoints"], out["keypoints"]):
            for person in rows:
                if person[1, 2] > 0 and person[2, 2] > 0:  # neck and left shoulder labelled
                    assert person[2, 0] > person[1, 0]
                    checked += 1
        # every labelled keypoint stays on its figure's (flipped) mask
        for g, person in enumerate(out["keypoints"]):
            for x, y, v in person:
                if v == 2:
                    assert out["masks"][g][pixel((x, y))]
    assert flipped and checked > 20
    mirrored = hflip(ds[0], keypoint_flip=list(range(K)))  # no renumbering: the rule breaks
    person = mirrored["keypoints"][0]
    assert person[2, 0] < person[1, 0]


# -- COCO person keypoints, out and back in --------------------------------------------------


def test_coco_export_round_trip_through_the_loader(tmp_path):
    ds = PoseDataset(5, seed=2)
    json_path = write_coco(ds, tmp_path)
    content = json.loads(open(json_path).read())
    (category,) = content["categories"]
    assert category["keypoints"] == list(KEYPOINT_NAMES)
    assert category["skeleton"] == [[a + 1, b + 1] for a, b in SKELETON]
    loaded = CocoDataset(json_path, tmp_path / "images")
    assert loaded.keypoint_names == KEYPOINT_NAMES and loaded.skeleton == SKELETON
    assert loaded.keypoint_flip == list(FLIP_INDEX)
    annotations = iter(content["annotations"])
    for i in range(len(ds)):
        a, b = ds[i], loaded[i]
        for key in ("boxes", "labels", "masks", "keypoints"):
            np.testing.assert_array_equal(a[key], b[key])
        for rows in a["keypoints"]:
            ann = next(annotations)
            assert ann["num_keypoints"] == int((rows[:, 2] > 0).sum())
            assert ann["keypoints"][2::3] == [int(v) for v in rows[:, 2]]


COCO_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
COCO_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
    [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip


def person_keypoints_file(tmp_path, annotations=None, categories=None):
    """A file laid out like COCO's person_keypoints_*.json: info/licenses, images with their
    extra fields, the person category with 17 names and the 19-edge skeleton, polygon people
    with integer keypoints and a crowd region with uncompressed RLE and no keypoints."""
    kp = [0] * 51
    kp[0:3] = [30, 12, 2]  # nose
    kp[15:21] = [24, 20, 2, 36, 20, 1]  # shoulders, the right one hidden
    content = {
        "info": {"description": "COCO-like"},
        "licenses": [{"id": 1, "name": "x", "url": "u"}],
        "images": [
            {
                "license": 1,
                "file_name": "000000000001.jpg",
                "coco_url": "c",
                "height": 48,
                "width": 64,
                "date_captured": "d",
                "flickr_url": "f",
                "id": 1,
            },
        ],  # fmt: skip
        "annotations": annotations
        or [
            {
                "segmentation": [[20, 8, 40, 8, 40, 40, 20, 40]],
                "num_keypoints": 3,
                "area": 640.0,
                "iscrowd": 0,
                "keypoints": kp,
                "image_id": 1,
                "bbox": [20, 8, 20, 32],
                "category_id": 1,
                "id": 183014,
            },
            {
                "segmentation": {"counts": [3072 - 40, 40], "size": [48, 64]},
                "num_keypoints": 0,
                "area": 40,
                "iscrowd": 1,
                "keypoints": [0] * 51,
                "image_id": 1,
                "bbox": [63, 8, 1, 40],
                "category_id": 1,
                "id": 900100,
            },
        ],  # fmt: skip
        "categories": categories
        or [
            {
                "supercategory": "person",
                "id": 1,
                "name": "person",
                "keypoints": COCO_NAMES,
                "skeleton": COCO_SKELETON,
            }
        ],  # fmt: skip
    }
    os.makedirs(tmp_path / "images", exist_ok=True)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "images/000000000001.jpg")
    path = tmp_path / "person_keypoints.json"
    path.write_text(json.dumps(content))
    return path, content


def test_loader_accepts_coco_person_keypoints(tmp_path):
    path, _ = person_keypoints_file(tmp_path)
    ds = CocoDataset(path, tmp_path / "images")
    assert ds.keypoint_names == tuple(COCO_NAMES) and len(ds.skeleton) == 19
    assert ds.skeleton[0] == (15, 13)  # [16, 14] made 0-based
    assert ds.keypoint_flip == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    item = ds[0]
    assert item["keypoints"].shape == (1, 17, 3) and ds.num_crowd == 1  # the crowd: no target
    np.testing.assert_array_equal(
        item["keypoints"][0, [0, 5, 6]], [[30, 12, 2], [24, 20, 2], [36, 20, 1]]
    )
    assert item["keypoints"][0, 1:5].sum() == 0


def bad(content, **changes):
    """A copy of ``content`` whose first annotation (or, with ``category=``, category) has the
    given keys changed (None deletes a key)."""
    content = json.loads(json.dumps(content))
    target = (
        content["categories"][0] if changes.pop("category", False) else content["annotations"][0]
    )
    for key, value in changes.items():
        if value is None:
            del target[key]
        else:
            target[key] = value
    return content


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(keypoints=[0] * 50), r"3 x 17 = 51 numbers \(category 1 has 17 keypoints\), got 50"),
        (dict(keypoints="0 0 0"), "flat list"),
        (dict(keypoints=[0] * 48 + [1.0, float("nan"), 2]), "51 numbers"),
        (dict(keypoints=[0] * 50 + [3]), r"keypoint 16 \('right_ankle'\) has visibility 3"),
        (dict(num_keypoints=2), "'num_keypoints' is 2 but 3 keypoints have v > 0; set it to 3"),
        (dict(keypoints=None), "'num_keypoints' is 3 but there are no 'keypoints'"),
        (dict(category=True, keypoints=None, skeleton=None), "declares no keypoint names"),
        (dict(category=True, keypoints=["a", "a"]), "distinct keypoint names"),
        (dict(category=True, skeleton=[[0, 1]]), r"pairs of keypoint numbers 1..17 \(1-based"),
    ],
)
def test_bad_keypoint_annotations_are_named(tmp_path, change, message):
    _, content = person_keypoints_file(tmp_path)
    with pytest.raises(ValueError, match=message):
        validate_coco_instances(bad(content, **change), source="kp.json")


def test_categories_must_agree_on_their_keypoints(tmp_path):
    cats = [
        {"id": 1, "name": "person", "keypoints": COCO_NAMES, "skeleton": COCO_SKELETON},
        {"id": 2, "name": "robot", "keypoints": ["a", "b"]},
    ]
    path, content = person_keypoints_file(tmp_path, categories=cats)
    problems = find_coco_problems(content, source="kp.json")
    assert len(problems) == 1 and "categories declare different keypoints" in problems[0]
    # A category without keypoints may sit beside them; its annotations get none (v = 0).
    cats[1] = {"id": 2, "name": "ball"}
    ball = {"id": 7, "image_id": 1, "category_id": 2, "bbox": [2, 2, 4, 4], "iscrowd": 0,
            "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}  # fmt: skip
    path, content = person_keypoints_file(tmp_path, categories=cats)
    content["annotations"].append(ball)
    path.write_text(json.dumps(content))
    item = CocoDataset(path, tmp_path / "images")[0]
    assert item["labels"].tolist() == [1, 2] and item["keypoints"][1].sum() == 0


# -- OKS and keypoint AP ---------------------------------------------------------------------


def test_oks_by_its_definition():
    # area 100, sigma 0.1: k = 0.2, 2 A k^2 = 8; a squared error of 8 scores exp(-1)
    gt = np.array([[10.0, 10.0, 2], [20.0, 20.0, 1], [5.0, 5.0, 0]])
    pred = np.array([[12.0, 12.0], [20.0, 20.0], [90.0, 90.0]])  # the unlabelled one is ignored
    oks = object_keypoint_similarity(pred, gt, 100.0, [0.1, 0.1, 0.1])
    assert oks == pytest.approx((math.exp(-1) + 1) / 2)
    assert math.isnan(object_keypoint_similarity(pred, gt * [1, 1, 0], 100.0, [0.1] * 3))


def perfect_predictions(ds):
    predictions = []
    for i in range(len(ds)):
        item = ds[i]
        keypoints = item["keypoints"].copy()
        keypoints[..., 2] = 1  # what a model returns
        g = len(item["labels"])
        predictions.append({"boxes": item["boxes"], "labels": item["labels"],
                            "scores": np.linspace(0.9, 0.8, g), "masks": item["masks"],
                            "keypoints": keypoints})  # fmt: skip
    return predictions


def test_keypoint_ap_is_one_for_perfect_predictions_and_lower_when_shifted(tmp_path):
    ds = PoseDataset(12, seed=9)
    ids = list(range(len(ds)))
    results = predictions_to_coco_results(perfect_predictions(ds), ids, ds.label_to_category_id)
    perfect = evaluate_keypoints(ds, results, ds.keypoint_sigmas, print_table=False)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AR"] == pytest.approx(1.0)
    assert evaluate_coco(ds, results, print_table=False)["segm"]["AP"] == pytest.approx(1.0)
    aps = []
    for shift in (1.5, 3.0, 40.0):
        moved = [dict(r, keypoints=[v + shift * (k % 3 == 0) for k, v in enumerate(r["keypoints"])])
                 for r in results]  # fmt: skip
        aps.append(evaluate_keypoints(ds, moved, ds.keypoint_sigmas, print_table=False)["AP"])
    assert 1.0 > aps[0] > aps[1] > 0.0 and aps[2] == 0.0
    # through a results json, and COCOeval's OKS is the formula above
    path = write_coco_results(results, tmp_path / "results.json")
    assert evaluate_keypoints(ds, str(path), ds.keypoint_sigmas, print_table=False)["AP"] == 1.0
    cocoeval = keypoint_cocoeval(ds, moved, ds.keypoint_sigmas)
    gt = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[0]))
    detections = [r for r in moved if r["image_id"] == 0]
    expected = object_keypoint_similarity(
        np.reshape(detections[0]["keypoints"], (K, 3)),
        np.reshape(gt[0]["keypoints"], (K, 3)),
        gt[0]["area"],
        ds.keypoint_sigmas,
    )
    assert cocoeval.ious[(0, 1)][0, 0] == pytest.approx(expected)


def test_keypoint_evaluation_errors_are_named():
    ds = PoseDataset(2, seed=1)
    results = predictions_to_coco_results(perfect_predictions(ds), [0, 1])
    with pytest.raises(ValueError, match="COCO's are for its 17 keypoints, this data has 14"):
        evaluate_keypoints(ds, results, print_table=False)
    with pytest.raises(ValueError, match="sigmas must be 14 positive numbers"):
        evaluate_keypoints(ds, results, [0.1] * 13, print_table=False)
    no_keypoints = [{k: v for k, v in r.items() if k != "keypoints"} for r in results]
    with pytest.raises(ValueError, match=r"lacks \['keypoints'\]"):
        evaluate_keypoints(ds, no_keypoints, ds.keypoint_sigmas, print_table=False)
    short = [dict(results[0], keypoints=results[0]["keypoints"][:-3])]
    with pytest.raises(ValueError, match="39 keypoint values; the ground truth has 14"):
        evaluate_keypoints(ds, short, ds.keypoint_sigmas, print_table=False)
    with pytest.raises(ValueError, match="no keypoint categories"):
        evaluate_keypoints({**to_coco_dict(ds), "categories": [{"id": 1, "name": "p"}],
                            "annotations": []}, [], [0.1] * 14)  # fmt: skip
    with pytest.raises(ValueError, match=r"'keypoints'\] must be \(D, K, 3\)"):
        predictions_to_coco_results(
            [dict(perfect_predictions(ds)[0], keypoints=np.zeros((1, 3)))], [0]
        )


def test_sigmas_are_cocos_scaled_to_the_stick_figures_area():
    """The documented rule: COCO's sigma of the same (or nearest) COCO keypoint, CrowdPose's
    0.079 for head and neck, scaled by sqrt(PERSON_AREA / STICK_AREA); STICK_AREA is the
    figures' measured area / height^2."""
    base = {**dict(zip(COCO_NAMES, COCO_KEYPOINT_SIGMAS)), "head": 0.079, "neck": 0.079}
    nearest = {"hand": "wrist", "foot": "ankle"}
    for name, sigma in zip(KEYPOINT_NAMES, KEYPOINT_SIGMAS):
        side, _, part = name.rpartition("_")
        analogue = f"{side}_{nearest.get(part, part)}" if side else name
        assert sigma == pytest.approx(base[analogue] * pose.SIGMA_SCALE, abs=1e-4), name
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(300):
        h = rng.uniform(48, 100)
        canvas, _ = pose._figure_canvas(pose._random_joints(rng, h), h)
        ratios.append(canvas.sum() / h**2)
    assert np.mean(ratios) == pytest.approx(pose.STICK_AREA, rel=0.02)


def test_draw_keypoints_draws_labelled_joints_and_their_edges():
    from matplotlib.figure import Figure

    from mrcnn_edu.visualize import draw_keypoints, instance_colour

    person = np.array([[1.0, 1.0, 2], [5.0, 1.0, 1], [9.0, 9.0, 0]])
    ax = Figure().subplots()
    draw_keypoints(ax, person, skeleton=[(0, 1), (1, 2)])
    lines = ax.get_lines()
    edges = [ln for ln in lines if ln.get_linestyle() == "-"]
    assert len(edges) == 1 and list(edges[0].get_xdata()) == [1.0, 5.0]  # (1, 2) has v = 0
    dots = [ln for ln in lines if ln.get_marker() == "o"]
    assert [list(d.get_xdata()) for d in dots] == [[1.0], [5.0]]  # visible, then hidden
    assert dots[1].get_markerfacecolor() == "none" and edges[0].get_color() == instance_colour(0)
    with pytest.raises(ValueError, match=r"\(D, K, 3\)"):
        draw_keypoints(ax, np.zeros((2, 2)))
