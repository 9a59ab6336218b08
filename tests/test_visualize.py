"""Figures: instances drawn over images, prediction grids, training curves."""

import csv
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from mrcnn_edu.data.shapes import ShapesDataset  # noqa: E402
from mrcnn_edu.visualize import (  # noqa: E402
    _training_curves_figure,
    draw_boxes,
    draw_instances,
    instance_colour,
    plot_training_curves,
    save_predictions_figure,
    show_image,
)


def as_prediction(item, score=0.9):
    g = len(item["labels"])
    return {
        "boxes": item["boxes"],
        "labels": item["labels"],
        "scores": np.full(g, score, np.float32),
        "masks": item["masks"].astype(np.float32) * 0.8,  # probabilities
    }


def test_draw_instances_draws_each_box_label_and_mask():
    ds = ShapesDataset(1, image_size=(64, 48), min_objects=3, max_objects=3, seed=2)
    item = ds[0]
    ax = Figure().subplots()
    scores = np.array([0.91, 0.5, 0.123])
    draw_instances(
        ax, item["image"], item["boxes"], item["labels"], item["masks"], scores, ds.class_names
    )
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 3
    x1, y1, x2, y2 = item["boxes"][0]
    assert boxes[0].get_xy() == (x1, y1) and boxes[0].get_width() == x2 - x1
    texts = sorted(t.get_text() for t in ax.texts)
    names = [ds.class_names[k - 1] for k in item["labels"]]
    assert texts == sorted(f"{n} {s:.2f}" for n, s in zip(names, scores))
    image, overlay = ax.images  # the picture and the translucent masks over it
    assert image.get_array().shape == (64, 48, 3)
    alpha = np.asarray(overlay.get_array())[..., 3]
    np.testing.assert_array_equal(alpha > 0, item["masks"].any(axis=0))


def test_draw_instances_without_masks_or_scores_shows_label_numbers():
    ax = Figure().subplots()
    image = np.zeros((3, 20, 20), np.float32)
    draw_instances(ax, image, np.array([[2, 3, 10, 12]]), np.array([4]))
    assert [t.get_text() for t in ax.texts] == ["4"]
    assert len(ax.images) == 1


def test_draw_instances_rejects_mismatched_inputs():
    ax = Figure().subplots()
    image = np.zeros((3, 20, 20), np.float32)
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        draw_instances(ax, image, np.zeros((2, 4)), np.array([1]))
    with pytest.raises(ValueError, match=r"masks must be \(D, H, W\)"):
        draw_instances(ax, image, np.zeros((1, 4)), np.array([1]), np.zeros((1, 10, 10)))
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\)"):
        draw_instances(ax, np.zeros((20, 20, 3)), np.zeros((1, 4)), np.array([1]))


def two_touching_squares(size=40):
    """A black image and two 20 x 20 masks of class 1 that share an edge at x = 20."""
    masks = np.zeros((2, size, size), np.float32)
    masks[0, 10:30, 0:20] = 1
    masks[1, 10:30, 20:40] = 1
    boxes = np.array([[0, 10, 20, 30], [20, 10, 40, 30]], np.float32)
    return np.zeros((3, size, size), np.float32), boxes, np.array([1, 1]), masks


