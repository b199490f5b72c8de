"""Pure NumPy/OpenCV array functions: decode, grayscale, resize, normalise, post-process, encode.

Conventions: images are 2-D ``uint8`` after :func:`normalise`; masks are 2-D ``uint8`` holding
0 (background) and 1 (lung); probability maps are 2-D ``float32`` in [0, 1].

Intensity pipeline, the same for every input (8/16-bit PNG, JPEG, DICOM):

1. :func:`decode` gives the picture's values with a larger value meaning brighter, turned as
   every viewer shows it. PNG/JPEG: the stored values (8 or 16 bits), rotated or mirrored by
   the file's EXIF orientation. DICOM (optional ``pydicom``): the stored values through the
   modality LUT (Rescale Slope/Intercept or Modality LUT Sequence), then the VOI LUT Sequence
   or else the first Window Center/Width when the header has one, then negated for MONOCHROME1
   (and for a Presentation LUT Shape of INVERSE) so that lungs are dark as in MONOCHROME2.
2. :func:`to_grayscale` keeps one channel.
3. :func:`normalise` stretches the darkest value to 0 and the brightest to 255.

No step depends on the bit depth: a linear re-encoding of the same picture (``x * 257`` in a
16-bit PNG, 12 bits stored, a rescale slope and intercept, MONOCHROME1 inversion) normalises to
the identical ``uint8`` image, so a 16-bit or DICOM version of an X-ray segments exactly like
its 8-bit PNG.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from isal import isal_zlib

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DICOM_MAGIC = b"DICM"
"""The four bytes after a DICOM file's 128-byte preamble, whatever the file's name."""
_DICOM_HEADER = 128 + len(DICOM_MAGIC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"
# SOF0-15 (not DHT, JPG, DAC), and SOF55, the frame header of JPEG-LS
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_JPEG_STANDALONE = frozenset({0x01, 0xD8})  # TEM, SOI: markers without a length

MAX_JPEG_SCANS = 100
"""The most scans a JPEG may have: a progressive JPEG has about ten, and each scan costs a pass
over the whole image (the docs' Bad inputs page has what 2,000 scans cost)."""
_HEADER_BYTES = 16 << 20  # the most bytes of a deflated DICOM inflated to find its pixel size
_INFLATE_SLACK = 1 << 20  # bytes allowed after the pixel data a header announces
MAX_PIXELS = 100_000_000
"""The largest image decoded (rows x columns, e.g. 10000 x 10000), read from the PNG/JPEG/DICOM
header before any pixel is decoded: a larger one is an :class:`ImageDecodeError`, so that a
huge or forged header cannot exhaust a worker's memory."""
_NORMALISE_CHUNK = 1 << 20  # pixels per step of normalise's float64 arithmetic


RADIOGRAPHS = frozenset({"CR", "DX", "DR", "RG"})
"""DICOM modalities segmented: computed and digital radiography (DR and RG as some systems
write them)."""
CAPTURES = frozenset({"OT", "SC", ""})
"""Modalities (or none) of secondary captures: digitised films and screenshots, segmented where
the header shows a projection, not a slice (:func:`_check_radiograph`)."""
_PROJECTION_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    }
)
_PROJECTION_XRAYS = frozenset({"MG", "IO", "PX", "XA", "RF", "DG"})
"""Projection X-ray modalities that are not chest radiographs: mammography, dental,
angiography, fluoroscopy."""
NOT_FRONTAL_VIEWS = frozenset({"LL", "RL", "LLO", "RLO", "LAT", "LATERAL"})
"""View Position values of views the model was not trained on: lateral (LL, RL, and the
non-standard LAT) and oblique (LLO, RLO). Decubitus views (LLD, RLD) are frontal projections."""


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image."""


class NotFrontalError(ImageDecodeError):
    """A radiograph of a view that is not frontal (lateral, oblique): read, not segmented.

    ``info`` holds its header fields, so that its row can still say what it is.
    """

    def __init__(self, message: str, info: ImageInfo) -> None:
        super().__init__(message)
        self.info = info


@dataclass(frozen=True)
class ImageInfo:
    """Header fields of a DICOM image; empty strings and NaN when unknown (PNG/JPEG).

    Spacings are the physical distances in mm between adjacent rows and between adjacent
    columns: Pixel Spacing when present, else Imager Pixel Spacing (at the detector).
    """

    modality: str = ""
    view_position: str = ""
    spacing_row_mm: float = math.nan
    spacing_col_mm: float = math.nan


def is_dicom(data: bytes) -> bool:
    """True when ``data`` (or just its first 132 bytes) starts like a DICOM file."""
    return data[128:_DICOM_HEADER] == DICOM_MAGIC


def decode(data: bytes, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes keeping bit depth and colour (8/16-bit, gray or BGR; an
    alpha channel is dropped), turned by the EXIF orientation as viewers show it.

    DICOM is recognised by its preamble, not its name, and comes back as presentation values
    (see the module docstring): ``float64`` where a rescale gives fractions or a window applies.
    """
    return _decode(data, name)[0]


