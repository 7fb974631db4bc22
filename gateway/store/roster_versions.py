"""The roster on PostgreSQL: each published version of the roster file, for every node to follow.

Each node matches against a roster file of its own (``roster.db`` in its
folder, see :mod:`gateway.store.roster_file`): its workers read it, its PHI is
sealed. With a PostgreSQL store several nodes share one database, so an import
on one node publishes the file it built to all of them, and the same never
half-an-import rule holds across nodes:

- the import builds the new file as on SQLite (a private copy in its folder),
  then, in ONE transaction, adds a ``roster_versions`` row (its number, SHA-256
  and size) and its bytes (``roster_chunks``) and drops the versions older than
  the newest :data:`KEEP_VERSIONS`; only once that has committed is the copy
  renamed over the node's own file. Imports on any node run one at a time
  (:data:`ROSTER_LOCK`), each built on the newest published version;
- every node follows (:class:`RosterFollower`): it asks for the newest version
  number (one read of the table's key, every :data:`FOLLOW_SECONDS`) and, when
  it is newer than its file's, downloads it into a private temporary file in
  its folder, checks its SHA-256 and size, makes it durable and renames it over
  its file. Its readers move to it between batches by file identity, as after
  a local import.

A version is in the table whole or not at all, and a file is renamed into
place whole or not at all: no node reads half of one. The bytes are those of
the file, its PHI sealed under the key ring: the database holds no more PHI in
clear than the file does. The file says which version it is (``roster_meta``
:data:`~gateway.store.roster_file.PUBLISHED_VERSION`), so a node knows its
version without hashing its file. The bytes go in chunks of
:data:`CHUNK_BYTES`: one PostgreSQL value holds at most 1 GB, and neither side
holds a whole file in memory.

On SQLite (one node) the tables stay empty: the node's file is the roster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import socket
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from gateway.errors import StoreError
from gateway.store.files import create_private_file
from gateway.store.postgres import PostgresDatabase, connect
from gateway.store.roster_file import (
    PUBLISHED_VERSION,
    ROSTER_SCHEMA_VERSION,
    _file_identity,
    roster_lock,
    roster_path,
)

__all__ = [
    "CHUNK_BYTES",
    "FOLLOW_SECONDS",
    "KEEP_VERSIONS",
    "ROSTER_LOCK",
    "ROSTER_VERSIONS_SCHEMA",
    "PublishedVersion",
    "RosterFollower",
    "RosterPublication",
    "follow_published_roster",
    "install_newest",
    "local_version",
    "newest_version",
    "publication",
    "published_versions",
    "upload_version",
]

_log = Logger()

#: The tables (migration 11 of :mod:`gateway.store.schema`; created on both engines, used on PostgreSQL).
ROSTER_VERSIONS_SCHEMA = """
CREATE TABLE roster_versions (
    version BIGINT NOT NULL PRIMARY KEY,
    published_at TEXT NOT NULL,
    imported_by TEXT NOT NULL,
    node TEXT NOT NULL,
    kind TEXT NOT NULL,
    import_id INTEGER NOT NULL DEFAULT 0,
    roster_schema INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunks INTEGER NOT NULL
);
CREATE TABLE roster_chunks (
    version BIGINT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (version, seq)
)
"""

#: The session advisory lock an import (or a rotation) holds from before it copies the newest
#: version to after it has published its own: one at a time across nodes, each built on the last.
ROSTER_LOCK = 0x4845524C52  # "HERLR"
#: Bytes per roster_chunks row.
CHUNK_BYTES = 4 << 20
#: Published versions kept (the newest, and the one before for a node still on it); older ones go.
KEEP_VERSIONS = 2
#: How often a node looks for a newer version (seconds).
FOLLOW_SECONDS = 5.0

_COLUMNS = "version, published_at, imported_by, node, kind, import_id, roster_schema, sha256, size, chunks"


@dataclass(frozen=True, slots=True)
class PublishedVersion:
    """One published roster version (a ``roster_versions`` row)."""

    version: int
    published_at: str
    imported_by: str
    node: str
    kind: str  # "import", or "rotation" (every member sealed again under a new key)
    import_id: int  # the file's newest roster_imports id
    roster_schema: int  # the file's roster schema version (user_version)
    sha256: str
    size: int
    chunks: int


# -- reading the table ---------------------------------------------------------------------


def newest_version(conn) -> int:
    """The newest published version's number (0: none yet). One read of the table's key."""
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM roster_versions").fetchone()[0]


def published_versions(conn, limit: int = 20) -> list[PublishedVersion]:
    """The published versions still kept, newest first."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM roster_versions ORDER BY version DESC LIMIT ?", (limit,))
    return [PublishedVersion(*r) for r in rows.fetchall()]


