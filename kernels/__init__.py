"""GPU kernels (installed as ``mrcnn_edu.kernels``): CuPy and Numba-CUDA versions of the hot ops.

Nothing here is imported by the NumPy path; each module imports cupy or numba only when used.
"""
