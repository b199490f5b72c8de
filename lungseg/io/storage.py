"""Where jobs read and write: local paths and ``s3://bucket/key``, through one :class:`Store`.

A job makes its :class:`Store` once, from its config, and hands it to everything that reads or
writes (catalog, actors, table writer): the S3 endpoint is settled once, on the driver, and every
process of the job then reaches the same store. Credentials are never part of it: they come from
the AWS SDK's default chain (environment, profiles, instance roles) in each process.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs

from lungseg.core.errors import UserError
from lungseg.core.layout import WRITE_PROBE


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


def fingerprint(data: bytes) -> str:
    """What a file holds, in a line: ``<size>:<first 32 hex digits of its SHA-256>``.

    Every file a job writes, and every input it reads, is recorded by this (the ledger of
    :mod:`lungseg.runs.outputs`, a table row's ``*_fingerprint`` columns), so that a rerun can tell
    its own unchanged files from changed or foreign ones. 1.5 GB/s on one core here.
    """
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()[:32]}"


def fingerprint_size(value: str) -> int:
    """The size in bytes that a :func:`fingerprint` records."""
    return int(value.split(":", 1)[0])


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


def _s3_path(uri: str, bucket: str, key: str) -> str:
    """``bucket/key`` of an S3 URI; a key with ``.``, ``..`` or empty parts is refused.

    pyarrow's client collapses ``.`` and ``..`` when it writes (``ds/./x`` is stored as
    ``ds/x``) while other clients keep them, so such a key names two objects at once, and no
    check of where a job writes could be trusted for it.
    """
    parts = key.removeprefix("/").removesuffix("/").split("/")
    if not bucket or (key.strip("/") and any(p in ("", ".", "..") for p in parts)):
        raise StorageError(
            f"{uri}: an S3 URI needs a bucket and a key without '.', '..' or empty parts "
            "(S3 clients disagree on what such keys name); write it plainly, e.g. "
            "s3://bucket/folder/sub"
        )
    return f"{bucket}/{'/'.join(parts)}".rstrip("/")


@lru_cache(maxsize=8)
def _s3(endpoint: str | None) -> pafs.S3FileSystem:
    options = {
        "connect_timeout": 5,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        # create_dir (Ray Train's, for a run folder and its parents) writes a zero-byte
        # ``folder/`` marker object for each folder it does not find: where the folder already
        # holds objects (a run folder holds its manifest before Ray starts), none
        "check_directory_existence_before_creation": True,
    }
    if endpoint:
        parsed = urlparse(endpoint)
        options |= {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
    return pafs.S3FileSystem(**options)


@dataclass(frozen=True)
class Store:
    """Local files and S3 objects of one job, reached through pyarrow filesystems.

    ``endpoint`` is the S3 endpoint URL (``http://host:port``; None: AWS itself). Make one with
    :meth:`for_job`, which settles the endpoint from the option or the environment once, and
    the ``folder`` that relative local paths are under. A Store pickles to both, so Ray's
    workers get it as an argument.
    """

    endpoint: str | None = None
    folder: str | None = None
    """Where relative local paths are: a job's store (:meth:`for_job`) takes its driver's working
    folder, since Ray's workers keep the folder Ray was started in (``ray start`` elsewhere, or
    a driver that changed folders) and would read and write somewhere else; None: this
    process's own."""

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
                return cls(value, os.getcwd())
        return cls(None, os.getcwd())

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """``(filesystem, path)`` for pyarrow; local paths come back absolute, relative ones
        under :attr:`folder`."""
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            return _s3(self.endpoint), _s3_path(uri, parsed.netloc, parsed.path)
        if is_remote(uri):
            raise UserError(
                f"unsupported URI scheme {parsed.scheme!r} in {uri!r} (use a path or s3://)"
            )
        path = parsed.path if parsed.scheme == "file" else uri
        local = os.path.join(self.folder or os.getcwd(), os.path.expanduser(path))
        return pafs.LocalFileSystem(), os.path.normpath(local)

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

    def write_whole(self, uri: str, data: bytes) -> None:
        """Write a file so that a reader sees its old bytes or its new ones, never a part: on a
        local disk a temporary file beside it (``<name>.<hex>.tmp``) renamed onto it; on S3
        every write is whole."""
        fs, path = self.resolve(uri)
        if isinstance(fs, pafs.S3FileSystem):
            self.write_bytes(uri, data)
            return
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        self.write_bytes(temporary, data)
        with explained(uri):
            os.replace(temporary, path)

    def listing(self, uri: str) -> dict[str, int]:
        """Every file under ``uri`` as ``{key relative to uri: size}``; empty if it is absent.

        Folder markers (zero-byte keys ending in ``/``, left by some S3 tools) are not files.
        """
        fs, path = self.resolve(uri)
        with explained(uri):
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        start = len(path.rstrip("/")) + 1
        return {i.path[start:]: i.size for i in infos if i.type == pafs.FileType.File}

    def delete_file(self, uri: str) -> None:
        """Delete one file or object; nothing if it is absent.

        On S3 through boto3: pyarrow's client, deleting a folder's last object, writes a
        zero-byte ``folder/`` marker object in its place (to keep the folder "existing"), and
        those pile up in a job's outputs.
        """
        fs, path = self.resolve(uri)
        if isinstance(fs, pafs.S3FileSystem):
            _delete_on_s3(self, uri, [path])
            return
        with explained(uri):
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Write ``data`` to ``uri`` only if nothing is there: True if this call made it.

        Atomic, so that of two jobs creating the same file at once exactly one succeeds: on a
        local disk (NFS included) a hard link of a finished temporary file, which fails where
        the name exists (readers never see it half written); on S3 a conditional write
        (``If-None-Match: *``). A store that has no conditional writes gets a write, then a
        read-back after :data:`SETTLE_SECONDS` that must find these bytes (not atomic, but two
        jobs must then meet within that time to both win).
        """
        fs, path = self.resolve(uri)
        if isinstance(fs, pafs.S3FileSystem):
            return _create_on_s3(self, uri, path, data)
        with explained(uri):
            fs.create_dir(posixpath.dirname(path), recursive=True)
            temporary = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "wb") as f:
                f.write(data)
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(temporary)
        return True

    def replace(self, source: str, target: str) -> None:
        """Move the file ``source`` onto ``target``, replacing it.

        A rename on a local disk (atomic); on S3, which has no rename, a copy then a delete.
        """
        fs, path = self.resolve(source)
        with explained(target):
            if not isinstance(fs, pafs.S3FileSystem):
                fs.move(path, self.resolve(target)[1])
                return
            fs.copy_file(path, self.resolve(target)[1])
        self.delete_file(source)  # not pyarrow's move, which leaves a folder marker

    def remove_tree(self, uri: str) -> None:
        """Delete the folder or prefix ``uri`` and everything under it; nothing if it is absent."""
        fs, path = self.resolve(uri)
        if isinstance(fs, pafs.S3FileSystem):  # not pyarrow's delete_dir: it leaves a marker
            with explained(uri):
                infos = fs.get_file_info(
                    pafs.FileSelector(path, recursive=True, allow_not_found=True)
                )
            # its objects, and the markers of its folders and of itself where a tool left any
            folders = [i.path for i in infos if i.type == pafs.FileType.Directory] + [path]
            files = [i.path for i in infos if i.type == pafs.FileType.File]
            _delete_on_s3(self, uri, files + [f"{folder}/" for folder in folders])
            return
        with explained(uri):
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_dir(path)

    def remove_folder_markers(self, uri: str) -> None:
        """Delete the zero-byte ``folder/`` marker objects under the S3 prefix ``uri`` (and its
        own), which pyarrow's ``create_dir`` leaves where Ray Train makes its folders; nothing
        on a local disk, where folders are folders."""
        fs, path = self.resolve(uri)
        if not isinstance(fs, pafs.S3FileSystem):
            return
        bucket, _, prefix = path.partition("/")
        pages = _boto(self.endpoint).get_paginator("list_objects_v2")
        with explained(uri):
            markers = [
                f"{bucket}/{item['Key']}"
                for page in pages.paginate(Bucket=bucket, Prefix=f"{prefix}/")
                for item in page.get("Contents", [])
                if item["Key"].endswith("/") and item["Size"] == 0
            ]
        _delete_on_s3(self, uri, markers)

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
        """Fail early, naming ``root``, when outputs cannot be written there (write + delete of a
        probe of this call's own, so that jobs starting at once do not delete each other's); on
        S3, first when there are no credentials to write with (:meth:`check_credentials`)."""
        probe = join(root, f"{WRITE_PROBE}.{uuid.uuid4().hex}")
        fs = self.resolve(probe)[0]
        if isinstance(fs, pafs.S3FileSystem):
            self.check_credentials(root)  # before anything is written (a probe, a lock)
            self.file_type(root)  # a missing bucket is named as such
        self.write_bytes(probe, b"")
        with explained(root):
            self.delete_file(probe)

    def check_credentials(self, uri: str) -> None:
        """Refuse to write to the S3 ``uri`` without credentials, saying where lungseg looked.

        An endpoint may answer unsigned requests (reads of a public bucket, a test server), but
        a job that writes claims its output with a conditional write, which must be signed: a
        job without credentials is stopped here, before it writes anything (the lock above all).
        Nothing for a local ``uri``.
        """
        if urlparse(uri).scheme != "s3":
            return
        import boto3

        if boto3.Session().get_credentials() is None:
            raise StorageError(f"{uri}: {_no_credentials()}")


SETTLE_SECONDS = 1.0
"""How long a store without conditional writes is given before a created file is read back."""


def _no_credentials() -> str:
    """Where boto3's chain looked for credentials, as this process's environment sets it."""
    env = os.environ
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
    config = env.get("AWS_CONFIG_FILE") or "~/.aws/config"
    metadata = (
        "instance metadata (off: AWS_EC2_METADATA_DISABLED)"
        if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
        else "the instance's metadata service"
    )
    return (
        "no S3 credentials found, and writing needs them: lungseg looked where boto3 looks: "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, profile "
        f"{profile!r} in {shared} (AWS_SHARED_CREDENTIALS_FILE) and {config} (AWS_CONFIG_FILE), "
        f"AWS_WEB_IDENTITY_TOKEN_FILE, the container's credentials endpoint and {metadata}"
    )


@lru_cache(maxsize=8)
def _boto(endpoint: str | None):
    """A boto3 S3 client of ``endpoint``, for what pyarrow's client cannot do: conditional
    writes, and telling missing credentials from refused ones."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3})
    return boto3.client("s3", endpoint_url=endpoint, config=config)