def _decode(data: bytes, name: str) -> tuple[np.ndarray, ImageInfo, Dataset | None]:
    """:func:`decode`, the DICOM header fields (an empty :class:`ImageInfo` for PNG/JPEG) and
    the parsed DICOM dataset (None for PNG/JPEG)."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    if is_dicom(data):
        dataset = _read_dicom(data, name)
        try:
            rows, columns = int(dataset.Rows), int(dataset.Columns)
        except Exception as exc:  # absent, or not a number
            raise ImageDecodeError(f"{name}: DICOM without readable Rows and Columns") from exc
        _check_pixels(rows, columns, name)
        _check_radiograph(dataset, name)
        info = _dicom_info(dataset)
        _check_frontal(dataset, info, name)
        return _dicom_pixels(dataset, name), info, dataset
    if data.startswith(PNG_MAGIC):
        kind, size = "PNG", _png_size(data)
    elif data.startswith(JPEG_MAGIC):
        kind, size = "JPEG", _jpeg_size(data)
    else:
        raise ImageDecodeError(f"{name}: not a PNG, JPEG or DICOM image ({len(data)} bytes)")
    if size is None:
        raise ImageDecodeError(f"{name}: {kind} without a readable size header ({len(data)} bytes)")
    _check_pixels(*size, name)
    if kind == "JPEG":
        _check_scans(data, name)
    # Not IMREAD_UNCHANGED, which ignores the EXIF orientation that every viewer applies: any
    # depth and colour kept (an alpha channel is dropped: grayscale ignores it anyway).
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if array is None or array.size == 0:
        raise ImageDecodeError(f"{name}: corrupt or truncated {kind} ({len(data)} bytes)")
    return array, ImageInfo(), None


def _check_pixels(rows: int, columns: int, name: str) -> None:
    """Refuse, before decoding, an image whose header gives more than :data:`MAX_PIXELS`."""
    if rows * columns > MAX_PIXELS:
        raise ImageDecodeError(
            f"{name}: image of {columns}x{rows} pixels is larger than the limit of "
            f"{MAX_PIXELS:,} pixels"
        )


def _check_radiograph(dataset: Dataset, name: str) -> None:
    """Refuse, before decoding, a DICOM that is not a radiograph: a CT or MR slice, an
    ultrasound, a segmentation, a dose map, a mammogram would all get lung masks otherwise.

    Accepted: :data:`RADIOGRAPHS`, and :data:`CAPTURES` of a projection: a radiography or
    secondary-capture SOP class, no Image Position or Orientation (Patient) (which only a slice
    has), and grey levels (a capture in colour is a screenshot or a photograph).
    """
    modality = str(dataset.get("Modality") or "").strip().upper()
    if modality in RADIOGRAPHS:
        return
    accepted = "lungseg segments CR, DX and DR radiographs and secondary captures of them"
    if modality not in CAPTURES:
        what = "a chest radiograph" if modality in _PROJECTION_XRAYS else "a radiograph"
        raise ImageDecodeError(f"{name}: not {what}: modality {modality} ({accepted})")
    sop_class = str(dataset.get("SOPClassUID") or "")
    if sop_class and sop_class not in _PROJECTION_CLASSES:
        kind = getattr(dataset.SOPClassUID, "name", sop_class)
        raise ImageDecodeError(f"{name}: not a radiograph: SOP class {kind} ({accepted})")
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
        if keyword in dataset:
            raise ImageDecodeError(
                f"{name}: not a radiograph: modality {modality or 'absent'} with the {keyword} "
                f"of a cross-sectional slice ({accepted})"
            )
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(
            f"{name}: not a radiograph: a secondary capture in colour (photometric "
            f"interpretation {photometric or 'absent'}) ({accepted})"
        )


def _check_frontal(dataset: Dataset, info: ImageInfo, name: str) -> None:
    """Refuse to segment, as if it were frontal, a lateral or oblique view: by View Position
    (:data:`NOT_FRONTAL_VIEWS`), or where it is empty by the View Code Sequence's meaning.

    Image Laterality is not a view: on a chest radiograph it names a side, if anything.
    """
    position = info.view_position.upper()
    view = f"View Position {position}" if position in NOT_FRONTAL_VIEWS else ""
    if not position:
        for item in dataset.get("ViewCodeSequence") or []:
            meaning = str(item.get("CodeMeaning") or "").strip()
            words = meaning.lower()
            if ("lateral" in words or "oblique" in words) and "decubitus" not in words:
                view = f"view code {meaning!r}"
    if view:
        raise NotFrontalError(
            f"{name}: not a frontal view ({view}): the model segments frontal (PA or AP) "
            "chest radiographs; not segmented",
            info,
        )


def _check_scans(jpeg: bytes, name: str) -> None:
    """Refuse a JPEG of more than :data:`MAX_JPEG_SCANS` scans before decoding it.

    Every start-of-scan marker is a scan: in entropy-coded data a 0xFF byte is always followed
    by 0x00 or a restart marker, so the pair 0xFF 0xDA marks nothing else.
    """
    scans = jpeg.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise ImageDecodeError(
            f"{name}: JPEG with {scans} scans, more than the limit of {MAX_JPEG_SCANS} "
            "(progressive JPEGs have about ten)"
        )


def _png_size(data: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` from a PNG's IHDR chunk, which must come first; None without one."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` from a JPEG's first frame header (SOF marker); None without one.

    Walks the marker segments after SOI as libjpeg does, skipping stray bytes between them.
    """
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF or data[i + 1] in (0x00, 0xFF):
            i += 1
            continue
        marker = data[i + 1]
        if marker in _JPEG_STANDALONE or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return height, width
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


