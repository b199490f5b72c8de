"""Output roots a careful user can trust: one job at a time, one run per root, and a ledger of
every file a run wrote, so that nothing a user made is ever removed or written over.

Before a job writes anything, :func:`claimed` makes sure that

- the output root overlaps nothing the job reads (its input and mask roots, its model and split
  files: neither inside the other), links resolved, so that a job never writes where it reads;
- no other lungseg job holds it: a lock created atomically (:meth:`Store.create_exclusive`)
  and renewed while the job runs, so that a crashed job's lock lapses;
- the root is new or empty, or holds an earlier run of the same kind of job (a segment output
  is not a training run folder, nor the reverse), which the job goes on with (``--resume``; a
  training run always) when every setting is the same, or replaces (``--overwrite``).

The ledger of a root is what its runs wrote, by key relative to the root: the manifest's
``files`` (the table, the model, a summary: each with its :func:`lungseg.io.storage.fingerprint`),
the files each row of the job's table names (with their fingerprints), the files a running job
planned to write before it wrote them (``.lungseg/planned-*.txt``, so that a killed run's
files are known too) and the folders that Ray Train writes for a training run. ``--overwrite``
removes exactly the ledger's files; a file outside the ledger in one of the job's places
(``masks/``, ``model.keras``, ...) stops the job, which names it; other files of the user's
(notes beside the outputs) are left alone. When a run completes, the files of its earlier runs
and attempts that its own outputs no longer name are removed (a mask of an image that failed
this time, an earlier report), so that no root mixes the outputs of two runs.

The manifest, ``lungseg.json``, says what made the root's outputs: the job, lungseg's version,
every setting that changes results, the ledger's files and whether the run finished.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from lungseg import __version__
from lungseg.core.errors import EXIT_IMAGES_FAILED, EXIT_OK, UserError
from lungseg.core.layout import (
    JOURNAL_SUFFIX,
    LAYOUTS,
    LEDGER_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    WRITE_PROBE,
    Layout,
)
from lungseg.io import storage
from lungseg.io.catalog import first_few
from lungseg.io.storage import StorageError, Store
from lungseg.runs import table

logger = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
"""A lock whose holder has not renewed it for this long is taken to be a crashed job's."""
HEARTBEAT_SECONDS = 20.0
"""How often a running job renews its lock."""
LEDGER_VERSION = 1
"""The manifest's ``ledger``: the manifests of lungseg before the ledger have none."""
_PLANNED = "planned-"
_PLAN_KEYS = 100_000  # keys per plan file
_KINDS = {
    "segment": "a segment output",
    "train": "a training run folder",
    "clean": "a clean output",
    "export": "a SavedModel folder",
}


def _parts(store: Store, uri: str) -> tuple[bool, tuple[str, ...]]:
    """Whether ``uri`` is on S3, and its path's components (local paths with links resolved;
    S3 keys are refused by :meth:`Store.resolve` where ``.`` or ``..`` could hide a path)."""
    fs, path = store.resolve(uri)
    remote = isinstance(fs, pafs.S3FileSystem)
    if not remote:
        path = os.path.realpath(path)
    return remote, tuple(p for p in path.split("/") if p)


