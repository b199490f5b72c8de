"""Export a ``.keras`` model as a TensorFlow SavedModel for serving (TF Serving, TFLite, ...)."""

from __future__ import annotations

import tempfile

import pyarrow.fs as pafs

from lungseg import storage
from lungseg.model import load_model
from lungseg.storage import Store


def export_saved_model(model: str, output: str, s3_endpoint: str | None = None) -> str:
    """Write a SavedModel of ``model`` to the folder ``output`` (local or S3).

    Its ``serve`` signature takes float32 ``(batch, size, size, 1)`` X-rays with values in
    [0, 255] and returns lung probabilities of the same shape.
    """
    store = Store.for_job(s3_endpoint)
    keras_model = load_model(store.read_bytes(model))
    fs, path = store.resolve(output)
    with tempfile.TemporaryDirectory() as folder, storage.explained(output):
        keras_model.export(folder, format="tf_saved_model")
        fs.create_dir(path, recursive=True)
        pafs.copy_files(folder, path, destination_filesystem=fs)
    return output
