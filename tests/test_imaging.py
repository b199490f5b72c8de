"""Tests for lungseg.core.imaging: tiny arrays, real PNG/JPEG bytes from cv2.imencode, exact
values."""

from __future__ import annotations

import io
import zlib

import cv2
import numpy as np
import pytest

from lungseg.core.imaging import (
    ImageDecodeError,
    augment,
    binarise,
    decode,
    encode_image,
    encode_png,
    fill_holes,
    keep_largest,
    load_image,
    load_mask,
    lung_labels,
    lungs_split,
    merge_masks,
    normalise,
    postprocess,
    probability_bytes,
    resize_image,
    resize_mask,
    to_grayscale,
)


def _encode(array: np.ndarray, ext: str = ".png") -> bytes:
    ok, buffer = cv2.imencode(ext, array)
    assert ok
    return buffer.tobytes()


# A picture that uses the full 8-bit range, and a low-contrast one whose stretch lands on
# exact halves: lo=0, hi=6 -> scale 255/6 = 42.5, so 3 -> 127.5 (a rounding tie).
FULL_RANGE = np.arange(256, dtype=np.uint8).reshape(16, 16)
LOW_CONTRAST_TIE = np.array([[0, 3, 6]], np.uint8)
LOW_CONTRAST_TIE_14 = np.array([[0, 7, 14]], np.uint8)  # 7 * 255 / 14 = 127.5
PICTURES = pytest.mark.parametrize(
    "picture",
    [FULL_RANGE, LOW_CONTRAST_TIE, LOW_CONTRAST_TIE_14],
    ids=["full-range", "tie-0-3-6", "tie-0-7-14"],
)


# --- decode -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.array([[0, 128], [255, 7]], np.uint8),  # 8-bit gray
        np.array([[0, 300], [65535, 1000]], np.uint16),  # 16-bit gray, values > 255
        np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [9, 8, 7]]], np.uint8),  # BGR
        np.array([[[255, 0, 0, 0], [0, 255, 0, 128]], [[0, 0, 255, 255], [1, 2, 3, 4]]], np.uint8),
    ],
    ids=["gray8", "gray16", "bgr", "bgra"],
)
def test_decode_png_keeps_depth_and_colour_drops_alpha(array: np.ndarray) -> None:
    decoded = decode(_encode(array))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array[..., :3])  # grayscale ignores alpha anyway


def test_decode_png_16_bit_values_above_255_survive() -> None:
    decoded = decode(_encode(np.array([[256, 40000]], np.uint16)))
    assert decoded.dtype == np.uint16
    assert decoded.tolist() == [[256, 40000]]


def test_decode_jpeg() -> None:
    # A constant 8x8 gray block is one flat JPEG block: lossless in practice, allow +-1.
    decoded = decode(_encode(np.full((8, 8), 100, np.uint8), ".jpg"), "scan.jpg")
    assert decoded.dtype == np.uint8
    assert decoded.shape == (8, 8)
    assert np.abs(decoded.astype(int) - 100).max() <= 1


def test_decode_empty_bytes_names_the_file() -> None:
    with pytest.raises(ImageDecodeError, match=r"^scan\.png: empty file \(0 bytes\)$"):
        decode(b"", "scan.png")


def test_decode_garbage_names_the_file_and_size() -> None:
    # len(b"not an image") == 12
    with pytest.raises(
        ImageDecodeError, match=r"^scan\.png: not a PNG, JPEG or DICOM image \(12 bytes\)$"
    ):
        decode(b"not an image", "scan.png")


def test_image_decode_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decode(b"", "x.png")


# --- to_grayscale -------------------------------------------------------------------------------


def test_to_grayscale_2d_is_unchanged() -> None:
    gray = np.array([[1, 2], [3, 4]], np.uint16)
    out = to_grayscale(gray)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, gray)


def test_to_grayscale_single_channel_is_squeezed() -> None:
    image = np.array([[[5], [6]], [[7], [8]]], np.uint8)
    out = to_grayscale(image)
    assert out.shape == (2, 2)
    np.testing.assert_array_equal(out, [[5, 6], [7, 8]])