def check_apart(store: Store, output: str, reads: Mapping[str, str | None]) -> None:
    """Refuse an ``output`` root that is, or is inside, or holds, anything the job reads.

    ``reads`` maps the option that names a root or a file (``--input``, ``--model``) to its
    URI (None: not given).
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


def _listed(keys: Iterable[str]) -> str:
    return first_few(sorted(keys))


def read_manifest(store: Store, root: str) -> dict | None:
    """The manifest of the outputs under ``root``, None where there is none."""
    uri = storage.join(root, MANIFEST_FILE)
    if store.file_type(uri) != pafs.FileType.File:
        return None
    try:
        return json.loads(store.read_bytes(uri))
    except ValueError as exc:
        raise UserError(f"{uri} is not a lungseg manifest ({exc}): move it away") from exc


def differences(before: Mapping, now: Mapping, within: str = "") -> list[str]:
    """What differs between two manifests' settings, one ``name: earlier -> now`` each; nested
    settings (a training recipe) by their dotted names (``recipe.batch_size: 4 -> 8``), not as
    two whole dicts."""
    out = []
    for name in sorted(set(before) | set(now)):
        old, new = before.get(name), now.get(name)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out += differences(old, new, f"{within}{name}.")
        elif old != new:
            out.append(f"{within}{name}: {old!r} -> {new!r}")
    return out


def outcome(
    images: int,
    flagged: int,
    failed_ids: Sequence[str],
    resumed: int = 0,
    review: int | None = None,
) -> dict:
    """How a finished run's images fared, as its manifest records it for a pipeline to read
    whatever a scheduler made of the exit status (``ray job submit`` shows 2 and 3 as FAILED):
    the exit status, the rows by status, those kept from an earlier run (``resumed``), the
    masks sent to review (where quality control ran) and every failed id."""
    counts = {
        "exit_status": EXIT_IMAGES_FAILED if failed_ids else EXIT_OK,
        "images": images,
        "ok": images - flagged - len(failed_ids),
        "flagged": flagged,
        "failed": len(failed_ids),
        "resumed": resumed,
    }
    if review is not None:
        counts["review"] = review
    return counts | {"failed_ids": sorted(failed_ids)}


class _Lock:
    """``<root>/.lungseg.lock``: who holds the root, created atomically, renewed every
    :data:`HEARTBEAT_SECONDS`.

    A lock whose holder is gone (a process of this machine that no longer runs, or no renewal
    for :data:`LEASE_SECONDS`) is taken over through a second atomic create, of
    ``.lungseg.lock.takeover-<its token>``: of two jobs taking over the same lapsed lock, one
    removes it and the other finds the winner's.
    """

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

    def _body(self) -> bytes:
        return json.dumps(self.record | {"renewed": time.time()}).encode()

    def _holder(self) -> dict | None:
        """The lock's record; None where there is no lock; a record that is not one (a file
        of someone else's) reads as a holder that never renewed it."""
        try:
            holder = json.loads(self.store.read_bytes(self.uri))
        except StorageError:
            return None if self.store.file_type(self.uri) == pafs.FileType.NotFound else {}
        except ValueError:
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # a process of this machine that is gone
            except PermissionError:
                pass
        try:
            renewed = float(holder.get("renewed", 0))
        except (TypeError, ValueError):
            renewed = 0.0
        return time.time() - renewed > LEASE_SECONDS

    def acquire(self) -> None:
        for _ in range(3):
            if self.store.create_exclusive(self.uri, self._body()):
                self._thread.start()
                return
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile: try again
            if not self._stale(holder):
                ago = time.time() - float(holder.get("renewed", 0))
                raise UserError(
                    f"{self.root} is in use by another lungseg job ({holder.get('job')}, pid "
                    f"{holder.get('pid')} on {holder.get('host')}, started "
                    f"{holder.get('started')}): wait for it to end, or choose another --output; "
                    f"a job that crashed gives the folder up {LEASE_SECONDS:.0f} s after its "
                    f"last sign of life ({ago:.0f} s ago)"
                )
            self._take_over(holder)
        raise UserError(f"{self.root} was claimed by another lungseg job at the same moment")

    def _take_over(self, holder: dict) -> None:
        """Remove a lapsed lock, if no other job is removing the same one."""
        marker = f"{self.uri}.takeover-{holder.get('token')}"
        if not self.store.create_exclusive(marker, self._body()):
            raise UserError(f"{self.root} was claimed by another lungseg job at the same moment")
        try:
            again = self._holder()
            if again is not None and again.get("token") == holder.get("token"):
                logger.warning(
                    "taking over %s from a %s job that is gone (pid %s on %s)",
                    self.root,
                    holder.get("job"),
                    holder.get("pid"),
                    holder.get("host"),
                )
                self.store.delete_file(self.uri)
        finally:
            self.store.delete_file(marker)

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(StorageError):
                if (self._holder() or {}).get("token") != self.token:
                    logger.error("%s: another job took this job's lock over", self.root)
                    return
                self.store.write_whole(self.uri, self._body())

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(StorageError):
            if (self._holder() or {}).get("token") == self.token:
                self.store.delete_file(self.uri)


