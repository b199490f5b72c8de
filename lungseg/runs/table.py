"""The one Parquet table a job writes on its driver, row by row as results arrive, with the
journal that lets an interrupted job resume. No Ray here: rows come as pyarrow tables from any
iterable (a Ray dataset's batches, or rows made in this process)."""

from __future__ import annotations

import bisect
import logging
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lungseg.core.layout import ERROR, JOURNAL_SUFFIX, LOST
from lungseg.io import storage
from lungseg.io.catalog import Case
from lungseg.io.storage import Store

logger = logging.getLogger(__name__)

_PART = re.compile(r"part-(\d+)\.parquet")
_FRESH = "fresh"  # marks a journal begun by a fresh run: the table beside it is stale
_TABLE = "table.parquet.tmp"  # the table being written, moved onto its place when complete


def _journal(uri: str) -> str:
    """The folder beside a job's table where it keeps its rows while it runs."""
    return f"{uri}{JOURNAL_SUFFIX}"


def _journal_parts(uri: str, store: Store) -> tuple[list[str], bool]:
    """The journal's part files (paths, in order) and whether a fresh run started it."""
    files = {posixpath.basename(p): p for p in store.list_files(_journal(uri))}
    parts = sorted((int(m[1]), p) for name, p in files.items() if (m := _PART.fullmatch(name)))
    return [path for _, path in parts], _FRESH in files


def previous_rows(uri: str, schema: pa.Schema, store: Store) -> list[dict]:
    """The rows that earlier runs of a job left at ``uri``, for a resumed run to choose from.

    The complete table, unless the last run started afresh and was interrupted (its journal
    says so), then the journal's parts in the order written: a later row of an id replaces an
    earlier one. Unreadable files (a part cut short by a crash) and tables that lack a column of
    ``schema`` (written by an earlier lungseg) are skipped with a message.
    """
    fs, path = store.resolve(uri)
    parts, fresh = _journal_parts(uri, store)
    with storage.explained(uri):
        table_exists = fs.get_file_info(path).type == pafs.FileType.File
    rows: dict[str, dict] = {}
    for file in [path, *parts] if table_exists and not fresh else parts:
        try:
            missing = set(schema.names) - set(pq.read_schema(file, filesystem=fs).names)
            if missing:
                logger.warning(
                    "resume: ignoring %s, written without the columns %s: its images are "
                    "done again",
                    file,
                    ", ".join(sorted(missing)),
                )
                continue
            table = pq.read_table(file, filesystem=fs, schema=schema)
        except (OSError, pa.ArrowException) as exc:
            logger.warning("resume: ignoring unreadable %s: %s", file, exc)
            continue
        rows.update((row["id"], row) for row in table.to_pylist())
    return list(rows.values())


def _row_file_tables(
    uri: str, columns: Sequence[str], store: Store
) -> Iterator[tuple[pa.Table, list[str]]]:
    """The table at ``uri`` and its journal's parts, in the order written, each read as its
    ``columns`` that it has (the second value) and their ``<column>_fingerprint``."""
    fs, path = store.resolve(uri)
    parts, _ = _journal_parts(uri, store)
    with storage.explained(uri):
        tables = [path] if fs.get_file_info(path).type == pafs.FileType.File else []
    for file in [*tables, *parts]:
        try:
            names = set(pq.read_schema(file, filesystem=fs).names)
            wanted = [c for c in columns if c in names]
            prints = [f"{c}_fingerprint" for c in wanted if f"{c}_fingerprint" in names]
            yield pq.read_table(file, filesystem=fs, columns=wanted + prints), wanted
        except (OSError, pa.ArrowException) as exc:
            logger.warning("ignoring unreadable %s: %s", file, exc)


def written_files(uri: str, columns: Sequence[str], store: Store) -> dict[str, str | None]:
    """The files that the rows of the table at ``uri`` and of its journal name in ``columns``
    (keys relative to the output root), each with the fingerprint in ``<column>_fingerprint``
    (None where a table has no such column); a later row's wins."""
    files: dict[str, str | None] = {}
    for read, wanted in _row_file_tables(uri, columns, store):
        for row in read.to_pylist():
            files |= {row[c]: row.get(f"{c}_fingerprint") for c in wanted if row[c]}
    return files


