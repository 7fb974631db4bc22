"""The message store: every SQL statement Herald runs lives here.

One SQLite file in WAL mode with ``synchronous=FULL``. A single writer thread
owns the write connection; callers on the reactor hand it jobs and get
Deferreds back. The writer takes every job waiting in its queue, runs them in
one transaction (each in its own savepoint, so one failure does not undo the
others) and commits once: that is the group commit that keeps throughput up
when many connections deliver at once.

Reads from other threads (the pipeline, the CLI) open their own connections.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import os
import queue
import shutil
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlite_utils
from twisted.internet import defer
from twisted.logger import Logger

from gateway.errors import StoreError

# States of a message (see ARCHITECTURE.md).
RECEIVED = "received"
REJECTED = "rejected"
IGNORED = "ignored"
FAILED = "failed"
ROUTED = "routed"
#: A possible roster match (or a probable one, when not routed automatically)
#: waits in the review queue; the HIE notification is already written.
REVIEW = "review"
#: Matched (or not) and no recipient is to be told.
MATCHED = "matched"
UNMATCHED = "unmatched"

# States of a notification.
PENDING = "pending"
SENT = "sent"
RETRYING = "retrying"
DEAD = "dead"

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS migrations (
    version INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
)
"""

# Version 1: the first schema.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    peer TEXT,
    sending_application TEXT,
    sending_facility TEXT,
    message_type TEXT,
    trigger_event TEXT,
    control_id TEXT,
    version TEXT,
    processing_id TEXT,
    accept_ack_type TEXT,
    application_ack_type TEXT,
    charset TEXT,
    sha256 TEXT NOT NULL,
    raw BLOB NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    flag TEXT,
    ack_code TEXT,
    fhir TEXT,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_sender_control
    ON messages (sending_facility, sending_application, control_id);