def _internal(key: str, layout: Layout) -> bool:
    """lungseg's own bookkeeping under a root: its manifest and lock (and their temporary
    copies), its write probe, its plans and the job's table journal."""
    top = key.split("/", 1)[0]
    return (
        key in (MANIFEST_FILE, LOCK_FILE)
        or key.startswith((f"{MANIFEST_FILE}.", f"{LOCK_FILE}.", f"{WRITE_PROBE}."))
        or top == LEDGER_DIR
        or (layout.table is not None and top == layout.table + JOURNAL_SUFFIX)
    )


@dataclass
class Ledger:
    """The files that earlier runs of a job wrote under a root (key -> fingerprint; None for a
    file planned but perhaps never written), and its ``owned`` folders (all the job's)."""

    files: dict[str, str | None] = field(default_factory=dict)
    owned: tuple[str, ...] = ()

    def __contains__(self, key: str) -> bool:
        return key in self.files or key.split("/", 1)[0] in self.owned


def _plans(store: Store, root: str) -> list[str]:
    """The keys of every plan a run left under ``root``."""
    names = store.listing(storage.join(root, LEDGER_DIR))
    return [f"{LEDGER_DIR}/{name}" for name in names if name.startswith(_PLANNED)]


def _planned(store: Store, root: str, plan: str) -> list[str]:
    """The keys that the plan ``plan`` under ``root`` lists."""
    return store.read_bytes(storage.join(root, plan)).decode().splitlines()


def ledger(store: Store, root: str, manifest: Mapping, layout: Layout) -> Ledger:
    """The ledger of the runs whose manifest is ``manifest`` (see the module docstring)."""
    files: dict[str, str | None] = {}
    for plan in _plans(store, root):
        files |= dict.fromkeys(_planned(store, root, plan))
    if layout.table is not None:
        files |= table.written_files(storage.join(root, layout.table), layout.row_files, store)
    files |= manifest.get("files", {})
    return Ledger(files, layout.owned)


def _earlier(store: Store, root: str, manifest: Mapping, layout: Layout) -> Ledger:
    """The ledger of an earlier run in ``root``, refused where it is of another kind of job or
    from a lungseg without a ledger."""
    kind = manifest.get("kind") or getattr(LAYOUTS.get(manifest.get("job", "")), "kind", None)
    if kind != layout.kind:
        what = _KINDS.get(kind or "", f"the outputs of a {manifest.get('job')} job")
        raise UserError(
            f"--output {root} holds {what} ({manifest.get('job')}, {manifest.get('started')}), "
            f"not {_KINDS[layout.kind]}: lungseg never mixes the two, nor replaces one with the "
            "other; choose another --output"
        )
    if manifest.get("ledger") != LEDGER_VERSION:
        raise UserError(
            f"--output {root} holds outputs of lungseg {manifest.get('lungseg')}, which kept no "
            "ledger of the files it wrote, so lungseg cannot tell them from yours: move them "
            "away or delete them yourself, or choose another --output"
        )
    return ledger(store, root, manifest, layout)


def _remove(store: Store, root: str, keys: Iterable[str]) -> None:
    """Delete the files ``keys`` under ``root``, then the folders that this left empty."""
    folders = set()
    for key in sorted(keys):
        store.delete_file(storage.join(root, key))
        folders.update(key.rsplit("/", i)[0] for i in range(1, key.count("/") + 1))
    fs, path = store.resolve(root)
    if isinstance(fs, pafs.LocalFileSystem):
        for folder in sorted(folders, key=lambda f: -f.count("/")):
            with contextlib.suppress(OSError):  # not empty: someone else's files stay
                os.rmdir(os.path.join(path, folder))