# Luminance 0.114 B + 0.587 G + 0.299 R of 255: blue 29.07 -> 29, green 149.685 -> 150,
# red 76.245 -> 76, white 255.
@pytest.mark.parametrize(
    "image",
    [
        np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8),
        np.array(
            [[[255, 0, 0, 0], [0, 255, 0, 7], [0, 0, 255, 255], [255, 255, 255, 0]]], np.uint8
        ),
    ],
    ids=["bgr", "bgra-alpha-ignored"],
)
def test_to_grayscale_colour_by_luminance(image: np.ndarray) -> None:
    out = to_grayscale(image)
    assert out.dtype == np.uint8
    assert out.tolist() == [[29, 150, 76, 255]]


def test_to_grayscale_keeps_16_bit() -> None:
    out = to_grayscale(np.full((1, 2, 3), 65535, np.uint16))
    assert out.dtype == np.uint16
    assert out.tolist() == [[65535, 65535]]


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 2, 5), (1, 2, 2, 3)])
def test_to_grayscale_rejects_other_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageDecodeError, match="unsupported image shape"):
        to_grayscale(np.zeros(shape, np.uint8))


# --- normalise ----------------------------------------------------------------------------------


def test_normalise_exact_stretch() -> None:
    # lo = 10, hi = 60, scale = 255 / 50 = 5.1: 0*5.1, 10*5.1, 20*5.1, 50*5.1 = 0, 51, 102, 255
    out = normalise(np.array([[10, 20], [30, 60]], np.uint8))
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 51], [102, 255]]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_normalise_constant_image_gives_zeros(dtype: type) -> None:
    out = normalise(np.full((3, 2), 77, dtype))
    assert out.dtype == np.uint8
    assert out.shape == (3, 2)
    assert not out.any()


@PICTURES
def test_normalise_same_at_8_and_16_bits(picture: np.ndarray) -> None:
    # x * 257 maps 0..255 onto 0..65535, so the linear stretch is the same picture.
    eight = normalise(picture)
    sixteen = normalise(picture.astype(np.uint16) * 257)
    np.testing.assert_array_equal(sixteen, eight)


@PICTURES
def test_normalise_float_linear_reencoding_is_exact(picture: np.ndarray) -> None:
    # float64 values (as a DICOM rescale gives) normalise like the integers they encode, ties
    # included: 2 x - 1024 is exact in float64.
    np.testing.assert_array_equal(normalise(picture * 2.0 - 1024.0), normalise(picture))


@pytest.mark.parametrize(("dtype", "top"), [(np.uint8, 255), (np.uint16, 4095), (np.uint16, 65535)])
def test_normalise_lookup_equals_arithmetic(dtype: type, top: int) -> None:
    # uint8/uint16 go through a look-up table; int32 takes the per-pixel float64 path.
    image = np.random.default_rng(top).integers(3, top, (64, 80)).astype(dtype)
    np.testing.assert_array_equal(normalise(image), normalise(image.astype(np.int32)))


def test_normalise_float_rounds_half_up() -> None:
    # lo = -1, hi = 1: 0 -> 127.5 -> 128, 0.25 -> 159.375 -> 159
    assert normalise(np.array([[-1.0, 0.0, 0.25, 1.0]])).tolist() == [[0, 128, 159, 255]]


# --- load_image / resize_image ------------------------------------------------------------------


@PICTURES
def test_load_image_8_and_16_bit_png_identical(picture: np.ndarray) -> None:
    eight = load_image(_encode(picture), "a8.png")
    sixteen = load_image(_encode(picture.astype(np.uint16) * 257), "a16.png")
    assert eight.dtype == sixteen.dtype == np.uint8
    assert eight.shape == sixteen.shape == picture.shape
    assert (eight.min(), eight.max()) == (0, 255)
    np.testing.assert_array_equal(sixteen, eight)


