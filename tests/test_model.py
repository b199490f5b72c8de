"""Tests for lungseg.model.unet: U-Net shapes and sizes, the BCE + Dice loss and the overlap
counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from keras import ops

from lungseg.core.metrics import confusion
from lungseg.model.unet import (
    bce_dice_loss,
    build_unet,
    for_inference,
    load_model,
    overlap_counts,
    predict_in_batches,
    to_bytes,
    with_precision,
)


def _np(x) -> np.ndarray:
    return ops.convert_to_numpy(x)


def _t(x) -> object:
    return ops.convert_to_tensor(np.asarray(x, np.float32))


# --- build_unet ---------------------------------------------------------------------------------


def test_default_unet_shape_and_size() -> None:
    model = build_unet()
    params = model.count_params()
    assert model.input_shape == (None, 256, 256, 1)
    assert model.output_shape == (None, 256, 256, 1)
    assert model.name == "unet256_f16_d4"
    assert params < 2_000_000, f"default U-Net has {params:,} parameters"


def test_small_unet_exact_parameter_count() -> None:
    # Conv 3x3 without bias: 9*cin*f; two BatchNorms per block: 2 * 4f; ConvT 2x2: 4*cin*f + f.
    # down0   cin 1,  f 4:   36 + 144  + 16 + 16 =  212
    # down1   cin 4,  f 8:  288 + 576  + 32 + 32 =  928
    # bottom  cin 8,  f 16: 1152 + 2304 + 64 + 64 = 3584
    # up1     16 -> 8:  4*16*8 + 8 =  520;  dec1 cin 16, f 8: 1152 + 576 + 32 + 32 = 1792
    # up0      8 -> 4:  4*8*4  + 4 =  132;  dec0 cin 8,  f 4:  288 + 144 + 16 + 16 =  464
    # lung     1x1, 4 -> 1: 4 + 1 = 5
    # total 212 + 928 + 3584 + 520 + 1792 + 132 + 464 + 5 = 7637
    model = build_unet(size=32, base_filters=4, depth=2)
    assert model.count_params() == 7637
    assert model.output_shape == (None, 32, 32, 1)
    assert model.name == "unet32_f4_d2"


@pytest.mark.parametrize(("size", "depth"), [(30, 2), (100, 3), (256, 9), (33, 1)])
def test_size_not_divisible_by_two_to_the_depth(size: int, depth: int) -> None:
    with pytest.raises(ValueError, match=rf"size {size} must be divisible by 2\*\*depth"):
        build_unet(size=size, base_filters=4, depth=depth)


def test_size_divisible_but_not_power_of_two() -> None:
    model = build_unet(size=36, base_filters=4, depth=2)  # 36 = 9 * 4
    assert model.output_shape == (None, 36, 36, 1)


def test_output_is_a_probability_for_a_uint8_batch() -> None:
    model = build_unet(size=32, base_filters=4, depth=2)
    batch = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    out = _np(model(batch, training=False))
    assert out.shape == (3, 32, 32, 1)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert out.min() >= 0.0
    assert out.max() <= 1.0


# --- bce_dice_loss ------------------------------------------------------------------------------


def test_loss_is_per_image() -> None:
    rng = np.random.default_rng(1)
    truth = (rng.random((3, 8, 8, 1)) > 0.5).astype(np.float32)
    prob = rng.uniform(0.05, 0.95, (3, 8, 8, 1)).astype(np.float32)
    loss = _np(bce_dice_loss(_t(truth), _t(prob)))
    assert loss.shape == (3,)
    assert np.all(np.isfinite(loss))
    # each entry depends on its own image only
    alone = _np(bce_dice_loss(_t(truth[1:2]), _t(prob[1:2])))
    assert alone[0] == pytest.approx(loss[1], rel=1e-6)


def test_loss_perfect_smaller_than_inverted() -> None:
    truth = np.zeros((1, 4, 4, 1), np.float32)
    truth[0, :2] = 1.0  # 8 of 16 pixels
    perfect = _np(bce_dice_loss(_t(truth), _t(truth)))[0]
    inverted = _np(bce_dice_loss(_t(truth), _t(1.0 - truth)))[0]
    # perfect: bce ~ -log(1 - 1e-7) ~ 0 and Dice term 1 - (2*8 + 1) / (8 + 8 + 1) = 0
    assert perfect == pytest.approx(0.0, abs=1e-5)
    # inverted: no overlap, Dice term 1 - 1 / (8 + 8 + 1) = 16/17, plus a large clipped bce
    assert inverted > 16 / 17 + 10
    assert perfect < inverted


def test_loss_exact_values() -> None:
    # 4x4 images, constant prediction p, smooth = 1, sum(p) = 16p:
    # truth 0, p = 0.25: bce = -log(0.75); Dice term 1 - 1 / (16*0.25 + 1) = 1 - 1/5
    # truth 0, p = 0.5:  bce = -log(0.5);  Dice term 1 - 1 / (16*0.5 + 1)  = 1 - 1/9
    # truth 1, p = 0.5:  bce = -log(0.5);  Dice term 1 - (2*8 + 1) / (16 + 8 + 1) = 1 - 17/25
    truth = np.zeros((3, 4, 4, 1), np.float32)
    truth[2] = 1.0
    prob = np.empty((3, 4, 4, 1), np.float32)
    prob[0], prob[1], prob[2] = 0.25, 0.5, 0.5
    expected = [
        -math.log(0.75) + 1 - 1 / 5,  # 1.0876821
        -math.log(0.5) + 1 - 1 / 9,  # 1.5820361
        -math.log(0.5) + 1 - 17 / 25,  # 1.0131472
    ]
    loss = _np(bce_dice_loss(_t(truth), _t(prob)))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_loss_smooth_parameter() -> None:
    # truth 0, p = 0.25, smooth = 2: bce = -log(0.75); Dice term 1 - 2 / (4 + 2) = 2/3
    truth = np.zeros((1, 4, 4, 1), np.float32)
    prob = np.full((1, 4, 4, 1), 0.25, np.float32)
    loss = _np(bce_dice_loss(_t(truth), _t(prob), smooth=2.0))
    np.testing.assert_allclose(loss, [-math.log(0.75) + 2 / 3], rtol=1e-5)


def test_loss_accepts_integer_truth() -> None:
    truth = np.zeros((1, 4, 4, 1), np.uint8)
    prob = np.full((1, 4, 4, 1), 0.25, np.float32)
    loss = _np(bce_dice_loss(ops.convert_to_tensor(truth), _t(prob)))
    np.testing.assert_allclose(loss, [-math.log(0.75) + 1 - 1 / 5], rtol=1e-5)


# --- overlap_counts -----------------------------------------------------------------------------


def test_overlap_counts_exact_and_threshold_inclusive() -> None:
    truth = np.array([[[1, 0], [1, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 0]]], np.float32)[..., None]
    prob = np.array(
        [
            [[0.5, 0.5], [0.49, 0.1]],  # pred [[1,1],[0,0]]: tp (0,0), fp (0,1), fn (1,0)
            [[0.9, 0.8], [0.7, 0.2]],  # pred 3 of 4 lung pixels: tp 3, fp 0, fn 1
            [[0.0, 0.0], [0.0, 0.0]],  # both empty
        ],
        np.float32,
    )[..., None]
    counts = _np(overlap_counts(_t(truth), _t(prob)))
    assert counts.shape == (3, 3)
    np.testing.assert_array_equal(counts, [[1, 1, 1], [3, 0, 1], [0, 0, 0]])


def test_overlap_counts_custom_threshold_and_0_255_truth() -> None:
    truth = np.array([[[255, 255, 0, 0]]], np.float32)[..., None]  # truth > 0 is lung
    prob = np.array([[[0.9, 0.6, 0.8, 0.3]]], np.float32)[..., None]
    # threshold 0.8: pred [1, 0, 1, 0] -> tp 1, fp 1 (third), fn 1 (second)
    counts = _np(overlap_counts(_t(truth), _t(prob), threshold=0.8))
    np.testing.assert_array_equal(counts, [[1, 1, 1]])


@pytest.mark.parametrize("seed", [0, 1])
def test_overlap_counts_agree_with_numpy_confusion(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = (rng.random((4, 6, 5, 1)) > 0.5).astype(np.float32)
    prob = rng.random((4, 6, 5, 1)).astype(np.float32)
    counts = _np(overlap_counts(_t(truth), _t(prob)))
    for i in range(4):
        c = confusion(prob[i, ..., 0] >= 0.5, truth[i, ..., 0])
        assert counts[i].tolist() == [c.tp, c.fp, c.fn]


# --- with_precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_with_precision_computes_in_half_keeps_weights_and_float32_output(precision: str) -> None:
    model = build_unet(size=32, base_filters=4, depth=2)
    half = with_precision(model, precision)
    assert half is not model
    assert half.get_layer("down0_conv1").compute_dtype == precision
    assert half.get_layer("lung").compute_dtype == "float32"
    for ours, theirs in zip(half.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)).astype(np.float32)
    out = _np(half(x, training=False))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _np(model(x, training=False)), atol=0.05)


def test_with_precision_float32_is_the_model_and_others_are_refused() -> None:
    model = build_unet(size=32, base_filters=4, depth=2)
    assert with_precision(model, "float32") is model
    with pytest.raises(ValueError, match="precision must be one of"):
        with_precision(model, "int8")


def test_for_inference_compiles_float32_by_xla_with_the_same_probabilities() -> None:
    model = build_unet(size=32, base_filters=4, depth=2)
    films = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 1)).astype(np.uint8)
    plain = np.asarray(model.predict_on_batch(films))
    compiled = for_inference(load_model(to_bytes(model)), "float32")  # no predict function yet
    assert compiled.jit_compile is True
    np.testing.assert_allclose(np.asarray(compiled.predict_on_batch(films)), plain, atol=1e-5)
    assert (
        for_inference(build_unet(size=32, base_filters=4, depth=2), "bfloat16").jit_compile is False
    )


def test_predict_in_batches_gives_the_whole_stack_s_maps_with_a_short_last_batch() -> None:
    model = build_unet(size=32, base_filters=4, depth=2)
    films = np.random.default_rng(2).integers(0, 256, (5, 32, 32)).astype(np.uint8)
    whole = np.asarray(model.predict_on_batch(films[..., None]))[..., 0]
    maps = predict_in_batches(model, films, 2)  # batches of 2, 2 and 1
    assert maps.shape == (5, 32, 32)
    np.testing.assert_allclose(maps, whole, atol=1e-6)
    assert predict_in_batches(model, films[:0], 2).shape == (0, 32, 32)