CREATE INDEX IF NOT EXISTS messages_state ON messages (state, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    message_id INTEGER,
    notification_id TEXT,
    actor TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_message ON events (message_id, id);
CREATE TABLE IF NOT EXISTS roster_members (
    aco_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    mbi TEXT,
    mrn TEXT,
    mrn_authority TEXT,
    last_name TEXT NOT NULL,
    first_name TEXT NOT NULL,
    birth_date TEXT NOT NULL,
    sex TEXT NOT NULL,
    pcp_npi TEXT,
    pcp_name TEXT,
    care_manager TEXT,
    effective_start TEXT,
    effective_end TEXT,
    name_key TEXT NOT NULL,
    imported_at TEXT NOT NULL,
    PRIMARY KEY (aco_id, member_id)
);
CREATE INDEX IF NOT EXISTS roster_mbi ON roster_members (mbi);
CREATE INDEX IF NOT EXISTS roster_mrn ON roster_members (mrn, mrn_authority);
CREATE INDEX IF NOT EXISTS roster_name_key ON roster_members (name_key);
CREATE TABLE IF NOT EXISTS matches (
    message_id INTEGER PRIMARY KEY,
    aco_id TEXT,
    member_id TEXT,
    method TEXT,
    grade TEXT,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS notifications (
    id TEXT PRIMARY KEY,
    message_id INTEGER NOT NULL,
    recipient_role TEXT NOT NULL,
    recipient TEXT NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    event_code TEXT NOT NULL,
    summary TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS notifications_message ON notifications (message_id);
CREATE TABLE IF NOT EXISTS delivery_attempts (
    id INTEGER PRIMARY KEY,
    notification_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS delivery_attempts_notification ON delivery_attempts (notification_id, id);
"""


# Version 2: a notification's Bundle is no longer stored per recipient (it is
# built from messages.fhir when sent), so notifications.payload may be NULL.
# SQLite cannot drop a NOT NULL constraint in place: the table is rebuilt.
# Rows written before keep their stored payload and are sent from it.
_SCHEMA_V2 = """
CREATE TABLE notifications_v2 (
    id TEXT PRIMARY KEY,
    message_id INTEGER NOT NULL,
    recipient_role TEXT NOT NULL,
    recipient TEXT NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    event_code TEXT NOT NULL,
    summary TEXT NOT NULL,
    payload TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
INSERT INTO notifications_v2 (id, message_id, recipient_role, recipient, channel, target, event_code, summary,
    payload, state, attempts, next_attempt_at, last_error, created_at, updated_at)
    SELECT id, message_id, recipient_role, recipient, channel, target, event_code, summary,
    payload, state, attempts, next_attempt_at, last_error, created_at, updated_at FROM notifications;
DROP TABLE notifications;
ALTER TABLE notifications_v2 RENAME TO notifications;
CREATE INDEX notifications_due ON notifications (state, next_attempt_at);
CREATE INDEX notifications_message ON notifications (message_id)
"""

# Version 3: the roster moves to its own file (roster.db, see "roster: its own
# file" below); the main database keeps what the server writes while it runs:
# confirmed MRN links, the review queue, the score of a match.
_SCHEMA_V3 = """
CREATE TABLE confirmed_links (
    mrn TEXT NOT NULL,
    mrn_authority TEXT NOT NULL COLLATE NOCASE,
    aco_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    review_id INTEGER,
    confirmed_by TEXT NOT NULL,
    confirmed_at TEXT NOT NULL,
    PRIMARY KEY (mrn, mrn_authority, aco_id)
);
CREATE TABLE reviews (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL UNIQUE,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    grade TEXT NOT NULL,
    score REAL,
    candidates TEXT NOT NULL,
    decided_by TEXT,
    decided_at TEXT,
    aco_id TEXT,
    member_id TEXT,
    note TEXT
);
CREATE INDEX reviews_state ON reviews (state, id);
ALTER TABLE matches ADD COLUMN score REAL
"""

_V1_MEMBER_COLUMNS = (
    "aco_id",
    "member_id",
    "mbi",
    "mrn",
    "mrn_authority",
    "last_name",
    "first_name",
    "birth_date",
    "sex",
    "pcp_npi",
    "pcp_name",
    "care_manager",
    "effective_start",
    "effective_end",
)


def _main_file(conn: sqlite3.Connection) -> Path | None:
    for _, name, file in conn.execute("PRAGMA database_list").fetchall():
        if name == "main" and file:
            return Path(file)
    return None


def _migrate_v3(conn: sqlite3.Connection) -> None:
    _run_sql(conn, _SCHEMA_V3)
    # Members imported by version 1 move to the roster file (published like an
    # import, audited here), so matching finds them without a new import.
    from gateway.matching.roster import RosterMember, RosterRow

    cols = ", ".join(_V1_MEMBER_COLUMNS)
    legacy = conn.execute(f"SELECT {cols} FROM roster_members ORDER BY aco_id, member_id").fetchall()
    main = _main_file(conn)
    if legacy and main is not None and not roster_path(main).exists():
        moment = _utc_now()
        members = (RosterMember(**{c: ("" if r[c] is None else str(r[c])) for c in _V1_MEMBER_COLUMNS}) for r in legacy)
        rows = (RosterRow(n, m, (), m.aco_id, m.member_id) for n, m in enumerate(members, start=1))
        import_id, acos, total, counts, _, _, _, _ = _import_roster_file(
            roster_path(main),
            rows,
            moment=moment,
            by="herald",
            file="herald.db (schema version 1)",
            sha256="",
            fmt="migrated",
            replace=False,
            aco_ids=(),
            effective=None,
            skip_bad_rows=True,
        )
        detail = {"import": import_id, "file": "herald.db", "format": "migrated", "acos": acos, "added": total}
        _event(conn, iso(moment), None, None, "roster", "roster-imported", detail)
    conn.execute("DROP TABLE roster_members")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """An aware datetime as ISO 8601 in UTC with milliseconds."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class IntakeRecord:
    """What intake stores for one frame (header fields may be blank when unreadable)."""

    raw: bytes
    peer: str
    state: str
    ack_code: str
    sending_application: str = ""
    sending_facility: str = ""
    message_type: str = ""
    trigger_event: str = ""
    control_id: str = ""
    version: str = ""
    processing_id: str = ""
    accept_ack_type: str = ""
    application_ack_type: str = ""
    charset: str = ""
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class IntakeResult:
    """The outcome of storing a frame: its row id and whether it repeated an earlier one."""

    message_id: int
    duplicate_of: int | None = None
    flag: str | None = None


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """A stored message waiting for the pipeline."""

    id: int
    raw: bytes
    received_at: str
    charset: str


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One try at delivering a notification, and the state it leaves the notification in."""

    notification_id: str
    message_id: int
    attempt: int  # 1-based
    outcome: str  # ok / error
    detail: str
    state: str  # sent / retrying / dead
    next_attempt_at: float


@dataclass(frozen=True, slots=True)
class Notification:
    """One outbox row: a Bundle for one recipient over one channel (see :mod:`gateway.delivery.routing`)."""

    id: str
    message_id: int
    recipient_role: str
    recipient: str
    channel: str
    target: str
    event_code: str
    summary: str
    #: The Bundle as sent, in rows written before schema version 2; None in
    #: newer rows, whose Bundle is built from the message's (``bundle``).
    payload: str | None
    state: str = PENDING
    attempts: int = 0
    #: The message's stored Bundle (``messages.fhir``), read with a due
    #: notification that has no stored payload.
    bundle: str | None = None


def open_database(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the store's SQLite file with Herald's pragmas."""
    path = Path(path)
    if readonly:
        if not path.exists():
            raise StoreError(f"no Herald database at {path}")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


#: Schema migrations, applied in order; each runs once and is recorded in the
#: ``migrations`` table. Append new versions here; never edit an applied one.
#: A step is SQL text (statements separated by ``;``) or a function of the
#: connection, run inside the migration's transaction.
MIGRATIONS: list[tuple[int, str | Callable[[sqlite3.Connection], None]]] = [
    (1, _SCHEMA_V1),
    (2, _SCHEMA_V2),
    (3, _migrate_v3),
]

#: The schema version this code writes.
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _run_sql(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def schema_version(conn: sqlite3.Connection) -> int:
    """The newest migration applied to this database (0 for a new file)."""
    if not sqlite_utils.Database(conn)["migrations"].exists():
        return 0
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM migrations").fetchone()[0]


def migrate(conn: sqlite3.Connection, now: datetime | None = None) -> None:
    """Bring the schema up to :data:`SCHEMA_VERSION`, one recorded migration at a time (idempotent).

    Refuses a database written by a newer Herald rather than guess at it.
    """
    current = schema_version(conn)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {current}, newer than this Herald's {SCHEMA_VERSION}; upgrade Herald"
        )
    if current == SCHEMA_VERSION:
        return
    stamp = iso(now or _utc_now())
    conn.execute("BEGIN IMMEDIATE")
    try:
        _run_sql(conn, _MIGRATIONS_TABLE)
        # Read again under the write lock: another process may have migrated meanwhile.
        current = schema_version(conn)
        for version, step in MIGRATIONS:
            if version <= current:
                continue
            if callable(step):
                step(conn)
            else:
                _run_sql(conn, step)
            conn.execute("INSERT INTO migrations (version, applied_at) VALUES (?, ?)", (version, stamp))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class _Job:
    __slots__ = ("fn", "args", "deferred")

    def __init__(self, fn, args, deferred) -> None:
        self.fn = fn
        self.args = args
        self.deferred = deferred


_STOP = object()
#: Put on the writer's queue to wake it for background work.
_WAKE = object()


class _ReadThread:
    """Runs read jobs on a thread of their own with a read-only connection.

    Reads need no place in the writer's queue: in WAL mode a reader sees the
    last commit and never waits for the writer, so the outbox poll and the
    pipeline's fetch do not queue behind an fsync, nor an ACK behind them.
    Each job runs in its own read transaction (one snapshot).
    """

    def __init__(self, path: Path, reactor, fire: Callable[[list], None]) -> None:
        self._path = path
        self._reactor = reactor
        self._fire = fire
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="herald-store-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: _Job) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        """Finish the queued reads and end the thread (blocking: call it off the reactor)."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        conn = None
        try:
            while True:
                job = self._queue.get()
                if job is _STOP:
                    return
                jobs = [job]
                stop = False
                while True:  # every read waiting now, answered with one wake-up of the reactor
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stop = True
                        break
                    jobs.append(more)
                results = []
                for job in jobs:
                    try:
                        if conn is None:
                            conn = open_database(self._path, readonly=True)
                        conn.execute("BEGIN")
                        try:
                            results.append((job, True, job.fn(conn, *job.args)))
                        finally:
                            conn.execute("COMMIT")
                    except Exception as e:
                        results.append((job, False, StoreError(f"store read failed: {e}")))
                self._reactor.callFromThread(self._fire, results)
                if stop:
                    return
        finally:
            if conn is not None:
                conn.close()


class Store:
    """The durable message log, roster and outbox.

    Write methods return Deferreds and run on the writer thread; reads run on
    a reader thread; the ``*_sync`` read helpers may be called from any
    thread that owns a connection made by :func:`open_database`.

    The writer serves the ACK path first. Jobs given to :meth:`submit`
    (intake) all go into the next commit; jobs given to
    :meth:`submit_background` (pipeline outcomes, delivery records) take turns,
    :attr:`BACKGROUND_PER_COMMIT` at a time, riding a commit with the intake
    jobs waiting then, so an ACK never waits behind a queue of large pipeline
    writes.
    """

    _log = Logger()

    #: Largest number of queued jobs committed together.
    MAX_GROUP = 512
    #: Background jobs added to one commit.
    BACKGROUND_PER_COMMIT = 1
    #: Pipeline outcomes written per background job.
    OUTCOMES_PER_JOB = 16
    #: Background writes wait at most this long for a commit to ride with.
    IDLE_FLUSH_SECONDS = 0.5

    def __init__(self, path: Path | str, reactor=None, clock: Callable[[], datetime] = _utc_now) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.path = Path(path)
        self._reactor = reactor
        self.clock = clock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._background: collections.deque = collections.deque()
        self._riders: collections.deque = collections.deque()
        self._conn = open_database(self.path)
        migrate(self._conn, clock())
        self._thread = threading.Thread(target=self._run, name="herald-store-writer", daemon=True)
        self._reader = _ReadThread(self.path, reactor, self._fire)
        self._started = False
        self.commits = 0
        self.jobs = 0
        #: Commits that ran again job by job because one job failed.
        self.replays = 0

    # -- the writer thread -------------------------------------------------

    def start(self) -> None:
        """Start the writer and reader threads."""
        if not self._started:
            self._started = True
            self._thread.start()
            self._reader.start()

    def stop(self) -> defer.Deferred:
        """Finish the queued jobs, stop the threads and close the database."""
        if not self._started:
            self._conn.close()
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()
        self._queue.put(_STOP)

        def wait() -> None:
            self._thread.join()
            self._reader.stop()
            self._conn.close()
            # Jobs that raced the stop are failed, not left hanging.
            leftovers = []
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not _STOP and job is not _WAKE:
                    leftovers.append((job, False, StoreError("the store has stopped")))
            while self._background:
                leftovers.append((self._background.popleft(), False, StoreError("the store has stopped")))
            if leftovers:
                self._reactor.callFromThread(self._fire, leftovers)

        from twisted.internet import threads

        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), wait)
        d.chainDeferred(done)
        self._started = False
        return done

    def submit(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``fn(conn, *args)`` in the writer's next transaction; fire with its result.

        ``fn`` may run twice: when another job of its commit fails, the
        commit is rolled back and its jobs run again one savepoint each. So
        it must do nothing but SQL on ``conn``.
        """
        if not self._started:
            return defer.fail(StoreError("the store is not running"))
        d: defer.Deferred = defer.Deferred()
        self._queue.put(_Job(fn, args, d))
        return d

    def submit_background(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Like :meth:`submit`, for work off the ACK path: it takes its turn after intake's jobs."""
        if not self._started:
            return defer.fail(StoreError("the store is not running"))
        d: defer.Deferred = defer.Deferred()
        self._background.append(_Job(fn, args, d))
        self._queue.put(_WAKE)
        return d

    def submit_read(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``fn(conn, *args)`` on the reader thread, in a read transaction; fire with its result."""
        if not self._started:
            return defer.fail(StoreError("the store is not running"))
        d: defer.Deferred = defer.Deferred()
        self._reader.submit(_Job(fn, args, d))
        return d

    def submit_nowait(self, fn: Callable[..., Any], *args: Any) -> None:
        """Like :meth:`submit`, for writes nobody waits on (they ride the next commit)."""
        if not self._started:
            self._log.warn("store not running; dropped a background write")
            return
        # Not queued: it must not wake the writer for a commit (an fsync) of
        # its own. It rides with the next real job, or the idle flush.
        self._riders.append(_Job(fn, args, None))

    def _take_riders(self, batch: list) -> None:
        riders = self._riders
        while riders:
            batch.append(riders.popleft())

    def _run(self) -> None:
        conn = self._conn
        q = self._queue
        background = self._background
        stopping = False
        while True:
            batch: list[_Job] = []
            if not stopping:
                try:
                    # Do not sleep while background work waits.
                    first = q.get_nowait() if background else q.get(timeout=self.IDLE_FLUSH_SECONDS)
                except queue.Empty:
                    first = None  # idle: flush background work and riders
                if first is _STOP:
                    stopping = True
                elif first is not None and first is not _WAKE:
                    batch.append(first)
                while not stopping and len(batch) < self.MAX_GROUP:
                    try:
                        job = q.get_nowait()
                    except queue.Empty:
                        break
                    if job is _STOP:
                        stopping = True
                    elif job is not _WAKE:
                        batch.append(job)
            for _ in range(self.BACKGROUND_PER_COMMIT if not stopping else len(background)):
                if not background:
                    break
                batch.append(background.popleft())
            self._take_riders(batch)
            if batch:
                self._commit_group(conn, batch)
            if stopping and not background and not self._riders:
                return

    def _commit_group(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        try:
            results = self._run_batch(conn, batch)
        except Exception as e:  # the writer thread must outlive any failure
            self._log.failure("store writer batch failed")
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = [(job, False, StoreError(f"store failure: {e}")) for job in batch]
        self.commits += 1
        self.jobs += len(batch)
        self._reactor.callFromThread(self._fire, results)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> list:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            err = StoreError(f"could not begin a transaction: {e}")
            return [(job, False, err) for job in batch]
        # Optimistic: every job straight into the transaction, no savepoints
        # (two statements a job saved). Jobs almost never fail; when one does,
        # the whole group is rolled back and run again, one savepoint a job,
        # so that job fails alone.
        try:
            results = [(job, True, job.fn(conn, *job.args)) for job in batch]
        except Exception as e:
            _rollback(conn)
            if len(batch) == 1:
                return [(batch[0], False, e)]
            self.replays += 1
            return self._run_isolated(conn, batch)
        return self._commit(conn, results)

    def _run_isolated(self, conn: sqlite3.Connection, batch: list[_Job]) -> list:
        """Run each job in its own savepoint, so that one failing job is undone alone."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            err = StoreError(f"could not begin a transaction: {e}")
            return [(job, False, err) for job in batch]
        results = []
        for job in batch:
            try:
                conn.execute("SAVEPOINT job")
                value = job.fn(conn, *job.args)
                conn.execute("RELEASE job")
                results.append((job, True, value))
            except Exception as e:  # each job fails alone
                try:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                except sqlite3.Error:
                    pass
                results.append((job, False, e))
        return self._commit(conn, results)

    @staticmethod
    def _commit(conn: sqlite3.Connection, results: list) -> list:
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            _rollback(conn)
            err = StoreError(f"commit failed: {e}")
            return [(job, False, err) for job, _, _ in results]
        return results

    def _fire(self, results: list) -> None:
        for job, ok, value in results:
            if job.deferred is None:
                if not ok:
                    self._log.error("background store write failed: {error}", error=repr(value))
                continue
            if ok:
                job.deferred.callback(value)
            else:
                job.deferred.errback(value)

    # -- intake ------------------------------------------------------------

    def record_frame(self, record: IntakeRecord) -> defer.Deferred[IntakeResult]:
        """Store a frame (and its ``received`` event) durably; fire once committed."""
        return self.submit(self._record_frame, record, iso(self.clock()))

    def _record_frame(self, conn: sqlite3.Connection, r: IntakeRecord, now: str) -> IntakeResult:
        digest = hashlib.sha256(r.raw).hexdigest()
        duplicate_of = None
        flag = None
        state = r.state
        reason = r.reason
        if r.control_id and state == RECEIVED:
            earlier = conn.execute(
                "SELECT id, sha256 FROM messages WHERE sending_facility = ? AND sending_application = ? "
                "AND control_id = ? AND state != ? ORDER BY id",
                (r.sending_facility, r.sending_application, r.control_id, REJECTED),
            ).fetchall()
            for row in earlier:
                if row["sha256"] == digest:
                    duplicate_of = row["id"]
                    break
            if duplicate_of is not None:
                _event(conn, now, duplicate_of, None, "intake", "retransmission", {"peer": r.peer})
                return IntakeResult(duplicate_of, duplicate_of, None)
            if earlier:
                flag = "control-id-reused"
        cur = conn.execute(
            "INSERT INTO messages (received_at, peer, sending_application, sending_facility, message_type, "
            "trigger_event, control_id, version, processing_id, accept_ack_type, application_ack_type, charset, "
            "sha256, raw, state, reason, flag, ack_code, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                now,
                r.peer,
                r.sending_application,
                r.sending_facility,
                r.message_type,
                r.trigger_event,
                r.control_id,
                r.version,
                r.processing_id,
                r.accept_ack_type,
                r.application_ack_type,
                r.charset,
                digest,
                r.raw,
                state,
                reason,
                flag,
                r.ack_code,
                now,
            ),
        )
        message_id = cur.lastrowid
        detail: dict[str, Any] = {"peer": r.peer, "bytes": len(r.raw)}
        if flag:
            detail["flag"] = flag
        _event(conn, now, message_id, None, "intake", "received", detail)
        if state == REJECTED:
            _event(conn, now, message_id, None, "intake", "rejected", {"reason": reason})
        return IntakeResult(message_id, None, flag)

    def record_ack_sent(self, message_id: int, code: str) -> None:
        """Log that an ACK went out (rides the next commit; nobody waits on it)."""
        self.submit_nowait(self._event_job, message_id, None, "intake", "ack-sent", {"code": code}, iso(self.clock()))

    def record_event(
        self,
        message_id: int | None,
        actor: str,
        kind: str,
        detail: dict | None = None,
        notification_id: str | None = None,
    ) -> defer.Deferred:
        """Append one audit event."""
        return self.submit(self._event_job, message_id, notification_id, actor, kind, detail, iso(self.clock()))

    @staticmethod
    def _event_job(conn, message_id, notification_id, actor, kind, detail, now) -> None:
        _event(conn, now, message_id, notification_id, actor, kind, detail)

    # -- pipeline ----------------------------------------------------------

    def pending_messages(self, after_id: int, limit: int) -> defer.Deferred[list[PendingMessage]]:
        """Messages still in state ``received`` with id > ``after_id``, oldest first."""
        return self.submit_read(self._pending_messages, after_id, limit)

    @staticmethod
    def _pending_messages(conn, after_id: int, limit: int) -> list[PendingMessage]:
        rows = conn.execute(
            "SELECT id, raw, received_at, charset FROM messages WHERE state = ? AND id > ? ORDER BY id LIMIT ?",
            (RECEIVED, after_id, limit),
        ).fetchall()
        return [PendingMessage(r["id"], r["raw"], r["received_at"], r["charset"] or "") for r in rows]

    def record_outcomes(self, outcomes: Iterable) -> defer.Deferred[int]:
        """Apply pipeline outcomes: state, FHIR, match, outbox rows and events; fire with how many applied.

        Written :attr:`OUTCOMES_PER_JOB` at a time, one transaction each; one
        message's outcome is always whole in one transaction. Each outcome
        applies only if its message is still ``received``, so a message is
        never turned into notifications twice.
        """
        outcomes = list(outcomes)
        now, now_seconds = iso(self.clock()), self._reactor.seconds()
        # In slices: each slice rides one commit with the intake jobs of the
        # moment, so no commit (and no ACK waiting on it) carries a whole batch.
        step = self.OUTCOMES_PER_JOB
        jobs = [
            self.submit_background(self._record_outcomes, outcomes[i : i + step], now, now_seconds)
            for i in range(0, len(outcomes), step)
        ]
        if not jobs:
            return defer.succeed(0)
        d = defer.gatherResults(jobs, consumeErrors=True)
        d.addCallbacks(sum, lambda f: f.value.subFailure)
        return d

    @classmethod
    def _record_outcomes(cls, conn, outcomes: list, now: str, now_seconds: float) -> int:
        applied = 0
        for o in outcomes:
            conn.execute("SAVEPOINT outcome")
            try:
                applied += cls._record_outcome(conn, o, now, now_seconds)
                conn.execute("RELEASE outcome")
            except sqlite3.IntegrityError as e:
                # One message's conflict must not hold up the rest of the batch.
                conn.execute("ROLLBACK TO outcome")
                conn.execute("RELEASE outcome")
                reason = f"its outcome could not be stored: {e}"
                conn.execute(
                    "UPDATE messages SET state = ?, reason = ?, updated_at = ? WHERE id = ? AND state = ?",
                    (FAILED, reason, now, o.message_id, RECEIVED),
                )
                _event(conn, now, o.message_id, None, "pipeline", "failed", {"stage": "store", "reason": reason})
        return applied

    @staticmethod
    def _record_outcome(conn, o, now: str, now_seconds: float) -> int:
        cur = conn.execute(
            "UPDATE messages SET state = ?, reason = ?, fhir = ?, updated_at = ? WHERE id = ? AND state = ?",
            (o.state, o.reason, o.fhir_json, now, o.message_id, RECEIVED),
        )
        if cur.rowcount != 1:
            return 0
        for kind, detail in o.events:
            _event(conn, now, o.message_id, None, "pipeline", kind, detail)
        if o.match is not None:
            _record_match(conn, o.message_id, o.match, o.review, now)
        for n in o.notifications:
            _insert_notification(conn, n, now, now_seconds)
        return 1

    # -- delivery ----------------------------------------------------------

    def due_notifications(self, now_seconds: float, limit: int, exclude: Iterable[str] = ()) -> defer.Deferred:
        """Notifications pending or retrying whose next attempt is due."""
        return self.submit_read(self._due, now_seconds, limit, tuple(exclude))

    @staticmethod
    def _due(conn, now_seconds: float, limit: int, exclude: tuple) -> list[Notification]:
        rows = conn.execute(
            "SELECT n.id, n.message_id, n.recipient_role, n.recipient, n.channel, n.target, n.event_code, "
            "n.summary, n.payload, n.state, n.attempts, CASE WHEN n.payload IS NULL THEN m.fhir END AS bundle "
            "FROM notifications n JOIN messages m ON m.id = n.message_id "
            "WHERE n.state IN (?, ?) AND n.next_attempt_at <= ? ORDER BY n.next_attempt_at LIMIT ?",
            (PENDING, RETRYING, now_seconds, limit + len(exclude)),
        ).fetchall()
        out = [_notification(r) for r in rows if r["id"] not in exclude]
        return out[:limit]

    def next_due_time(self) -> defer.Deferred[float | None]:
        """When the earliest pending or retrying notification falls due (reactor seconds)."""
        return self.submit_read(self._next_due)

    @staticmethod
    def _next_due(conn) -> float | None:
        row = conn.execute(
            "SELECT MIN(next_attempt_at) FROM notifications WHERE state IN (?, ?)", (PENDING, RETRYING)
        ).fetchone()
        return row[0]

    def record_attempts(self, attempts: list[DeliveryAttempt]) -> defer.Deferred:
        """Record delivery attempts and their notifications' new states, in one job."""
        return self.submit_background(self._record_attempts, list(attempts), iso(self.clock()))

    @staticmethod
    def _record_attempts(conn, attempts: list[DeliveryAttempt], now: str) -> int:
        conn.executemany(
            "UPDATE notifications SET attempts = ?, state = ?, next_attempt_at = ?, last_error = ?, "
            "updated_at = ? WHERE id = ?",
            [
                (a.attempt, a.state, a.next_attempt_at, None if a.outcome == "ok" else a.detail, now, a.notification_id)
                for a in attempts
            ],
        )
        conn.executemany(
            "INSERT INTO delivery_attempts (notification_id, attempt, at, outcome, detail) VALUES (?, ?, ?, ?, ?)",
            [(a.notification_id, a.attempt, now, a.outcome, a.detail) for a in attempts],
        )
        kinds = {SENT: "delivered", DEAD: "dead-letter"}
        conn.executemany(
            "INSERT INTO events (at, message_id, notification_id, actor, kind, detail) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    now,
                    a.message_id,
                    a.notification_id,
                    "delivery",
                    kinds.get(a.state, "delivery-failed"),
                    json.dumps({"attempt": a.attempt, "detail": a.detail}),
                )
                for a in attempts
            ],
        )
        return len(attempts)


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite may have rolled back already (a full disk, an I/O error)


def _event(conn, now: str, message_id, notification_id, actor: str, kind: str, detail) -> None:
    conn.execute(
        "INSERT INTO events (at, message_id, notification_id, actor, kind, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (now, message_id, notification_id, actor, kind, json.dumps(detail) if detail is not None else None),
    )


def _notification(row) -> Notification:
    return Notification(
        id=row["id"],
        message_id=row["message_id"],
        recipient_role=row["recipient_role"],
        recipient=row["recipient"],
        channel=row["channel"],
        target=row["target"],
        event_code=row["event_code"],
        summary=row["summary"],
        payload=row["payload"],
        state=row["state"],
        attempts=row["attempts"],
        bundle=row["bundle"],
    )


# -- reads for the pipeline and the CLI (any thread, own connection) ---------


def list_messages(conn, limit: int = 50, state: str | None = None) -> list[sqlite3.Row]:
    """The newest messages, with header fields and state (no raw bytes)."""
    sql = (
        "SELECT m.id, m.received_at, m.sending_application, m.sending_facility, m.message_type, m.trigger_event, "
        "m.control_id, m.state, m.reason, m.flag, m.ack_code, "
        "(SELECT COUNT(*) FROM notifications n WHERE n.message_id = m.id) AS notifications "
        "FROM messages m"
    )
    args: list[Any] = []
    if state:
        sql += " WHERE m.state = ?"
        args.append(state)
    sql += " ORDER BY m.id DESC LIMIT ?"
    args.append(limit)
    return conn.execute(sql, args).fetchall()


def message_detail(conn, message_id: int) -> dict | None:
    """Everything about one message: row, match, notifications, attempts and events."""
    row = conn.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        return None
    match = conn.execute("SELECT * FROM matches WHERE message_id = ?", (message_id,)).fetchone()
    notes = conn.execute(
        "SELECT id, recipient_role, recipient, channel, target, event_code, summary, state, attempts, last_error "
        "FROM notifications WHERE message_id = ? ORDER BY recipient_role",
        (message_id,),
    ).fetchall()
    attempts = conn.execute(
        "SELECT a.* FROM delivery_attempts a JOIN notifications n ON n.id = a.notification_id "
        "WHERE n.message_id = ? ORDER BY a.id",
        (message_id,),
    ).fetchall()
    events = conn.execute("SELECT * FROM events WHERE message_id = ? ORDER BY id", (message_id,)).fetchall()
    return {
        "message": dict(row),
        "match": dict(match) if match else None,
        "notifications": [dict(n) for n in notes],
        "attempts": [dict(a) for a in attempts],
        "events": [dict(e) for e in events],
    }


def notifications_for(conn, message_ids: Iterable[int] | None = None) -> list[sqlite3.Row]:
    """Notifications (without payloads), optionally for some messages only."""
    sql = (
        "SELECT id, message_id, recipient_role, recipient, channel, target, event_code, summary, state, attempts "
        "FROM notifications"
    )
    if message_ids is not None:
        ids = list(message_ids)
        sql += f" WHERE message_id IN ({','.join('?' * len(ids))})"
        return conn.execute(sql + " ORDER BY message_id, recipient_role", ids).fetchall()
    return conn.execute(sql + " ORDER BY message_id, recipient_role").fetchall()


def count_by_state(conn) -> dict[str, int]:
    """Messages per state."""
    return {r[0]: r[1] for r in conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state")}


# -- roster: its own file, replaced whole by each import ------------------------
#
# The roster lives in ``roster.db`` beside the main database, never modified in
# place once published: an import copies it, applies the new version to the
# copy (no lock any other process waits on), makes it durable and renames it
# over ``roster.db``. Readers open the file read-only and ``immutable`` and
# reopen it when it has been replaced (between pipeline batches), so intake
# never waits on an import and a query never sees half of one. Confirmed MRN
# links and the review queue stay in the main database (the server writes
# them); an import's audit event goes there in a small transaction.

#: The roster file's name, in the main database's folder.
ROSTER_FILE = "roster.db"
#: Its schema version (``PRAGMA user_version``); a newer one is refused.
ROSTER_SCHEMA_VERSION = 1

#: Roster columns as matching reads them (see MATCHING_CONTRACT.md).
MEMBER_COLUMNS = (
    "aco_id",
    "member_id",
    "mbi",
    "mrn",
    "mrn_authority",
    "last_name",
    "first_name",
    "middle_name",
    "birth_date",
    "sex",
    "address_line",
    "city",
    "state",
    "zip",
    "phone",
    "pcp_npi",
    "pcp_name",
    "care_manager",
    "effective_start",
    "effective_end",
    "opted_out",
)
#: What a lookup returns of a member: the contract's columns and the normalised
#: person (``gateway.matching.model.pack_person``), so scoring does no normalising.
_ROW_COLUMNS = (*MEMBER_COLUMNS, "person")
_MEMBER_SELECT = ", ".join(f"r.{c}" for c in _ROW_COLUMNS)

_ROSTER_SCHEMA = (
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
    UNIQUE (aco_id, member_id)
);
CREATE INDEX roster_mbi ON roster_members (mbi) WHERE mbi != '';
CREATE INDEX roster_mrn ON roster_members (mrn, mrn_authority COLLATE NOCASE) WHERE mrn != '';
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
CREATE TABLE roster_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)
"""
)


#: How much of the roster file a reader maps into memory (address space; the pages are the OS's cache).
_ROSTER_MMAP_BYTES = 1 << 32


def roster_path(db_path: Path | str) -> Path:
    """The roster file that goes with the main database ``db_path``."""
    return Path(db_path).with_name(ROSTER_FILE)


def key_id(key: str) -> int:
    """A blocking key as the roster stores it: a signed 64-bit hash (collisions only add candidates)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _row(values: tuple) -> dict:
    return dict(zip(_ROW_COLUMNS, values, strict=True))


class RosterSnapshot:
    """One published version of the roster, read-only.

    The file is never modified in place (an import replaces it whole), so it is
    opened ``immutable``: no locks, no journal checks, and the connection keeps
    reading the version it opened even after a newer one is renamed over it.
    With no roster file yet, the snapshot is an empty roster.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # Identity first, then open: if an import lands in between, the identity is
        # the older file's and the next check reopens (never the other way round).
        self.identity = _file_identity(path)
        if self.identity is None:
            self.conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            _run_sql(self.conn, _ROSTER_SCHEMA)
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
        meta = dict(self.conn.execute("SELECT name, value FROM roster_meta").fetchall())
        self.recipe = meta.get("blocking_recipe", "")
        self.version = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM roster_imports").fetchone()[0]
        self._sizes: dict[str, int] = {}

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


class RosterReader:
    """The published roster, followed across imports.

    :meth:`current` costs one ``stat``; when an import has replaced the file
    it opens the new version and closes the old one. Call it between batches,
    not within one, so a batch sees one version throughout.
    """

    def __init__(self, db_path: Path | str) -> None:
        self.path = roster_path(db_path)
        self._snapshot: RosterSnapshot | None = None

    def current(self) -> RosterSnapshot:
        """The newest published version."""
        snapshot = self._snapshot
        if snapshot is None or snapshot.identity != _file_identity(self.path):
            fresh = RosterSnapshot(self.path)
            if snapshot is not None:
                snapshot.close()
            self._snapshot = snapshot = fresh
        return snapshot

    def close(self) -> None:
        """Close the open version."""
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None


def open_roster_snapshot(db_path: Path | str) -> RosterSnapshot:
    """The roster as published now, for the main database ``db_path``."""
    return RosterSnapshot(roster_path(db_path))


@functools.lru_cache(maxsize=32)
def _buckets_sql(keys: int) -> str:
    # One statement for every key of a query; each bucket is read no further than its LIMIT.
    return " UNION ALL ".join(["SELECT * FROM (SELECT key, member FROM roster_keys WHERE key = ? LIMIT ?)"] * keys)


class StoredRoster:
    """The roster lookups matching needs (``gateway.matching.model.RosterLookups``).

    Reads one roster version (``roster``) and the main database's confirmed
    MRN links (``links``, optional). Every lookup goes through an index: the
    MBI and MRN indexes, the blocking-key table (one statement for all of a
    query's keys, each bucket read no further than the cap), members by id.
    """

    def __init__(self, roster: RosterSnapshot, links: sqlite3.Connection | None = None) -> None:
        self._conn = roster.conn
        self._links = links

    def by_mbi(self, mbi: str) -> list[dict]:
        """Members with this MBI (every ACO)."""
        rows = self._conn.execute(
            f"SELECT {_MEMBER_SELECT} FROM roster_members r WHERE r.mbi = ? AND r.mbi != ''", (mbi,)
        )
        return [_row(r) for r in rows]

    def by_mrn(self, mrn: str, authority: str) -> list[dict]:
        """Members with this MRN and assigning authority on the roster, or linked by an accepted review."""
        rows = self._conn.execute(
            f"SELECT {_MEMBER_SELECT} FROM roster_members r WHERE r.mrn = ? AND r.mrn != '' "
            "AND r.mrn_authority = ? COLLATE NOCASE",
            (mrn, authority),
        ).fetchall()
        if self._links is not None:
            seen = {(r[0], r[1]) for r in rows}
            for aco_id, member_id in self._links.execute(
                "SELECT aco_id, member_id FROM confirmed_links WHERE mrn = ? AND mrn_authority = ?", (mrn, authority)
            ).fetchall():
                if (aco_id, member_id) not in seen:
                    seen.add((aco_id, member_id))
                    rows.extend(
                        self._conn.execute(
                            f"SELECT {_MEMBER_SELECT} FROM roster_members r WHERE r.aco_id = ? AND r.member_id = ?",
                            (aco_id, member_id),
                        )
                    )
        return [_row(r) for r in rows]

    def blocking_buckets(self, keys: list[str], cap: int) -> dict[str, list[int]]:
        """Each key's members (row ids), at most ``cap + 1`` of them; one statement for every key."""
        if not keys:
            return {}
        ids = {key_id(k): k for k in keys}
        sql = _buckets_sql(len(ids))
        args: list[int] = []
        for k in ids:
            args += (k, cap + 1)
        buckets: dict[str, list[int]] = {}
        for key, member in self._conn.execute(sql, args):
            buckets.setdefault(ids[key], []).append(member)
        return buckets

    def persons(self, refs: list[int]) -> dict[int, str]:
        """The normalised persons of these members, by row id (what matching's prefilter reads)."""
        if not refs:
            return {}
        marks = ",".join("?" * len(refs))
        return dict(self._conn.execute(f"SELECT id, person FROM roster_members WHERE id IN ({marks})", refs))

    def members(self, refs: list[int]) -> list[dict]:
        """The rows of these members (row ids from :meth:`blocking_buckets`)."""
        if not refs:
            return []
        marks = ",".join("?" * len(refs))
        rows = self._conn.execute(f"SELECT {_MEMBER_SELECT} FROM roster_members r WHERE r.id IN ({marks})", refs)
        return [_row(r) for r in rows]


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
    sql = f"SELECT {_MEMBER_SELECT} FROM roster_members r WHERE r.aco_id = ? AND r.member_id = ?"
    row = roster.conn.execute(sql, (aco_id, member_id)).fetchone()
    return _row(row) if row else None


def roster_imports(roster: RosterSnapshot, limit: int = 20) -> list[dict]:
    """The newest roster imports (versions), with their counts."""
    cur = roster.conn.execute("SELECT * FROM roster_imports ORDER BY id DESC LIMIT ?", (limit,))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur]


# -- roster: import (a copy of the file, published by rename) --------------------


@dataclass(frozen=True)
class RosterImportReport:
    """What one roster import did: rows added / changed / ended / unchanged / rejected.

    ``lock_seconds``: how long the main database's write lock was held (the
    audit event only); ``publish_seconds``: making the new file durable and
    renaming it into place; ``read_seconds`` and ``apply_seconds``: the
    import's other phases (nothing waits on them).
    """

    import_id: int
    acos: tuple[str, ...]
    rows: int
    added: int
    changed: int
    ended: int
    unchanged: int
    rejected: int
    problems: list[tuple[int, str, str]]
    lock_seconds: float
    publish_seconds: float = 0.0
    read_seconds: float = 0.0  # reading, checking and staging the file
    apply_seconds: float = 0.0  # applying the version to the copy


_STAGE_COLUMNS = (*MEMBER_COLUMNS, "person", "keys", "row_hash")
#: Problems an import reports by line; beyond these it gives a count.
MAX_PROBLEMS = 1000
_STAGE_BATCH = 5000
#: Page cache of an import's connection (KiB): big enough to build the key index without thrashing.
_IMPORT_CACHE_KIB = 65536


class roster_lock:  # noqa: N801 - used as a context manager, named for what it holds
    """The lock that serialises roster imports (``roster.lock`` beside the roster file; ``flock``)."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name.replace(".db", ".lock"))
        self._fd: int | None = None

    def __enter__(self) -> roster_lock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another import finishes first
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _open_work_copy(published: Path) -> tuple[sqlite3.Connection, Path]:
    """A private copy of the published roster (or a new empty one), ready to change."""
    work = published.with_name(published.name + ".importing")
    work.unlink(missing_ok=True)  # a crashed import's leftover: never published, safe to drop
    if published.exists():
        shutil.copyfile(published, work)
    conn = sqlite3.connect(str(work), isolation_level=None, check_same_thread=False)
    # The copy is private until renamed into place: no journal (a failure discards
    # the whole copy) and no syncs until it is complete (one fsync before the rename).
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute(f"PRAGMA cache_size=-{_IMPORT_CACHE_KIB}")
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found == 0:
        _run_sql(conn, _ROSTER_SCHEMA)
        conn.execute(f"PRAGMA user_version={ROSTER_SCHEMA_VERSION}")
    elif found > ROSTER_SCHEMA_VERSION:
        conn.close()
        work.unlink(missing_ok=True)
        raise StoreError(f"{published} has roster schema version {found}, newer than this Herald's; upgrade Herald")
    return conn, work


def _publish(conn: sqlite3.Connection, work: Path, published: Path) -> None:
    """Make the finished copy durable and rename it over the published roster (atomic for readers)."""
    conn.execute("PRAGMA journal_mode=DELETE")  # no -wal/-shm/-journal left beside the file
    conn.close()
    fd = os.open(work, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(work, published)
    dir_fd = os.open(published.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _stage(conn: sqlite3.Connection, rows: Iterable, problems: list, keep: set, counted: list[int]) -> tuple[int, int]:
    """Load rows into the connection's TEMP tables; collect problems (``counted[0]``: how many in all).

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
                keep.add((row.aco_id, row.member_id))
            continue
        values = m.values()
        keys = json.dumps([key_id(k) for k in m.keys])
        batch.append((row.line, *values, m.person, keys, m.content_hash_of(values)))
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


def _refresh_derived(conn: sqlite3.Connection) -> None:
    """Recompute every member's normalised person and blocking keys (the recipe changed since they were stored)."""
    from gateway.matching.model import blocking_keys, pack_person, person_from_member

    conn.execute("DELETE FROM roster_keys")
    cols = ", ".join(MEMBER_COLUMNS)
    last = 0
    while True:  # in slices by row id: a million members never sit in memory at once
        rows = conn.execute(
            f"SELECT id, {cols} FROM roster_members WHERE id > ? ORDER BY id LIMIT ?", (last, _STAGE_BATCH)
        ).fetchall()
        if not rows:
            return
        updates, keys = [], []
        for r in rows:
            person = person_from_member(dict(zip(MEMBER_COLUMNS, r[1:], strict=True)))
            updates.append((pack_person(person), r[0]))
            keys.extend((key_id(k), r[0]) for k in blocking_keys(person))
        conn.executemany("UPDATE roster_members SET person = ? WHERE id = ?", updates)
        conn.executemany("INSERT OR IGNORE INTO roster_keys (key, member) VALUES (?, ?)", keys)
        last = rows[-1][0]


def _apply_import(
    conn: sqlite3.Connection,
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
    from gateway.matching.model import BLOCKING_RECIPE, blocking_keys, person_from_member

    conn.execute("BEGIN")
    stored_recipe = conn.execute("SELECT value FROM roster_meta WHERE name = 'blocking_recipe'").fetchone()
    if stored_recipe is not None and stored_recipe[0] != BLOCKING_RECIPE:
        _refresh_derived(conn)
    conn.execute("INSERT OR REPLACE INTO roster_meta (name, value) VALUES ('blocking_recipe', ?)", (BLOCKING_RECIPE,))
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
            effective,
            total,
            rejected,
        ),
    ).lastrowid
    counts = dict(conn.execute("SELECT action, COUNT(*) FROM roster_stage GROUP BY action").fetchall())
    # The changed members' old keys, from the person stored with them (deleted by primary key, no scan).
    old = conn.execute(
        "SELECT r.id, r.person FROM roster_stage s JOIN roster_members r "
        "ON r.aco_id = s.aco_id AND r.member_id = s.member_id WHERE s.action = 'change'"
    ).fetchall()
    stale = [
        (key_id(k), member) for member, packed in old for k in blocking_keys(person_from_member({"person": packed}))
    ]
    conn.executemany("DELETE FROM roster_keys WHERE key = ? AND member = ?", stale)
    cols = ", ".join(c for c in MEMBER_COLUMNS if c != "effective_start")
    conn.execute(
        f"INSERT INTO roster_members ({cols}, effective_start, person, row_hash, import_id) "
        f"SELECT {cols}, CASE WHEN effective_start != '' THEN effective_start ELSE COALESCE(?, '') END, "
        "person, row_hash, ? FROM roster_stage WHERE action = 'add' ORDER BY aco_id, member_id",
        (effective, import_id),
    )
    sets = ", ".join(f"{c} = s.{c}" for c in MEMBER_COLUMNS if c not in ("aco_id", "member_id", "effective_start"))
    # A member coming back after being ended starts again with this version.
    conn.execute(
        f"UPDATE roster_members SET {sets}, "
        "effective_start = CASE WHEN s.effective_start != '' THEN s.effective_start "
        "WHEN roster_members.ended_by IS NOT NULL THEN ? ELSE roster_members.effective_start END, "
        "ended_by = NULL, person = s.person, row_hash = s.row_hash, import_id = ? "
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
    conn.execute("COMMIT")
    return import_id, counts, ended


def _import_roster_file(
    published: Path,
    rows: Iterable,
    *,
    moment: datetime,
    by: str,
    file: str,
    sha256: str,
    fmt: str,
    replace: bool,
    aco_ids: Iterable[str],
    effective: str | None,
    skip_bad_rows: bool,
) -> tuple:
    """Stage, apply and publish under the roster lock; returns what the report and the audit need."""
    from gateway.errors import RosterError

    with roster_lock(published):
        started = time.perf_counter()
        conn, work = _open_work_copy(published)
        try:
            problems: list[tuple[int, str, str]] = []
            keep: set[tuple[str, str]] = set()
            counted = [0]
            total, rejected = _stage(conn, rows, problems, keep, counted)
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
            _publish(conn, work, published)
            publish_seconds = time.perf_counter() - started
        except BaseException:
            conn.close()
            work.unlink(missing_ok=True)
            raise
    seconds = (read_seconds, apply_seconds, publish_seconds)
    return import_id, acos, total, counts, ended, rejected, problems, seconds


def import_roster(
    db_path: Path | str,
    rows: Iterable,
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
) -> RosterImportReport:
    """Import a roster as one new version per ACO, published atomically.

    ``rows`` are :class:`gateway.matching.roster.RosterRow`. The published roster file
    is copied; the rows are staged in the copy's TEMP tables, then new members
    are added, changed ones updated (their blocking keys too), and with
    ``replace`` every member of the file's ACOs (and of ``aco_ids``) missing
    from the file is end-dated the day before ``effective`` (today when not
    given) -- never deleted. A member whose row was rejected keeps its current
    state. The copy is then made durable and renamed over the roster file:
    readers see the old version or the new one, never a mix, and nothing the
    server does waits on the import. One import at a time (``roster.lock``).
    The audit event goes to the main database in one small transaction. Any
    problem rejects the whole file (:class:`RosterError`, nothing published)
    unless ``skip_bad_rows``.
    """
    moment = now or _utc_now()
    stamp = iso(moment)
    who = by or "unknown"
    main = open_database(db_path)
    try:
        # Before the roster lock: a migration may itself publish the roster file.
        migrate(main, now)
    finally:
        main.close()
    published = roster_path(db_path)
    import_id, acos, total, counts, ended, rejected, problems, seconds = _import_roster_file(
        published,
        rows,
        moment=moment,
        by=who,
        file=file,
        sha256=sha256,
        fmt=fmt,
        replace=replace,
        aco_ids=aco_ids,
        effective=effective,
        skip_bad_rows=skip_bad_rows,
    )
    added, changed, same = counts.get("add", 0), counts.get("change", 0), counts.get("same", 0)
    detail = {
        "import": import_id,
        "file": Path(file).name,
        "format": fmt,
        "acos": acos,
        "by": who,
        "effective": effective,
        "added": added,
        "changed": changed,
        "ended": ended,
        "unchanged": same,
        "rejected": rejected,
    }
    lock_seconds = _record_roster_event(db_path, stamp, detail)
    read_seconds, apply_seconds, publish_seconds = seconds
    return RosterImportReport(
        import_id,
        tuple(acos),
        total,
        added,
        changed,
        ended,
        same,
        rejected,
        problems,
        lock_seconds,
        publish_seconds,
        read_seconds,
        apply_seconds,
    )


@contextlib.contextmanager
def _write_transaction(db_path: Path | str, now: datetime | None = None, *, migrated: bool = True):
    """A connection to the main database inside ``BEGIN IMMEDIATE``: committed when the block
    ends, rolled back on any exception, closed either way. ``migrated`` brings the schema up
    to date first (the CLI's commands may be the first to open an old database)."""
    conn = open_database(db_path)
    try:
        if migrated:
            migrate(conn, now)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()


def _record_roster_event(db_path: Path | str, stamp: str, detail: dict) -> float:
    """Audit a published import in the main database (one small transaction); returns the seconds it held the lock."""
    started = time.perf_counter()
    with _write_transaction(db_path, migrated=False) as conn:
        _event(conn, stamp, None, None, "roster", "roster-imported", detail)
    return time.perf_counter() - started


def import_members_sync(
    db_path: Path | str, members: list, source: str, rejected: int = 0, now: datetime | None = None
) -> int:
    """Add or update ``members`` (:class:`gateway.matching.roster.RosterMember`), ending nobody. Returns how many."""
    from gateway.matching.roster import RosterRow

    rows = (RosterRow(n, m, (), m.aco_id, m.member_id) for n, m in enumerate(members, start=2))
    report = import_roster(db_path, rows, file=source, fmt="members", replace=False, by="herald", now=now)
    return report.added + report.changed + report.unchanged


# -- matches and the review queue ----------------------------------------------

REVIEW_OPEN = "open"
REVIEW_ACCEPTED = "accepted"
REVIEW_REJECTED = "rejected"


def _record_match(conn, message_id: int, match, review: dict | None, now: str) -> None:
    """Store a message's match (grade, method, score) and, when held, open its review."""
    conn.execute(
        "INSERT OR REPLACE INTO matches (message_id, aco_id, member_id, method, grade, score, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (message_id, match.aco_id, match.member_id, match.method, match.grade, match.score, json.dumps(match.detail)),
    )
    if review is not None:
        conn.execute(
            "INSERT INTO reviews (message_id, state, created_at, grade, score, candidates) VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, REVIEW_OPEN, now, match.grade, match.score, json.dumps(review["candidates"])),
        )


def stored_match(conn, message_id: int) -> dict | None:
    """A message's match row (grade, method, score, member, detail as a dict)."""
    row = conn.execute("SELECT * FROM matches WHERE message_id = ?", (message_id,)).fetchone()
    if row is None:
        return None
    item = dict(row)
    item["detail"] = json.loads(item["detail"] or "{}")
    return item


def list_reviews(conn, state: str | None = REVIEW_OPEN, limit: int = 100) -> list[dict]:
    """Reviews (open ones by default), oldest first, with their message's header fields."""
    sql = (
        "SELECT v.*, m.received_at, m.sending_application, m.sending_facility, m.trigger_event, m.control_id, "
        "m.fhir, m.state AS message_state FROM reviews v JOIN messages m ON m.id = v.message_id"
    )
    args: list[Any] = []
    if state:
        sql += " WHERE v.state = ?"
        args.append(state)
    sql += " ORDER BY v.id LIMIT ?"
    args.append(limit)
    out = []
    for row in conn.execute(sql, args):
        item = dict(row)
        item["candidates"] = json.loads(item["candidates"])
        out.append(item)
    return out


def review_detail(conn, review_id: int) -> dict | None:
    """One review with what deciding it needs: the stored message (raw bytes, charset, receipt time)."""
    row = conn.execute(
        "SELECT v.*, m.raw, m.charset, m.received_at, m.control_id, m.state AS message_state "
        "FROM reviews v JOIN messages m ON m.id = v.message_id WHERE v.id = ?",
        (review_id,),
    ).fetchone()
    if row is None:
        return None
    item = dict(row)
    item["candidates"] = json.loads(item["candidates"])
    return item


def _decide(conn, review_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT id, message_id, state FROM reviews WHERE id = ?", (review_id,)).fetchone()
    if row is None:
        raise StoreError(f"no review with id {review_id}")
    if row["state"] != REVIEW_OPEN:
        raise StoreError(f"review {review_id} is already {row['state']}")
    return row


def _insert_notification(conn, n, now: str, due: float) -> None:
    """One outbox row, pending from ``due`` (reactor seconds), and its ``routed`` audit event."""
    conn.execute(
        "INSERT INTO notifications (id, message_id, recipient_role, recipient, channel, target, event_code, "
        "summary, payload, state, attempts, next_attempt_at, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
        (
            n.id,
            n.message_id,
            n.recipient_role,
            n.recipient,
            n.channel,
            n.target,
            n.event_code,
            n.summary,
            n.payload,
            PENDING,
            due,
            now,
            now,
        ),
    )
    _event(
        conn,
        now,
        n.message_id,
        n.id,
        "router",
        "routed",
        {"role": n.recipient_role, "channel": n.channel, "target": n.target},
    )


def accept_review(
    db_path: Path | str,
    review_id: int,
    *,
    aco_id: str,
    member_id: str,
    notifications: list,
    events: list[tuple[str, dict]],
    mrns: Iterable[tuple[str, str]],
    by: str,
    now: datetime | None = None,
) -> str:
    """Accept a review in one transaction: route the held notifications, remember the MRN links.

    The message's MRNs (value, assigning authority) become confirmed links to
    the member, so the next message carrying one of them matches ``certain``
    by MRN. Returns the message's new state. Raises :class:`StoreError` when
    the review does not exist or was already decided.
    """
    stamp = iso(now or _utc_now())
    with _write_transaction(db_path, now) as conn:
        row = _decide(conn, review_id)
        message_id = row["message_id"]
        conn.execute(
            "UPDATE reviews SET state = ?, decided_by = ?, decided_at = ?, aco_id = ?, member_id = ? WHERE id = ?",
            (REVIEW_ACCEPTED, by, stamp, aco_id, member_id, review_id),
        )
        conn.execute(
            "UPDATE matches SET aco_id = ?, member_id = ?, method = 'review', "
            "detail = json_set(COALESCE(detail, '{}'), '$.review', ?, '$.reviewed_by', ?) WHERE message_id = ?",
            (aco_id, member_id, review_id, by, message_id),
        )
        _event(
            conn,
            stamp,
            message_id,
            None,
            "review",
            "review-accepted",
            {"review": review_id, "by": by, "aco": aco_id, "member": member_id},
        )
        for kind, detail in events:
            _event(conn, stamp, message_id, None, "review", kind, detail)
        due = time.time()
        for n in notifications:
            _insert_notification(conn, n, stamp, due)
        for mrn, authority in mrns:
            conn.execute(
                "INSERT OR REPLACE INTO confirmed_links (mrn, mrn_authority, aco_id, member_id, review_id, "
                "confirmed_by, confirmed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (mrn, authority, aco_id, member_id, review_id, by, stamp),
            )
        state = _settle(conn, message_id, MATCHED, stamp)
    return state


def reject_review(
    db_path: Path | str, review_id: int, *, by: str, reason: str = "", now: datetime | None = None
) -> str:
    """Reject a review: the message is unmatched (its HIE notification stands). Returns its new state."""
    stamp = iso(now or _utc_now())
    with _write_transaction(db_path, now) as conn:
        row = _decide(conn, review_id)
        message_id = row["message_id"]
        conn.execute(
            "UPDATE reviews SET state = ?, decided_by = ?, decided_at = ?, note = ? WHERE id = ?",
            (REVIEW_REJECTED, by, stamp, reason or None, review_id),
        )
        conn.execute(
            "UPDATE matches SET aco_id = NULL, member_id = NULL, grade = 'none', method = 'review', "
            "detail = json_set(COALESCE(detail, '{}'), '$.review', ?, '$.reviewed_by', ?) WHERE message_id = ?",
            (review_id, by, message_id),
        )
        _event(
            conn,
            stamp,
            message_id,
            None,
            "review",
            "review-rejected",
            {"review": review_id, "by": by, **({"reason": reason} if reason else {})},
        )
        state = _settle(conn, message_id, UNMATCHED, stamp)
    return state


def _settle(conn, message_id: int, without_notifications: str, now: str) -> str:
    """Move a message out of ``review``: ``routed`` if it has notifications, else the given state."""
    has = conn.execute("SELECT 1 FROM notifications WHERE message_id = ? LIMIT 1", (message_id,)).fetchone()
    state = ROUTED if has else without_notifications
    conn.execute(
        "UPDATE messages SET state = ?, updated_at = ? WHERE id = ? AND state = ?", (state, now, message_id, REVIEW)
    )
    return state