def test_load_image_of_colour_png_is_2d() -> None:
    bgr = np.zeros((3, 4, 3), np.uint8)
    bgr[0, 0] = 255  # one white pixel -> 255, the rest 0
    out = load_image(_encode(bgr))
    assert out.shape == (3, 4)
    assert out.dtype == np.uint8
    assert int(out.sum()) == 255


def test_load_image_bad_bytes_names_the_file() -> None:
    with pytest.raises(ImageDecodeError, match=r"^broken\.png: "):
        load_image(b"\x89PNG not really", "broken.png")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_resize_image_shape_and_dtype(dtype: type) -> None:
    image = np.full((10, 6), 40, dtype)
    out = resize_image(image, 4)
    assert out.shape == (4, 4)
    assert out.dtype == dtype
    assert np.all(out == 40)  # area interpolation of a constant image is that constant


def test_resize_image_area_average() -> None:
    # 4x4 -> 2x2 with INTER_AREA averages each 2x2 block: (0+0+4+4)/4 = 2, (8+8+8+8)/4 = 8
    image = np.array([[0, 0, 8, 8], [4, 4, 8, 8], [0, 0, 0, 0], [0, 0, 0, 4]], np.uint8)
    assert resize_image(image, 2).tolist() == [[2, 8], [0, 1]]


# --- binarise / merge_masks ---------------------------------------------------------------------

CROSS = np.array([[0, 255], [255, 0]], np.uint8)


@pytest.mark.parametrize(
    "mask",
    [
        np.array([[0, 255], [255, 0]], np.uint8),
        np.array([[0, 65535], [65535, 0]], np.uint16),
        np.stack([CROSS] * 3, axis=-1),  # white on black RGB
        np.stack([CROSS] * 3 + [np.full((2, 2), 255, np.uint8)], axis=-1),  # opaque RGBA
        np.array([[False, True], [True, False]]),
    ],
    ids=["uint8", "uint16", "rgb", "rgba", "bool"],
)
def test_binarise(mask: np.ndarray) -> None:
    out = binarise(mask)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1], [1, 0]]


@pytest.mark.parametrize(
    "mask",
    [
        np.array([[0, 1], [1, 0]], np.uint8),  # 0/1
        np.array([[0, 1], [2, 0]], np.uint8),  # lungseg's own labels: right lung 1, left 2
        np.array([[0, 255], [255, 0]], np.uint16),  # 16-bit 0/255
        np.array([[0, 1], [1, 0]], np.uint16),
        np.array([[0, 128], [1, 0]], np.uint8),  # any non-zero value, not only above half
        np.stack([np.zeros((2, 2), np.uint8)] * 2 + [CROSS], axis=-1),  # red lungs (BGR)
        np.stack([CROSS, np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8)], -1),  # blue
    ],
    ids=["0-1", "labels", "16-bit 0-255", "16-bit 0-1", "any value", "red", "blue"],
)
def test_binarise_reads_any_non_zero_pixel_as_lung(mask: np.ndarray) -> None:
    """Trust issue case 5: these used to read as empty masks (Dice 0.0000, status ok)."""
    assert binarise(mask).tolist() == [[0, 1], [1, 0]]


def test_binarise_drops_alpha_before_looking_at_colour() -> None:
    transparent_black = np.zeros((2, 2, 4), np.uint8)
    transparent_black[..., 3] = 255
    assert binarise(transparent_black).tolist() == [[0, 0], [0, 0]]


def test_merge_masks_pixelwise_max() -> None:
    left = np.array([[1, 0, 0], [1, 0, 0]], np.uint8)
    right = np.array([[0, 0, 1], [1, 0, 1]], np.uint8)
    assert merge_masks([left, right]).tolist() == [[1, 0, 1], [1, 0, 1]]
    assert merge_masks([left]).tolist() == left.tolist()


def test_merge_masks_size_mismatch() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        merge_masks([np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8)])


# --- resize_mask --------------------------------------------------------------------------------


