"""Property-based tests (hypothesis) of the decoder path: random images, then broken bytes.

Whatever the bytes, :func:`lungseg.core.imaging.load_image_with_info` returns a 2-D ``uint8``
image or raises :class:`lungseg.core.imaging.ImageDecodeError`, and
:class:`lungseg.stages.preprocess.Preprocess` (called here in-process, as its Ray actor would)
gives exactly one row per input, ``ok`` or ``error`` with a specific reason.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lungseg.core import imaging
from lungseg.core.layout import ERROR, OK
from lungseg.io.catalog import Case
from lungseg.stages.preprocess import Preprocess, case_batch
from tests.test_dicom import dicom_bytes

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def pictures(draw) -> tuple[np.ndarray, str]:
    """A small random picture and a format that can hold it: PNG, JPEG or DICOM."""
    fmt = draw(st.sampled_from(["png", "jpeg", "dicom"]))
    dtype = np.uint8 if fmt == "jpeg" else draw(st.sampled_from([np.uint8, np.uint16]))
    channels = {"png": [0, 1, 3, 4], "jpeg": [0, 3], "dicom": [0]}[fmt]
    rows, columns = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    depth = draw(st.sampled_from(channels))
    shape = (rows, columns, depth) if depth else (rows, columns)
    return draw(hnp.arrays(dtype, shape)), fmt


def encode(picture: np.ndarray, fmt: str) -> bytes:
    if fmt == "dicom":  # a fixed instance UID: the same picture gives the same bytes
        return dicom_bytes(picture, SOPInstanceUID="1.2.826.0.1.3680043.8.498.1")
    ok, buffer = cv2.imencode(".png" if fmt == "png" else ".jpg", picture)
    assert ok
    return buffer.tobytes()


@st.composite
def broken(draw) -> bytes:
    """Random bytes, or a valid image's bytes cut short, overwritten in places or spliced."""
    if draw(st.booleans()):
        prefix = draw(st.sampled_from([b"", imaging.PNG_MAGIC, imaging.JPEG_MAGIC, bytes(128)]))
        magic = imaging.DICOM_MAGIC if prefix == bytes(128) else b""
        return prefix + magic + draw(st.binary(max_size=600))
    data = bytearray(encode(*draw(pictures())))
    cut = draw(st.integers(0, len(data)))
    if draw(st.booleans()):
        return bytes(data[:cut])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:cut] + draw(st.binary(max_size=64)) + data[cut:])


@FUZZ
@given(pictures())
def test_every_valid_picture_loads_at_its_own_size(picture):
    array, fmt = picture
    image, _ = imaging.load_image_with_info(encode(array, fmt), fmt)
    assert image.dtype == np.uint8 and image.shape == array.shape[:2]


@FUZZ
@given(broken())
def test_any_bytes_load_or_raise_a_decode_error(data):
    try:
        image, info = imaging.load_image_with_info(data, "fuzz.png")
    except imaging.ImageDecodeError as exc:
        assert str(exc).startswith("fuzz.png: ")
        return
    assert image.ndim == 2 and image.dtype == np.uint8 and 0 < image.size <= imaging.MAX_PIXELS
    assert isinstance(info, imaging.ImageInfo)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@FUZZ
@given(
    st.lists(
        st.tuples(st.one_of(pictures().map(lambda p: encode(*p)), broken()), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_preprocess_gives_exactly_one_row_per_input(folder, inputs):
    cases = []
    for n, (data, with_truth) in enumerate(inputs):
        (folder / f"{n}.png").write_bytes(data)
        if with_truth:  # the image's own bytes as its "mask": same size when it decodes
            (folder / f"{n}_mask.png").write_bytes(data)
        truth = (str(folder / f"{n}_mask.png"),) if with_truth else ()
        cases.append(Case(str(n), str(folder / f"{n}.png"), truth))
    out = Preprocess(size=16, display=32)(case_batch(cases))
    assert list(out["id"]) == [c.id for c in cases]
    assert {len(column) for column in out.values()} == {len(cases)}
    for status, error in zip(out["status"], out["error"], strict=True):
        assert status in (OK, ERROR)
        assert (status == OK) == (error == "")
        assert error == "" or error.startswith(("ImageDecodeError: ", "ValueError: mask"))
