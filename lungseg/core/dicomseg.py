"""Lung labels back to PACS: a DICOM Segmentation object (SEG) of a DICOM image, with highdicom.

One SEG per image: BINARY, two segments (1 the patient's right lung, 2 the left, as in
``labels/``), at the image's own rows and columns, referencing its SOP instance, with its
patient and study (highdicom copies them from the header) in a new series of its own.
highdicom (the optional ``dicom`` extra) accepts projection radiographs (DX, CR) without a
frame of reference since 0.18.2. Bytes in, bytes out: no files, no Ray.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from lungseg import __version__
from lungseg.core.errors import UserError

MISSING = '--dicom-seg needs highdicom: pip install "lungseg[dicom]"'
"""The one-line error of ``--dicom-seg`` without the ``dicom`` extra."""

SERIES_NUMBER = 7001
"""The Series Number of every SEG lungseg writes: one number, so that a viewer lists lungseg's
masks of a study together, after the study's own series."""

SEGMENTS = ((1, "Right lung", "3341006"), (2, "Left lung", "44029006"))
"""Segment number (the label in ``labels/``), label and SNOMED CT code of each lung."""
_CATEGORY = ("91723000", "SCT", "Anatomical Structure")  # SNOMED CT, T-D000A in SRT

# Type 2 attributes (present, maybe empty) that highdicom reads from the source image: a film
# whose header lacks them gets them empty, as the image's own IOD allows.
_TYPE_2 = ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
           "StudyDate", "StudyTime", "ReferringPhysicianName")  # fmt: skip


@dataclass(frozen=True)
class Algorithm:
    """What drew the masks, as each SEG's algorithm identification says: lungseg's version and
    the model file's SHA-256 and input size, and the probability cut."""

    model_sha256: str
    model_input_size: int
    threshold: float


def require() -> None:
    """Refuse ``--dicom-seg`` in one line (a :class:`UserError`) where highdicom is missing."""
    try:
        import highdicom  # noqa: F401
    except ImportError as exc:
        raise UserError(MISSING) from exc


def segmentation(header: bytes, labels: np.ndarray, algorithm: Algorithm) -> bytes:
    """The SEG file of the image whose header (a DICOM file without pixel data,
    :func:`lungseg.core.imaging.dicom_header`) is ``header``, from its labels at full size (0,
    1 right lung, 2 left). Raises ValueError where the header cannot be referenced (no SOP
    Instance, Study or Series Instance UID) or the labels are not the image's size."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    source = pydicom.dcmread(io.BytesIO(header))
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                           "SeriesInstanceUID") if not source.get(k)]  # fmt: skip
    if missing:
        raise ValueError(f"the DICOM header has no {', '.join(missing)} to reference")
    rows, columns = int(source.Rows), int(source.Columns)
    if labels.shape != (rows, columns):
        raise ValueError(
            f"labels {labels.shape[1]}x{labels.shape[0]} differ from the image {columns}x{rows}"
        )
    for keyword in _TYPE_2:
        if keyword not in source:
            setattr(source, keyword, None)
    identification = hd.AlgorithmIdentificationSequence(
        name="lungseg",
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        source="lungseg",
        parameters={
            "model_sha256": algorithm.model_sha256,
            "model_input_size": str(algorithm.model_input_size),
            "threshold": str(algorithm.threshold),
        },
    )
    category = hd.sr.CodedConcept(*_CATEGORY)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        for number, label, code in SEGMENTS
    ]
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=labels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="lungseg",
        manufacturer_model_name="lungseg U-Net",
        software_versions=__version__,
        device_serial_number=algorithm.model_sha256[:64],
        content_label="LUNGS",
        content_description="Lung fields segmented by lungseg",
        series_description="lungseg lungs",
    )
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()