def test_resize_mask_up() -> None:
    # 2x upsampling with linear interpolation: the nearest source pixel weighs 0.75 * 0.75 =
    # 0.5625 >= 0.5, so each pixel becomes a 2x2 block (and height/width are not swapped).
    mask = np.array([[1, 0, 1], [0, 1, 0]], np.uint8)
    out = resize_mask(mask, 4, 6)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.kron(mask, np.ones((2, 2), np.uint8)))


def test_resize_mask_down() -> None:
    # 4x4 -> 2x2 averages 2x2 blocks: 4/4 = 1 -> 1, 2/4 = 0.5 -> 1 (>= 0.5), 1/4 -> 0, 0 -> 0
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.uint8)
    out = resize_mask(mask, 2, 2)
    assert out.dtype == np.uint8
    assert out.tolist() == [[1, 1], [0, 0]]


def test_resize_mask_stays_binary() -> None:
    rng = np.random.default_rng(0)
    mask = (rng.random((13, 17)) > 0.5).astype(np.uint8)
    for height, width in [(5, 7), (40, 23), (13, 30)]:
        out = resize_mask(mask, height, width)
        assert out.shape == (height, width)
        assert set(np.unique(out).tolist()) <= {0, 1}


def test_resize_mask_same_size_is_identity() -> None:
    mask = np.array([[True, False], [False, True]])
    out = resize_mask(mask, 2, 2)
    assert out.dtype == np.uint8
    assert out.tolist() == [[1, 0], [0, 1]]


# --- keep_largest / fill_holes / postprocess ----------------------------------------------------

# Three blobs separated by empty columns: A = 2x3 = 6 px, B = 2x2 = 4 px, C = 2x1 = 2 px.
BLOBS = np.array(
    [
        [1, 1, 1, 0, 1, 1, 0, 1],
        [1, 1, 1, 0, 1, 1, 0, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ],
    np.uint8,
)


def test_keep_largest_keeps_two_largest_exactly() -> None:
    expected = BLOBS.copy()
    expected[:, 7] = 0  # blob C (2 px) goes
    out = keep_largest(BLOBS)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_keep_largest_one() -> None:
    expected = np.zeros_like(BLOBS)
    expected[:2, :3] = 1  # only blob A (6 px)
    np.testing.assert_array_equal(keep_largest(BLOBS, keep=1), expected)


def test_keep_largest_with_few_components_is_unchanged() -> None:
    np.testing.assert_array_equal(keep_largest(BLOBS, keep=3), BLOBS)
    assert not keep_largest(np.zeros((3, 3), np.uint8)).any()


def test_keep_largest_is_8_connected() -> None:
    # A diagonal pair is one component of 2 px under 8-connectivity; the two singles go.
    mask = np.zeros((4, 6), np.uint8)
    mask[0, 0] = mask[1, 1] = 1
    mask[0, 4] = 1
    mask[3, 4] = 1
    expected = np.zeros_like(mask)
    expected[0, 0] = expected[1, 1] = 1
    np.testing.assert_array_equal(keep_largest(mask, keep=1), expected)


def test_fill_holes_ring_becomes_disc() -> None:
    ring = np.zeros((7, 7), np.uint8)
    ring[1:6, 1:6] = 1
    ring[2:5, 2:5] = 0  # a 3x3 hole
    expected = np.zeros((7, 7), np.uint8)
    expected[1:6, 1:6] = 1
    out = fill_holes(ring)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_fill_holes_leaves_gap_touching_border() -> None:
    # The 0s in column 1 touch the top border: background, not a hole.
    cup = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], np.uint8)
    np.testing.assert_array_equal(fill_holes(cup), cup)


def test_fill_holes_mask_touching_border_with_inner_hole() -> None:
    # Foreground covers the whole border; the single inner 0 is a hole and is filled.
    mask = np.ones((3, 3), np.uint8)
    mask[1, 1] = 0
    assert fill_holes(mask).tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1]]


def test_probability_bytes_round_to_the_nearest_step_of_1_255() -> None:
    steps = probability_bytes(np.array([0.0, 0.5 / 255, 0.1, 0.5, 0.998, 1.0], np.float32))
    assert steps.dtype == np.uint8
    assert steps.tolist() == [0, 0, 26, 128, 254, 255]  # rint: half to even, 127.5 -> 128


