"""mrcnn-edu: a readable, NumPy-first reference implementation of Mask R-CNN.

Every stage is plain NumPy with a hand-written backward pass. Arrays may also be CuPy arrays:
array code is written against an ``xp`` module chosen by :func:`mrcnn_edu.backend.get_xp`.
"""

__version__ = "0.1.0"
