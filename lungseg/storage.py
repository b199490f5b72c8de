"""URIs to pyarrow filesystems: local paths and ``s3://bucket/key``, and safe output keys."""

from __future__ import annotations

import os
import posixpath
from contextlib import contextmanager
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme other than ``file``."""
    scheme = urlparse(uri).scheme
    return len(scheme) > 1 and scheme != "file"


class StorageError(OSError):
    """A path or URI that cannot be used, with the reason and the URI."""


# pyarrow's S3 error codes, in the order they are looked for, and what to tell the user.
_REASONS = (
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("NETWORK_CONNECTION", "the S3 endpoint is unreachable"),
    ("ACCESS_DENIED", "access denied"),
    ("INVALID_ACCESS_KEY_ID", "access denied: the access key is not known to the endpoint"),
    ("SIGNATURE_DOES_NOT_MATCH", "access denied: the secret key does not match"),
    ("Permission denied", "access denied"),
)


@contextmanager
def explained(uri: str):
    """Re-raise filesystem errors inside the block as :class:`StorageError` naming ``uri``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        text = str(exc)
        reason = next((why for code, why in _REASONS if code in text), text)
        raise StorageError(f"{uri}: {reason}") from exc


def endpoint_url(s3_endpoint: str | None = None) -> str | None:
    """The S3 endpoint in force: the explicit one, else ``AWS_ENDPOINT_URL_S3``/``_URL``."""
    return (
        s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )


@lru_cache(maxsize=8)
def _s3(endpoint: str | None) -> pafs.S3FileSystem:
    # Credentials are left to the AWS SDK's default chain (environment, profiles, instance
    # roles): they never pass through lungseg's arguments, logs or outputs.
    options = {
        "connect_timeout": 5,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        options |= {"endpoint_override": parsed.netloc or parsed.path}
        options |= {"scheme": parsed.scheme or "https"}
    return pafs.S3FileSystem(**options)


def resolve(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Turn a local path or URI into ``(filesystem, path)`` for pyarrow.

    Local paths come back absolute. S3 credentials come from the standard AWS chain; the
    endpoint from ``s3_endpoint``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _s3(endpoint_url(s3_endpoint)), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if is_remote(uri):
        raise ValueError(
            f"unsupported URI scheme {parsed.scheme!r} in {uri!r} (use a path or s3://)"
        )
    path = parsed.path if parsed.scheme == "file" else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(root: str, key: str) -> str:
    """Join a relative ``key`` under ``root``, refusing keys that would escape it."""
    parts = key.replace("\\", "/").split("/")
    if key.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe output key {key!r}: must be relative, without '.', '..' or '//'")
    if is_remote(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return os.path.join(root, *parts)


def read_bytes(uri: str, s3_endpoint: str | None = None) -> bytes:
    """Read a whole object or file."""
    fs, path = resolve(uri, s3_endpoint)
    with explained(uri), fs.open_input_stream(path) as f:
        return f.read()


@contextmanager
def open_output(uri: str, s3_endpoint: str | None = None):
    """A stream that writes the object or file ``uri``, creating parent directories (not on S3)."""
    fs, path = resolve(uri, s3_endpoint)
    with explained(uri):
        if not isinstance(fs, pafs.S3FileSystem):
            fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            yield f


def write_bytes(uri: str, data: bytes, s3_endpoint: str | None = None) -> None:
    """Write a whole object or file, creating parent directories (not needed on S3)."""
    with open_output(uri, s3_endpoint) as f:
        f.write(data)


def list_files(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """The paths (as :func:`resolve` gives them) of every file under ``uri``; none if absent."""
    fs, path = resolve(uri, s3_endpoint)
    with explained(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return [info.path for info in infos if info.type == pafs.FileType.File]


def replace(source: str, target: str, s3_endpoint: str | None = None) -> None:
    """Move the file ``source`` onto ``target``, replacing it.

    A rename on a local disk (atomic); on S3, which has no rename, a copy then a delete.
    """
    fs, path = resolve(source, s3_endpoint)
    with explained(target):
        fs.move(path, resolve(target, s3_endpoint)[1])


def remove_tree(uri: str, s3_endpoint: str | None = None) -> None:
    """Delete the folder or prefix ``uri`` and everything under it; nothing if it is absent."""
    fs, path = resolve(uri, s3_endpoint)
    with explained(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def file_type(uri: str, s3_endpoint: str | None = None) -> pafs.FileType:
    """What ``uri`` is (file, directory, not found); a missing bucket is a :class:`StorageError`."""
    fs, path = resolve(uri, s3_endpoint)
    with explained(uri):
        kind = fs.get_file_info(path).type
        bucket = path.split("/")[0]
        if (
            kind == pafs.FileType.NotFound
            and isinstance(fs, pafs.S3FileSystem)
            and fs.get_file_info(bucket).type == pafs.FileType.NotFound
        ):
            raise StorageError(f"{uri}: the bucket does not exist")
    return kind


def check_shared(uri: str, nodes: int, allow_local: bool = False) -> None:
    """Refuse a local ``uri`` as a job's output on a cluster of more than one node.

    Each node would write into its own disk; ``allow_local`` is for a path that every node
    mounts (NFS, EFS).
    """
    if nodes > 1 and not allow_local and not is_remote(uri):
        raise ValueError(
            f"--output {uri} is a local path, but this Ray cluster has {nodes} nodes: the run "
            "folder must be on storage that every node shares. Use an s3:// URI, or pass "
            "--allow-local-output if the path is on a file system mounted on every node (NFS)."
        )


def check_writable(root: str, s3_endpoint: str | None = None) -> None:
    """Fail early, naming ``root``, when outputs cannot be written there (probe write + delete)."""
    probe = join(root, ".lungseg-write-check")
    fs, path = resolve(probe, s3_endpoint)
    if isinstance(fs, pafs.S3FileSystem):
        file_type(root, s3_endpoint)  # a missing bucket is named as such
    write_bytes(probe, b"", s3_endpoint)
    with explained(root):
        fs.delete_file(path)