def test_postprocess_probability_map() -> None:
    prob = np.full((7, 12), 0.1, np.float32)
    prob[1:6, 1:5] = 0.9  # left lung, 20 px ...
    prob[3, 2] = 0.2  # ... with a hole
    prob[1:6, 7:10] = 0.8  # right lung, 15 px ...
    prob[3, 8] = 0.5  # ... one pixel exactly at the threshold (inclusive)
    prob[0, 11] = 0.7  # a 1 px speck
    expected = np.zeros((7, 12), np.uint8)
    expected[1:6, 1:5] = 1
    expected[1:6, 7:10] = 1
    out = postprocess(prob, 0.5)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_postprocess_threshold_and_keep() -> None:
    prob = np.array([[0.6, 0.0, 0.9, 0.9]], np.float32)
    # threshold 0.7 drops the 0.6 pixel; keep=1 on {0.6}, {0.9, 0.9} keeps the pair
    assert postprocess(prob, threshold=0.7).tolist() == [[0, 0, 1, 1]]
    assert postprocess(prob, 0.5, keep=1).tolist() == [[0, 0, 1, 1]]
    assert postprocess(prob, 0.5).tolist() == [[1, 0, 1, 1]]


# --- encode_png / load_mask ---------------------------------------------------------------------


def test_encode_png_round_trip() -> None:
    mask = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1], [0, 0, 1, 1, 1]], np.uint8)
    data = encode_png(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = decode(data)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (3, 5)
    np.testing.assert_array_equal(decoded, mask * 255)
    np.testing.assert_array_equal(binarise(decoded), mask)


def _row_filters(png: bytes) -> list[int]:
    """The filter byte of each row of an 8-bit gray PNG (its IDAT chunks inflated)."""
    width = int.from_bytes(png[16:20], "big")
    idat, at = b"", 8
    while at < len(png):
        length, kind = int.from_bytes(png[at : at + 4], "big"), png[at + 4 : at + 8]
        idat += png[at + 8 : at + 8 + length] if kind == b"IDAT" else b""
        at += 12 + length
    raw = zlib.decompress(idat)
    return [raw[i] for i in range(0, len(raw), width + 1)]


def test_flat_pictures_are_encoded_unfiltered_values_unchanged() -> None:
    labels = np.array([[0, 1, 1, 0], [2, 2, 0, 1], [0, 0, 0, 0]], np.uint8)
    flat = encode_image(labels, flat=True)
    np.testing.assert_array_equal(decode(flat), labels)
    assert _row_filters(flat) == [0, 0, 0]
    assert _row_filters(encode_png(labels > 0)) == [0, 0, 0]
    ramp = np.tile(np.arange(0, 64, 8, dtype=np.uint8), (3, 1))  # a photograph's rows are filtered
    assert any(_row_filters(encode_image(ramp)))
    np.testing.assert_array_equal(decode(encode_image(ramp)), ramp)


def test_flat_pngs_read_alike_in_every_reader() -> None:
    """lungseg writes flat PNGs itself (ISA-L's deflate): OpenCV, Pillow and zlib must read
    exactly the pixels OpenCV's own PNG of the same picture holds, at a film's size too."""
    from PIL import Image

    mask = np.zeros((2048, 1536), np.uint8)
    cv2.ellipse(mask, (400, 1000), (250, 600), 0, 0, 360, 255, -1)
    labels = (mask > 0).astype(np.uint8)
    labels[:, 768:] *= 2
    for picture in (mask, labels, np.zeros((1, 1), np.uint8), np.full((3, 7), 255, np.uint8)):
        ours = encode_image(picture, flat=True)
        opencv = cv2.imdecode(cv2.imencode(".png", picture)[1], cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(ours, np.uint8), -1), opencv)
        with Image.open(io.BytesIO(ours)) as image:
            assert image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), picture)
        assert _row_filters(ours) == [0] * picture.shape[0]


