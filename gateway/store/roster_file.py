"""The roster file, read side: one published version of the attribution roster, and its lookups.

The roster lives in ``roster.db`` beside the main database and is never
modified in place once published: an import (:mod:`gateway.store.roster_import`)
copies it, applies the new version to the copy and renames it over
``roster.db``. Readers open the file read-only and ``immutable`` and reopen
it when it has been replaced (between pipeline batches), so intake never
waits on an import and a query never sees half of one. Confirmed MRN links
and the review queue stay in the main database (the server writes them).
With a PostgreSQL store each node has its own file, kept at the version
published from any node (:mod:`gateway.store.roster_versions`).

From schema version 3 a member's identifying values are sealed (one ``phi``
value a member, and its normalised ``person``), and everything found by
equality (MBI, MRN, blocking keys, name and birth-date terms) is a keyed hash
(:mod:`gateway.store.sealing`). A reader opens them with the key ring it is
given; a file of an older version is read as it is, in plaintext.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

from gateway.errors import StoreError
from gateway.records import MEMBER_COLUMNS
from gateway.store.files import private_folder
from gateway.store.keys import KeyRing, KeyRingError
from gateway.store.postgres import column_names
from gateway.store.schema import run_sql
from gateway.store.sealing import (
    ROSTER_PHI_COLUMNS,
    block_hash,
    keys_of,
    mbi_hash,
    mrn_hash,
    mrn_hashes,
    roster_context,
    term_hash,
)

__all__ = [
    "ROSTER_FILE",
    "ROSTER_SCHEMA_VERSION",
    "RosterReader",
    "RosterSnapshot",
    "StoredRoster",
    "key_id",
    "lookup_ring",
    "open_roster_snapshot",
    "roster_count",
    "roster_imports",
    "roster_member",
    "roster_lock",
    "roster_path",
]

#: The roster file's name, in the main database's folder.
ROSTER_FILE = "roster.db"
#: Its schema version (``PRAGMA user_version``); a newer one is refused.
ROSTER_SCHEMA_VERSION = 3
#: The first schema version whose members are sealed and whose lookups are keyed hashes.
SEALED_SINCE = 3
#: The roster_meta row naming the version a file was published as to every node of a PostgreSQL
#: store (:mod:`gateway.store.roster_versions`); a file of a SQLite store has none.
PUBLISHED_VERSION = "published_version"

#: What brings a roster file of the version before up to each version. An
#: import applies them to its copy (so the next published file is current);
#: a reader of an older file, which it never writes, reads what a migration
#: adds as its default (:data:`_ADDED_IN`).
ROSTER_MIGRATIONS = {
    # Version 2: the member's generational name suffix (JR, III, ...), and how many current
    # members carry each name and birth date (filled by the import that upgrades the file).
    2: "ALTER TABLE roster_members ADD COLUMN name_suffix TEXT NOT NULL DEFAULT '';\n"
    "CREATE TABLE roster_terms (term TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID",
    # Version 3: PHI at rest. A member's identifying values are sealed together in `phi`
    # (their own columns then hold ''), its person sealed in place; the MBI and MRN are
    # found by keyed hashes. The import that upgrades a file seals every member and hashes
    # its keys and terms again (gateway.store.roster_import.seal_members); roster_meta's
    # lookup_check names the key ring.
    3: "ALTER TABLE roster_members ADD COLUMN phi BLOB;\n"
    "ALTER TABLE roster_members ADD COLUMN mbi_hash TEXT NOT NULL DEFAULT '';\n"
    "ALTER TABLE roster_members ADD COLUMN mrn_hash TEXT NOT NULL DEFAULT '';\n"
    "DROP INDEX IF EXISTS roster_mbi;\n"
    "DROP INDEX IF EXISTS roster_mrn;\n"
    "CREATE INDEX roster_mbi ON roster_members (mbi_hash) WHERE mbi_hash != '';\n"
    "CREATE INDEX roster_mrn ON roster_members (mrn_hash, mrn_authority COLLATE NOCASE) WHERE mrn_hash != ''",
}
#: The member columns a migration added, by the version that added them.
_ADDED_IN = {"name_suffix": 2}


#: What a lookup returns of a member: the contract's columns and the normalised
#: person (``gateway.matching.pack_person``), so scoring does no normalising.
_ROW_COLUMNS = (*MEMBER_COLUMNS, "person")


def _member_select(version: int) -> str:
    """The select list of a member in a roster file of schema ``version`` (a column it lacks reads as ''),
    and last its sealed values (``phi``; NULL before version 3)."""
    if version >= SEALED_SINCE:
        columns = ["''" if c in ROSTER_PHI_COLUMNS else f"r.{c}" for c in _ROW_COLUMNS]
        return ", ".join([*columns, "r.phi"])
    columns = [f"'' AS {c}" if _ADDED_IN.get(c, 0) > version else f"r.{c}" for c in _ROW_COLUMNS]
    return ", ".join([*columns, "NULL"])


ROSTER_SCHEMA = (
    "CREATE TABLE roster_members (id INTEGER PRIMARY KEY, "
    + ", ".join(
        f"{c} INTEGER NOT NULL DEFAULT 0" if c == "opted_out" else f"{c} TEXT NOT NULL DEFAULT ''"
        for c in MEMBER_COLUMNS
    )
    + """,
    person TEXT NOT NULL DEFAULT '',
    row_hash BLOB,
    import_id INTEGER NOT NULL,
    ended_by INTEGER,
    phi BLOB,
    mbi_hash TEXT NOT NULL DEFAULT '',
    mrn_hash TEXT NOT NULL DEFAULT '',
    UNIQUE (aco_id, member_id)
);
CREATE INDEX roster_mbi ON roster_members (mbi_hash) WHERE mbi_hash != '';
CREATE INDEX roster_mrn ON roster_members (mrn_hash, mrn_authority COLLATE NOCASE) WHERE mrn_hash != '';
CREATE INDEX roster_end ON roster_members (effective_end);
CREATE TABLE roster_keys (
    key INTEGER NOT NULL,
    member INTEGER NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
CREATE TABLE roster_imports (
    id INTEGER PRIMARY KEY,
    imported_at TEXT NOT NULL,
    imported_by TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    format TEXT NOT NULL,
    mode TEXT NOT NULL,
    aco_ids TEXT NOT NULL,
    effective_date TEXT,
    rows INTEGER NOT NULL DEFAULT 0,
    added INTEGER NOT NULL DEFAULT 0,
    changed INTEGER NOT NULL DEFAULT 0,
    ended INTEGER NOT NULL DEFAULT 0,
    unchanged INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE roster_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE roster_terms (term TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID
"""
)


#: How much of the roster file a reader maps into memory (address space; the pages are the OS's cache).
_ROSTER_MMAP_BYTES = 1 << 32
#: Opened persons a snapshot keeps (about 150 bytes each).
_PERSON_CACHE = 100_000


def roster_path(db_path: Path | str) -> Path:
    """The roster file that goes with the main database ``db_path``."""
    return Path(db_path).with_name(ROSTER_FILE)


def key_id(key: str) -> int:
    """A blocking key as roster files before version 3 store it: an unkeyed signed 64-bit hash."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


def lookup_ring(found: str | None, keys: KeyRing, path: Path | str) -> KeyRing:
    """The ring a roster file's keyed hashes were made with (``found``: its lookup_check), given ``keys``.

    A file written with encryption off hashed under the disabled ring's public
    key, which any ring can recompute; one written with another key is refused.
    """
    if found is None or found == keys.fingerprint:
        return keys
    if found == KeyRing.disabled().fingerprint:
        return KeyRing.disabled()
    if not keys.enabled:
        raise KeyRingError(
            f"{path} is encrypted (key check {found}) but encryption at rest is off: "
            "set [security] key_file (or HERALD_KEYS) to its key ring"
        )
    raise KeyRingError(
        f"{path} was written with another key ring (key check {found}; {keys.source} has {keys.fingerprint}): "
        "is [security] key_file (or HERALD_KEYS) the right one?"
    )


class roster_lock:  # noqa: N801 - used as a context manager, named for what it holds
    """The lock that serialises changes to one node's roster file (``roster.lock`` beside it; ``flock``).

    Held by an import (or a rotation) from its copy to its rename, and by a
    download of a version published from another node
    (:mod:`gateway.store.roster_versions`). With ``wait=False`` it is not waited
    for: :attr:`held` says whether it was taken.
    """

    def __init__(self, path: Path, *, wait: bool = True) -> None:
        self.path = path.with_name(path.name.replace(".db", ".lock"))
        self.wait = wait
        self.held = False
        self._fd: int | None = None

    def __enter__(self) -> roster_lock:
        import fcntl

        if not self.path.parent.exists():
            private_folder(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))  # another import finishes first
        except BlockingIOError:
            os.close(fd)
            return self
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.held = True
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            self.held = False


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class RosterSnapshot:
    """One published version of the roster, read-only.

    The file is never modified in place (an import replaces it whole), so it is
    opened ``immutable``: no locks, no journal checks, and the connection keeps
    reading the version it opened even after a newer one is renamed over it.
    With no roster file yet, the snapshot is an empty roster. A file of an
    older schema version is read as it is (``member_select`` gives a column it
    lacks as ''; its values and lookups are plaintext); the next import
    upgrades it. ``keys`` opens the sealed values; the keyed hashes are those
    of the ring the file was written with (:func:`lookup_ring`).
    """

    def __init__(self, path: Path, keys: KeyRing | None = None) -> None:
        self.path = path
        self.keys = keys or KeyRing.disabled()
        # Identity first, then open: if an import lands in between, the identity is
        # the older file's and the next check reopens (never the other way round).
        self.identity = _file_identity(path)
        found = ROSTER_SCHEMA_VERSION
        if self.identity is None:
            self.conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            run_sql(self.conn, ROSTER_SCHEMA)
        else:
            uri = f"file:{urllib.parse.quote(str(path))}?immutable=1"
            self.conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            # Memory-mapped reads: a query touches a few hundred random pages, each a syscall and a
            # copy otherwise. Safe here: the file is never written or truncated once published.
            self.conn.execute(f"PRAGMA mmap_size={_ROSTER_MMAP_BYTES}")
            found = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if found > ROSTER_SCHEMA_VERSION:
                self.conn.close()
                raise StoreError(
                    f"{path} has roster schema version {found}, newer than this Herald's "
                    f"{ROSTER_SCHEMA_VERSION}; upgrade Herald"
                )
        self.schema_version = found
        #: Whether members are sealed and lookups keyed (schema version 3 on).
        self.sealed = found >= SEALED_SINCE
        #: How a lookup selects a member's columns from this file (``r`` is roster_members); see :meth:`row`.
        self.member_select = _member_select(found)
        meta = dict(self.conn.execute("SELECT name, value FROM roster_meta").fetchall())
        #: The ring the file's keyed hashes are under (None: an older file's plaintext lookups).
        self.lookups: KeyRing | None = None
        self._locked: KeyRingError | None = None
        if self.sealed:
            try:
                self.lookups = lookup_ring(meta.get("lookup_check"), self.keys, path)
            except KeyRingError as e:
                if self.keys.enabled:  # a key, but not this file's: refused now, by name
                    self.conn.close()
                    raise
                # No key given: what reads no PHI (counts, versions) works; a lookup says why it cannot.
                self._locked = e
        self.recipe = meta.get("blocking_recipe", "")
        #: How many current members the term counts were taken over (0: the file has none).
        self.terms_total = int(meta.get("terms_total", "0"))
        #: The version every node of a PostgreSQL store knows this file by (0: not published there).
        self.published_version = int(meta.get(PUBLISHED_VERSION, "0"))
        self.version = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM roster_imports").fetchone()[0]
        self._sizes: dict[str, int] = {}
        # Opened persons by row id: matching's prefilter reads the same big buckets' members again and
        # again, and this version of the file never changes (bounded; emptied when full).
        self._persons: dict[int, str] = {}

    def size(self, on: str | None = None) -> int:
        """Members whose attribution has not ended by ``on`` (default today); matching's thresholds scale with it."""
        on = on or datetime.now(UTC).date().isoformat()
        if on not in self._sizes:
            self._sizes[on] = self.conn.execute(
                "SELECT COUNT(*) FROM roster_members WHERE effective_end = '' OR effective_end >= ?", (on,)
            ).fetchone()[0]
        return self._sizes[on]

    def close(self) -> None:
        """Close the connection (a replaced file's space is freed when its last reader closes)."""
        self.conn.close()

    # -- sealed values and keyed lookups ------------------------------------------------

    def row(self, values: tuple) -> dict:
        """A member as a dict of its contract columns and person, from a row of :attr:`member_select`."""
        item = dict(zip(_ROW_COLUMNS, values[:-1], strict=True))
        if self.sealed:
            aco_id, member_id = item["aco_id"], item["member_id"]
            phi = values[-1]
            if phi is not None:
                opened = json.loads(self.keys.open(phi, roster_context("phi", aco_id, member_id)))
                item.update(zip(ROSTER_PHI_COLUMNS, opened, strict=True))
            item["person"] = self.person(item["person"], aco_id, member_id)
        return item

    def person(self, stored, aco_id: str, member_id: str) -> str:
        """A member's normalised person, opened."""
        if not self.sealed or not stored:
            return stored
        return self.keys.open_text(stored, roster_context("person", aco_id, member_id))

    def _hashing(self) -> KeyRing | None:
        if self._locked is not None:
            raise self._locked
        return self.lookups

    def persons(self, refs: list[int]) -> dict[int, str]:
        """The opened persons of these members by row id (one statement for those not opened before)."""
        cache = self._persons
        found = {ref: cache[ref] for ref in refs if ref in cache}
        todo = [ref for ref in refs if ref not in found]
        if todo:
            marks = ",".join("?" * len(todo))
            rows = self.conn.execute(
                f"SELECT id, aco_id, member_id, person FROM roster_members WHERE id IN ({marks})", todo
            ).fetchall()
            if len(cache) + len(rows) > _PERSON_CACHE:
                cache.clear()
            for ref, aco_id, member_id, stored in rows:
                found[ref] = cache[ref] = self.person(stored, aco_id, member_id)
        return found

    def mbi_key(self, mbi: str) -> str:
        """What the MBI index holds for ``mbi``."""
        lookups = self._hashing()
        return mbi if lookups is None else mbi_hash(lookups, mbi)

    def mrn_key(self, mrn: str) -> str:
        """What the MRN index holds for ``mrn``."""
        lookups = self._hashing()
        return mrn if lookups is None else mrn_hash(lookups, mrn)

    def block_key(self, key: str) -> int:
        """What roster_keys holds for a blocking key."""
        lookups = self._hashing()
        return key_id(key) if lookups is None else block_hash(lookups, key)

    def term_key(self, term: str) -> str:
        """What roster_terms holds for a term."""
        lookups = self._hashing()
        return term if lookups is None else term_hash(lookups, term)


class RosterReader:
    """The published roster, followed across imports.

    :meth:`current` costs one ``stat``; when an import has replaced the file
    it opens the new version and closes the old one. Call it between batches,
    not within one, so a batch sees one version throughout.
    """

    def __init__(self, db_path: Path | str, keys: KeyRing | None = None) -> None:
        self.path = roster_path(db_path)
        self.keys = keys
        self._snapshot: RosterSnapshot | None = None

    def current(self) -> RosterSnapshot:
        """The newest published version."""
        snapshot = self._snapshot
        if snapshot is None or snapshot.identity != _file_identity(self.path):
            fresh = RosterSnapshot(self.path, self.keys)
            if snapshot is not None:
                snapshot.close()
            self._snapshot = snapshot = fresh
        return snapshot

    def close(self) -> None:
        """Close the open version."""
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None


def open_roster_snapshot(db_path: Path | str, keys: KeyRing | None = None) -> RosterSnapshot:
    """The roster as published now, for the main database ``db_path``, its values opened with ``keys``."""
    return RosterSnapshot(roster_path(db_path), keys)


@functools.lru_cache(maxsize=32)
def _buckets_sql(keys: int) -> str:
    # One statement for every key of a query; each bucket is read no further than its LIMIT.
    return " UNION ALL ".join(["SELECT * FROM (SELECT key, member FROM roster_keys WHERE key = ? LIMIT ?)"] * keys)


class StoredRoster:
    """The roster lookups matching needs (``gateway.matching.RosterLookups``).

    Reads one roster version (``roster``) and the main database's confirmed
    MRN links (``links``, optional). Every lookup goes through an index: the
    MBI and MRN indexes, the blocking-key table (one statement for all of a
    query's keys, each bucket read no further than the cap), members by id.
    """

    def __init__(self, roster: RosterSnapshot, links: sqlite3.Connection | None = None) -> None:
        self._roster = roster
        self._conn = roster.conn
        self._links = links
        self._select = roster.member_select
        self._terms_total = roster.terms_total
        # Where each lookup's value is (the keyed hash's column from version 3 on).
        self._mbi_column = "mbi_hash" if roster.sealed else "mbi"
        self._mrn_column = "mrn_hash" if roster.sealed else "mrn"
        if links is not None:
            hashed = "mrn_hash" in column_names(links, "confirmed_links")
            self._links_hashed = hashed
            self._links_keys = keys_of(links)
            # Most databases hold no link: then no MRN is hashed for them, nor looked up (one read a batch).
            if links.execute("SELECT 1 FROM confirmed_links LIMIT 1").fetchone() is None:
                self._links = None

    def by_mbi(self, mbi: str) -> list[dict]:
        """Members with this MBI (every ACO)."""
        column = self._mbi_column
        rows = self._conn.execute(
            f"SELECT {self._select} FROM roster_members r WHERE r.{column} = ? AND r.{column} != ''",
            (self._roster.mbi_key(mbi),),
        )
        return [self._roster.row(r) for r in rows]

    def by_mrn(self, mrn: str, authority: str) -> list[dict]:
        """Members with this MRN and assigning authority on the roster, or linked by an accepted review."""
        column = self._mrn_column
        rows = self._conn.execute(
            f"SELECT {self._select} FROM roster_members r WHERE r.{column} = ? AND r.{column} != '' "
            "AND r.mrn_authority = ? COLLATE NOCASE",
            (self._roster.mrn_key(mrn), authority),
        ).fetchall()
        if self._links is not None:
            seen = {(r[0], r[1]) for r in rows}
            if self._links_hashed:
                hashes = mrn_hashes(self._links_keys, mrn)
                marks = ",".join("?" * len(hashes))
                sql = f"SELECT aco_id, member_id FROM confirmed_links WHERE mrn_hash IN ({marks}) AND mrn_authority = ?"
                args: tuple = (*hashes, authority)
            else:  # a database not yet at schema version 5 (read before the server migrated it)
                sql = "SELECT aco_id, member_id FROM confirmed_links WHERE mrn = ? AND mrn_authority = ?"
                args = (mrn, authority)
            for aco_id, member_id in self._links.execute(sql, args).fetchall():
                if (aco_id, member_id) not in seen:
                    seen.add((aco_id, member_id))
                    rows.extend(
                        self._conn.execute(
                            f"SELECT {self._select} FROM roster_members r WHERE r.aco_id = ? AND r.member_id = ?",
                            (aco_id, member_id),
                        )
                    )
        return [self._roster.row(r) for r in rows]

    def blocking_buckets(self, keys: list[str], cap: int) -> dict[str, list[int]]:
        """Each key's members (row ids), at most ``cap + 1`` of them; one statement for every key."""
        if not keys:
            return {}
        ids = {self._roster.block_key(k): k for k in keys}
        sql = _buckets_sql(len(ids))
        args: list[int] = []
        for k in ids:
            args += (k, cap + 1)
        buckets: dict[str, list[int]] = {}
        for key, member in self._conn.execute(sql, args):
            buckets.setdefault(ids[key], []).append(member)
        return buckets

    def term_counts(self, terms: list[str]) -> tuple[dict[str, int], int]:
        """How many current members carry each term (a normalised name or birth date), and of how many."""
        if not terms or not self._terms_total:
            return {}, 0
        hashed = {self._roster.term_key(t): t for t in terms}
        marks = ",".join("?" * len(hashed))
        rows = self._conn.execute(f"SELECT term, count FROM roster_terms WHERE term IN ({marks})", list(hashed))
        return {hashed[term]: count for term, count in rows}, self._terms_total

    def persons(self, refs: list[int]) -> dict[int, str]:
        """The normalised persons of these members, by row id (what matching's prefilter reads)."""
        if not refs:
            return {}
        return self._roster.persons(refs)

    def members(self, refs: list[int]) -> list[dict]:
        """The rows of these members (row ids from :meth:`blocking_buckets`)."""
        if not refs:
            return []
        marks = ",".join("?" * len(refs))
        rows = self._conn.execute(f"SELECT {self._select} FROM roster_members r WHERE r.id IN ({marks})", refs)
        return [self._roster.row(r) for r in rows]


def roster_count(roster: RosterSnapshot, active_on: str | None = None) -> int:
    """How many members the roster holds (only those effective on ``active_on``, when given)."""
    conn = roster.conn
    if active_on is None:
        return conn.execute("SELECT COUNT(*) FROM roster_members").fetchone()[0]
    return conn.execute(
        "SELECT COUNT(*) FROM roster_members WHERE (effective_start = '' OR effective_start <= ?) "
        "AND (effective_end = '' OR effective_end >= ?)",
        (active_on, active_on),
    ).fetchone()[0]


def roster_member(roster: RosterSnapshot, aco_id: str, member_id: str) -> dict | None:
    """One member by ACO and member id."""
    sql = f"SELECT {roster.member_select} FROM roster_members r WHERE r.aco_id = ? AND r.member_id = ?"
    row = roster.conn.execute(sql, (aco_id, member_id)).fetchone()
    return roster.row(row) if row else None


def roster_imports(roster: RosterSnapshot, limit: int = 20) -> list[dict]:
    """The newest roster imports (versions), with their counts."""
    cur = roster.conn.execute("SELECT * FROM roster_imports ORDER BY id DESC LIMIT ?", (limit,))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur]
