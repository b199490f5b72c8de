"""Where jobs read and write: local paths and ``s3://bucket/key``, through one :class:`Store`.

A job makes its :class:`Store` once, from its config, and hands it to everything that reads or
writes (catalog, actors, table writer): the S3 endpoint is settled once, on the driver, and every
process of the job then reaches the same store. Credentials are never part of it: they come from
the AWS SDK's default chain (environment, profiles, instance roles) in each process.
"""

from __future__ import annotations

import os
import posixpath
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs

from lungseg.errors import UserError


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme other than ``file``."""
    scheme = urlparse(uri).scheme
    return len(scheme) > 1 and scheme != "file"


class StorageError(UserError, OSError):
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


def join(root: str, key: str) -> str:
    """Join a relative ``key`` under ``root``, refusing keys that would escape it."""
    parts = key.replace("\\", "/").split("/")
    if key.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe output key {key!r}: must be relative, without '.', '..' or '//'")
    if is_remote(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return os.path.join(root, *parts)


def check_shared(uri: str, nodes: int, allow_local: bool = False) -> None:
    """Refuse a local ``uri`` as a job's output on a cluster of more than one node.

    Each node would write into its own disk; ``allow_local`` is for a path that every node
    mounts (NFS, EFS).
    """
    if nodes > 1 and not allow_local and not is_remote(uri):
        raise UserError(
            f"--output {uri} is a local path, but this Ray cluster has {nodes} nodes: the run "
            "folder must be on storage that every node shares. Use an s3:// URI, or pass "
            "--allow-local-output if the path is on a file system mounted on every node (NFS)."
        )


def check_endpoint(url: str, name: str = "--s3-endpoint") -> None:
    """Refuse an S3 endpoint that is not ``http(s)://host[:port][/path]``, or that holds
    credentials (``user:secret@host``, with or without a scheme), without echoing it: the
    endpoint is printed and saved in manifests, credentials belong to the AWS chain."""
    if "@" in url:
        raise UserError(
            f"{name} must not hold credentials (user:secret@host), which would land in logs and "
            "manifests: give them through the AWS chain (AWS_ACCESS_KEY_ID, profiles, roles)"
        )
    parsed = urlparse(url)
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parsed = parsed._replace(netloc="")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(
            f"{name} must be an http:// or https:// URL of the S3 endpoint, e.g. "
            f"http://minio.local:9000, got {url!r}"
        )


@lru_cache(maxsize=8)
def _s3(endpoint: str | None) -> pafs.S3FileSystem:
    options = {
        "connect_timeout": 5,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        options |= {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
    return pafs.S3FileSystem(**options)


@dataclass(frozen=True)
class Store:
    """Local files and S3 objects of one job, reached through pyarrow filesystems.

    ``endpoint`` is the S3 endpoint URL (``http://host:port``; None: AWS itself). Make one with
    :meth:`for_job`, which settles the endpoint from the option or the environment once. A Store
    pickles to its endpoint, so Ray actors get it as an argument.
    """

    endpoint: str | None = None

    @classmethod
    def for_job(cls, s3_endpoint: str | None = None) -> Store:
        """The store of a job: ``s3_endpoint``, else ``AWS_ENDPOINT_URL_S3``/``_URL``, else AWS.

        The endpoint must be an ``http://`` or ``https://`` URL of a host, without credentials
        (:func:`check_endpoint`).
        """
        for name, value in (
            ("--s3-endpoint", s3_endpoint),
            ("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL_S3")),
            ("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL")),
        ):
            if value:
                check_endpoint(value, name)
                return cls(value)
        return cls(None)

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """``(filesystem, path)`` for pyarrow; local paths come back absolute."""
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            return _s3(self.endpoint), f"{parsed.netloc}{parsed.path}".rstrip("/")
        if is_remote(uri):
            raise UserError(
                f"unsupported URI scheme {parsed.scheme!r} in {uri!r} (use a path or s3://)"
            )
        path = parsed.path if parsed.scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))

    def read_bytes(self, uri: str) -> bytes:
        """Read a whole object or file."""
        fs, path = self.resolve(uri)
        with explained(uri), fs.open_input_stream(path) as f:
            return f.read()

    @contextmanager
    def open_output(self, uri: str):
        """A stream that writes the object or file ``uri``, creating parent folders (not on S3)."""
        fs, path = self.resolve(uri)
        with explained(uri):
            if not isinstance(fs, pafs.S3FileSystem):
                fs.create_dir(posixpath.dirname(path), recursive=True)
            with fs.open_output_stream(path) as f:
                yield f

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole object or file, creating parent folders (not needed on S3)."""
        with self.open_output(uri) as f:
            f.write(data)

    def list_files(self, uri: str) -> list[str]:
        """The paths (as :meth:`resolve` gives them) of every file under ``uri``; none if absent."""
        fs, path = self.resolve(uri)
        with explained(uri):
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return [info.path for info in infos if info.type == pafs.FileType.File]

    def replace(self, source: str, target: str) -> None:
        """Move the file ``source`` onto ``target``, replacing it.

        A rename on a local disk (atomic); on S3, which has no rename, a copy then a delete.
        """
        fs, path = self.resolve(source)
        with explained(target):
            fs.move(path, self.resolve(target)[1])

    def remove_tree(self, uri: str) -> None:
        """Delete the folder or prefix ``uri`` and everything under it; nothing if it is absent."""
        fs, path = self.resolve(uri)
        with explained(uri):
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_dir(path)

    def file_type(self, uri: str) -> pafs.FileType:
        """What ``uri`` is (file, folder, not found); a missing bucket is a StorageError."""
        fs, path = self.resolve(uri)
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

    def check_writable(self, root: str) -> None:
        """Fail early, naming ``root``, when outputs cannot be written there (write + delete)."""
        probe = join(root, ".lungseg-write-check")
        fs, path = self.resolve(probe)
        if isinstance(fs, pafs.S3FileSystem):
            self.file_type(root)  # a missing bucket is named as such
        self.write_bytes(probe, b"")
        with explained(root):
            fs.delete_file(path)


DEFAULT_STORE = Store()
"""Local files, and S3 objects at AWS itself: the store of a caller that names no endpoint."""