class Claim:
    """A root held by a running job: what it writes goes through here into the ledger, and
    :meth:`finish` completes the run."""

    def __init__(
        self,
        store: Store,
        root: str,
        layout: Layout,
        manifest: dict,
        earlier: Ledger | None,
        scope: tuple[str, ...] | None = None,
    ) -> None:
        self.store, self.root, self.layout, self.manifest = store, root, layout, manifest
        self.earlier = earlier or Ledger()
        self.resumed = earlier is not None and scope is None
        self.scope = scope  # amending (a report): the only places this claim replaces
        self.written: set[str] = set()

    def uri(self, key: str) -> str:
        """The URI of ``key`` under the root."""
        return storage.join(self.root, key)

    def write(self, key: str, data: bytes) -> str:
        """Write the file ``key`` under the root, in the ledger; its URI."""
        uri = self.uri(key)
        self.store.write_bytes(uri, data)
        self._note(key, storage.fingerprint(data))
        return uri

    def record(self, key: str) -> None:
        """Put a file written otherwise (a table moved into place) in the ledger."""
        self._note(key, storage.fingerprint(self.store.read_bytes(self.uri(key))))

    def _note(self, key: str, fingerprint: str) -> None:
        self.manifest["files"][key] = fingerprint
        self.written.add(key)
        self.save()

    def plan(self, keys: Iterable[str]) -> None:
        """Note the files this run may write, before any is written: a run killed half way
        leaves files that no row names yet, and they must still be the job's. A file per
        :data:`_PLAN_KEYS` keys: a million images' 4 million keys joined at once held 407 MiB
        on the driver."""
        keys = iter(keys)
        while text := "\n".join(itertools.islice(keys, _PLAN_KEYS)):
            name = f"{_PLANNED}{uuid.uuid4().hex}.txt"
            self.store.write_bytes(storage.join(self.root, f"{LEDGER_DIR}/{name}"), text.encode())

    def save(self) -> None:
        """Write the manifest (whole: a reader never sees half of it)."""
        text = json.dumps(self.manifest, indent=2).encode()
        self.store.write_whole(self.uri(MANIFEST_FILE), text)

    def write_manifest(self, **fields) -> None:
        """Record ``fields`` (counts) in the manifest, and write it."""
        self.manifest |= fields
        self.save()

    def finish(self, **fields) -> None:
        """Complete the run: remove what its earlier runs and attempts wrote that its own
        outputs do not name, and its plans; record ``fields`` and ``state: complete``.

        The keys are compared in Arrow, a plan at a time, and the root is listed only where
        more than :data:`_LIST_OVER` are stale. A fresh run of a million images has two million
        keys in its plans and two million in its table: as Python sets they raised the
        driver's peak memory by 1,650 MiB (28.9 s); in Arrow by 227 MiB (11.7 s), measured on
        such a table and plans (the docs' performance page)."""
        plans = _plans(self.store, self.root)
        keep = pa.array(list(self.written), pa.string())
        if self.scope is None and self.layout.table is not None:
            uri = self.uri(self.layout.table)
            keep = pa.concat_arrays(
                [keep, table.written_keys(uri, self.layout.row_files, self.store)]
            )
        known = [*self.earlier.files, *self.manifest["files"]]
        candidates = itertools.chain(
            [pa.array(known, pa.string())],
            (pa.array(_planned(self.store, self.root, plan), pa.string()) for plan in plans),
        )
        stale: set[str] = set()
        for keys in candidates:
            if self.scope is not None:
                tops = pc.list_element(pc.split_pattern(keys, "/", max_splits=1), 0)
                keys = keys.filter(pc.is_in(tops, pa.array(self.scope, pa.string())))
            stale.update(keys.filter(pc.invert(pc.is_in(keys, value_set=keep))).to_pylist())
        if len(stale) > _LIST_OVER:
            present = self.store.listing(self.root)
            stale_present = [k for k in stale if k in present]
        else:  # a few: each looked up
            file = pafs.FileType.File
            stale_present = [k for k in stale if self.store.file_type(self.uri(k)) == file]
        _remove(self.store, self.root, [*stale_present, *plans])
        files = self.manifest["files"]
        self.manifest["files"] = {k: v for k, v in files.items() if k not in stale}
        if self.scope is None:
            fields = {"state": "complete", "finished": _now(), **fields}
        self.write_manifest(**fields)


_LIST_OVER = 1000
"""Stale keys above which a finishing run lists its root once, rather than looking each up."""


