"""What a ``.keras`` file says without loading Keras: its input size, its SHA-256 and its
quality-control calibration.

A job's driver needs them (to size the preprocessing, to record which model made an output, to
score masks) but not the model itself, and importing TensorFlow there would cost seconds and
hundreds of MiB. The calibration travels inside the file, as ``lungseg.json`` beside Keras's own
entries (Keras reads only its own), so that it cannot be separated from the weights it fits.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass

from lungseg.core.errors import UserError
from lungseg.core.qc import FEATURES, Calibration

NOTES = "lungseg.json"
"""The entry of a ``.keras`` zip that holds lungseg's notes on the model: ``{"qc": ...}``, or
``{"qc": null, "qc_missing": why}`` where its trainer could not measure a calibration."""
_TWO_VIEWS = ("disagreement", "uncertain", "review_risk", "films")
"""The fields of the calibration a lungseg before one-pass quality control stored."""
_TWO_VIEWS_MISSING = (
    "its calibration is for the two-view quality control of an earlier lungseg; "
    "`lungseg train` makes a model with one"
)
_THREE_MEASURES_MISSING = (
    f"its calibration weighs the 3 measures of an earlier lungseg (before the mask's lower "
    f"border was one), not this one's {len(FEATURES)}; `lungseg train` makes a model with one"
)


@dataclass(frozen=True)
class ModelFile:
    """A ``.keras`` file's SHA-256 (hex), the side of its square one-channel input and its
    quality-control calibration: None in a file that was not made by a lungseg trainer, and in
    one whose trainer could not measure it (``calibration_missing`` then says why)."""

    sha256: str
    size: int
    calibration: Calibration | None = None
    calibration_missing: str | None = None


def describe(data: bytes, name: str = "model") -> ModelFile:
    """Read the input shape from the ``config.json`` inside a ``.keras`` zip.

    A file that is not a Keras 3 model of one ``(size, size, 1)`` input is a :class:`UserError`.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            config = json.loads(archive.read("config.json"))
            names = archive.namelist()
            notes = json.loads(archive.read(NOTES)) if NOTES in names else {}
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
    if not isinstance(inputs[0][1], int) or inputs[0][1] < 1:
        raise UserError(
            f"{name}: its input has no fixed size ({inputs[0][1]}, {inputs[0][2]}, 1): lungseg "
            "resizes every X-ray to the model's size, so save the model with one, e.g. "
            "keras.Input((256, 256, 1))"
        )
    calibration, missing = None, notes.get("qc_missing")
    qc = notes.get("qc")
    if isinstance(qc, dict) and set(qc) == set(_TWO_VIEWS):
        missing = _TWO_VIEWS_MISSING
    elif isinstance(qc, dict) and _measures(qc) == 3:
        missing = _THREE_MEASURES_MISSING
    elif qc is not None:
        try:
            calibration = Calibration(**qc)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"{name}: its {NOTES} has no valid quality-control calibration"
            ) from exc
    return ModelFile(hashlib.sha256(data).hexdigest(), int(inputs[0][1]), calibration, missing)


def _measures(qc: dict) -> int | None:
    """How many measures a stored calibration weighs (None where it cannot be told)."""
    weights = qc.get("weights")
    return len(weights) if isinstance(weights, list) else None


def with_calibration(data: bytes, calibration: Calibration | None, missing: str = "") -> bytes:
    """The bytes of a ``.keras`` file with ``calibration`` in its :data:`NOTES` (replaced if
    it had one); without one, why it is ``missing``, so that a job using the model can tell a
    lungseg model that has none from a model that no lungseg trainer made."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target,
    ):
        for entry in source.infolist():
            if entry.filename != NOTES:
                target.writestr(entry, source.read(entry))
        stamp = source.getinfo("config.json").date_time  # the same bytes for the same model
        qc = {"qc": asdict(calibration)} if calibration else {"qc": None, "qc_missing": missing}
        notes = json.dumps(qc, indent=2)
        target.writestr(zipfile.ZipInfo(NOTES, stamp), notes)
    return out.getvalue()
