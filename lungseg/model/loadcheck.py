"""Check that Keras loads a model file, in a process of its own, beside the driver's other work.

A segment job's driver must know before Ray starts that its actors will load the model
(:func:`lungseg.model.unet.load_checked`), but it never runs the model: TensorFlow in the
driver cost about 640 MiB (a 100,000-key dry run's driver peaked at 923 MiB with it, 285
without) and seconds of start. In a child process the check costs the driver neither, and
runs while the driver lists the catalog and starts Ray.

A file that passed is remembered (:func:`passed_before`): its verdict depends only on its
bytes and on the Keras and TensorFlow that load it, and a rerun with the same model then
starts no child. The check is the larger part of a job's start: 3.8 s alone here, 6.8 s
beside Ray's start on 2 cores, where the Ray start alone takes 2.5 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from lungseg.core.errors import UserError

logger = logging.getLogger(__name__)

CACHE = "LUNGSEG_CACHE"
"""The variable naming the folder that remembers the model files that passed (default:
``$XDG_CACHE_HOME/lungseg``, else ``~/.cache/lungseg``)."""

_REFUSED = 3  # the child's exit status for a file Keras cannot use: its stdout says why
_CHILD_ENV = {
    "CUDA_VISIBLE_DEVICES": "",  # the check needs no GPU, and must not hold one the job needs
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


def _marker(data: bytes, size: int) -> Path | None:
    """The file whose presence says that ``data`` passed at input ``size``, under these
    versions of Keras and TensorFlow; None where a version cannot be told (another build of
    the package, such as tensorflow-cpu): such a file is checked every time."""
    try:
        versions = "|".join(metadata.version(package) for package in ("keras", "tensorflow"))
    except metadata.PackageNotFoundError:
        return None
    key = hashlib.sha256(hashlib.sha256(data).digest() + f"|{size}|{versions}".encode())
    root = os.environ.get(CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lungseg"
    )
    return Path(root, "passed-models", key.hexdigest())


def passed_before(data: bytes, size: int) -> bool:
    """Whether the model file ``data`` passed the check before, at input ``size``, with the
    Keras and TensorFlow installed now."""
    marker = _marker(data, size)
    return marker is not None and marker.is_file()


def _remember(data: bytes, size: int) -> None:
    marker = _marker(data, size)
    if marker is None:
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError as exc:  # a read-only home: the next run checks again
        logger.debug("cannot remember the model's check in %s: %s", marker, exc)


@contextlib.contextmanager
def checking(data: bytes, size: int, name: str) -> Iterator[Callable[[], None]]:
    """Start checking the model file ``data`` (of input ``size``; ``name`` for messages) in a
    child process, unless it :func:`passed_before`; yields a function that waits for the
    verdict and raises the :class:`UserError` :func:`~lungseg.model.unet.load_checked` would
    have. A child still running when the block ends (another check failed first) is killed."""
    if passed_before(data, size):
        yield lambda: None
        return
    child = subprocess.Popen(
        [sys.executable, "-m", __name__, str(size), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ | _CHILD_ENV,
    )
    said: dict[str, bytes] = {}

    def talk() -> None:
        said["out"], said["err"] = child.communicate(data)

    talking = threading.Thread(target=talk, name="model-check", daemon=True)
    talking.start()

    def verdict() -> None:
        talking.join()
        if child.returncode == _REFUSED:
            raise UserError(said["out"].decode().strip())
        if child.returncode:
            tail = said["err"].decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"checking {name} in a process of its own failed: {tail}")
        _remember(data, size)

    try:
        yield verdict
    finally:
        if child.poll() is None:
            child.kill()
        talking.join()


def _main(argv: list[str]) -> int:
    """The child: the model file's bytes on stdin, its input size and name as arguments."""
    from lungseg.model.unet import load_checked

    size, name = argv
    try:
        load_checked(sys.stdin.buffer.read(), int(size), name)
    except UserError as exc:
        print(exc)
        return _REFUSED
    return 0


if __name__ == "__main__":
    status = _main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # TensorFlow's teardown took 1.2 s more, with the verdict known
