"""Roster imports, as the CLI and a console run them: read a file, publish a version, audit it.

This sits above the store and matching: it reads the file with
:mod:`gateway.matching.roster`, hands the rows and matching's normalisation
(:data:`~gateway.matching.roster.DERIVATION`) to the store to publish, and
writes the audit event through the store's writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gateway.matching.roster import (
    DERIVATION,
    RosterMember,
    RosterOptions,
    RosterRow,
    RosterSource,
    UnreadColumn,
    open_roster,
)
from gateway.store import Store, roster_path
from gateway.store.keys import KeyRing
from gateway.store.roster_import import RosterVersion, publish_roster_version

__all__ = [
    "RosterImportReport",
    "adopt_legacy_roster",
    "import_members",
    "import_roster",
    "import_roster_file",
    "opened_store",
]


@contextlib.contextmanager
def opened_store(
    database: Path | str, clock: Callable[[], datetime] | None = None, keys: KeyRing | None = None
) -> Iterator[Store]:
    """A running store for a process that has no gateway of its own (the CLI), closed on leaving.

    Its writes go through the same writer, stamped by the same clock, and
    sealed with the same key ring (``keys``), as the server's. A version-1
    database's roster is carried over first.
    """
    store = Store(database, keys=keys, **({"clock": clock} if clock else {}))
    store.start()
    try:
        adopt_legacy_roster(store)
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def _running(target: Store | Path | str, keys: KeyRing | None = None) -> Iterator[Store]:
    # A running store is used as it is (with its key ring); a database path gets one for the call.
    if isinstance(target, Store):
        yield target
    else:
        with opened_store(target, keys=keys) as store:
            yield store


@dataclass(frozen=True, slots=True)
class RosterImportReport(RosterVersion):
    """What one roster import did (see :class:`~gateway.store.roster_import.RosterVersion`), and
    ``lock_seconds``: how long the main database's write lock was held (the audit event only).

    ``unread_columns``: the file's header cells whose values were not
    imported (unknown, a second column for one already read, no name);
    ``not_read``: the headers the file's format says Herald does not read.
    """

    lock_seconds: float = 0.0
    unread_columns: tuple[UnreadColumn, ...] = ()
    not_read: tuple[str, ...] = ()

    @property
    def warnings(self) -> list[tuple[int, str, str]]:
        """Each unread column as a (line, column, reason) warning."""
        return [u.warning() for u in self.unread_columns]


def import_roster(
    target: Store | Path | str,
    rows: Iterable[RosterRow],
    *,
    file: str,
    sha256: str = "",
    fmt: str = "csv",
    replace: bool = True,
    aco_ids: Iterable[str] = (),
    effective: str | None = None,
    skip_bad_rows: bool = False,
    by: str = "",
    now: datetime | None = None,
    unread_columns: tuple[UnreadColumn, ...] = (),
    not_read: tuple[str, ...] = (),
    keys: KeyRing | None = None,
) -> RosterImportReport:
    """Publish ``rows`` as one new roster version per ACO and audit it in the main database.

    ``target`` is a running store (its members are sealed with its key ring),
    or the main database's path (a store is opened for the call, with
    ``keys``). ``unread_columns`` and ``not_read`` (the file's columns that
    were not imported) go into the report and, by header name, into the
    audit event.

    See :func:`gateway.store.roster_import.publish_roster_version` for what a
    version does; nothing the server does waits on it. Raises
    :class:`~gateway.errors.RosterError` (nothing published) when the file is
    rejected.
    """
    with _running(target, keys) as store:
        args = (store, rows, file, sha256, fmt, replace, aco_ids, effective, skip_bad_rows, by, now)
        return _import(*args, unread_columns=unread_columns, not_read=not_read)


def _import(
    store, rows, file, sha256, fmt, replace, aco_ids, effective, skip_bad_rows, by, now, *, unread_columns, not_read
) -> RosterImportReport:
    moment = now or store.clock()
    who = by or "unknown"
    version = publish_roster_version(
        roster_path(store.path),
        rows,
        DERIVATION,
        moment=moment,
        by=who,
        file=file,
        sha256=sha256,
        fmt=fmt,
        replace=replace,
        aco_ids=aco_ids,
        effective=effective,
        skip_bad_rows=skip_bad_rows,
        keys=store.keys,
        database=store.path,  # on PostgreSQL: published to every node
    )
    detail = {
        "import": version.import_id,
        "file": Path(file).name,
        "format": fmt,
        "acos": list(version.acos),
        "by": who,
        "effective": effective,
        "added": version.added,
        "changed": version.changed,
        "ended": version.ended,
        "unchanged": version.unchanged,
        "rejected": version.rejected,
        **({"published_version": version.published_version} if version.published_version else {}),
        # Header names only, never a value: what of the file was not imported.
        "unread_columns": [
            {"position": u.position, "header": u.header.strip(), "nearest": u.nearest} for u in unread_columns
        ],
        "not_read_by_format": len(not_read),
    }
    started = time.perf_counter()
    store.record_roster_event(detail, at=moment)  # the version's own time, as roster_imports has it
    lock_seconds = time.perf_counter() - started
    values = {f.name: getattr(version, f.name) for f in dataclasses.fields(RosterVersion)}
    return RosterImportReport(
        **values, lock_seconds=lock_seconds, unread_columns=tuple(unread_columns), not_read=tuple(not_read)
    )


def import_roster_file(
    target: Store | Path | str,
    path: Path,
    options: RosterOptions | None = None,
    *,
    replace: bool = True,
    effective: str | None = None,
    skip_bad_rows: bool = False,
    by: str = "",
    now: datetime | None = None,
    on_header: Callable[[RosterSource], None] | None = None,
    keys: KeyRing | None = None,
) -> RosterImportReport:
    """Read ``path`` row by row into ``store`` as a new roster version (see :func:`import_roster`).

    Raises :class:`~gateway.errors.RosterError` with every problem (by line
    and column) when the file is rejected; nothing is written then. A
    header cell no roster column reads is reported (``unread_columns`` of
    the report), or refuses the file with ``options.strict``.
    ``on_header`` is called with the opened file once its header is
    checked, before any row is read (the CLI says the unread columns then).
    """
    options = options or RosterOptions()
    source, digest = open_roster(path, options)
    if on_header is not None:
        on_header(source)
    return import_roster(
        target,
        source.rows(),
        file=str(path),
        sha256=digest,
        fmt=source.format.name + (" (fixed width)" if source.fixed else ""),
        replace=replace,
        aco_ids=(options.aco_id,) if options.aco_id else (),
        effective=effective,
        skip_bad_rows=skip_bad_rows,
        by=by,
        now=now,
        unread_columns=source.unread,
        not_read=source.not_read,
        keys=keys,
    )


def import_members(
    target: Store | Path | str,
    members: list[RosterMember],
    source: str,
    now: datetime | None = None,
    keys: KeyRing | None = None,
) -> int:
    """Add or update ``members``, ending nobody (tests and benchmarks). Returns how many are on the roster."""
    rows = (RosterRow(n, m, (), m.aco_id, m.member_id) for n, m in enumerate(members, start=2))
    report = import_roster(target, rows, file=source, fmt="members", replace=False, by="herald", now=now, keys=keys)
    return report.added + report.changed + report.unchanged


def adopt_legacy_roster(store: Store) -> int:
    """Publish the members a schema-version-1 database kept in itself to the roster file, once.

    Version 1 stored the roster in ``herald.db``; the migration to version 3
    set those rows aside (the store cannot normalise them: that is matching's
    work). Run at start-up by the service and the CLI: when the rows are
    there and no roster file exists yet, they become its first version; the
    rows are then dropped. Returns how many members were published.
    """
    legacy = store.legacy_roster()
    if legacy is None:
        return 0
    published = roster_path(store.path)
    if not legacy or published.exists():
        store.drop_legacy_roster(None)
        return 0
    members = (RosterMember(**row) for row in legacy)
    rows = (RosterRow(n, m, (), m.aco_id, m.member_id) for n, m in enumerate(members, start=1))
    version = publish_roster_version(
        published,
        rows,
        DERIVATION,
        moment=store.clock(),
        by="herald",
        file="herald.db (schema version 1)",
        fmt="migrated",
        replace=False,
        skip_bad_rows=True,
        keys=store.keys,
        database=store.path,
    )
    detail = {
        "import": version.import_id,
        "file": "herald.db",
        "format": "migrated",
        "acos": list(version.acos),
        "added": version.rows,
    }
    store.drop_legacy_roster(detail)
    return version.added
