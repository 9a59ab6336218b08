"""setup.cfg lists its packages by hand (kernels/ is mapped into mrcnn_edu.kernels), so a new
subpackage that is not listed would be missing from a normal (non-editable) install."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "mrcnn_edu").rglob("__init__.py")
    }
    on_disk.add("mrcnn_edu.kernels")  # kernels/ at the top level, mapped by package_dir
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [options] packages"
    assert (ROOT / "kernels" / "__init__.py").exists()
