"""RoIPool and RoIAlign: a fixed-size feature grid for every region of interest.

Both ops cut a region ``(x1, y1, x2, y2)`` (image pixels) out of a feature map ``(N, C, H, W)``
and return a ``(PH, PW)`` grid of features per RoI, so that box and mask heads see inputs of one
size. They differ in how the region meets the feature grid:

* **RoIPool** (Fast R-CNN) rounds the RoI to whole feature pixels, cuts it into ``PH x PW`` bins
  with integer (floor / ceil) edges and takes the maximum of each bin. Two quantisations: the
  pooled features can be up to a pixel (16 image pixels at stride 16) away from the box.
* **RoIAlign** (Mask R-CNN, section 3) rounds nothing: each bin averages ``g x g`` bilinear samples
  taken at the exact sub-pixel positions. ``aligned=True`` also shifts the RoI by half a pixel so
  that pixel *centres* line up (Detectron2's correction).

Semantics and signatures follow torchvision (written down in ``docs/conventions.md``), so results
compare line by line. ``docs/roi_pooling.md`` derives the forward and backward passes.

Two implementations of each op live here, side by side:

* the **readable definitions** (``roi_align_reference``, ``roi_pool_reference``): Python loops over
  RoIs, bins and samples, written as the paper describes them;
* the **fast forms** used by ``roi_align`` / ``roi_pool``, tested equal to the definitions.
  RoIAlign is separable: a bin average of bilinear samples weights rows and columns
  independently, so for one RoI ``out[c] = Ay @ F[c] @ Ax.T`` with small interpolation matrices
  ``Ay (PH, H)`` and ``Ax (PW, W)`` -- two BLAS matrix products on the RoI's window of the map.
  RoIPool's max over a bin is the max of four overlapping power-of-two rectangles read from a
  precomputed 2-D "sparse table", so every bin costs four lookups whatever its size.

The files, one topic each:

* ``align.py``: ``roi_align``, ``roi_align_backward``, ``interpolation_matrices`` and the
  separable fast form;
* ``pool.py``: ``roi_pool``, ``roi_pool_backward``, ``roi_pool_bins`` and the sparse table;
* ``poolers.py``: ``MultiScaleRoIAlign`` (RoIAlign over FPN levels), ``LevelMapper`` (which level
  a box is pooled from) and ``infer_scale``;
* ``reference.py``: the paper-literal loops ``roi_align_reference``,
  ``roi_align_backward_reference`` and ``roi_pool_reference``;
* ``_checks.py``: the argument checks all of them share, and ``boxes_to_rois``.

CuPy arrays are handed to the GPU kernels in ``mrcnn_edu.kernels`` (after the same validation);
the NumPy path never imports cupy.
"""

from ._checks import boxes_to_rois
from .align import interpolation_matrices, roi_align, roi_align_backward
from .pool import roi_pool, roi_pool_backward, roi_pool_bins
from .poolers import LevelMapper, MultiScaleRoIAlign, PoolerCache, infer_scale
from .reference import roi_align_backward_reference, roi_align_reference, roi_pool_reference

__all__ = [
    "roi_align",
    "roi_align_backward",
    "roi_pool",
    "roi_pool_backward",
    "MultiScaleRoIAlign",
    "PoolerCache",
    "LevelMapper",
    "infer_scale",
    "boxes_to_rois",
    "interpolation_matrices",
    "roi_pool_bins",
    "roi_align_reference",
    "roi_align_backward_reference",
    "roi_pool_reference",
]
