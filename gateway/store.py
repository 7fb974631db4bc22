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
import hashlib
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
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
    """One outbox row: a Bundle for one recipient over one channel (see :mod:`gateway.routing`)."""

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
            m = o.match
            conn.execute(
                "INSERT OR REPLACE INTO matches (message_id, aco_id, member_id, method, grade, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (o.message_id, m.aco_id, m.member_id, m.method, m.grade, json.dumps(m.detail)),
            )
        for n in o.notifications:
            conn.execute(
                "INSERT INTO notifications (id, message_id, recipient_role, recipient, channel, target, "
                "event_code, summary, payload, state, attempts, next_attempt_at, created_at, updated_at) "
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
                    now_seconds,
                    now,
                    now,
                ),
            )
            _event(
                conn,
                now,
                o.message_id,
                n.id,
                "router",
                "routed",
                {"role": n.recipient_role, "channel": n.channel, "target": n.target},
            )
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

    # -- roster ------------------------------------------------------------

    def replace_members(self, members: list, now: str | None = None) -> defer.Deferred[int]:
        """Insert or update roster members (keyed by ACO id and member id)."""
        return self.submit(upsert_members, members, now or iso(self.clock()))


def upsert_members(conn: sqlite3.Connection, members: list, now: str) -> int:
    """Insert or update roster members in the current transaction."""
    conn.executemany(
        "INSERT INTO roster_members (aco_id, member_id, mbi, mrn, mrn_authority, last_name, first_name, birth_date, "
        "sex, pcp_npi, pcp_name, care_manager, effective_start, effective_end, name_key, imported_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (aco_id, member_id) DO UPDATE SET mbi = excluded.mbi, mrn = excluded.mrn, "
        "mrn_authority = excluded.mrn_authority, last_name = excluded.last_name, first_name = excluded.first_name, "
        "birth_date = excluded.birth_date, sex = excluded.sex, pcp_npi = excluded.pcp_npi, "
        "pcp_name = excluded.pcp_name, care_manager = excluded.care_manager, "
        "effective_start = excluded.effective_start, effective_end = excluded.effective_end, "
        "name_key = excluded.name_key, imported_at = excluded.imported_at",
        [
            (
                m.aco_id,
                m.member_id,
                m.mbi,
                m.mrn,
                m.mrn_authority,
                m.last_name,
                m.first_name,
                m.birth_date,
                m.sex,
                m.pcp_npi,
                m.pcp_name,
                m.care_manager,
                m.effective_start,
                m.effective_end,
                m.name_key,
                now,
            )
            for m in members
        ],
    )
    return len(members)


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


def members_by_mbi(conn, mbi: str) -> list[sqlite3.Row]:
    """Roster rows with this MBI."""
    return conn.execute("SELECT * FROM roster_members WHERE mbi = ?", (mbi,)).fetchall()


def members_by_mrn(conn, mrn: str, authority: str) -> list[sqlite3.Row]:
    """Roster rows with this MRN and assigning authority."""
    return conn.execute(
        "SELECT * FROM roster_members WHERE mrn = ? AND mrn_authority = ? COLLATE NOCASE", (mrn, authority)
    ).fetchall()


def members_by_name_key(conn, name_key: str) -> list[sqlite3.Row]:
    """Roster rows with this normalised last name + first name + birth date + sex key."""
    return conn.execute("SELECT * FROM roster_members WHERE name_key = ?", (name_key,)).fetchall()


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


def import_members_sync(
    db_path: Path | str, members: list, source: str, rejected: int, now: datetime | None = None
) -> int:
    """Write roster members from the CLI (its own connection; safe while a server runs)."""
    conn = open_database(db_path)
    try:
        migrate(conn, now)
        stamp = iso(now or _utc_now())
        conn.execute("BEGIN IMMEDIATE")
        try:
            count = upsert_members(conn, members, stamp)
            _event(
                conn,
                stamp,
                None,
                None,
                "roster",
                "roster-imported",
                {"file": Path(source).name, "members": count, "rejected_rows": rejected},
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return count
    finally:
        conn.close()


def roster_count(conn) -> int:
    """How many members the roster holds."""
    return conn.execute("SELECT COUNT(*) FROM roster_members").fetchone()[0]
