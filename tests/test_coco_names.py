"""COCO's class names ship as package data: the 80 names at their COCO ids, torchvision's
91-entry layout, and the JSON file inside a normal (non-editable) install."""

import configparser
import fnmatch
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mrcnn_edu.data import coco_classes, coco_label_names, torchvision_coco_categories
from mrcnn_edu.data.coco_names import coco_supercategories

ROOT = Path(__file__).resolve().parent.parent
GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # COCO ids without a category


def test_eighty_names_at_coco_ids():
    names = coco_classes()
    assert len(names) == 80 and len(set(names.values())) == 80
    assert set(names) == set(range(1, 91)) - GAPS
    assert names[1] == "person" and names[90] == "toothbrush"
    assert names[3] == "car" and names[44] == "bottle" and names[67] == "dining table"
    assert coco_supercategories()[2] == "vehicle" and coco_supercategories()[90] == "indoor"


def test_label_names_and_torchvision_layout():
    labels = coco_label_names()  # class_names of the converted 90-class model
    assert len(labels) == 90
    assert labels[1 - 1] == "person" and labels[90 - 1] == "toothbrush"
    assert [i for i in range(1, 91) if labels[i - 1] == "N/A"] == sorted(GAPS)
    tv = torchvision_coco_categories()
    assert len(tv) == 91 and tv[0] == "__background__" and tv[1:] == list(labels)


def test_layout_equals_torchvisions_own_list():
    detection = pytest.importorskip("torchvision.models.detection")
    meta = detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta
    assert torchvision_coco_categories() == list(meta["categories"])


def test_every_data_file_is_listed_in_package_data():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    package_data = cfg["options.package_data"]
    data_files = [p for p in (ROOT / "mrcnn_edu").rglob("*") if p.is_file()]
    data_files = [p for p in data_files if p.suffix not in (".py", ".pyc")]
    assert data_files, "expected mrcnn_edu/data/coco_classes.json"
    for p in data_files:
        package = ".".join(p.parent.relative_to(ROOT).parts)
        patterns = package_data.get(package, "").split()
        assert any(fnmatch.fnmatch(p.name, pat) for pat in patterns), (
            f"add {p.name} to [options.package_data] {package} in setup.cfg"
        )


@pytest.mark.slow
def test_the_wheel_contains_the_class_names(tmp_path):
    # Built from a copy of the sources, so the build folder never lands in the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("mrcnn_edu", "kernels"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "-q", "-w", str(out), str(src)], check=True, timeout=300)
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert "mrcnn_edu/data/coco_classes.json" in zf.namelist()