def _read_dicom(data: bytes, name: str) -> Dataset:
    """Parse DICOM bytes with pydicom (an optional dependency) into a ``Dataset``.

    A deflated dataset is inflated here, never past the size its own header allows
    (:func:`_inflate`), since pydicom would inflate all of it before any check.
    """
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.filereader import read_dataset
        from pydicom.uid import DeflatedExplicitVRLittleEndian
    except ImportError as exc:
        raise ImageDecodeError(
            f'{name}: reading DICOM needs pydicom: pip install "lungseg[dicom]"'
        ) from exc
    try:
        meta_end = _file_meta_end(data)
        meta = FileMetaDataset(read_dataset(io.BytesIO(data[_DICOM_HEADER:meta_end]), False, True))
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            dataset = read_dataset(io.BytesIO(_inflate(data[meta_end:], name)), False, True)
            dataset.file_meta = meta
            dataset.set_original_encoding(False, True)
        else:
            dataset = pydicom.dcmread(io.BytesIO(data))
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"{name}: not a readable DICOM file: {exc}") from exc
    if "PixelData" not in dataset:
        raise ImageDecodeError(f"{name}: DICOM file without pixel data")
    return dataset


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"})
_LONG_VRS |= {b"UR", b"UT", b"UV"}


def _file_meta_end(data: bytes) -> int:
    """The offset where a DICOM file's dataset starts: after the file meta group (0002,xxxx),
    which is always explicit VR little endian."""
    at = _DICOM_HEADER
    while at + 8 <= len(data):
        group, _ = struct.unpack("<HH", data[at : at + 4])
        if group != 2:
            break
        vr = data[at + 4 : at + 6]
        if vr in _LONG_VRS:
            length, at = struct.unpack("<I", data[at + 8 : at + 12])[0], at + 12
        else:
            length, at = struct.unpack("<H", data[at + 6 : at + 8])[0], at + 8
        at += length
    return at


