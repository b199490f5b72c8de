"""An output root that a careful user can trust: one job at a time, one run per root.

Before a job writes anything, :func:`claimed` makes sure that

- the output root overlaps no root the job reads (neither inside the other), so that a job
  never writes where it reads;
- no other lungseg job is writing there (a lock with a heartbeat: a crashed job's lock lapses);
- the root is new or empty, or holds the outputs of an earlier lungseg run: the job then goes
  on with that run only when asked to (``--resume``; for ``train``, always) and when the earlier
  run's manifest records the same settings, else it refuses and says what differs; or it
  replaces that run (``--overwrite``), removing what the earlier run made first, so that no
  table ever points at files of another run. A root holding files that lungseg did not make is
  refused: nothing is ever written over them.

The manifest, ``lungseg.json``, says what made the root's outputs: the job, lungseg's version,
every setting that changes results, what the job writes, and whether it finished.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence

import pyarrow.fs as pafs

from lungseg import __version__, storage
from lungseg.errors import UserError
from lungseg.layout import LOCK_FILE, MANIFEST_FILE
from lungseg.storage import StorageError, Store

logger = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
"""A lock whose holder has not renewed it for this long is taken to be a crashed job's."""
HEARTBEAT_SECONDS = 20.0
"""How often a running job renews its lock."""
_PROBE = ".lungseg-write-check"
_OURS = frozenset({LOCK_FILE, _PROBE})


def _parts(store: Store, uri: str) -> tuple[bool, tuple[str, ...]]:
    """Whether ``uri`` is on S3, and its path's components (local paths with links resolved)."""
    fs, path = store.resolve(uri)
    remote = isinstance(fs, pafs.S3FileSystem)
    if not remote:
        path = os.path.realpath(path)
    return remote, tuple(p for p in path.split("/") if p)


def check_apart(store: Store, output: str, reads: Mapping[str, str | None]) -> None:
    """Refuse an ``output`` root that is, or is inside, or holds, a root the job reads.

    ``reads`` maps the option that names a root (``--input``) to its URI (None: not given).
    """
    out_remote, out = _parts(store, output)
    for option, uri in reads.items():
        if uri is None:
            continue
        remote, read = _parts(store, uri)
        if remote == out_remote and (out[: len(read)] == read or read[: len(out)] == out):
            raise UserError(
                f"--output {output} overlaps {option} {uri} (one is inside the other): a job "
                "never writes where it reads; choose an --output outside it"
            )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def read_manifest(store: Store, root: str) -> dict | None:
    """The manifest of the outputs under ``root``, None where there is none."""
    uri = storage.join(root, MANIFEST_FILE)
    if store.file_type(uri) != pafs.FileType.File:
        return None
    try:
        return json.loads(store.read_bytes(uri))
    except ValueError as exc:
        raise UserError(f"{uri} is not a lungseg manifest ({exc}): move it away") from exc


def differences(before: Mapping, now: Mapping) -> list[str]:
    """What differs between two manifests' settings, one ``name: earlier -> now`` each."""
    names = sorted(set(before) | set(now))
    return [
        f"{name}: {before.get(name)!r} -> {now.get(name)!r}"
        for name in names
        if before.get(name) != now.get(name)
    ]


class _Lock:
    """``<root>/.lungseg.lock``: who holds the root, renewed every :data:`HEARTBEAT_SECONDS`."""

    def __init__(self, store: Store, root: str, job: str) -> None:
        self.store, self.root, self.job = store, root, job
        self.uri = storage.join(root, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self.record = {
            "job": job,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _now(),
            "token": self.token,
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self.uri))
        except (StorageError, ValueError):  # gone, or half written
            return None

    def _write(self) -> None:
        record = self.record | {"renewed": time.time()}
        self.store.write_bytes(self.uri, json.dumps(record).encode())

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # a process of this machine that is gone
            except PermissionError:
                pass
        return time.time() - float(holder.get("renewed", 0)) > LEASE_SECONDS

    def acquire(self) -> None:
        holder = self._read()
        if holder is not None and not self._stale(holder):
            ago = time.time() - float(holder.get("renewed", 0))
            raise UserError(
                f"{self.root} is in use by another lungseg job ({holder.get('job')}, pid "
                f"{holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}): "
                f"wait for it to end, or choose another --output; a job that crashed gives the "
                f"folder up {LEASE_SECONDS:.0f} s after its last sign of life ({ago:.0f} s ago)"
            )
        if holder is not None:
            logger.warning(
                "taking over %s from a %s job that is gone (pid %s on %s)",
                self.root,
                holder.get("job"),
                holder.get("pid"),
                holder.get("host"),
            )
        self._write()
        if (self._read() or {}).get("token") != self.token:  # another job wrote at once
            raise UserError(f"{self.root} was claimed by another lungseg job at the same moment")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(StorageError):
                self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if (self._read() or {}).get("token") == self.token:
            fs, path = self.store.resolve(self.uri)
            with contextlib.suppress(OSError):
                fs.delete_file(path)


