"""URIs to pyarrow filesystems: local paths and ``s3://bucket/key``, and safe output keys."""

from __future__ import annotations

import os
import posixpath
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme other than ``file``."""
    scheme = urlparse(uri).scheme
    return len(scheme) > 1 and scheme != "file"


@lru_cache(maxsize=8)
def _s3(endpoint: str | None) -> pafs.S3FileSystem:
    endpoint = (
        endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    if not endpoint:
        return pafs.S3FileSystem()
    parsed = urlparse(endpoint)
    return pafs.S3FileSystem(
        endpoint_override=parsed.netloc or parsed.path,
        scheme=parsed.scheme or "https",
    )


def resolve(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Turn a local path or URI into ``(filesystem, path)`` for pyarrow.

    Local paths come back absolute. S3 credentials come from the standard AWS chain; the
    endpoint from ``s3_endpoint``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _s3(s3_endpoint), f"{parsed.netloc}{parsed.path}".rstrip("/")
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
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, s3_endpoint: str | None = None) -> None:
    """Write a whole object or file, creating parent directories."""
    fs, path = resolve(uri, s3_endpoint)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