def local_version(path: Path) -> int:
    """The published version the roster file at ``path`` is (0: none, or a file never published)."""
    if not path.exists():
        return 0
    uri = f"file:{urllib.parse.quote(str(path))}?immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return 0
    try:
        row = conn.execute("SELECT value FROM roster_meta WHERE name = ?", (PUBLISHED_VERSION,)).fetchone()
    except sqlite3.Error:  # an empty or foreign file: not a published version
        return 0
    finally:
        conn.close()
    return int(row[0]) if row else 0


# -- publishing ----------------------------------------------------------------------------


def upload_version(
    conn,
    work: Path,
    version: int,
    *,
    published_at: str,
    imported_by: str,
    kind: str,
    import_id: int,
    roster_schema: int = ROSTER_SCHEMA_VERSION,
    node: str | None = None,
) -> PublishedVersion:
    """Publish the finished roster file ``work`` as ``version``, in one transaction: its row, its bytes,
    and the versions beyond the newest :data:`KEEP_VERSIONS` dropped. All of it, or nothing.

    Refused (:class:`StoreError`) when ``version`` is not newer than the newest published.
    """
    conn.execute("BEGIN")
    try:
        newest = newest_version(conn)
        if newest >= version:
            raise StoreError(f"roster version {newest} was published meanwhile; nothing was published, import again")
        digest = hashlib.sha256()
        size = chunks = 0
        with open(work, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                conn.execute(
                    "INSERT INTO roster_chunks (version, seq, data) VALUES (?, ?, ?)", (version, chunks, chunk)
                )
                digest.update(chunk)
                size += len(chunk)
                chunks += 1
        record = PublishedVersion(
            version,
            published_at,
            imported_by,
            node or socket.gethostname(),
            kind,
            import_id,
            roster_schema,
            digest.hexdigest(),
            size,
            chunks,
        )
        _insert_version(conn, record)
        _prune(conn)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # a broken connection has no transaction to roll back
            conn.rollback()
        raise
    return record


def _insert_version(conn, record: PublishedVersion) -> None:
    marks = ", ".join("?" * len(_COLUMNS.split(",")))
    conn.execute(f"INSERT INTO roster_versions ({_COLUMNS}) VALUES ({marks})", dataclasses.astuple(record))


def _prune(conn) -> None:
    """Drop every version but the newest :data:`KEEP_VERSIONS` (in the publishing transaction)."""
    kept = f"SELECT version FROM roster_versions ORDER BY version DESC LIMIT {KEEP_VERSIONS}"
    conn.execute(f"DELETE FROM roster_chunks WHERE version NOT IN ({kept})")
    conn.execute(f"DELETE FROM roster_versions WHERE version NOT IN ({kept})")


class RosterPublication:
    """An import's (or a rotation's) hold on the published roster, on PostgreSQL.

    Entered with this node's roster lock held: it takes :data:`ROSTER_LOCK`
    (waiting for another node's import to publish), brings the node's file
    to the newest published version so the new one is built on it, and
    numbers the new version (:attr:`version`). :meth:`stamp` writes that
    number into the work copy, :meth:`publish` publishes the finished copy
    (before it is renamed into place). Leaving releases the lock.
    """

    def __init__(self, location: PostgresDatabase, published: Path, *, by: str, at: str, kind: str) -> None:
        self.location = location
        self.published = published
        self.by, self.at, self.kind = by, at, kind
        self.version = 0
        self.import_id = 0
        self.record: PublishedVersion | None = None
        self._conn = None

    def __enter__(self) -> RosterPublication:
        conn = self._conn = connect(self.location)
        try:
            conn.execute("SELECT pg_advisory_lock(?)", (ROSTER_LOCK,))
            install_newest(conn, self.published)
            # Past the file's own number too (a database emptied and started again): followers move on.
            self.version = max(newest_version(conn), local_version(self.published)) + 1
        except sqlite3.Error as e:
            self.__exit__()
            raise StoreError(f"fetching the newest published roster version failed: {e}") from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("SELECT pg_advisory_unlock(?)", (ROSTER_LOCK,))
            self._conn.close()  # releases the lock in any case
            self._conn = None

    def stamp(self, roster: sqlite3.Connection, import_id: int) -> None:
        """Write the new version's number into the work copy (its own transaction), before it is closed."""
        self.import_id = import_id
        roster.execute(
            "INSERT OR REPLACE INTO roster_meta (name, value) VALUES (?, ?)", (PUBLISHED_VERSION, str(self.version))
        )

    def publish(self, work: Path) -> PublishedVersion:
        """Publish the finished, durable work copy to every node (one transaction; see :func:`upload_version`)."""
        try:
            self.record = upload_version(
                self._conn,
                work,
                self.version,
                published_at=self.at,
                imported_by=self.by,
                kind=self.kind,
                import_id=self.import_id,
            )
        except sqlite3.Error as e:
            raise StoreError(f"publishing roster version {self.version} failed: {e}; nothing was published") from None
        _log.info(
            "published roster version {version} ({size} bytes, sha256 {sha256})",
            version=self.version,
            size=self.record.size,
            sha256=self.record.sha256,
        )
        return self.record


@contextlib.contextmanager
def publication(
    database: Path | str | PostgresDatabase | None, published: Path, *, by: str, at: str, kind: str = "import"
) -> Iterator[RosterPublication | None]:
    """A :class:`RosterPublication` when the main database is on PostgreSQL; None on SQLite (nothing to do)."""
    if not isinstance(database, PostgresDatabase):
        yield None
        return
    with RosterPublication(database, published, by=by, at=at, kind=kind) as shared:
        yield shared


# -- following -----------------------------------------------------------------------------


def install_newest(conn, path: Path) -> int | None:
    """Bring the roster file at ``path`` to the newest published version, if that is newer than it.

    The caller holds the node's roster lock. The version is read in one
    snapshot (a version dropped meanwhile is still read whole), written to a
    private temporary file beside ``path``, checked (SHA-256, size, the version
    it says it is) and made durable, then renamed over ``path``. Returns the
    version installed, or None when the file is already the newest. On a
    mismatch (:class:`StoreError`) the temporary file goes and ``path`` is kept.
    """
    local = local_version(path)
    temp = path.with_name(path.name + ".following")
    conn.execute("BEGIN")
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute(f"SELECT {_COLUMNS} FROM roster_versions ORDER BY version DESC LIMIT 1").fetchone()
        if row is None or row[0] <= local:
            conn.execute("COMMIT")
            return None
        record = PublishedVersion(*row)
        if record.roster_schema > ROSTER_SCHEMA_VERSION:
            raise StoreError(
                f"roster version {record.version} has roster schema version {record.roster_schema}, newer than "
                f"this Herald's {ROSTER_SCHEMA_VERSION}; upgrade Herald (this node keeps version {local})"
            )
        digest = hashlib.sha256()
        size = 0
        temp.unlink(missing_ok=True)  # a crashed download's leftover
        create_private_file(temp)
        with open(temp, "wb") as f:
            for seq in range(record.chunks):
                data = _chunk(conn, record.version, seq)
                f.write(data)
                digest.update(data)
                size += len(data)
            f.flush()
            os.fsync(f.fileno())
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.rollback()
        temp.unlink(missing_ok=True)
        raise
    try:
        if (digest.hexdigest(), size) != (record.sha256, record.size):
            raise StoreError(
                f"roster version {record.version}: the downloaded file does not match what was published "
                f"(sha256 {digest.hexdigest()}, {size} bytes; published {record.sha256}, {record.size} bytes); "
                f"refused, this node keeps version {local}"
            )
        found = local_version(temp)
        if found != record.version:
            raise StoreError(
                f"roster version {record.version}: the downloaded file says it is version {found}; "
                f"refused, this node keeps version {local}"
            )
        _replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return record.version


def _chunk(conn, version: int, seq: int) -> bytes:
    row = conn.execute("SELECT data FROM roster_chunks WHERE version = ? AND seq = ?", (version, seq)).fetchone()
    if row is None:
        raise StoreError(f"roster version {version} lacks its chunk {seq}")
    return bytes(row[0])


def _replace(temp: Path, path: Path) -> None:
    """Rename the durable ``temp`` over ``path`` (atomic for readers) and make the rename durable."""
    os.replace(temp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RosterFollower:
    """Keeps one node's roster file at the newest version published in its PostgreSQL store.

    One a node (its server process: ``gateway.app.roster_follow``): the
    download happens once, and the node's readers (the pipeline's workers,
    the transitions service, the console) follow the file by its identity.
    :meth:`follow` is cheap to call often (it looks at most every
    ``interval`` seconds); :meth:`follow_now` looks now. Keeps one connection,
    opened again after a failure. Not thread-safe: one call at a time.
    """

    def __init__(
        self,
        location: PostgresDatabase,
        *,
        interval: float = FOLLOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.location = location
        self.path = roster_path(location)
        self.interval = interval
        self._clock = clock
        self._due = 0.0
        self._conn = None
        self._local: tuple[object, int] = (None, 0)

    def follow(self) -> int | None:
        """:meth:`follow_now`, if the last look was ``interval`` seconds ago or more; else None."""
        now = self._clock()
        if now < self._due:
            return None
        self._due = now + self.interval
        return self.follow_now()

    def follow_now(self) -> int | None:
        """Install the newest published version if it is newer than the node's file: the version installed, or None.

        None too when this node's roster lock is held (its own import, which
        installs the newest version itself). Raises :class:`StoreError` when
        the server cannot be read or a download is refused (the file is kept).
        """
        try:
            conn = self._connection()
            newest = newest_version(conn)
            if newest <= self.local_version():
                return None
            with roster_lock(self.path, wait=False) as lock:
                if not lock.held:
                    return None
                installed = install_newest(conn, self.path)
        except sqlite3.Error as e:
            self.close()  # a broken connection is opened again next time
            raise StoreError(f"following the published roster failed: {e}") from None
        except OSError as e:  # the node's folder (a full disk, no permission to write it)
            raise StoreError(f"following the published roster failed: {e}") from None
        if installed is not None:
            _log.info("installed published roster version {version}", version=installed)
        return installed

    def local_version(self) -> int:
        """The node's file's published version (read again only when the file has been replaced)."""
        identity = _file_identity(self.path)
        if identity is None:
            return 0
        if self._local[0] != identity:
            self._local = (identity, local_version(self.path))
        return self._local[1]

    def _connection(self):
        if self._conn is None:
            self._conn = connect(self.location)
        return self._conn

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def follow_published_roster(location: Path | str | PostgresDatabase) -> int | None:
    """Once: bring this node's roster file to the newest published version (None: nothing to do, or SQLite).

    For a process that reads the roster without a server of its own (the
    CLI); a server follows with :class:`RosterFollower`.
    """
    if not isinstance(location, PostgresDatabase):
        return None
    follower = RosterFollower(location)
    try:
        return follower.follow_now()
    finally:
        follower.close()
