"""Pictures of what the model sees and says: instances drawn over images, training curves.

Figures are built as ``matplotlib.figure.Figure`` objects and saved with the Agg renderer,
without ``pyplot``: nothing is registered globally, so there is no figure to leak or close and
no backend to switch, and the functions work the same in scripts, tests and notebooks.
``draw_instances`` draws onto any ``Axes``, including one from ``plt.subplots()`` in a notebook;
so do ``draw_boxes`` (xyxy rectangles in one colour) and ``show_image`` (a ``(3, H, W)`` image with
pixel edges on integer coordinates), the two pieces the chapter notebooks draw with, and
``draw_keypoints`` (skeletons of keypoints, COCO's visibility).

Matplotlib is imported inside the functions (``pip install 'mrcnn-edu[demo]'``), so importing
this module needs NumPy only.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from .backend import to_host
from .run_folder import atomic_save

_HINT = "pip install 'mrcnn-edu[demo]'"
# Well-separated colours, one per instance: the d-th instance of a panel gets
# _PALETTE[d % len(_PALETTE)], its box, mask and outline alike, so touching objects of one class
# stay apart on screen. Neighbours in the list differ in hue, and all are bright enough to
# show on dark and light images.
_PALETTE = (
    (0.90, 0.10, 0.10),  # red
    (0.10, 0.45, 0.95),  # blue
    (1.00, 0.85, 0.00),  # yellow
    (0.60, 0.20, 0.85),  # purple
    (0.10, 0.75, 0.20),  # green
    (1.00, 0.50, 0.00),  # orange
    (0.00, 0.80, 0.80),  # cyan
    (0.95, 0.30, 0.70),  # pink
    (0.60, 0.80, 0.10),  # lime
    (0.55, 0.35, 0.15),  # brown
)
# Columns of a training log that are axes or settings, not losses.
_NOT_LOSSES = {"step", "iter", "iteration", "epoch", "lr", "time", "seconds", "elapsed", "eta"}


def draw_instances(
    ax,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    mask_alpha: float = 0.45,
    mask_threshold: float = 0.5,
):
    """Draw an image and its instances on a matplotlib ``Axes``; return the axes.

    Instance ``d`` gets ``instance_colour(d)`` (box, fill, outline), so touching objects of one
    class stay apart, and ``"name score"`` in white on a dark label beside its box.

    Args:
        ax: the axes to draw on.
        image: ``(3, H, W)`` float in [0, 1] (or uint8 in [0, 255]).
        boxes: ``(D, 4)`` xyxy pixels (pixel edges: ``x2`` is one past the last column).
        labels: ``(D,)`` ints in ``1..K``.
        masks: optional ``(D, H, W)`` (or ``(D, 1, H, W)``) binary or probabilities; a pixel is
            drawn when its value is ``> mask_threshold``. Shown as translucent fills with an
            outline.
        scores: optional ``(D,)``; printed after the class name.
        class_names: names of labels ``1..K`` (``class_names[label - 1]``) or a
            ``{label: name}`` dict; default shows the label number.
    """
    image = _image_hwc(image)
    height, width = image.shape[:2]
    boxes, labels, masks, scores = _instance_arrays(boxes, labels, masks, scores, height, width)

    # extent puts pixel edges on integer coordinates, the convention boxes use.
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
    if masks is not None and len(masks):
        _draw_masks(ax, masks, mask_alpha, mask_threshold)
    for d, (box, label) in enumerate(zip(boxes, labels)):
        colour = instance_colour(d)
        draw_boxes(ax, box, colour, lw=1.5)
        text = _class_name(int(label), class_names)
        if scores is not None:
            text += f" {scores[d]:.2f}"
        # Above the box, unless that would leave the image: then just inside its top edge.
        # White on a dark box reads on any image; the box's edge ties the label to its instance.
        x1, y1 = box[:2]
        ax.text(
            x1,
            y1,
            text,
            fontsize=7,
            color="white",
            va="bottom" if y1 >= 0.08 * height else "top",
            ha="left",
            clip_on=True,
            bbox={"facecolor": (0.0, 0.0, 0.0, 0.7), "pad": 1, "edgecolor": colour, "lw": 1.0},
        )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    return ax


def draw_boxes(ax, boxes, colour, lw: float = 1.0, ls: str = "-", alpha: float | None = None):
    """Draw xyxy ``boxes`` (``(D, 4)`` pixels, any sequence of 4 numbers) as unfilled rectangles
    of one colour on a matplotlib ``Axes``; ``lw``, ``ls`` and ``alpha`` are matplotlib's
    line width, line style and opacity. Returns the axes."""
    _, patches = _import_matplotlib()
    style = {"fill": False, "edgecolor": colour, "lw": lw, "ls": ls, "alpha": alpha}
    for x1, y1, x2, y2 in np.asarray(to_host(boxes), dtype=np.float64).reshape(-1, 4):
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, **style))
    return ax


def draw_keypoints(ax, keypoints, skeleton=(), colour=None, marker_size: float = 3.0):
    """Draw skeletons on a matplotlib ``Axes``; return the axes.

    ``keypoints``: ``(D, K, 3)`` (or one ``(K, 3)``) rows ``(x, y, v)`` in pixels, COCO's
    visibility: a keypoint with ``v = 2`` is a filled dot, ``v = 1`` (labelled but hidden) an
    open circle, ``v = 0`` is not drawn. ``skeleton``: ``(a, b)`` pairs of 0-based keypoint
    indices, drawn as lines where both ends are drawn. Skeleton ``d`` gets
    ``instance_colour(d)`` (the colour ``draw_instances`` gives instance ``d``), or ``colour``.
    """
    keypoints = np.asarray(to_host(keypoints), dtype=np.float64)
    if keypoints.ndim == 2:
        keypoints = keypoints[None]
    if keypoints.ndim != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must be (D, K, 3) rows (x, y, v), got {keypoints.shape}")
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=3.0, foreground="black")]  # shows on its mask
    for d, person in enumerate(keypoints):
        c = instance_colour(d) if colour is None else colour
        shown = person[:, 2] > 0
        for a, b in skeleton:
            if shown[a] and shown[b]:
                ax.plot(person[[a, b], 0], person[[a, b], 1], color=c, lw=1.5, path_effects=outline)
        for v, face in ((2, c), (1, "none")):
            at = person[:, 2] == v
            ax.plot(person[at, 0], person[at, 1], "o", ms=marker_size, mfc=face, mec=c, mew=1.0,
                    path_effects=outline)  # fmt: skip
    return ax


def show_image(ax, image, title: str = ""):
    """Show a ``(3, H, W)`` image (float in [0, 1] or uint8) on a matplotlib ``Axes`` with pixel
    edges on integer coordinates (the box convention, so ``draw_boxes`` lines up), a small
    title and no axis lines. Returns the axes."""
    image = _image_hwc(image)
    ax.imshow(image, extent=(0, image.shape[1], image.shape[0], 0))
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def _instance_arrays(boxes, labels, masks, scores, height, width):
    """``draw_instances``' inputs as host arrays of matching lengths (masks ``(D, H, W)``)."""
    boxes = np.asarray(to_host(boxes), dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(to_host(labels)).reshape(-1)
    if labels.shape[0] != boxes.shape[0]:
        raise ValueError(f"got {boxes.shape[0]} boxes but {labels.shape[0]} labels")
    if scores is not None:
        scores = np.asarray(to_host(scores), dtype=np.float64).reshape(-1)
        if scores.shape[0] != boxes.shape[0]:
            raise ValueError(f"got {boxes.shape[0]} boxes but {scores.shape[0]} scores")
    if masks is not None:
        masks = np.asarray(to_host(masks))
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.shape != (boxes.shape[0], height, width):
            raise ValueError(
                f"masks must be (D, H, W) = {(boxes.shape[0], height, width)}, got {masks.shape}"
            )
    return boxes, labels, masks, scores


def _draw_masks(ax, masks, mask_alpha, mask_threshold):
    """Translucent fills in the instance colours, then an outline around each mask."""
    height, width = masks.shape[1:]
    extent = (0, width, height, 0)
    overlay = np.zeros((height, width, 4))
    for d, mask in enumerate(masks):
        inside = mask > mask_threshold
        overlay[inside, :3] = instance_colour(d)
        overlay[inside, 3] = mask_alpha
    ax.imshow(overlay, extent=extent, interpolation="nearest")
    for d, mask in enumerate(masks):
        if (mask > mask_threshold).any():
            # contour runs through pixel centres, which sit at +0.5 with this extent.
            ax.contour(
                np.arange(width) + 0.5,
                np.arange(height) + 0.5,
                (mask > mask_threshold).astype(float),
                levels=[0.5],
                colors=[instance_colour(d)],
                linewidths=1.0,
            )


def save_predictions_figure(
    images,
    predictions: Sequence[Mapping],
    targets: Sequence[Mapping] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    path: str | os.PathLike = "predictions.png",
    max_images: int = 8,
    score_threshold: float = 0.5,
    skeleton=(),
) -> str:
    """Save a grid of predictions (ground truth beside each when ``targets`` are given).

    Args:
        images: ``(N, 3, H, W)`` array or a list of ``(3, H, W)`` arrays.
        predictions: one dict per image with ``"boxes"``, ``"labels"``, ``"scores"`` and
            optionally ``"masks"`` (the model's ``predict`` output).
        targets: optional dicts with ``"boxes"``, ``"labels"`` and optionally ``"masks"``.
        class_names: as in ``draw_instances``.
        path: the PNG to write (its folder must exist).
        max_images: draw at most this many images (the first ones).
        score_threshold: detections scoring below this are not drawn.
        skeleton: edges ``(a, b)`` of the keypoints; predictions and targets carrying
            ``"keypoints"`` get their skeletons drawn (``draw_keypoints``) with or without it.

    Returns the path written.
    """
    Figure, _ = _import_matplotlib()
    num = _num_to_draw(images, predictions, targets, max_images)
    panels_per_image = 2 if targets is not None else 1
    images_per_row = 2 if targets is not None else 4
    cols = panels_per_image * min(num, images_per_row)
    rows = math.ceil(num / images_per_row)
    fig = Figure(figsize=(3.0 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for i in range(num):
        slot = i * panels_per_image
        if targets is not None:
            t = targets[i]
            draw_instances(
                axes[slot], images[i], t["boxes"], t["labels"], t.get("masks"),
                class_names=class_names,
            )  # fmt: skip
            if "keypoints" in t:
                draw_keypoints(axes[slot], t["keypoints"], skeleton)
            axes[slot].set_title("ground truth", fontsize=9)
            slot += 1
        _draw_prediction(axes[slot], images[i], predictions[i], score_threshold, class_names)
        if "keypoints" in predictions[i]:  # a model's keypoints carry v = 1: draw them filled
            keep = np.asarray(to_host(predictions[i]["scores"])) >= score_threshold
            shown = np.array(to_host(predictions[i]["keypoints"]), np.float64)[keep]
            shown[..., 2] = 2
            draw_keypoints(axes[slot], shown, skeleton)
    fig.tight_layout()
    return atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=100))


def _num_to_draw(images, predictions, targets, max_images) -> int:
    """How many images ``save_predictions_figure`` draws, after checking the lengths agree."""
    if len(images) != len(predictions):
        raise ValueError(f"got {len(images)} images but {len(predictions)} predictions")
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    num = min(len(images), max_images)
    if num == 0:
        raise ValueError("no images to draw")
    return num


def _draw_prediction(ax, image, prediction, score_threshold, class_names):
    """One prediction panel: the detections scoring at least ``score_threshold``."""
    scores = np.asarray(to_host(prediction["scores"]))
    keep = scores >= score_threshold
    masks = prediction.get("masks")
    draw_instances(
        ax,
        image,
        np.asarray(to_host(prediction["boxes"]))[keep],
        np.asarray(to_host(prediction["labels"]))[keep],
        None if masks is None else np.asarray(to_host(masks))[keep],
        scores[keep],
        class_names=class_names,
    )
    ax.set_title(f"prediction (score >= {score_threshold:g})", fontsize=9)


def plot_training_curves(
    log: str | os.PathLike | Mapping[str, Sequence[float]],
    path: str | os.PathLike = "training_curves.png",
    x_key: str = "step",
) -> str:
    """Plot every loss of a training log against the step, log y axis; return the path.

    Args:
        log: a CSV file with a header row (as the trainer writes) or ``{column: values}``.
            Every numeric column is a loss except ``x_key``, the bookkeeping columns
            (``step``, ``epoch``, ``lr``, ``time`` ...) and validation scores (``AP``,
            ``segm_AP50``, ...); ``lr``, when present, is drawn dashed on a second axis. Empty
            cells and non-positive losses are left out of the plot. Scores, when a column has
            any, get a second panel below (the trainer's ``eval_every``).
        path: the PNG to write.
        x_key: the column used as the x axis (default ``"step"``; row number if absent).
    """
    columns = _read_log(log)
    fig = _training_curves_figure(columns, x_key)
    path = os.fspath(path)
    fig.savefig(path, dpi=110)
    return path


def _training_curves_figure(columns: dict[str, np.ndarray], x_key: str):
    Figure, _ = _import_matplotlib()
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"log columns must be non-empty and of one length, got {sorted(lengths)}")
    (length,) = lengths
    x = columns.get(x_key, np.arange(length, dtype=np.float64))
    scores = {k: v for k, v in columns.items() if _is_score(k) and np.isfinite(v).any()}
    losses = {
        k: v
        for k, v in columns.items()
        if k.lower() not in _NOT_LOSSES and k != x_key and not _is_score(k)
    }
    if not losses:
        raise ValueError(
            f"the log has no loss columns (columns: {sorted(columns)}); expected e.g. "
            f"'loss', 'loss_classifier'"
        )
    x_label = x_key if x_key in columns else "row"
    if not scores:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        ax.set_xlabel(x_label)
    else:  # a second panel below: the validation scores at the steps they were measured
        fig = Figure(figsize=(7, 6.5))
        ax, ax_scores = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 2)})
        _draw_scores(ax_scores, x, scores)
        ax_scores.set_xlabel(x_label)
    _draw_losses(ax, x, losses)
    lr_key = next((k for k in columns if k.lower() == "lr"), None)
    if lr_key is not None:
        ax_lr = ax.twinx()
        ax_lr.plot(x, columns[lr_key], color="grey", ls="--", lw=1.0)
        ax_lr.set_ylabel("learning rate (dashed)", color="grey")
    fig.tight_layout()
    return fig