_DELETE_BATCH = 1000  # the most keys of one S3 DeleteObjects request


def _delete_on_s3(store: Store, uri: str, paths: list[str]) -> None:
    """Delete the objects ``paths`` (``bucket/key``; absent ones are no error), without leaving
    folder markers behind as pyarrow does."""
    from botocore.exceptions import BotoCoreError, ClientError

    by_bucket: dict[str, set[str]] = {}
    for path in paths:
        bucket, _, key = path.partition("/")
        if key:
            by_bucket.setdefault(bucket, set()).add(key)
    try:
        for bucket, keys in by_bucket.items():
            ordered = sorted(keys)
            for start in range(0, len(ordered), _DELETE_BATCH):
                batch = [{"Key": key} for key in ordered[start : start + _DELETE_BATCH]]
                done = _boto(store.endpoint).delete_objects(
                    Bucket=bucket, Delete={"Objects": batch, "Quiet": True}
                )
                if done.get("Errors"):
                    first = done["Errors"][0]
                    raise StorageError(
                        f"{uri}: could not delete s3://{bucket}/{first.get('Key')}: "
                        f"{first.get('Message') or first.get('Code')}"
                    )
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(uri, exc) from exc


def _s3_error(uri: str, exc: Exception) -> StorageError:
    """A boto3 failure as the :class:`StorageError` that says why: no credentials (and where
    lungseg looked), access denied, no such bucket, as the pyarrow path says them."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{uri}: {_no_credentials()}")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        reason = next((why for c, why in _REASONS if c.replace("_", "") in code.upper()), code)
        return StorageError(f"{uri}: {reason or exc}")
    return StorageError(f"{uri}: {exc}")


def _create_on_s3(store: Store, uri: str, path: str, data: bytes) -> bool:
    """:meth:`Store.create_exclusive` on S3 (``path`` is ``bucket/key``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = path.split("/", 1)
    try:
        _boto(store.endpoint).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False  # another writer was first
        if code not in ("NotImplemented", "501"):
            raise _s3_error(uri, exc) from exc
    except BotoCoreError as exc:
        raise _s3_error(uri, exc) from exc
    if store.file_type(uri) != pafs.FileType.NotFound:  # no conditional writes: read back
        return False
    store.write_bytes(uri, data)
    time.sleep(SETTLE_SECONDS)
    try:
        return store.read_bytes(uri) == data
    except StorageError:
        return False


DEFAULT_STORE = Store()
"""Local files, and S3 objects at AWS itself: the store of a caller that names no endpoint."""
