"""Export a ``.keras`` model as a TensorFlow SavedModel for serving (TF Serving, TFLite, ...)."""

from __future__ import annotations

import os
import tempfile

from lungseg.core.config import ExportConfig
from lungseg.core.layout import EXPORT
from lungseg.io.storage import Store
from lungseg.model import modelfile
from lungseg.model.unet import load_model
from lungseg.runs import outputs


def export_saved_model(config: ExportConfig) -> str:
    """Write a SavedModel of ``config.model`` to the folder ``config.output`` (local or S3).

    Its ``serve`` signature takes float32 ``(batch, size, size, 1)`` X-rays with values in
    [0, 255] and returns lung probabilities of the same shape. The folder is claimed like every
    job's output (:func:`lungseg.runs.outputs.claimed`): a folder holding another export is replaced
    only with ``overwrite``, one holding files that lungseg did not make never, and every file
    written goes into its ledger. Returns the folder.
    """
    model, output, overwrite = config.model, config.output, config.overwrite
    store = Store.for_job(config.s3_endpoint)
    outputs.check_apart(store, output, {"--model": model})
    data = store.read_bytes(model)
    settings = {"model": model, "model_sha256": modelfile.describe(data, model).sha256}
    keras_model = load_model(data)
    with (
        outputs.claimed(
            store,
            output,
            EXPORT,
            "export",
            settings,
            reads={"--model": model},
            resume=False,
            overwrite=overwrite,
        ) as claim,
        tempfile.TemporaryDirectory() as folder,
    ):
        keras_model.export(folder, format="tf_saved_model")
        for top, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(top, name)
                with open(path, "rb") as f:
                    claim.write(os.path.relpath(path, folder).replace(os.sep, "/"), f.read())
        claim.finish()
    return output
