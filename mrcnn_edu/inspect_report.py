"""What ``mrcnn-edu inspect`` shows: the statistics as text, and the figure.

``format_statistics`` turns ``inspect_data.dataset_statistics`` into the printed report.
The figure's top row: up to four images with each instance's mask, box and class name in its
own colour (``visualize.draw_instances``). Bottom row: instances per image, object sizes on a
log axis with the model's anchor sizes (solid) and the suggested ones (dashed), instances per
class, and box aspect ratios with the anchor ratios. Matplotlib is imported only when drawing.
The file is written atomically (a temporary file in the same folder, then ``os.replace``), and
an existing file is replaced only when asked.
"""

from __future__ import annotations

import os

import numpy as np

from .inspect_data import SUGGESTION_SAMPLE
from .out_paths import IMAGE_SUFFIXES, check_output_file
from .run_folder import atomic_save
from .visualize import draw_instances

_COLUMNS = 4


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> str:
    """Refuse, before any work, a figure path that cannot be written (``check_output_file``:
    no image extension, a missing or read-only folder, a file on the way) or an existing file
    unless ``overwrite``. Returns the path as a string."""
    path = check_output_file(path, "--out", IMAGE_SUFFIXES)
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{path!r} already exists; pass --overwrite to replace it")
    return path


def save_inspection_figure(
    samples, stats: dict, path: str | os.PathLike, overwrite: bool = False, class_names=None
) -> str:
    """Draw ``samples`` (dataset items: ``image``, ``boxes``, ``labels``, ``masks``) and the
    histograms of ``stats`` (``inspect_data.dataset_statistics``) to ``path``; return it."""
    from matplotlib.figure import Figure

    path = check_output_path(path, overwrite)
    fig = Figure(figsize=(3.4 * _COLUMNS, 6.8))
    axes = fig.subplots(2, _COLUMNS, squeeze=False)
    for ax, item in zip(axes[0], samples):
        draw_instances(
            ax, item["image"], item["boxes"], item["labels"], item["masks"],
            class_names=class_names,
        )  # fmt: skip
        n = len(item["labels"])
        ax.set_title(f"image id {item['image_id']}: {n} instance{'s' * (n != 1)}", fontsize=9)
    for ax in axes[0]:
        ax.set_axis_off()
    _per_image_histogram(axes[1][0], stats["instances_per_image"])
    _size_histogram(axes[1][1], stats)
    _class_bars(axes[1][2], stats["instances_per_class"])
    _ratio_histogram(axes[1][3], stats)
    fig.tight_layout()
    _save_atomically(fig, path, overwrite)
    return path


def format_statistics(stats: dict) -> str:
    """The statistics as the text ``mrcnn-edu inspect`` prints."""
    per_image = stats["instances_per_image"]
    lines = [
        f"images: {stats['num_images']} ({stats['num_images_empty']} without instances)",
        f"instances: {stats['num_instances']} (not counted: {stats['num_crowd']} crowd, "
        f"{stats['num_degenerate']} with an empty box)",
        "instances per class:",
        *(f"  {name:<20} {n}" for name, n in stats["instances_per_class"].items()),
    ]
    if len(per_image):
        lines.append(
            f"instances per image: min {per_image.min()}, median {np.median(per_image):g}, "
            f"max {per_image.max()}"
        )
    sizes = stats["object_sizes"]
    if len(sizes):
        buckets = stats["size_buckets"]
        ratios = np.percentile(stats["aspect_ratios"], [5, 50, 95])
        lines += [
            f"object sizes (sqrt of box area, px): {_spread(sizes)}",
            f"  COCO buckets: small (< 32^2) {buckets['small']}, medium {buckets['medium']}, "
            f"large (>= 96^2) {buckets['large']}",
            f"box aspect ratios h/w: 5th/50th/95th percentile {ratios[0]:.2f}/{ratios[1]:.2f}/"
            f"{ratios[2]:.2f} (anchor ratios {_ratios_text(stats['anchor_aspect_ratios'])})",
        ]
    return "\n".join(lines + _anchor_lines(stats))