def _inflate(deflated: bytes, name: str) -> bytes:
    """A deflated DICOM dataset inflated no further than its pixel data needs.

    The header elements are inflated first (up to :data:`_HEADER_BYTES`), Rows, Columns,
    Samples per Pixel and Bits Allocated read from them and checked against
    :data:`MAX_PIXELS`; the rest is inflated only up to the pixel data they announce plus
    :data:`_INFLATE_SLACK`. More than that is refused: a 300 KB file that inflates to
    hundreds of MiB is a bomb, not an X-ray.
    """
    from pydicom.filereader import read_dataset

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = bytearray(inflater.decompress(deflated, _HEADER_BYTES))
        header = read_dataset(
            io.BytesIO(bytes(out)), False, True, stop_when=lambda tag, vr, length: tag == _PIXELS
        )
        rows, columns = int(header.Rows), int(header.Columns)
    except (zlib.error, AttributeError, TypeError, ValueError, EOFError, OSError) as exc:
        raise ImageDecodeError(
            f"{name}: deflated DICOM without Rows and Columns in its first "
            f"{_HEADER_BYTES >> 20} MiB ({exc})"
        ) from exc
    _check_pixels(rows, columns, name)
    samples = int(header.get("SamplesPerPixel") or 1)
    bits = int(header.get("BitsAllocated") or 16)
    allowed = rows * columns * samples * -(-bits // 8) + len(out) + _INFLATE_SLACK
    while inflater.unconsumed_tail and len(out) < allowed:
        out += inflater.decompress(inflater.unconsumed_tail, allowed - len(out))
    if inflater.unconsumed_tail or (len(out) >= allowed and not inflater.eof):
        raise ImageDecodeError(
            f"{name}: deflated DICOM inflates beyond the {allowed:,} bytes that its "
            f"{columns}x{rows} pixels need: refused"
        )
    return bytes(out)


_PIXELS = 0x7FE00010  # the tag of (7FE0,0010) Pixel Data


def _embedded_size(dataset: Dataset) -> tuple[int, int] | None:
    """``(rows, columns)`` of the first frame of encapsulated JPEG, JPEG-LS or JPEG 2000 pixel
    data, read from the frame's own header (SOF, SIZ); None for other pixel data (RLE's
    segments can hold any bytes) or a frame that starts with neither."""
    frame = _first_fragment(bytes(dataset.PixelData[: 1 << 20]))
    if frame.startswith(b"\xff\x4f\xff\x51") and len(frame) >= 24:  # SOC, then SIZ
        width, height, left, top = struct.unpack(">IIII", frame[8:24])
        return height - top, width - left
    if frame.startswith(JPEG_MAGIC):
        return _jpeg_size(frame)
    return None


_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item, little endian


def _first_fragment(pixels: bytes) -> bytes:
    """The first fragment of encapsulated pixel data (after its Basic Offset Table item), as
    far as ``pixels`` holds it; empty when the items are not there."""
    at = 0
    for item in range(2):
        if pixels[at : at + 4] != _ITEM or len(pixels) < at + 8:
            return b""
        length = struct.unpack("<I", pixels[at + 4 : at + 8])[0]
        if item == 1:
            return pixels[at + 8 : at + 8 + length]
        at += 8 + length
    return b""


def _dicom_pixels(dataset: Dataset, name: str) -> np.ndarray:
    """A DICOM dataset's pixels as presentation values: modality LUT, VOI, MONOCHROME1 flip."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise ImageDecodeError(f"{name}: DICOM file meta without a Transfer Syntax UID")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        why = "pydicom cannot decode it"
    else:
        plugins = "; ".join(decoder.missing_dependencies)
        why = "" if decoder.is_available else f"it needs one of: {plugins}"
    if why:
        raise ImageDecodeError(
            f"{name}: unsupported DICOM transfer syntax {syntax} ({syntax.name}): {why}"
        )
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames != 1:
        raise ImageDecodeError(f"{name}: multi-frame DICOM ({frames} frames) is not supported")
    if syntax.is_encapsulated:
        embedded = _embedded_size(dataset)
        if embedded is not None and embedded != (int(dataset.Rows), int(dataset.Columns)):
            _check_pixels(*embedded, name)
            raise ImageDecodeError(
                f"{name}: its compressed frame is {embedded[1]}x{embedded[0]} pixels, but the "
                f"DICOM header says {dataset.Columns}x{dataset.Rows}: refused"
            )
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    try:
        array = dataset.pixel_array
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            array = apply_modality_lut(array, dataset)
            if array.dtype.kind == "f" and np.array_equal(array, np.rint(array)):
                array = array.astype(np.int64)  # a VOI LUT is indexed by whole numbers
            array = apply_voi_lut(array, dataset)
    except Exception as exc:
        raise ImageDecodeError(
            f"{name}: DICOM pixel data ({syntax.name}) could not be decoded: {exc}"
        ) from exc
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        inverse = str(dataset.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
        if (photometric == "MONOCHROME1") != inverse:
            return -array.astype(np.float64)  # the lowest value is white; normalise is linear
        return array
    if array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(array[:, :, ::-1])  # pydicom gives RGB, OpenCV order is BGR
    raise ImageDecodeError(f"{name}: unsupported DICOM photometric interpretation {photometric!r}")


def _dicom_info(dataset: Dataset) -> ImageInfo:
    """Modality, view position and pixel spacing (Pixel Spacing, else Imager Pixel Spacing)."""
    spacing = (math.nan, math.nan)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = dataset.get(keyword)
        try:
            row, col = (float(v) for v in values)
        except (TypeError, ValueError):  # absent, empty, not two numbers
            continue
        if row > 0 and col > 0 and math.isfinite(row * col):
            spacing = (row, col)
            break
    return ImageInfo(
        modality=str(dataset.get("Modality") or "").strip(),
        view_position=str(dataset.get("ViewPosition") or "").strip(),
        spacing_row_mm=spacing[0],
        spacing_col_mm=spacing[1],
    )


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

    ``(x - lo) * 255 / (hi - lo)`` rounded half up in ``float64``, which is exact for integer
    values (up to 32 bits): the same picture at 8 or 16 bits (``x * 257``) or after any other
    exact linear re-encoding gives the identical result. A constant image gives zeros.
    """
    lo, hi = float(gray.min()), float(gray.max())
    if not hi > lo:
        return np.zeros(gray.shape, np.uint8)
    if gray.dtype in (np.uint8, np.uint16):  # the same formula once per level, then a look-up
        levels = np.arange(int(hi) + 1, dtype=np.float64)
        lut = np.floor((levels - lo) * 255.0 / (hi - lo) + 0.5).clip(0, 255).astype(np.uint8)
        if gray.dtype == np.uint8:
            return cv2.LUT(gray, np.pad(lut, (0, 256 - lut.size)))
        return np.take(lut, gray)
    # In bands of rows, so that the float64 temporaries stay small whatever the image's size.
    out = np.zeros(gray.shape, np.uint8)
    step = max(1, _NORMALISE_CHUNK // max(1, math.prod(gray.shape[1:])))
    for top in range(0, gray.shape[0], step):
        scaled = (gray[top : top + step].astype(np.float64) - lo) * 255.0 / (hi - lo)
        out[top : top + step] = np.floor(scaled + 0.5)
    return out


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` with area interpolation (no aspect ratio kept)."""
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def binarise(mask: np.ndarray) -> np.ndarray:
    """A decoded mask file (any dtype or channels) to 0/1: any non-zero pixel is lung.

    So 0/255 and 0/1 masks, 16-bit ones and label maps (lungseg's own ``labels/``: 1 right
    lung, 2 left) all read alike; in colour, a pixel with any non-zero channel is lung (an
    alpha channel is dropped first).
    """
    if mask.ndim == 3 and mask.shape[2] == 4:
        mask = mask[:, :, :3]
    if mask.ndim == 3:
        return np.any(mask != 0, axis=2).astype(np.uint8)
    if mask.ndim != 2:
        raise ImageDecodeError(f"unsupported mask shape {mask.shape}")
    return (mask != 0).astype(np.uint8)


def merge_masks(masks: list[np.ndarray]) -> np.ndarray:
    """Merge binary masks (e.g. Montgomery left and right lungs) by pixel-wise maximum."""
    shapes = {m.shape for m in masks}
    if len(shapes) != 1:
        raise ValueError(f"masks to merge differ in size: {sorted(shapes)}")
    return np.maximum.reduce(masks)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 0/1 mask to ``height`` x ``width``: linear interpolation, then threshold at 0.5.

    Interpolated as 0/255 in 8 bits (OpenCV's fixed point, 3x faster than float32 for a
    2048 px mask), then cut at 128.
    """
    if mask.shape == (height, width):
        return mask.astype(np.uint8)
    smooth = cv2.resize(
        mask.astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_LINEAR
    )
    return (smooth >= 128).astype(np.uint8)


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


def probability_bytes(probability: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as ``uint8`` steps of 1/255, the form in which segment hands them
    from the model to the writing step (a quarter of float32's bytes)."""
    return np.rint(np.asarray(probability) * 255).astype(np.uint8)


def equalise(image: np.ndarray, clip: float, tiles: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (CLAHE) of a ``uint8`` image."""
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(image)


def postprocess(probability: np.ndarray, threshold: float, keep: int = 2) -> np.ndarray:
    """Probability map to a clean 0/1 lung mask: threshold, keep the two lungs, fill holes."""
    mask = (probability >= threshold).astype(np.uint8)
    return fill_holes(keep_largest(mask, keep))


def lungs_split(mask: np.ndarray) -> float:
    """Where a post-processed 0/1 mask's two lungs part, as a share of its width: midway between
    the right edge of the component on the image's left and the left edge of the other.

    One lung alone lies wholly on its side: 1.0 when left of the centre (every pixel is the
    right lung, :func:`lung_labels`), else 0.0. Computed on the model's small mask, it applies to
    the mask at any size.
    """
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    width = mask.shape[1]
    if count == 1:
        return 0.5
    if count == 2:
        return 1.0 if centroids[1, 0] < width / 2 else 0.0
    order = 1 + np.argsort(centroids[1:, 0], kind="stable")
    first, second = stats[order[0]], stats[order[-1]]
    edge = first[cv2.CC_STAT_LEFT] + first[cv2.CC_STAT_WIDTH]
    return float((edge + second[cv2.CC_STAT_LEFT]) / 2 / width)


def lung_labels(mask: np.ndarray, split: float) -> np.ndarray:
    """A 0/1 mask as labels: 0 background, 1 the patient's right lung, 2 the left.

    X-rays are shown as if facing the patient, so the patient's right lung is on the image's
    left: mask pixels left of ``split`` (a share of the width, :func:`lungs_split`) are 1.
    """
    labels = mask.astype(np.uint8)  # a copy: 0/1
    labels[:, right_columns(mask.shape[1], split) :] <<= 1  # 2 ms for a 2048 px mask
    return labels


def right_columns(width: int, split: float) -> int:
    """How many columns of an image ``width`` wide lie left of ``split``: the right lung's."""
    return math.ceil(split * width)


FLAT_LEVEL = 1
"""ISA-L's deflate level for :func:`encode_image`'s flat pictures: levels 1 and 2 cost and
weigh the same on masks (level 0 stores runs less tightly, 3 costs 8x more)."""


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _flat_png(image: np.ndarray) -> bytes:
    """A 2-D ``uint8`` image as an 8-bit grey PNG, rows unfiltered, deflated by ISA-L.

    A mask's or labels picture's long runs are all its PNG holds: libpng's zlib (OpenCV's
    encoder) spends 7-10 core-ms on a 2048 px mask, ISA-L's deflate about 1, for 40% more bytes
    (the docs' performance page, PNG compression). Every PNG reader gets the same pixels.
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"a flat PNG takes a 2-D uint8 image, not {image.dtype} {image.shape}")
    height, width = image.shape
    rows = np.zeros((height, width + 1), np.uint8)  # each row: filter type 0 (none), its pixels
    rows[:, 1:] = image
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    pixels = isal_zlib.compress(rows, FLAT_LEVEL)
    return b"".join(
        (
            PNG_MAGIC,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", pixels),
            _png_chunk(b"IEND", b""),
        )
    )


def encode_image(image: np.ndarray, flat: bool = False) -> bytes:
    """Encode an image (8/16-bit, gray or BGR) as PNG, values unchanged, with OpenCV's default
    compression (faster than any explicit level or strategy). ``flat``, for 2-D ``uint8``
    pictures of a few flat regions (masks, labels): :func:`_flat_png`, several times cheaper."""
    if flat:
        return _flat_png(image)
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def encode_png(mask: np.ndarray) -> bytes:
    """Encode a 0/1 mask as an 8-bit PNG holding 0 and 255."""
    return encode_image(mask.astype(np.uint8) * 255, flat=True)


def load_image(data: bytes, name: str = "image") -> np.ndarray:
    """Bytes of an X-ray to a normalised 2-D ``uint8`` image at its own size."""
    return load_image_with_info(data, name)[0]


def load_image_with_info(data: bytes, name: str = "image") -> tuple[np.ndarray, ImageInfo]:
    """:func:`load_image`, and the image's DICOM header fields."""
    pixels, info, _ = _decode(data, name)
    return normalise(to_grayscale(pixels)), info


def load_image_with_header(data: bytes, name: str = "image") -> tuple[np.ndarray, ImageInfo, bytes]:
    """:func:`load_image_with_info`, and a DICOM image's header as a DICOM file without its pixel
    data (:func:`dicom_header`; empty for PNG/JPEG): parsed once, with the pixels, for a DICOM
    Segmentation that references the image and copies its patient and study."""
    pixels, info, dataset = _decode(data, name)
    header = b"" if dataset is None else dicom_header(dataset)
    return normalise(to_grayscale(pixels)), info, header


_PIXEL_GROUP = 0x7FE0  # (7FE0,0010) Pixel Data, and its float and double float kinds
_OVERLAY_GROUPS = (0x6000, 0x60FF)  # overlay planes (60xx,xxxx), with their bitmaps


def dicom_header(dataset: Dataset) -> bytes:
    """A parsed DICOM image as a small DICOM file (explicit VR little endian) without its bulk:
    the pixel data, the overlay planes and the icon image are removed from ``dataset``. A few
    kilobytes, where the film is megabytes: what crosses Ray's object store to the writer."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    for tag in list(dataset.keys()):
        if tag.group == _PIXEL_GROUP or (_OVERLAY_GROUPS[0] <= tag.group <= _OVERLAY_GROUPS[1]):
            del dataset[tag]
    dataset.pop("IconImageSequence", None)
    meta = FileMetaDataset(dataset.file_meta)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    header = FileDataset("", dataset, preamble=b"\0" * 128, file_meta=meta)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, header, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def load_mask(files: list[bytes], names: list[str]) -> np.ndarray:
    """Bytes of one or more mask files (e.g. left + right) to one 0/1 mask at its own size."""
    return merge_masks([binarise(decode(d, n)) for d, n in zip(files, names, strict=True)])


def augment(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random variation of a training pair that a chest image could plausibly show.

    One affine warp for both (rotation within ±8°, scale 0.9-1.1, shift within ±6% of the
    side; borders filled with black), then, on the image alone, brightness ±8%, contrast
    0.85-1.15 and gamma 0.8-1.25. No left-right flip: the heart and the left lung's smaller
    shape sit on the patient's left in every real image.
    """
    size = image.shape[0]
    angle, scale = rng.uniform(-8, 8), rng.uniform(0.9, 1.1)
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    matrix[:, 2] += rng.uniform(-0.06, 0.06, 2) * size
    warp = {"dsize": (image.shape[1], size), "borderMode": cv2.BORDER_CONSTANT, "borderValue": 0}
    image = cv2.warpAffine(image, matrix, flags=cv2.INTER_LINEAR, **warp)
    mask = cv2.warpAffine(mask, matrix, flags=cv2.INTER_NEAREST, **warp)
    pixels = image.astype(np.float32) / 255
    pixels = (pixels - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.08, 0.08)
    pixels = np.clip(pixels, 0, 1) ** rng.uniform(0.8, 1.25)
    return np.rint(pixels * 255).astype(np.uint8), mask
