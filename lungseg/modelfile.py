"""What a ``.keras`` file says without loading Keras: its input size and its SHA-256.

A job's driver needs both (to size the preprocessing, to record which model made an output)
but not the model itself, and importing TensorFlow there would cost seconds and hundreds of MiB.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass

from lungseg.errors import UserError


@dataclass(frozen=True)
class ModelFile:
    """A ``.keras`` file's SHA-256 (hex) and the side of its square one-channel input."""

    sha256: str
    size: int


def describe(data: bytes, name: str = "model") -> ModelFile:
    """Read the input shape from the ``config.json`` inside a ``.keras`` zip.

    A file that is not a Keras 3 model of one ``(size, size, 1)`` input is a :class:`UserError`.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            config = json.loads(archive.read("config.json"))
        inputs = [
            layer["config"]["batch_shape"]
            for layer in config["config"]["layers"]
            if layer["class_name"] == "InputLayer"
        ]
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{name}: not a Keras 3 .keras model file ({exc})") from exc
    if len(inputs) != 1 or len(inputs[0]) != 4 or inputs[0][1] != inputs[0][2] or inputs[0][3] != 1:
        raise UserError(
            f"{name}: the model must take one (size, size, 1) X-ray, its inputs are {inputs}"
        )
    return ModelFile(sha256=hashlib.sha256(data).hexdigest(), size=int(inputs[0][1]))