def _anchor_lines(stats: dict) -> list[str]:
    lines = [
        f"anchor sizes: {_sizes_text(stats['anchor_sizes'])} on strides "
        f"{', '.join(map(str, stats['strides']))}"
    ]
    sizes = stats["input_object_sizes"]
    if not len(sizes):
        return lines + ["no instances: nothing to compare with the anchors"]
    if stats["input_resize"] is not None:
        short, longest = stats["input_resize"]
        lines.append(
            f"model input: shorter side {short}, longer at most {longest} (as at inference); "
            f"object sizes there: {_spread(sizes)}"
        )
    unmatched = stats["best_anchor_iou"] < 0.5
    missed = (
        f", sizes {sizes[unmatched].min():.1f}-{sizes[unmatched].max():.1f} px"
        if unmatched.any()
        else ""
    )
    suggested = stats["suggested_anchor_sizes"]
    lines += [
        f"objects no anchor matches at IoU >= 0.5: {int(unmatched.sum())} of {len(sizes)} "
        f"({100 * stats['unmatched_share']:.1f}%){missed}",
        f"suggested anchor sizes: {_sizes_text(suggested)}; train with --anchor-sizes "
        f"{_sizes_text(suggested).replace(' ', '')} (a run config: model.rpn.anchor_sizes "
        f"{_json_sizes(suggested)})",
        f"  on up to {SUGGESTION_SAMPLE} objects, suggested vs model anchors: unmatched "
        f"{stats['suggested_score'][0]:.1%} vs {stats['model_score'][0]:.1%}, mean best IoU "
        f"{stats['suggested_score'][1]:.2f} vs {stats['model_score'][1]:.2f}",
    ]
    if stats["suggestion_note"]:
        lines.append(f"  note: {stats['suggestion_note']}")
    return lines


def _spread(sizes) -> str:
    p5, p50, p95 = np.percentile(sizes, [5, 50, 95])
    return (
        f"min {sizes.min():.1f}, median {p50:.1f}, max {sizes.max():.1f} "
        f"(5th-95th percentile {p5:.1f}-{p95:.1f})"
    )


def _sizes_text(sizes) -> str:
    return ", ".join("/".join(f"{v:g}" for v in level) for level in sizes)


def _ratios_text(ratios) -> str:
    distinct = sorted({v for level in ratios for v in level})
    return ", ".join(f"{v:g}" for v in distinct)


def _json_sizes(sizes) -> str:
    return "[" + ", ".join("[" + ", ".join(f"{v:g}" for v in level) + "]" for level in sizes) + "]"


def _per_image_histogram(ax, per_image):
    top = int(per_image.max()) if len(per_image) else 0
    ax.hist(per_image, bins=np.arange(top + 2) - 0.5, color="0.5", rwidth=0.85)
    ax.set_xlabel("instances per image")
    ax.set_ylabel("images")


def _size_histogram(ax, stats):
    sizes = stats["input_object_sizes"]
    scale = "" if stats["input_resize"] is None else " at model input"
    ax.set_xlabel(f"object size sqrt(w h){scale}, px (log)")
    ax.set_ylabel("instances")
    if not len(sizes):
        return
    anchors = [v for level in stats["anchor_sizes"] for v in level]
    suggested = [v for level in stats["suggested_anchor_sizes"] for v in level]
    low = min(sizes.min(), *anchors, *suggested) / 1.2
    high = max(sizes.max(), *anchors, *suggested) * 1.2
    ax.hist(sizes, bins=np.geomspace(low, high, 40), color="0.5")
    _log_axis_ticks(ax, anchors)
    for i, v in enumerate(anchors):
        ax.axvline(v, color="tab:red", lw=1.2, label="model anchors" if i == 0 else None)
    for i, v in enumerate(suggested):
        ax.axvline(v, color="tab:blue", ls="--", lw=1.2, label="suggested" if i == 0 else None)
    ax.legend(fontsize=7)


def _class_bars(ax, per_class):
    names = list(per_class)
    ax.bar(range(len(names)), [per_class[n] for n in names], color="0.5")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45 if len(names) > 4 else 0, ha="right", fontsize=8)
    ax.set_ylabel("instances")


def _ratio_histogram(ax, stats):
    ratios = stats["aspect_ratios"]
    ax.set_xlabel("box aspect ratio h / w (log)")
    ax.set_ylabel("instances")
    if not len(ratios):
        return
    anchor_ratios = sorted({v for level in stats["anchor_aspect_ratios"] for v in level})
    low = min(ratios.min(), *anchor_ratios) / 1.2
    high = max(ratios.max(), *anchor_ratios) * 1.2
    ax.hist(ratios, bins=np.geomspace(low, high, 40), color="0.5")
    _log_axis_ticks(ax, anchor_ratios)
    for i, v in enumerate(anchor_ratios):
        ax.axvline(v, color="tab:red", lw=1.2, label="anchor ratios" if i == 0 else None)
    ax.legend(fontsize=7)


def _log_axis_ticks(ax, values):
    """A log x axis labelled at ``values`` only (the anchors), in plain numbers."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:g}" for v in values], fontsize=7)
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save_atomically(fig, path: str, overwrite: bool) -> None:
    extension = os.path.splitext(path)[1].lower().lstrip(".")

    def write(tmp):
        fig.savefig(tmp, dpi=100, format=extension)
        if os.path.lexists(path) and not overwrite:  # appeared while we worked
            raise ValueError(f"{path!r} already exists; pass --overwrite to replace it")

    try:
        atomic_save(path, write)
    except OSError as err:
        raise ValueError(f"cannot write {path!r}: {err}") from err
