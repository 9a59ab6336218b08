"""Reading an image file as the model reads images: ``(3, H, W)`` float32 RGB in ``[0, 1]``.

One reader for the datasets and ``mrcnn-edu predict``, so both see the same numbers. Values are
scaled by the image's bit depth: 8-bit images (grayscale, RGB, RGBA, palette, ...) by 255,
16-bit grayscale (Pillow's ``I;16`` modes, e.g. microscopy PNGs) by 65535 -- converting those
to 8-bit RGB first, as ``Image.convert("RGB")`` does, clips every value above 255 to white.
Grayscale is repeated over the three channels and an alpha channel is dropped (not composited).
Pillow is imported only here, when an image is read.
"""

from __future__ import annotations

import os

import numpy as np

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as a contiguous ``(3, H, W)`` float32 array in ``[0, 1]``.

    Raises FileNotFoundError for a missing file and ValueError for a file Pillow cannot read
    or pixel values that have no ``[0, 1]`` scale (a 32-bit integer or float image outside it).
    """
    from .coco import import_pil_image

    Image = import_pil_image()
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.exists(path):
            raise ValueError(f"{path!r} is a folder, not an image file")
        raise FileNotFoundError(f"image file not found: {path!r}")
    try:
        with Image.open(path) as img:
            img.load()
            gray = _gray_pixels(img, path)
            rgb = None if gray is not None else np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image file {path!r}: {err}") from err
    if gray is not None:
        return np.ascontiguousarray(np.broadcast_to(gray, (3, *gray.shape)))
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)


def _gray_pixels(img, path: str) -> np.ndarray | None:
    """(H, W) float32 in [0, 1] for the modes ``convert("RGB")`` would clip (16- and 32-bit
    integer, float); None for 8-bit modes, which convert exactly."""
    if img.mode in _SIXTEEN_BIT:
        return np.asarray(img).astype(np.float32) / np.float32(65535)
    if img.mode not in ("I", "F"):
        return None
    values = np.asarray(img)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "I" and 0 <= low and high <= 65535:  # 16-bit data held in 32-bit ints
        return values.astype(np.float32) / np.float32(65535)
    if img.mode == "F" and 0 <= low and high <= 1:
        return values.astype(np.float32)
    raise ValueError(
        f"{path!r} is a {'32-bit integer' if img.mode == 'I' else 'floating-point'} image with "
        f"values in [{low:g}, {high:g}]: there is no bit depth to scale it to [0, 1] by; save "
        "it as an 8- or 16-bit image"
    )
