"""Datasets: synthetic shapes and COCO-format loading."""
