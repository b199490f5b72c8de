"""The U-Net, its loss and its overlap counts, and loading a saved one. Knows nothing of Ray
or of where a model file is stored."""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
from keras import layers, ops

from lungseg.core.config import PRECISIONS, THRESHOLD, ModelConfig
from lungseg.core.errors import UserError


def _conv_block(x, filters: int, name: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_unet(
    size: int = ModelConfig.size,
    base_filters: int = ModelConfig.base_filters,
    depth: int = ModelConfig.depth,
    dropout: float = 0.1,
) -> keras.Model:
    """A U-Net for one-channel ``size`` x ``size`` X-rays with pixel values in [0, 255].

    ``depth`` 2x2 poolings, filters doubling from ``base_filters`` at each level; the output is a
    per-pixel lung probability of shape ``(size, size, 1)``.
    """
    if size % 2**depth:
        raise ValueError(f"size {size} must be divisible by 2**depth = {2**depth}")
    inputs = keras.Input((size, size, 1), name="xray")
    x = layers.Rescaling(1 / 255, name="scale")(inputs)
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(name=f"pool{level}")(x)
    x = _conv_block(x, base_filters * 2**depth, "bottom")
    x = layers.Dropout(dropout, name="dropout")(x)
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _conv_block(x, filters, f"dec{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="lung")(x)
    return keras.Model(inputs, outputs, name=f"unet{size}_f{base_filters}_d{depth}")


def with_precision(model: keras.Model, precision: str) -> keras.Model:
    """``model`` rebuilt to compute in ``precision`` (Keras mixed precision: variables stay
    float32, the output layer computes in float32), sharing nothing with the original.

    bfloat16 uses the bf16 units of recent CPUs (AMX) and of GPUs, float16 the tensor cores of
    GPUs; probabilities then differ from float32 in the second or third decimal place.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return model
    config = model.get_config()
    outputs = set(model.output_names)
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer":
            policy = "float32" if layer["name"] in outputs else f"mixed_{precision}"
            layer["config"]["dtype"] = policy
    rebuilt = model.__class__.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def for_inference(model: keras.Model, precision: str) -> keras.Model:
    """``model`` as segment runs it: in ``precision`` (:func:`with_precision`), compiled by XLA
    where that computes in float32. On a CPU, XLA's fused kernels cost 8% less per image than
    TensorFlow's (the docs' performance page), for a compile of about 2 core-s at the first
    batch; Keras already compiles by XLA on GPUs, and bfloat16 keeps oneDNN's bf16 kernels.
    The model must then always see one batch shape (:class:`lungseg.jobs.segment.Segmenter`
    pads), or it compiles again. In float32 this is ``model`` itself, so pass one not yet
    called: Keras keeps the predict function of a model's first call, compiled or not."""
    model = with_precision(model, precision)
    if precision == "float32":
        model.jit_compile = True
    return model


def predict_in_batches(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """``model``'s probability maps ``(n, size, size)`` of ``images`` ``(n, size, size)``,
    ``batch_size`` at a time by ``predict_on_batch``. Not ``model.predict``: on TensorFlow it
    feeds arrays through an autotuned tf.data pipeline, whose end costs time (32 images at 128
    px: a median 0.66 s a call against 0.33 s this way; the docs' performance page)."""
    parts = [
        keras.ops.convert_to_numpy(model.predict_on_batch(images[i : i + batch_size, ..., None]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts)[..., 0] if parts else np.zeros(images.shape, np.float32)


def bce_dice_loss(truth, probability, smooth: float = 1.0):
    """Per-image loss, shape ``(batch,)``: binary cross-entropy plus (1 - soft Dice)."""
    truth = ops.cast(truth, probability.dtype)
    bce = ops.mean(keras.losses.binary_crossentropy(truth, probability), axis=(1, 2))
    intersection = ops.sum(truth * probability, axis=(1, 2, 3))
    total = ops.sum(truth, axis=(1, 2, 3)) + ops.sum(probability, axis=(1, 2, 3))
    return bce + 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def dice_per_image(truth, probability, threshold: float = THRESHOLD):
    """Per-image Dice at ``threshold``, shape ``(batch,)``; 1 where both masks are empty."""
    tp, fp, fn = ops.unstack(overlap_counts(truth, probability, threshold), axis=1)
    return ops.where(2 * tp + fp + fn > 0, 2 * tp / ops.maximum(2 * tp + fp + fn, 1), 1.0)


def iou_per_image(truth, probability, threshold: float = THRESHOLD):
    """Per-image IoU at ``threshold``, shape ``(batch,)``; 1 where both masks are empty."""
    tp, fp, fn = ops.unstack(overlap_counts(truth, probability, threshold), axis=1)
    return ops.where(tp + fp + fn > 0, tp / ops.maximum(tp + fp + fn, 1), 1.0)


def overlap_counts(truth, probability, threshold: float = THRESHOLD):
    """Per-image true positive, false positive and false negative pixel counts, ``(batch, 3)``."""
    pred = ops.cast(probability >= threshold, "float32")
    true = ops.cast(truth > 0, "float32")
    tp = ops.sum(pred * true, axis=(1, 2, 3))
    return ops.stack(
        [tp, ops.sum(pred, axis=(1, 2, 3)) - tp, ops.sum(true, axis=(1, 2, 3)) - tp], axis=1
    )


def to_bytes(model: keras.Model) -> bytes:
    """``model`` (architecture and weights, no optimizer state) as the bytes of a ``.keras``."""
    copy = model.__class__.from_config(model.get_config())  # uncompiled: no optimizer
    copy.set_weights(model.get_weights())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        copy.save(path)
        with open(path, "rb") as f:
            return f.read()


def load_model(data: bytes) -> keras.Model:
    """A model from the bytes of a ``.keras`` file, without its optimizer (for inference)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")  # Keras reads .keras files by path only
        with open(path, "wb") as f:
            f.write(data)
        return keras.models.load_model(path, compile=False)


_PROBABILITIES = frozenset({"sigmoid", "hard_sigmoid"})


def check_segmenter(model: keras.Model, size: int, name: str = "model") -> None:
    """Refuse, in one line (a :class:`UserError`), a model that ``segment`` cannot use.

    It must take one ``(size, size, 1)`` X-ray and give one ``(size, size, 1)`` map of lung
    probabilities: a last layer with an activation ends in a sigmoid, and on three probe images
    (black, white and noise, as segment feeds them: ``uint8``) every value is in [0, 1]. A
    model of two channels, or of logits, would otherwise give masks without an error.
    """
    inputs = [tuple(tensor.shape) for tensor in model.inputs]
    outputs = [tuple(tensor.shape) for tensor in model.outputs]
    wanted = (None, size, size, 1)
    if inputs != [wanted] or outputs != [wanted]:
        raise UserError(
            f"{name}: segment needs a model of one (batch, {size}, {size}, 1) X-ray in and one "
            f"(batch, {size}, {size}, 1) map of lung probabilities out; this one takes "
            f"{inputs} and gives {outputs}"
        )
    activation = getattr(model.layers[-1], "activation", None)
    if activation is not None and keras.activations.serialize(activation) not in _PROBABILITIES:
        raise UserError(
            f"{name}: its last layer's activation is {keras.activations.serialize(activation)!r}"
            ", not a sigmoid: segment needs probabilities in [0, 1], not logits"
        )
    noise = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    probes = np.stack([np.zeros_like(noise), np.full_like(noise, 255), noise])[..., None]
    values = keras.ops.convert_to_numpy(model.predict_on_batch(probes))
    low, high = float(np.min(values)), float(np.max(values))
    if not (np.all(np.isfinite(values)) and low >= 0 and high <= 1):
        raise UserError(
            f"{name}: on three probe films it gives values from {low:.3g} to {high:.3g}: "
            "segment needs probabilities in [0, 1], not logits"
        )


def load_checked(data: bytes, size: int, name: str = "model") -> keras.Model:
    """:func:`load_model`, then :func:`check_segmenter`; a file Keras cannot load is a
    :class:`UserError` naming the first line of why."""
    try:
        model = load_model(data)
    except Exception as exc:  # Keras raises many kinds, each with a long message
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise UserError(f"{name}: Keras cannot load it: {type(exc).__name__}: {first}") from exc
    check_segmenter(model, size, name)
    return model