def _draw_losses(ax, x: np.ndarray, losses: dict[str, np.ndarray]) -> None:
    """Each loss against the step on a log axis; long runs as running means over faint raw
    curves."""
    window = max(len(x) // 50, 1) if len(x) >= SMOOTH_FROM else 1
    for name, values in losses.items():
        values = np.where(values > 0, values, np.nan)  # a log axis cannot show <= 0
        # The total ("loss" or "total") is drawn thicker, so the sum stands out from its parts.
        lw = 2.0 if name in ("loss", "total") else 1.2
        if window == 1:
            ax.plot(x, values, lw=lw, label=name)
            continue
        # Long runs: per-step losses are noisy (each step is a few images), so draw them faint
        # and label their running mean over ``window`` steps.
        (raw,) = ax.plot(x, values, lw=0.5, alpha=0.2, label="_nolegend_")
        ax.plot(x, running_mean(values, window), lw=lw, color=raw.get_color(), label=name)
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=2, framealpha=0.8)


def _draw_scores(ax, x: np.ndarray, scores: dict[str, np.ndarray]) -> None:
    """Validation scores (AP, AP50, ...) at the rows that have them, as dots joined by lines;
    a linear axis from 0."""
    for name, values in scores.items():
        measured = np.isfinite(values)
        ax.plot(x[measured], values[measured], marker="o", ms=3, lw=1.2, label=name)
    ax.set_ylim(bottom=0.0)
    ax.set_ylabel("validation")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=2, framealpha=0.8)


