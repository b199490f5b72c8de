"""Pure NumPy/OpenCV array functions: decode, grayscale, resize, normalise, post-process, encode.

Conventions: images are 2-D ``uint8`` after :func:`normalise`; masks are 2-D ``uint8`` holding
0 (background) and 1 (lung); probability maps are 2-D ``float32`` in [0, 1].
"""

from __future__ import annotations

import cv2
import numpy as np


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image."""


def decode(data: bytes, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG bytes keeping bit depth and channels (8/16-bit, gray, BGR, BGRA)."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.size == 0:
        raise ImageDecodeError(f"{name}: not a decodable PNG/JPEG image ({len(data)} bytes)")
    return array


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """One channel of the same dtype; colour is converted by luminance and alpha dropped."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    raise ImageDecodeError(f"unsupported image shape {image.shape}")


def normalise(gray: np.ndarray) -> np.ndarray:
    """Stretch intensities linearly so the darkest pixel is 0 and the brightest 255 (``uint8``).

    Integer arithmetic rounding half up, so the same picture at 8 or 16 bits (``x * 257``) gives
    the identical result; a constant image gives zeros.
    """
    lo, hi = int(gray.min()), int(gray.max())
    if hi <= lo:
        return np.zeros(gray.shape, np.uint8)
    span = hi - lo
    return (((gray.astype(np.int64) - lo) * 510 + span) // (2 * span)).astype(np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` with area interpolation (no aspect ratio kept)."""
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def binarise(mask: np.ndarray) -> np.ndarray:
    """A decoded mask file (any dtype or channels) to 0/1.

    Lung is above half the dtype's maximum (128 of 255), except in a mask holding only 0 and 1,
    where 1 is lung.
    """
    gray = to_grayscale(mask)
    if gray.max() <= 1:
        return (gray > 0).astype(np.uint8)
    return (gray > np.iinfo(gray.dtype).max / 2).astype(np.uint8)


def merge_masks(masks: list[np.ndarray]) -> np.ndarray:
    """Merge binary masks (e.g. Montgomery left and right lungs) by pixel-wise maximum."""
    shapes = {m.shape for m in masks}
    if len(shapes) != 1:
        raise ValueError(f"masks to merge differ in size: {sorted(shapes)}")
    return np.maximum.reduce(masks)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 0/1 mask to ``height`` x ``width``: linear interpolation, then threshold at 0.5."""
    if mask.shape == (height, width):
        return mask.astype(np.uint8)
    smooth = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return (smooth >= 0.5).astype(np.uint8)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions of a 0/1 mask that do not touch the border."""
    padded = np.pad(mask, 1).astype(np.uint8)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return (mask.astype(bool) | holes).astype(np.uint8)


def keep_largest(mask: np.ndarray, keep: int = 2) -> np.ndarray:
    """Keep the ``keep`` largest 8-connected components of a 0/1 mask."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    if count - 1 <= keep:
        return mask.astype(np.uint8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    kept = 1 + np.argsort(areas, kind="stable")[::-1][:keep]
    return np.isin(labels, kept).astype(np.uint8)


def postprocess(probability: np.ndarray, threshold: float = 0.5, keep: int = 2) -> np.ndarray:
    """Probability map to a clean 0/1 lung mask: threshold, keep the two lungs, fill holes."""
    mask = (probability >= threshold).astype(np.uint8)
    return fill_holes(keep_largest(mask, keep))


def encode_png(mask: np.ndarray) -> bytes:
    """Encode a 0/1 mask as an 8-bit PNG holding 0 and 255."""
    ok, buffer = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def load_image(data: bytes, name: str = "image") -> np.ndarray:
    """Bytes of an X-ray to a normalised 2-D ``uint8`` image at its own size."""
    return normalise(to_grayscale(decode(data, name)))


def load_mask(files: list[bytes], names: list[str]) -> np.ndarray:
    """Bytes of one or more mask files (e.g. left + right) to one 0/1 mask at its own size."""
    return merge_masks([binarise(decode(d, n)) for d, n in zip(files, names, strict=True)])