class Claim:
    """A root held by a running job: where its manifest goes, and how it is finished."""

    def __init__(self, store: Store, root: str, manifest: dict, resumed: bool) -> None:
        self.store, self.root, self.manifest, self.resumed = store, root, manifest, resumed

    def write_manifest(self, **fields) -> None:
        """Record ``fields`` (``state``, counts) in the manifest, and write it."""
        self.manifest |= fields
        uri = storage.join(self.root, MANIFEST_FILE)
        self.store.write_bytes(uri, json.dumps(self.manifest, indent=2).encode())


def _entries(store: Store, root: str) -> list[str]:
    """The names directly under ``root`` (none where it does not exist)."""
    fs, path = store.resolve(root)
    with storage.explained(root):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [info.base_name for info in infos]


def _remove(store: Store, root: str, names: Sequence[str]) -> None:
    """Delete the files and folders ``names`` under ``root`` (``*``: everything but ours)."""
    present = set(_entries(store, root)) - _OURS
    chosen = present if "*" in names else present & set(names)
    for name in sorted(chosen):
        uri = storage.join(root, name)
        if store.file_type(uri) == pafs.FileType.Directory:
            store.remove_tree(uri)
        else:
            fs, path = store.resolve(uri)
            with storage.explained(uri):
                fs.delete_file(path)


@contextlib.contextmanager
def claimed(
    store: Store,
    root: str,
    job: str,
    settings: Mapping,
    makes: Sequence[str],
    *,
    reads: Mapping[str, str | None] = {},
    resume: bool,
    overwrite: bool,
) -> Iterator[Claim]:
    """Hold ``root`` for one ``job`` run with ``settings`` (see the module docstring).

    ``makes`` names what the job writes directly under ``root`` (``*``: everything, a run
    folder). ``resume`` goes on with an earlier run of the same job and settings; without it, a
    root holding an earlier run is refused unless ``overwrite``. The manifest is written at once
    (``state: running``); the caller finishes it with :meth:`Claim.write_manifest`.
    """
    check_apart(store, root, reads)
    store.check_writable(root)
    lock = _Lock(store, root, job)
    lock.acquire()
    try:
        earlier = read_manifest(store, root)
        others = sorted(set(_entries(store, root)) - _OURS - {MANIFEST_FILE})
        now = json.loads(json.dumps({"lungseg": __version__, "job": job, **settings}))
        resumed = False
        if earlier is None and others:
            raise UserError(
                f"--output {root} holds files that lungseg did not make ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}): choose a new or empty folder"
            )
        if earlier is not None:
            before = {"lungseg": earlier.get("lungseg"), "job": earlier.get("job")}
            before |= earlier.get("settings", {})
            if overwrite:
                _remove(store, root, earlier.get("makes", []))
                logger.info("overwrite: removed the outputs of the earlier run in %s", root)
            elif not resume:
                raise UserError(
                    f"--output {root} holds the outputs of an earlier run ({earlier.get('job')}, "
                    f"{earlier.get('started')}, {earlier.get('state')}): pass --resume to go on "
                    "with it, --overwrite to replace it, or choose another --output"
                )
            elif differences(before, now):
                raise UserError(
                    f"--output {root} holds a run with other settings, which --resume would mix "
                    f"with this one: {'; '.join(differences(before, now))} (earlier -> now); "
                    "use the earlier settings, --overwrite, or another --output"
                )
            else:
                resumed = True
        manifest = {
            "lungseg": __version__,
            "job": job,
            "settings": {k: v for k, v in now.items() if k not in ("lungseg", "job")},
            "makes": list(makes),
            "started": earlier["started"] if resumed else _now(),
            "state": "running",
        }
        claim = Claim(store, root, manifest, resumed)
        claim.write_manifest()
        yield claim
    finally:
        lock.release()