def rendered_rgb(fig):
    """The figure's pixels as Agg draws them: (rows, cols, 3) uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def pixel_at(ax, pixels, x, y):
    """The rendered pixel at data point (x, y) (display y runs up, rows run down)."""
    px, py = ax.transData.transform((x, y))
    return pixels[int(pixels.shape[0] - py), int(px)].astype(int)


def test_touching_masks_of_one_class_get_different_colours_on_screen():
    image, boxes, labels, masks = two_touching_squares()
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    draw_instances(ax, image, boxes, labels, masks, np.array([0.9, 0.8]), ("square",))
    pixels = rendered_rgb(fig)
    left, right = pixel_at(ax, pixels, 10, 22), pixel_at(ax, pixels, 30, 22)
    # On black, a fill of opacity 0.45 shows 0.45 x its colour.
    for shown, d in ((left, 0), (right, 1)):
        expected = 0.45 * 255 * np.array(instance_colour(d))
        np.testing.assert_allclose(shown, expected, atol=3)
    assert np.abs(left - right).sum() > 100
    # box edge and outline in the instance's colour too
    edges = [p.get_edgecolor()[:3] for p in ax.patches if isinstance(p, Rectangle)]
    assert edges == [instance_colour(0), instance_colour(1)]
    # labels: name and score, white on a dark box edged in the instance colour
    assert [t.get_text() for t in ax.texts] == ["square 0.90", "square 0.80"]
    for d, text in enumerate(ax.texts):
        assert text.get_color() == "white"
        patch = text.get_bbox_patch()
        assert max(patch.get_facecolor()[:3]) < 0.2 and patch.get_facecolor()[3] >= 0.6
        assert patch.get_edgecolor()[:3] == instance_colour(d)
    # deterministic: the same drawing renders the same pixels
    again = Figure(figsize=(4, 4), dpi=100)
    draw_instances(again.subplots(), image, boxes, labels, masks, np.array([0.9, 0.8]), ("square",))
    np.testing.assert_array_equal(rendered_rgb(again), pixels)


def test_instance_colours_are_well_separated_and_cycle():
    colours = np.array([instance_colour(d) for d in range(10)])
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + 10 * np.eye(10)
    assert gaps.min() > 0.25
    assert instance_colour(10) == instance_colour(0) and instance_colour(13) == instance_colour(3)


def test_predictions_figure_shows_each_instance_in_its_own_colour(tmp_path):
    image, boxes, labels, masks = two_touching_squares(64)
    prediction = {"boxes": boxes, "labels": labels, "scores": np.array([0.9, 0.8]),
                  "masks": masks}  # fmt: skip
    path = save_predictions_figure([image], [prediction], path=tmp_path / "p.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    for d in (0, 1):
        fill = np.round(0.45 * 255 * np.array(instance_colour(d)))
        near = np.abs(pixels - fill).max(axis=-1) <= 3
        assert near.sum() > 1000, d  # most of a 20 x 20 mask at ~4 screen pixels per pixel


def test_draw_boxes_draws_unfilled_xyxy_rectangles_in_one_style():
    ax = Figure().subplots()
    assert draw_boxes(ax, np.array([[2, 3, 10, 12], [0, 0, 4, 5]], np.float32), "cyan") is ax
    draw_boxes(ax, [(1.5, 2.0, 3.5, 7.0)], "red", lw=2.5, ls="--", alpha=0.5)  # a list works too
    assert len(ax.patches) == 3 and all(isinstance(p, Rectangle) for p in ax.patches)
    first, _, last = ax.patches
    assert first.get_xy() == (2, 3) and (first.get_width(), first.get_height()) == (8, 9)
    assert not first.get_fill() and first.get_linewidth() == 1.0
    assert last.get_xy() == (1.5, 2.0) and (last.get_width(), last.get_height()) == (2.0, 5.0)
    assert last.get_linewidth() == 2.5 and last.get_linestyle() == "--"
    assert last.get_edgecolor() == (1.0, 0.0, 0.0, 0.5)
    draw_boxes(ax, np.zeros((0, 4)), "white")  # no boxes: nothing drawn
    assert len(ax.patches) == 3


def test_show_image_puts_pixel_edges_on_integer_coordinates():
    image = np.random.default_rng(0).uniform(0, 1, (3, 10, 16)).astype(np.float32)
    ax = Figure().subplots()
    assert show_image(ax, image, "a title") is ax
    (shown,) = ax.images
    np.testing.assert_allclose(shown.get_array(), image.transpose(1, 2, 0))
    assert shown.get_extent() == [0, 16, 10, 0]
    assert ax.get_title() == "a title" and not ax.axison
    ax = Figure().subplots()
    show_image(ax, (image * 255).astype(np.uint8))  # uint8 images are scaled to [0, 1]
    assert ax.images[0].get_array().max() <= 1.0 and ax.get_title() == ""


def test_predictions_figure_puts_ground_truth_beside_predictions(tmp_path):
    ds = ShapesDataset(3, image_size=(64, 64), seed=5)
    items = [ds[i] for i in range(3)]
    path = save_predictions_figure(
        [it["image"] for it in items],
        [as_prediction(it) for it in items],
        targets=items,
        class_names=ds.class_names,
        path=tmp_path / "pred.png",
    )
    assert path == str(tmp_path / "pred.png") and os.path.getsize(path) > 20_000
    # 3 images, two per row, each as a (ground truth, prediction) pair of 3-inch panels
    assert Image.open(path).size == (4 * 300, 2 * 300)


def test_predictions_figure_without_targets_and_max_images(tmp_path):
    ds = ShapesDataset(10, image_size=(48, 48), seed=6)
    items = [ds[i] for i in range(10)]
    images = np.stack([it["image"] for it in items])  # an (N, 3, H, W) batch works too
    path = save_predictions_figure(
        images, [as_prediction(it, 0.3) for it in items], path=tmp_path / "p.png", max_images=6
    )
    assert Image.open(path).size == (4 * 300, 2 * 300)  # 6 panels, four per row
    with pytest.raises(ValueError, match="10 images but 9 predictions"):
        save_predictions_figure(images, [as_prediction(it) for it in items[:9]], path="x.png")


def write_log(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_training_curves_from_a_csv(tmp_path):
    rows = [
        {
            "step": s,
            "loss": 3.0 * 0.98**s,
            "loss_classifier": 1.0 * 0.97**s,
            "loss_mask": 0.7 * 0.99**s,
            "lr": 0.02 * min(1.0, (s + 1) / 10),
            "phase": "train",  # a text column is ignored
        }
        for s in range(60)
    ]
    write_log(tmp_path / "log.csv", rows)
    path = plot_training_curves(tmp_path / "log.csv", tmp_path / "curves.png")
    assert path == str(tmp_path / "curves.png") and os.path.getsize(path) > 10_000
    columns = {k: np.array([r[k] for r in rows], float) for k in rows[0] if k != "phase"}
    fig = _training_curves_figure(columns, "step")
    ax, ax_lr = fig.axes
    assert [line.get_label() for line in ax.lines] == ["loss", "loss_classifier", "loss_mask"]
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.lines[1].get_ydata(), columns["loss_classifier"])
    np.testing.assert_allclose(ax_lr.lines[0].get_ydata(), columns["lr"])


def test_training_curves_from_a_dict_skip_non_positive_values(tmp_path):
    log = {"loss": [1.0, 0.5, 0.0, 0.25], "loss_box": [0.3, 0.2, 0.1, 0.05]}
    path = plot_training_curves(log, tmp_path / "c.png")
    assert os.path.getsize(path) > 5_000
    fig = _training_curves_figure({k: np.array(v) for k, v in log.items()}, "step")
    ydata = fig.axes[0].lines[0].get_ydata()
    assert np.isnan(ydata[2]) and ydata[3] == 0.25  # a log axis cannot show 0
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), [0, 1, 2, 3])


def test_training_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        plot_training_curves(tmp_path / "missing.csv", tmp_path / "c.png")
    write_log(tmp_path / "log.csv", [{"step": 1, "lr": 0.1}])
    with pytest.raises(ValueError, match="no loss columns"):
        plot_training_curves(tmp_path / "log.csv", tmp_path / "c.png")
    (tmp_path / "empty.csv").write_text("step,loss\n")
    with pytest.raises(ValueError, match="no data rows"):
        plot_training_curves(tmp_path / "empty.csv", tmp_path / "c.png")


def test_long_logs_are_drawn_as_running_means(tmp_path):
    from mrcnn_edu.visualize import running_mean

    np.testing.assert_allclose(
        running_mean(np.array([1.0, 3.0, 5.0, np.nan, 9.0]), 2), [1.0, 2.0, 4.0, 5.0, 9.0]
    )
    rng = np.random.default_rng(0)
    n = 500
    cols = {
        "step": np.arange(1, n + 1, dtype=float),
        "loss_mask": rng.uniform(0.1, 1.0, n),
        "total": rng.uniform(1.0, 2.0, n),
    }
    fig = _training_curves_figure(cols, "step")
    ax = fig.axes[0]
    labelled = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    assert [ln.get_label() for ln in labelled] == ["loss_mask", "total"]
    np.testing.assert_allclose(labelled[0].get_ydata(), running_mean(cols["loss_mask"], n // 50))
    assert len(ax.lines) == 4  # each loss also drawn raw, faint, unlabelled
