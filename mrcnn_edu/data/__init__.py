"""Datasets: synthetic shapes and COCO-format loading; COCO's class names as data."""

from .coco_names import coco_classes, coco_label_names, torchvision_coco_categories

__all__ = ["coco_classes", "coco_label_names", "torchvision_coco_categories"]
