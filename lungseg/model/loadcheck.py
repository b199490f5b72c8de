"""Check that Keras loads a model file, in a process of its own, beside the driver's other work.

A segment job's driver must know before Ray starts that its actors will load the model
(:func:`lungseg.model.unet.load_checked`), but it never runs the model: TensorFlow in the
driver cost about 640 MiB (a 100,000-key dry run's driver peaked at 923 MiB with it, 285
without) and seconds of start. In a child process the check costs the driver neither, and
runs while the driver lists the catalog.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

from lungseg.core.errors import UserError

_REFUSED = 3  # the child's exit status for a file Keras cannot use: its stdout says why
_CHILD_ENV = {
    "CUDA_VISIBLE_DEVICES": "",  # the check needs no GPU, and must not hold one the job needs
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


@contextlib.contextmanager
def checking(data: bytes, size: int, name: str) -> Iterator[Callable[[], None]]:
    """Start checking the model file ``data`` (of input ``size``; ``name`` for messages) in a
    child process; yields a function that waits for the verdict and raises the
    :class:`UserError` :func:`~lungseg.model.unet.load_checked` would have. A child still
    running when the block ends (another check failed first) is killed."""
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
    sys.exit(_main(sys.argv[1:]))