# A validation score column of log.csv: AP or AR, optionally with a threshold or size suffix
# (AP50, APs, AR100), alone or after a prefix (segm_AP, bbox_AP50).
_SCORE_COLUMN = re.compile(r"(?:.*_)?A[PR](?:\d+|[sml])?")


def _is_score(name: str) -> bool:
    return _SCORE_COLUMN.fullmatch(name) is not None


SMOOTH_FROM = 100  # logs with at least this many rows get running-mean curves


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each position (fewer at the start), NaNs skipped."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, len(v) + 1)
    lo = np.maximum(hi - window, 0)
    count = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / count, np.nan)


def _read_log(log) -> dict[str, np.ndarray]:
    if isinstance(log, Mapping):
        return {str(k): np.asarray(v, dtype=np.float64).reshape(-1) for k, v in log.items()}
    path = os.fspath(log)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training log {path!r} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no data rows (is it a CSV with a header line?)")
    columns = {}
    for name in rows[0]:
        if name is None:
            continue
        values = []
        for row in rows:
            cell = (row.get(name) or "").strip()
            try:
                values.append(float(cell) if cell else math.nan)
            except ValueError:
                break  # a text column (a phase name, a timestamp): not plottable
        else:
            columns[name.strip()] = np.asarray(values)
    return columns


def _image_hwc(image) -> np.ndarray:
    image = np.asarray(to_host(image))
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (3, H, W) (or (1, H, W)), got shape {image.shape}")
    image = image.transpose(1, 2, 0)
    if image.dtype == np.uint8:
        image = image.astype(np.float64) / 255.0
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.clip(image.astype(np.float64), 0.0, 1.0)


def instance_colour(index: int) -> tuple[float, float, float]:
    """The RGB colour (floats in [0, 1]) ``draw_instances`` gives its ``index``-th instance:
    a fixed palette of ten well-separated colours, cycled."""
    return _PALETTE[int(index) % len(_PALETTE)]


def _class_name(label: int, class_names) -> str:
    if class_names is None:
        return str(label)
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    if 1 <= label <= len(class_names):
        return str(class_names[label - 1])
    return str(label)


def _import_matplotlib():
    """``(Figure, matplotlib.patches)``, or an ImportError naming the extra to install."""
    try:
        from matplotlib import patches
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"figures need matplotlib ({err}); install it with {_HINT}") from err
    return Figure, patches
