"""The NumPy path never imports a GPU library: RoI ops and NMS on NumPy arrays leave cupy,
numba and the kernels package unimported (checked in a fresh interpreter, since another test in
this process may have imported them)."""

import subprocess
import sys

CHILD = r"""
import sys
import numpy as np
from mrcnn_edu import nms as nms_mod, roi_ops

rng = np.random.default_rng(0)
features = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
rois = np.array([[0, 1, 1, 6, 6], [0, 2, 0, 7, 5]], dtype=np.float32)
out = roi_ops.roi_align(features, rois, 2, 1.0, 2, False)
roi_ops.roi_align_backward(np.ones_like(out), rois, features.shape, 2, 1.0, 2, False)
pooled, argmax = roi_ops.roi_pool(features, rois, 2, 1.0)
roi_ops.roi_pool_backward(np.ones_like(pooled), argmax, features.shape)
boxes = rois[:, 1:].copy()
scores = np.array([0.9, 0.8], dtype=np.float32)
assert nms_mod.nms(boxes, scores, 0.5).tolist() == [0, 1]
nms_mod.batched_nms(boxes, scores, np.array([0, 1]), 0.5)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("cupy", "numba", "cupyx")
                or m.startswith("mrcnn_edu.kernels"))
print("LOADED", loaded)
"""


def test_numpy_roi_ops_and_nms_never_import_cupy_or_the_kernels():
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout
