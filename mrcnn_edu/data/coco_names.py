"""COCO's 80 category names, shipped as data (``coco_classes.json`` next to this file).

COCO numbers its categories 1..90 with ten gaps; torchvision's COCO models have 91 outputs
indexed by those ids (0 is the background, gaps are ``"N/A"``). A model converted from them
(``MaskRCNNConfig.resnet50_fpn(num_classes=90)``) predicts labels 1..90 that *are* COCO ids, so
``coco_label_names()`` is the ``class_names`` to draw its predictions with.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

MISSING = "N/A"  # torchvision's name for a COCO id without a category
BACKGROUND = "__background__"


@lru_cache(maxsize=1)
def _categories() -> tuple[tuple[int, str, str], ...]:
    text = resources.files(__package__).joinpath("coco_classes.json").read_text("utf-8")
    rows = json.loads(text)["categories"]
    return tuple((int(c["id"]), str(c["name"]), str(c["supercategory"])) for c in rows)


def coco_classes() -> dict[int, str]:
    """``{COCO category id: name}`` for the 80 categories (``1: "person"`` .. ``90:
    "toothbrush"``)."""
    return {i: name for i, name, _ in _categories()}


def coco_supercategories() -> dict[int, str]:
    """``{COCO category id: supercategory}`` (``1: "person"``, ``2: "vehicle"``, ...)."""
    return {i: sup for i, _, sup in _categories()}


def coco_label_names() -> tuple[str, ...]:
    """Names of labels 1..90 (``names[label - 1]``), ``"N/A"`` at the ten unused ids: the
    ``class_names`` of a model converted from torchvision's COCO weights."""
    names = coco_classes()
    return tuple(names.get(i, MISSING) for i in range(1, max(names) + 1))


def torchvision_coco_categories() -> list[str]:
    """torchvision's 91-entry layout: index 0 ``"__background__"``, then ids 1..90."""
    return [BACKGROUND, *coco_label_names()]