def _check_places(root: str, layout: Layout, listing: Mapping[str, int], known: Ledger) -> None:
    """Refuse a root with files outside the ledger in the job's places; name the others."""
    foreign = [k for k in listing if not _internal(k, layout) and k not in known]
    theirs = [k for k in foreign if k.split("/", 1)[0] in layout.makes]
    if theirs:
        raise UserError(
            f"--output {root} holds files that no lungseg run wrote where this job writes "
            f"({_listed(theirs)}): lungseg never removes or writes over them; move them away, "
            "or choose another --output"
        )
    if foreign:
        shown = _listed(foreign)
        logger.info(
            "%s: leaving alone %d files lungseg did not make: %s", root, len(foreign), shown
        )


@contextlib.contextmanager
def claimed(
    store: Store,
    root: str,
    layout: Layout,
    job: str,
    settings: Mapping,
    *,
    reads: Mapping[str, str | None] = {},
    resume: bool,
    overwrite: bool,
) -> Iterator[Claim]:
    """Hold ``root`` for one ``job`` run with ``settings`` (see the module docstring).

    ``layout`` says what the job writes; ``reads`` every root and file it reads, by option.
    ``resume`` goes on with an earlier run of the same job and settings; without it, a root
    holding an earlier run is refused unless ``overwrite``. The manifest is written at once
    (``state: running``); the caller completes the run with :meth:`Claim.finish`.
    """
    check_apart(store, root, reads)
    store.check_writable(root)
    lock = _Lock(store, root, job)
    lock.acquire()
    try:
        earlier = read_manifest(store, root)
        listing = store.listing(root)
        now = json.loads(json.dumps({"lungseg": __version__, "job": job, **settings}))
        known = None
        if earlier is None:
            theirs = [k for k in listing if not _internal(k, layout)]
            if theirs:
                raise UserError(
                    f"--output {root} holds files that lungseg did not make ({_listed(theirs)}):"
                    " choose a new or empty folder"
                )
        else:
            known = _earlier(store, root, earlier, layout)
            _check_places(root, layout, listing, known)
            before = {"lungseg": earlier.get("lungseg"), "job": earlier.get("job")}
            before |= earlier.get("settings", {})
            if overwrite:
                ours = [k for k in listing if k in known or _internal(k, layout)]
                _remove(store, root, [k for k in ours if k not in (LOCK_FILE, MANIFEST_FILE)])
                removed = sum(k in known for k in ours)
                logger.info(
                    "overwrite: removed the %d files of the earlier run in %s", removed, root
                )
                known = None
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
        manifest = {
            "lungseg": __version__,
            "job": job,
            "kind": layout.kind,
            "ledger": LEDGER_VERSION,
            "settings": {k: v for k, v in now.items() if k not in ("lungseg", "job")},
            "started": earlier["started"] if known is not None else _now(),
            "state": "running",
            "files": dict(earlier.get("files", {})) if known is not None else {},
        }
        claim = Claim(store, root, layout, manifest, known)
        claim.save()
        yield claim
    finally:
        lock.release()


@contextlib.contextmanager
def amended(
    store: Store,
    root: str,
    layout: Layout,
    job: str,
    places: tuple[str, ...],
    reads: Mapping[str, str | None] = {},
) -> Iterator[Claim]:
    """Hold the complete run in ``root`` while ``job`` adds files in ``places`` (a report into a
    segment output): they go into its ledger, replacing what an earlier ``job`` wrote there."""
    check_apart(store, root, reads)
    if read_manifest(store, root) is None:  # before the lock, which would make the folder
        raise UserError(f"{root} holds no lungseg output (no {MANIFEST_FILE})")
    lock = _Lock(store, root, job)
    lock.acquire()
    try:
        manifest = read_manifest(store, root) or {}
        known = _earlier(store, root, manifest, layout)
        if manifest.get("state") != "complete":
            raise UserError(
                f"{root} holds a {manifest.get('job')} run that did not finish: "
                "resume it (--resume) first"
            )
        _check_places(root, layout, store.listing(root), known)
        known = Ledger({k: v for k, v in known.files.items() if k.split("/", 1)[0] in places})
        yield Claim(store, root, layout, manifest, known, scope=places)
    finally:
        lock.release()
