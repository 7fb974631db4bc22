"""The roster file, write side: an import builds a new version in a copy and publishes it by rename.

The store does the SQL; what a member's normalised person and blocking keys
are is matching's business, handed in as a :class:`RosterDerivation` by the
layer above (``gateway.app.roster``), so the store imports no stage.

Members are sealed as they are staged, with the key ring given (see
:mod:`gateway.store.sealing`); the copy is private (0600) from its first byte,
and a file of an older schema version, or one whose keyed hashes are under
another ring (written with encryption off), has every member sealed and hashed
again before the new version is applied. :func:`reseal_roster` republishes
the file with every member under the ring's newest key (``herald keys rotate``).

With a PostgreSQL store (``database=``) each new file is built on the newest
version published from any node and published to all of them in one
transaction before it is renamed into place (:mod:`gateway.store.roster_versions`).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from gateway.errors import RosterError, StoreError
from gateway.records import MEMBER_COLUMNS, RosterDerivation
from gateway.store.files import create_private_file
from gateway.store.keys import SEALED_PREFIX, KeyRing
from gateway.store.postgres import PostgresDatabase
from gateway.store.roster_file import (
    ROSTER_MIGRATIONS,
    ROSTER_SCHEMA,
    ROSTER_SCHEMA_VERSION,
    SEALED_SINCE,
    lookup_ring,
    roster_lock,
)
from gateway.store.roster_versions import RosterPublication, publication
from gateway.store.schema import iso, run_sql, utc_now
from gateway.store.sealing import (
    ROSTER_PHI_COLUMNS,
    block_hash,
    mbi_hash,
    member_pseudonym,
    mrn_hash,
    roster_context,
    row_digest,
    term_hash,
)

__all__ = [
    "MAX_PROBLEMS",
    "RosterVersion",
    "publish_roster_version",
    "reseal_roster",
    "roster_key_counts",
    "roster_lock",
    "seal_members",
]


@dataclass(frozen=True, slots=True)
class RosterVersion:
    """What publishing one roster version did (counts, problems, and how long each phase took)."""

    import_id: int
    acos: tuple[str, ...]
    rows: int
    added: int
    changed: int
    ended: int
    unchanged: int
    rejected: int
    problems: list[tuple[int, str, str]]
    read_seconds: float  # reading, checking and staging the file
    apply_seconds: float  # applying the version to the copy
    publish_seconds: float  # making the copy durable and renaming it into place
    #: On PostgreSQL, the number every node follows this version by (roster_versions; 0 on SQLite).
    published_version: int = 0


_MEMBER_ID_AT = MEMBER_COLUMNS.index("member_id")
_STAGE_COLUMNS = (*MEMBER_COLUMNS, "person", "keys", "row_hash", "phi", "mbi_hash", "mrn_hash")
#: Where each sealed value sits in a member's values (MEMBER_COLUMNS order).
_PHI_AT = tuple(MEMBER_COLUMNS.index(c) for c in ROSTER_PHI_COLUMNS)
#: Problems an import reports by line; beyond these it gives a count.
MAX_PROBLEMS = 1000
_STAGE_BATCH = 5000
#: Page cache of an import's connection (KiB): big enough to build the key index without thrashing.
_IMPORT_CACHE_KIB = 65536


def _open_work_copy(
    published: Path, keys: KeyRing, derivation: RosterDerivation
) -> tuple[sqlite3.Connection, Path, int]:
    """A private copy of the published roster (or a new empty one), at this schema version, its
    members sealed and hashed with ``keys``, ready to change. Returns it with how many members
    were sealed again (an older file's, or one hashed under another ring)."""
    work = published.with_name(published.name + ".importing")
    work.unlink(missing_ok=True)  # a crashed import's leftover: never published, safe to drop
    create_private_file(work)  # 0600 before a byte is copied into it (copyfile keeps the mode)
    if published.exists():
        shutil.copyfile(published, work)
    conn = sqlite3.connect(str(work), isolation_level=None, check_same_thread=False)
    # The copy is private until renamed into place: no journal (a failure discards
    # the whole copy) and no syncs until it is complete (one fsync before the rename).
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute(f"PRAGMA cache_size=-{_IMPORT_CACHE_KIB}")
    # Plaintext an upgrade replaces is overwritten, not left in free pages. The staging table goes to
    # SQLite's temporary file (deleted when the import ends): every staged name, date, address, MBI
    # and MRN is sealed or hashed before it is staged, so the file holds no readable PHI, and a
    # million staged members do not sit in memory (1.95 GB RSS when they did).
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute("PRAGMA temp_store=FILE")
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        sealed = 0
        if found == 0:
            run_sql(conn, ROSTER_SCHEMA)
            conn.execute(f"PRAGMA user_version={ROSTER_SCHEMA_VERSION}")
            _set_lookup_check(conn, keys)
        elif found > ROSTER_SCHEMA_VERSION:
            raise StoreError(f"{published} has roster schema version {found}, newer than this Herald's; upgrade Herald")
        else:
            hashed_by = None
            if found < ROSTER_SCHEMA_VERSION:
                # An older Herald's file: the copy is upgraded, and published so if this import is.
                for version in range(found + 1, ROSTER_SCHEMA_VERSION + 1):
                    run_sql(conn, ROSTER_MIGRATIONS[version])
                conn.execute(f"PRAGMA user_version={ROSTER_SCHEMA_VERSION}")
            if found >= SEALED_SINCE:
                stored = conn.execute("SELECT value FROM roster_meta WHERE name = 'lookup_check'").fetchone()
                hashed_by = lookup_ring(stored[0] if stored else None, keys, published)
            if found < SEALED_SINCE or hashed_by is not keys:
                # Plaintext (an older file), or hashes under the disabled ring: every member anew.
                conn.execute("BEGIN")
                sealed = seal_members(conn, keys, derivation, rehash=True)
                conn.execute("COMMIT")
                conn.execute("VACUUM")  # no page of the plaintext left in the file
                _set_lookup_check(conn, keys)
    except BaseException:
        conn.close()
        work.unlink(missing_ok=True)
        raise
    return conn, work, sealed


def _set_lookup_check(conn: sqlite3.Connection, keys: KeyRing) -> None:
    conn.execute("INSERT OR REPLACE INTO roster_meta (name, value) VALUES ('lookup_check', ?)", (keys.fingerprint,))


def _seal_member(keys: KeyRing, values: tuple, person: str) -> tuple:
    """A member's stored form: its values with the sealed ones '' (in MEMBER_COLUMNS order), its sealed
    person, sealed ``phi``, the MBI's and MRN's keyed hashes and the row digest."""
    row = dict(zip(MEMBER_COLUMNS, values, strict=True))
    aco_id, member_id = row["aco_id"], row["member_id"]
    phi = keys.seal(
        json.dumps([values[i] for i in _PHI_AT], ensure_ascii=False).encode("utf-8"),
        roster_context("phi", aco_id, member_id),
    )
    clear = tuple("" if c in ROSTER_PHI_COLUMNS else v for c, v in row.items())
    sealed_person = keys.seal_text(person, roster_context("person", aco_id, member_id)) if person else ""
    return (
        clear,
        sealed_person,
        phi,
        mbi_hash(keys, row["mbi"]) if row["mbi"] else "",
        mrn_hash(keys, row["mrn"]) if row["mrn"] else "",
        row_digest(keys, values),
    )


def _stored_values(keys: KeyRing, row: sqlite3.Row | tuple) -> tuple:
    """A stored member's values (MEMBER_COLUMNS order) from ``id, <MEMBER_COLUMNS>, phi``, opened."""
    values = list(row[1 : 1 + len(MEMBER_COLUMNS)])
    phi = row[1 + len(MEMBER_COLUMNS)]
    if phi is not None:
        aco_id, member_id = values[0], values[1]
        opened = json.loads(keys.open(phi, roster_context("phi", aco_id, member_id)))
        for at, value in zip(_PHI_AT, opened, strict=True):
            values[at] = value
    return tuple(values)


def _stored_person(keys: KeyRing, stored, aco_id: str, member_id: str) -> str:
    return keys.open_text(stored, roster_context("person", aco_id, member_id)) if stored else ""


_MEMBER_READ = f"SELECT id, {', '.join(MEMBER_COLUMNS)}, phi, person FROM roster_members"


def seal_members(
    conn: sqlite3.Connection, keys: KeyRing, derivation: RosterDerivation, *, rehash: bool, only_stale: bool = False
) -> int:
    """Seal every member's values and person under ``keys``' newest key; with ``rehash`` also their
    keyed hashes (MBI, MRN, blocking keys, row digest, terms) under ``keys``. Returns how many.

    ``only_stale``: only members whose ``phi`` is not sealed under the newest key yet (a rotation).
    In slices by row id: a million members never sit in memory at once.
    """
    if rehash:
        conn.execute("DELETE FROM roster_keys")
    current = _sealed_head(keys)
    where = "WHERE id > ?"
    if only_stale and current is not None:
        where += f" AND (phi IS NULL OR substr(phi, 1, {len(current)}) != ?)"
    last = done = 0
    while True:
        args: list = [last] + ([current] if only_stale and current is not None else []) + [_STAGE_BATCH]
        rows = conn.execute(f"{_MEMBER_READ} {where} ORDER BY id LIMIT ?", args).fetchall()
        if not rows:
            break
        updates, block = [], []
        for r in rows:
            values = _stored_values(keys, r)
            person = _stored_person(keys, r[-1], values[0], values[1])
            clear, sealed_person, phi, mbi_h, mrn_h, digest = _seal_member(keys, values, person)
            updates.append((*clear, sealed_person, phi, mbi_h, mrn_h, digest, r[0]))
            if rehash:
                block.extend((block_hash(keys, k), r[0]) for k in derivation.keys_of(person))
        sets = ", ".join(f"{c} = ?" for c in MEMBER_COLUMNS)
        conn.executemany(
            f"UPDATE roster_members SET {sets}, person = ?, phi = ?, mbi_hash = ?, mrn_hash = ?, row_hash = ? "
            "WHERE id = ?",
            updates,
        )
        if rehash:
            conn.executemany("INSERT OR IGNORE INTO roster_keys (key, member) VALUES (?, ?)", block)
        done += len(rows)
        last = rows[-1][0]
    if rehash:
        _count_terms(conn, derivation, keys)
    return done


def _sealed_head(keys: KeyRing) -> bytes | None:
    """The first bytes of every value sealed under ``keys``' newest key (None when it seals nothing)."""
    if not keys.enabled:
        return None
    key_id = keys.current_id.encode("ascii")
    return SEALED_PREFIX + bytes([len(key_id)]) + key_id


def _publish(conn: sqlite3.Connection, work: Path, published: Path, shared: RosterPublication | None = None) -> None:
    """Make the finished copy durable and rename it over the published roster (atomic for readers).

    With ``shared`` (PostgreSQL) the copy is first published to every node
    (one transaction); only once that has committed is it renamed into place
    here, so this node never reads a version the others cannot follow.
    """
    conn.execute("PRAGMA journal_mode=DELETE")  # no -wal/-shm/-journal left beside the file
    conn.close()
    fd = os.open(work, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if shared is not None:
        shared.publish(work)
    os.replace(work, published)
    dir_fd = os.open(published.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _stage(
    conn: sqlite3.Connection, rows: Iterable, problems: list, keep: set, counted: list[int], keys: KeyRing
) -> tuple[int, int]:
    """Load rows into the connection's TEMP tables (in memory), sealed and hashed with ``keys``;
    collect problems (``counted[0]``: how many in all).

    Returns (rows, rejected rows).
    """
    cols = ", ".join(_STAGE_COLUMNS)
    conn.execute(f"CREATE TEMP TABLE roster_stage (line INTEGER NOT NULL, {cols}, action TEXT)")
    conn.execute("CREATE TEMP TABLE roster_keep (aco_id TEXT, member_id TEXT)")
    insert = f"INSERT INTO roster_stage (line, {cols}) VALUES ({', '.join('?' * (len(_STAGE_COLUMNS) + 1))})"
    batch: list[tuple] = []
    total = rejected = 0
    for row in rows:
        total += 1
        m = row.member
        if m is None:
            rejected += 1
            # Rows come in line order: the first problems are kept, the rest counted.
            room = MAX_PROBLEMS - len(problems)
            problems.extend(row.problems[: max(0, room)])
            counted[0] += len(row.problems)
            if row.aco_id and row.member_id:
                keep.add((row.aco_id, member_pseudonym(keys, row.member_id)))
            continue
        values = m.values()
        stored_id = member_pseudonym(keys, values[_MEMBER_ID_AT])
        if stored_id != values[_MEMBER_ID_AT]:
            values = (*values[:_MEMBER_ID_AT], stored_id, *values[_MEMBER_ID_AT + 1 :])
        clear, person, phi, mbi_h, mrn_h, digest = _seal_member(keys, values, m.person)
        block = json.dumps([block_hash(keys, k) for k in m.keys])
        batch.append((row.line, *clear, person, block, digest, phi, mbi_h, mrn_h))
        if len(batch) >= _STAGE_BATCH:
            conn.executemany(insert, batch)
            batch.clear()
    conn.executemany(insert, batch)
    conn.execute("CREATE INDEX temp.roster_stage_member ON roster_stage (aco_id, member_id)")
    # A member listed twice cannot be trusted either way: every copy is a problem row.
    for aco_id, member_id, lines in conn.execute(
        "SELECT aco_id, member_id, group_concat(line) FROM roster_stage GROUP BY aco_id, member_id HAVING COUNT(*) > 1"
    ).fetchall():
        found = sorted(int(n) for n in lines.split(","))
        where = ", ".join(str(n) for n in found)
        for line in found:
            counted[0] += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append((line, "member_id", f"member {member_id} of ACO {aco_id} appears on lines {where}"))
        rejected += len(found)
        keep.add((aco_id, member_id))
    if keep:
        conn.executemany("INSERT INTO roster_keep VALUES (?, ?)", sorted(keep))
        conn.execute(
            "DELETE FROM roster_stage WHERE (aco_id, member_id) IN (SELECT aco_id, member_id FROM roster_keep)"
        )
    return total, rejected


def _refresh_derived(conn: sqlite3.Connection, derivation: RosterDerivation, keys: KeyRing) -> None:
    """Recompute every member's normalised person and blocking keys (the recipe changed since they were stored)."""
    conn.execute("DELETE FROM roster_keys")
    last = 0
    while True:  # in slices by row id: a million members never sit in memory at once
        rows = conn.execute(f"{_MEMBER_READ} WHERE id > ? ORDER BY id LIMIT ?", (last, _STAGE_BATCH)).fetchall()
        if not rows:
            return
        updates, block = [], []
        for r in rows:
            values = _stored_values(keys, r)
            person, member_keys = derivation.derive(dict(zip(MEMBER_COLUMNS, values, strict=True)))
            updates.append((keys.seal_text(person, roster_context("person", values[0], values[1])), r[0]))
            block.extend((block_hash(keys, k), r[0]) for k in member_keys)
        conn.executemany("UPDATE roster_members SET person = ? WHERE id = ?", updates)
        conn.executemany("INSERT OR IGNORE INTO roster_keys (key, member) VALUES (?, ?)", block)
        last = rows[-1][0]


def _count_terms(conn: sqlite3.Connection, derivation: RosterDerivation, keys: KeyRing) -> None:
    """Count, over the members not ended, how many carry each term (``derivation.terms_of``); kept by keyed hash."""
    counts: Counter[str] = Counter()
    members = last = 0
    while True:  # in slices by row id, as _refresh_derived
        rows = conn.execute(
            "SELECT id, aco_id, member_id, person FROM roster_members WHERE id > ? AND ended_by IS NULL "
            "ORDER BY id LIMIT ?",
            (last, _STAGE_BATCH),
        ).fetchall()
        if not rows:
            break
        for _, aco_id, member_id, stored in rows:
            counts.update(derivation.terms_of(_stored_person(keys, stored, aco_id, member_id)))
        members += len(rows)
        last = rows[-1][0]
    conn.execute("DELETE FROM roster_terms")
    hashed: Counter[str] = Counter()
    for term, count in counts.items():
        hashed[term_hash(keys, term)] += count
    conn.executemany("INSERT INTO roster_terms (term, count) VALUES (?, ?)", sorted(hashed.items()))
    conn.execute("INSERT OR REPLACE INTO roster_meta (name, value) VALUES ('terms_total', ?)", (str(members),))


def _apply_import(
    conn: sqlite3.Connection,
    derivation: RosterDerivation,
    keys: KeyRing,
    *,
    stamp: str,
    by: str,
    file: str,
    sha256: str,
    fmt: str,
    replace: bool,
    acos: list[str],
    effective: str | None,
    start_of_version: str,
    end_of_previous: str,
    total: int,
    rejected: int,
) -> tuple[int, dict[str, int], int]:
    """Apply the staged rows to the work copy as a new version: (import id, counts by action, ended)."""
    conn.execute("BEGIN")
    stored_recipe = conn.execute("SELECT value FROM roster_meta WHERE name = 'blocking_recipe'").fetchone()
    if stored_recipe is not None and stored_recipe[0] != derivation.recipe:
        _refresh_derived(conn, derivation, keys)
    conn.execute("INSERT OR REPLACE INTO roster_meta (name, value) VALUES ('blocking_recipe', ?)", (derivation.recipe,))
    conn.execute("UPDATE roster_stage SET action = 'add'")
    conn.execute(
        "UPDATE roster_stage SET action = CASE WHEN r.row_hash = roster_stage.row_hash "
        "AND r.ended_by IS NULL THEN 'same' ELSE 'change' END FROM roster_members r "
        "WHERE r.aco_id = roster_stage.aco_id AND r.member_id = roster_stage.member_id"
    )
    import_id = conn.execute(
        "INSERT INTO roster_imports (imported_at, imported_by, file, sha256, format, mode, aco_ids, "
        "effective_date, rows, rejected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            stamp,
            by,
            Path(file).name,
            sha256,
            fmt,
            "replace" if replace else "update",
            ",".join(acos),
            effective or start_of_version,  # the version's first day, said even when it defaulted to today
            total,
            rejected,
        ),
    ).lastrowid
    counts = dict(conn.execute("SELECT action, COUNT(*) FROM roster_stage GROUP BY action").fetchall())
    # The changed members' old keys, from the person stored with them (deleted by primary key, no scan).
    old = conn.execute(
        "SELECT r.id, r.aco_id, r.member_id, r.person FROM roster_stage s JOIN roster_members r "
        "ON r.aco_id = s.aco_id AND r.member_id = s.member_id WHERE s.action = 'change'"
    ).fetchall()
    stale = [
        (block_hash(keys, k), member)
        for member, aco_id, member_id, stored in old
        for k in derivation.keys_of(_stored_person(keys, stored, aco_id, member_id))
    ]
    conn.executemany("DELETE FROM roster_keys WHERE key = ? AND member = ?", stale)
    cols = ", ".join(c for c in MEMBER_COLUMNS if c != "effective_start")
    conn.execute(
        f"INSERT INTO roster_members ({cols}, effective_start, person, row_hash, phi, mbi_hash, mrn_hash, import_id) "
        f"SELECT {cols}, CASE WHEN effective_start != '' THEN effective_start ELSE COALESCE(?, '') END, "
        "person, row_hash, phi, mbi_hash, mrn_hash, ? FROM roster_stage WHERE action = 'add' "
        "ORDER BY aco_id, member_id",
        (effective, import_id),
    )
    sets = ", ".join(f"{c} = s.{c}" for c in MEMBER_COLUMNS if c not in ("aco_id", "member_id", "effective_start"))
    # A member coming back after being ended starts again with this version.
    conn.execute(
        f"UPDATE roster_members SET {sets}, "
        "effective_start = CASE WHEN s.effective_start != '' THEN s.effective_start "
        "WHEN roster_members.ended_by IS NOT NULL THEN ? ELSE roster_members.effective_start END, "
        "ended_by = NULL, person = s.person, row_hash = s.row_hash, phi = s.phi, mbi_hash = s.mbi_hash, "
        "mrn_hash = s.mrn_hash, import_id = ? "
        "FROM roster_stage s WHERE s.action = 'change' "
        "AND s.aco_id = roster_members.aco_id AND s.member_id = roster_members.member_id",
        (start_of_version, import_id),
    )
    ended = 0
    if replace:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS roster_acos (aco_id TEXT PRIMARY KEY)")
        conn.executemany("INSERT OR IGNORE INTO roster_acos VALUES (?)", [(a,) for a in acos])
        ended = conn.execute(
            "UPDATE roster_members SET effective_end = ?, ended_by = ? "
            "WHERE aco_id IN (SELECT aco_id FROM roster_acos) "
            "AND (effective_end = '' OR effective_end > ?) "
            "AND NOT EXISTS (SELECT 1 FROM roster_stage s WHERE s.aco_id = roster_members.aco_id "
            "AND s.member_id = roster_members.member_id) "
            "AND NOT EXISTS (SELECT 1 FROM roster_keep k WHERE k.aco_id = roster_members.aco_id "
            "AND k.member_id = roster_members.member_id)",
            (end_of_previous, import_id, end_of_previous),
        ).rowcount
    # The new keys, sorted so the key index is filled front to back.
    conn.execute(
        "INSERT OR IGNORE INTO roster_keys (key, member) SELECT j.value, r.id FROM roster_stage s "
        "JOIN roster_members r ON r.aco_id = s.aco_id AND r.member_id = s.member_id, json_each(s.keys) j "
        "WHERE s.action IN ('add', 'change') ORDER BY 1, 2"
    )
    conn.execute(
        "UPDATE roster_imports SET added = ?, changed = ?, ended = ?, unchanged = ? WHERE id = ?",
        (counts.get("add", 0), counts.get("change", 0), ended, counts.get("same", 0), import_id),
    )
    _count_terms(conn, derivation, keys)
    conn.execute("COMMIT")
    return import_id, counts, ended


def publish_roster_version(
    published: Path,
    rows: Iterable,
    derivation: RosterDerivation,
    *,
    moment: datetime,
    by: str,
    file: str,
    sha256: str = "",
    fmt: str = "csv",
    replace: bool = True,
    aco_ids: Iterable[str] = (),
    effective: str | None = None,
    skip_bad_rows: bool = False,
    keys: KeyRing | None = None,
    database: Path | str | PostgresDatabase | None = None,
) -> RosterVersion:
    """Stage ``rows`` in a copy of the roster file, apply them as a new version and publish it.

    ``rows`` are :class:`gateway.matching.roster.RosterRow`, their members'
    person and keys already derived. New members are added, changed ones
    updated (their blocking keys too), and with ``replace`` every member of
    the file's ACOs (and of ``aco_ids``) missing from the file is end-dated
    the day before ``effective`` (today when not given) -- never deleted. A
    member whose row was rejected keeps its current state. The copy is then
    made durable and renamed over the roster file: readers see the old
    version or the new one, never a mix. One import at a time
    (``roster.lock``). Any problem rejects the whole file
    (:class:`RosterError`, nothing published) unless ``skip_bad_rows``.
    Members are sealed and hashed with ``keys`` (stored as given without).

    ``database`` is the main database. On PostgreSQL the import is built on
    the newest version published from any node (imports on every node run one
    at a time), and the version is published to them all in one transaction
    before it is renamed into place here (:mod:`gateway.store.roster_versions`);
    if that fails nothing is published anywhere.
    """
    keys = keys or KeyRing.disabled()
    with roster_lock(published), publication(database, published, by=by, at=iso(moment)) as shared:
        started = time.perf_counter()
        conn, work, _ = _open_work_copy(published, keys, derivation)
        try:
            problems: list[tuple[int, str, str]] = []
            keep: set[tuple[str, str]] = set()
            counted = [0]
            total, rejected = _stage(conn, rows, problems, keep, counted, keys)
            read_seconds = time.perf_counter() - started
            problems.sort(key=lambda p: p[0])
            if problems and not skip_bad_rows:
                raise RosterError(problems, more=counted[0] - len(problems))
            if total - rejected == 0:
                raise RosterError(problems[:MAX_PROBLEMS] or [(0, "-", "the file has no members")])
            acos = sorted({r[0] for r in conn.execute("SELECT DISTINCT aco_id FROM roster_stage")} | set(aco_ids))
            start_of_version = effective or moment.date().isoformat()
            end_of_previous = (datetime.fromisoformat(start_of_version) - timedelta(days=1)).date().isoformat()
            started = time.perf_counter()
            import_id, counts, ended = _apply_import(
                conn,
                derivation,
                keys,
                stamp=iso(moment),
                by=by,
                file=file,
                sha256=sha256,
                fmt=fmt,
                replace=replace,
                acos=acos,
                effective=effective,
                start_of_version=start_of_version,
                end_of_previous=end_of_previous,
                total=total,
                rejected=rejected,
            )
            apply_seconds = time.perf_counter() - started
            started = time.perf_counter()
            if shared is None:
                _publish(conn, work, published)
            else:
                shared.stamp(conn, import_id)
                _publish(conn, work, published, shared)
            publish_seconds = time.perf_counter() - started
        except BaseException:
            conn.close()
            work.unlink(missing_ok=True)
            raise
    return RosterVersion(
        import_id,
        tuple(acos),
        total,
        counts.get("add", 0),
        counts.get("change", 0),
        ended,
        counts.get("same", 0),
        rejected,
        problems,
        read_seconds,
        apply_seconds,
        publish_seconds,
        shared.version if shared is not None else 0,
    )


def reseal_roster(
    published: Path,
    keys: KeyRing,
    derivation: RosterDerivation,
    *,
    database: Path | str | PostgresDatabase | None = None,
    by: str = "herald",
) -> int:
    """Republish the roster file with every member sealed under ``keys``' newest key (a rotation).

    An older file, or one hashed under another ring, is upgraded and hashed
    again on the way. No version is added (``roster_imports`` is unchanged);
    readers move to the new file between batches, as after an import. Returns
    how many members were sealed again (0 when there is no roster file, or
    every member was sealed under the newest key already: nothing is published).
    On PostgreSQL (``database``) the newest published version is resealed and
    published to every node as a new published version, as an import is.
    """
    if not published.exists() and not isinstance(database, PostgresDatabase):
        return 0
    with roster_lock(published), publication(database, published, by=by, at=iso(utc_now()), kind="rotation") as shared:
        if not published.exists():  # on PostgreSQL, none published either
            return 0
        conn, work, upgraded = _open_work_copy(published, keys, derivation)
        try:
            conn.execute("BEGIN")
            sealed = seal_members(conn, keys, derivation, rehash=False, only_stale=True)
            conn.execute("COMMIT")
            if upgraded or sealed:
                if shared is not None:
                    import_id = conn.execute("SELECT COALESCE(MAX(id), 0) FROM roster_imports").fetchone()[0]
                    shared.stamp(conn, import_id)
                _publish(conn, work, published, shared)
            else:
                conn.close()
                work.unlink(missing_ok=True)
        except BaseException:
            conn.close()
            work.unlink(missing_ok=True)
            raise
    return upgraded + sealed


def roster_key_counts(published: Path, keys: KeyRing) -> dict[str | None, int]:
    """How many roster members are sealed under each key id (None: plaintext, an older file's)."""
    if not published.exists():
        return {}
    uri = f"file:{published}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SEALED_SINCE:
            return {None: conn.execute("SELECT COUNT(*) FROM roster_members").fetchone()[0]}
        counts: Counter[str | None] = Counter(
            keys.key_of(phi) for (phi,) in conn.execute("SELECT phi FROM roster_members")
        )
        return dict(counts)
    finally:
        conn.close()