@pytest.mark.parametrize("picture", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 3), np.uint8)])
def test_flat_png_refuses_what_it_cannot_hold(picture: np.ndarray) -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_image(picture, flat=True)


def test_load_mask_merges_left_and_right() -> None:
    left = np.zeros((3, 4), np.uint8)
    left[:, 0] = 255
    right = np.zeros((3, 4), np.uint16)  # a different bit depth for the other lung
    right[1:, 3] = 65535
    out = load_mask([_encode(left), _encode(right)], ["left.png", "right.png"])
    assert out.dtype == np.uint8
    assert out.tolist() == [[1, 0, 0, 0], [1, 0, 0, 1], [1, 0, 0, 1]]


def test_load_mask_single_file() -> None:
    mask = np.array([[0, 255]], np.uint8)
    assert load_mask([_encode(mask)], ["m.png"]).tolist() == [[0, 1]]


def test_load_mask_size_mismatch() -> None:
    files = [_encode(np.zeros((3, 4), np.uint8)), _encode(np.zeros((4, 3), np.uint8))]
    with pytest.raises(ValueError, match="differ in size"):
        load_mask(files, ["left.png", "right.png"])


def test_load_mask_bad_file_names_it() -> None:
    with pytest.raises(ImageDecodeError, match=r"^right\.png: empty file"):
        load_mask([_encode(np.zeros((2, 2), np.uint8)), b""], ["left.png", "right.png"])


def test_load_mask_names_must_match_files() -> None:
    with pytest.raises(ValueError):
        load_mask([_encode(np.zeros((2, 2), np.uint8))], ["a.png", "b.png"])


def test_augment_is_seeded_and_keeps_a_binary_mask_aligned():
    image = np.zeros((64, 64), np.uint8)
    image[16:48, 16:48] = 200
    mask = (image > 0).astype(np.uint8)
    first = augment(image, mask, np.random.default_rng(3))
    again = augment(image, mask, np.random.default_rng(3))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    out_image, out_mask = first
    assert out_image.shape == (64, 64) and out_image.dtype == np.uint8
    assert set(np.unique(out_mask)) == {0, 1}
    # The square moved with the mask: its pixels stay brighter than the background around it.
    assert out_image[out_mask == 1].mean() > out_image[out_mask == 0].mean() + 100
    assert 0.75 * mask.sum() < out_mask.sum() < 1.3 * mask.sum()


def test_lungs_part_midway_between_the_two_components():
    mask = np.zeros((4, 10), np.uint8)
    mask[1:3, 1:3] = 1  # columns 1-2: the image's left, the patient's right lung
    mask[1:4, 6:9] = 1  # columns 6-8
    assert lungs_split(mask) == 0.45  # (3 + 6) / 2 / 10
    assert lung_labels(mask, 0.45).tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 2, 2, 2, 0],
        [0, 1, 1, 0, 0, 0, 2, 2, 2, 0],
        [0, 0, 0, 0, 0, 0, 2, 2, 2, 0],
    ]


def test_a_split_from_the_small_mask_labels_the_full_size_one():
    small = np.zeros((4, 10), np.uint8)
    small[1:3, 1:3] = small[1:3, 6:9] = 1
    big = resize_mask(small, 8, 20)
    labels = lung_labels(big, lungs_split(small))
    assert set(np.unique(labels[:, :9])) == {0, 1} and set(np.unique(labels[:, 9:])) == {0, 2}
    assert ((labels > 0) == (big > 0)).all()


@pytest.mark.parametrize(
    ("column", "split", "label"),
    [(1, 1.0, 1), (7, 0.0, 2)],  # one lung alone is wholly on its side of the centre
)
def test_one_lung_alone_is_labelled_by_its_side(column, split, label):
    mask = np.zeros((3, 10), np.uint8)
    mask[1, column : column + 2] = 1
    assert lungs_split(mask) == split
    assert set(np.unique(lung_labels(mask, split))) == {0, label}
    assert lungs_split(np.zeros((3, 10), np.uint8)) == 0.5