def written_keys(uri: str, columns: Sequence[str], store: Store) -> pa.Array:
    """The keys of :func:`written_files`, as one Arrow array (repeats kept, no fingerprints):
    what a finishing run keeps, without a Python string per file (:meth:`lungseg.runs.outputs.
    Claim.finish` has the figures)."""
    chunks = [
        read[c].combine_chunks().drop_null()
        for read, wanted in _row_file_tables(uri, columns, store)
        for c in wanted
    ]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def failed_ids(rows: pa.Table) -> list[str]:
    """The ids of the ``error`` rows of a table of rows."""
    statuses = rows["status"].to_pylist()
    return [
        i for i, status in zip(rows["id"].to_pylist(), statuses, strict=True) if status == ERROR
    ]


def write_table(
    batches: Iterable[pa.Table],
    uri: str,
    schema: pa.Schema,
    cases: Sequence[Case],
    store: Store,
    on_table: Callable[[pa.Table], None] | None = None,
    known: Sequence[dict] = (),
    resume: bool = False,
) -> Counter[str]:
    """On the driver, stream ``batches`` into ONE Parquet file at ``uri``; count rows by status.

    ``batches`` hold exactly the (scalar) columns of ``schema``, among them ``id``, ``source``,
    ``status`` and ``error``; ``known`` rows (kept by a resumed run, or already on the driver)
    come first. Each case gets exactly one row: a repeated id (Ray running a batch again after a
    failure) keeps its first row, and a case whose id never came out of the pipeline gets an
    ``error`` row "lost by the pipeline". ``on_table`` sees every table as it is written.

    While it runs, each batch of rows also goes to a journal, ``<uri>.parts/``, for
    :func:`previous_rows` to read after an interruption; a fresh run (not ``resume``) first
    clears the journal of earlier runs. The table is written in the journal and moved onto
    ``uri`` when complete, so an earlier table stays whole until then; then the journal goes.
    """
    journal = _journal(uri)
    if resume:
        parts, _ = _journal_parts(uri, store)
    else:
        store.remove_tree(journal)
        store.write_bytes(storage.join(journal, _FRESH), b"")
        parts = []
    ids = sorted(case.id for case in cases)  # the cases' own strings: a set of a million
    seen = bytearray(len(ids))  # row ids (new strings) held 90 MiB; a byte per case instead
    others: set[str] = set()  # ids of no case: never expected, still written once
    statuses: Counter[str] = Counter()

    def first_time(case_id: str) -> bool:
        k = bisect.bisect_left(ids, case_id)
        if k < len(ids) and ids[k] == case_id:
            new, seen[k] = not seen[k], 1
            return new
        new = case_id not in others
        others.add(case_id)
        return new

    def account(table: pa.Table) -> pa.Table:
        first = [i for i, case_id in enumerate(table["id"].to_pylist()) if first_time(case_id)]
        table = table.take(pa.array(first, pa.int64()))
        statuses.update(table["status"].to_pylist())
        if on_table is not None:
            on_table(table)
        return table

    written = storage.join(journal, _TABLE)
    with (
        store.open_output(written) as stream,
        pq.ParquetWriter(stream, schema) as writer,
    ):
        writer.write_table(account(pa.Table.from_pylist(list(known), schema)))
        for batch in batches:
            table = account(batch.cast(schema))
            if table.num_rows:
                part = storage.join(journal, f"part-{len(parts):06d}.parquet")
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink)
                store.write_bytes(part, sink.getvalue().to_pybytes())
                parts.append(part)
                writer.write_table(table)
        lost_ids = {case_id for case_id, done in zip(ids, seen, strict=True) if not done}
        lost = [case for case in cases if case.id in lost_ids]
        why = {"status": ERROR, "error": LOST}
        rows_lost = [
            dict.fromkeys(schema.names) | {"id": c.id, "source": c.image} | why for c in lost
        ]
        writer.write_table(account(pa.Table.from_pylist(rows_lost, schema)))
    store.replace(written, uri)
    store.remove_tree(journal)
    return statuses
