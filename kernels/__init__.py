"""GPU kernels (installed as ``mrcnn_edu.kernels``): CuPy and Numba-CUDA versions of the hot ops.

Nothing here is imported by the NumPy path; each module imports cupy or numba only when used.

- ``cupy_roi_align`` / ``numba_roi_align``: RoIAlign forward and backward, RoIPool forward and
  backward (one thread per pooled output element; atomics in the backward passes).
- ``cupy_nms`` / ``numba_nms``: bitmask NMS and batched NMS.

``mrcnn_edu.backend.gpu_kernel`` picks the module from ``MRCNN_EDU_KERNELS`` (``cupy`` by
default, or ``numba``); see docs/gpu_kernels.md.
"""
