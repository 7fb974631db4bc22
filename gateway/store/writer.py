"""The writer thread and the reader thread: how work reaches the database.

A single writer thread owns the write connection; callers hand it jobs
(functions of a connection) and get a Deferred back, or, from a thread that is
not the reactor's (the CLI, a console's worker thread), wait for the result
with :meth:`Writer.call`. The writer takes every job waiting in its queue,
runs them in one transaction and commits once: that is the group commit that
keeps throughput up when many connections deliver at once. Reads run on a
thread of their own with a read-only connection.

A server's store (:attr:`Writer.inline`, SQLite) commits intake's jobs on
the reactor's thread instead whenever the writer thread is idle: the jobs
submitted in one turn of the reactor, one commit at its end. That saves two
thread hand-offs an ACK (the queue's wake-up and ``callFromThread``'s), the
larger part of an ACK's cost at one connection. When the writer thread is
busy (pipeline outcomes, a checkpoint) or another process holds the
database's write lock, the jobs go to its queue as before: the reactor never
waits for a lock.

Every write Herald makes goes through here, stamped by the writer's injected
clock; the jobs themselves (SQL only) live in the store's other modules.
"""

from __future__ import annotations

import collections
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from gateway.errors import StoreError
from gateway.store.events import gathered
from gateway.store.files import create_private_file, private_folder
from gateway.store.integrity import resume_chain
from gateway.store.keys import KeyRing
from gateway.store.postgres import LOCK_WAIT_SECONDS, PostgresDatabase, is_postgres
from gateway.store.schema import check_keys, iso, migrate, open_database, utc_now

__all__ = ["Writer"]


class _Job:
    """A function of a connection, its arguments, and who waits for it (a Deferred, a Future or nobody)."""

    __slots__ = ("fn", "args", "waiter")

    def __init__(self, fn, args, waiter) -> None:
        self.fn = fn
        self.args = args
        self.waiter = waiter


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

    def __init__(self, path: Path, deliver: Callable[[list], None], keys: KeyRing | None = None) -> None:
        self._path = path
        self._deliver = deliver
        self._keys = keys
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
                            # On PostgreSQL this thread also makes the nodes' claims (gateway.store.claims):
                            # small writes that must not wait for intake's commits.
                            claims = isinstance(self._path, PostgresDatabase)
                            conn = open_database(self._path, readonly=not claims, keys=self._keys)
                        conn.execute("BEGIN")
                        try:
                            value = job.fn(conn, *job.args)
                        except BaseException:
                            _rollback(conn)  # a claim made before the failure is not kept
                            raise
                        conn.execute("COMMIT")  # a claim is the caller's only once this returns
                        results.append((job, True, value))
                    except Exception as e:
                        results.append((job, False, StoreError(f"store read failed: {e}")))
                        if is_postgres(conn) and _lost(conn):
                            conn.close()
                            conn = None  # opened again for the next read (a restarted or failed-over server)
                self._deliver(results)
                if stop:
                    return
        finally:
            if conn is not None:
                conn.close()


class Writer:
    """The database's one writer thread and its reader thread.

    The writer serves the ACK path first. Jobs given to :meth:`submit`
    (intake) all go into the next commit; jobs given to
    :meth:`submit_background` (pipeline outcomes, delivery records) take turns,
    :attr:`BACKGROUND_PER_COMMIT` at a time, riding a commit with the intake
    jobs waiting then, so an ACK never waits behind a queue of large pipeline
    writes.

    ``clock`` stamps every write (``iso(clock())``); ``reactor`` runs the
    callbacks of Deferreds and gives the seconds outbox rows fall due in.
    ``keys`` seals and opens PHI (:mod:`gateway.store.sealing`); without it
    values are stored as given. A database written with another ring is
    refused (:class:`~gateway.store.keys.KeyRingError`).
    """

    _log = Logger()

    #: Whether :meth:`submit`'s jobs are committed on the reactor's thread when the writer thread is
    #: idle (see the module's docstring). ``make_service`` turns it on for a server on SQLite
    #: (``[storage] commit_on_reactor``); a store on PostgreSQL (one round trip a statement) always
    #: uses the writer thread.
    inline = False
    #: A commit on the reactor's thread slower than this (seconds) is slow. :attr:`SLOW_INLINE_COMMITS` of
    #: them within :attr:`SLOW_INLINE_WINDOW_SECONDS`, or one of a second or more (a disk stalling, not
    #: a flush's ordinary hiccup), send intake's commits to the writer thread for
    #: :attr:`INLINE_PAUSE_SECONDS`: a disk in trouble holds the reactor up (other connections, health
    #: checks, the console) a few times, not at every ACK.
    SLOW_INLINE_COMMIT_SECONDS = 0.05
    SLOW_INLINE_COMMITS = 3
    SLOW_INLINE_WINDOW_SECONDS = 30.0
    STALLED_INLINE_COMMIT_SECONDS = 1.0
    INLINE_PAUSE_SECONDS = 60.0
    #: Largest number of queued jobs committed together.
    MAX_GROUP = 512
    #: Background jobs added to one commit.
    BACKGROUND_PER_COMMIT = 1
    #: Background writes wait at most this long for a commit to ride with.
    IDLE_FLUSH_SECONDS = 0.5
    #: The write-ahead log is checkpointed and truncated, between commits, once it
    #: is larger than this (``wal_limit``, ``[storage] wal_limit_mb``); when the
    #: writer is idle, once it is larger than a sixteenth of it. Readers that
    #: always overlap keep SQLite's own checkpoints from ever resetting the log.
    WAL_LIMIT_BYTES = 64 * 1024 * 1024
    #: How often (seconds) the log's size is looked at between commits.
    WAL_CHECK_SECONDS = 1.0
    #: How long a checkpoint waits for readers to leave the log (ms) before trying later:
    #: it runs on the writer thread, so an ACK may wait this long behind it. Past the
    #: limit, each failed try doubles the wait, up to the maximum: readers that keep
    #: overlapping would otherwise starve it. An idle writer always waits the least.
    WAL_CHECKPOINT_WAIT_MS = 50
    WAL_CHECKPOINT_MAX_WAIT_MS = 2000

    def __init__(
        self, path: Path | str, reactor=None, clock: Callable[[], datetime] = utc_now, keys: KeyRing | None = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.path = path if isinstance(path, PostgresDatabase) else Path(path)
        self._reactor = reactor
        self.clock = clock
        self.keys = keys or KeyRing.disabled()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._background: collections.deque = collections.deque()
        self._riders: collections.deque = collections.deque()
        self._conn = open_database(self.path, keys=self.keys)
        try:
            migrate(self._conn, clock())
            _begin(self._conn)
            try:
                check_keys(self._conn, self.path, record=True)
            finally:
                self._conn.execute("COMMIT")
        except BaseException:
            self._conn.close()
            raise
        self._resume_chain()
        #: PostgreSQL keeps its own log (the WAL bound below is SQLite's), and several nodes claim work.
        self._postgres = is_postgres(self._conn)
        #: This node's name on the claims it makes (PostgreSQL: gateway.store.claims): its host and the
        #: id kept in its data folder (``node-id``), the same after a restart, so a node restarted after
        #: a crash takes back at once what it held (:meth:`serve_as_node`).
        self.node = f"{socket.gethostname()}:{node_id(self.path.folder)}" if self._postgres else ""
        #: Whether this is the node's server (:meth:`serve_as_node`), which gives up its claims when it stops.
        self._serving = False
        if self._postgres:
            self._conn.execute(f"SET lock_timeout = '{LOCK_WAIT_SECONDS}s'")
        self._thread = threading.Thread(target=self._run, name="herald-store-writer", daemon=True)
        self._reader = _ReadThread(self.path, self._deliver, self.keys)
        #: Held by whichever thread uses the write connection: the writer thread, or the
        #: reactor's thread committing intake's jobs itself (:attr:`inline`).
        self._conn_lock = threading.Lock()
        #: Jobs :meth:`submit` took in this turn of the reactor, committed together at its end (:attr:`inline`).
        self._pending: list[_Job] = []
        self._flush_call = None
        #: Commits made on the reactor's thread (:attr:`inline`), and those that were slow.
        self.inline_commits = 0
        self.slow_inline_commits = 0
        #: The monotonic time until which intake's commits stay on the writer thread (after slow ones),
        #: and when the last slow ones began.
        self._inline_paused_until = 0.0
        self._slow_starts: collections.deque = collections.deque(maxlen=self.SLOW_INLINE_COMMITS)
        self._monotonic = time.monotonic
        self._started = False
        self.commits = 0
        self.jobs = 0
        #: Connections opened again after the PostgreSQL server ended one.
        self.reconnects = 0
        #: Commits that ran again job by job because one job failed.
        self.replays = 0
        self.wal_limit = self.WAL_LIMIT_BYTES
        self._wal = Path(self.path).with_name(self.path.name + "-wal")
        self._next_wal_check = 0.0
        self._wal_dirty = True  # written to since the last checkpoint that emptied the log
        self._checkpoint_wait_ms = self.WAL_CHECKPOINT_WAIT_MS
        self._checkpoint_error = ""
        #: Checkpoints that truncated the log, and the largest size it was seen at.
        self.checkpoints = 0
        self.wal_peak = 0

    def _resume_chain(self) -> None:
        """The audit chain under this ring (:func:`~gateway.store.integrity.resume_chain`), in its own transaction."""
        conn = self._conn
        try:
            _begin(conn)
            try:
                said = resume_chain(conn, iso(self.clock()))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        if said:
            self._log.warn("audit trail: {said}", said=said)

    def seconds(self) -> float:
        """The reactor's clock, in seconds: what outbox rows' due times are measured in."""
        return self._reactor.seconds()

    # -- starting and stopping ---------------------------------------------------

    def start(self) -> None:
        """Start the writer and reader threads."""
        if not self._started:
            self._started = True
            self._thread.start()
            self._reader.start()

    def stop(self) -> defer.Deferred:
        """Finish the queued jobs, stop the threads and close the database (off the reactor)."""
        if not self._started:
            self._conn.close()
            return defer.succeed(None)
        self._queue_pending()
        self._started = False
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._shut_down)

    def close(self) -> None:
        """:meth:`stop`, blocking: for a caller that has no running reactor (the CLI)."""
        if not self._started:
            self._conn.close()
            return
        self._queue_pending()
        self._started = False
        self._shut_down()

    def _shut_down(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        self._reader.stop()
        if self._serving:
            self._give_up_claims()
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
            self._deliver(leftovers)

    def serve_as_node(self) -> None:
        """Be this node's server (PostgreSQL): the only process that claims work under its name.

        Refuses (:class:`StoreError`) when another live process serves under
        the same name (a second server on this data folder, or a copy of the
        folder on another machine with the same host name): a session advisory
        lock, held until this connection ends. Then it takes back at once what
        a previous run of this node died holding. A store opened by a command
        (``herald review``, ``roster``, ...) is not the server: it claims
        nothing and gives up nothing.
        """
        if not self._postgres or self._serving:
            return
        if not self._hold_node_lock(self._conn):
            raise StoreError(
                f"another Herald server runs as node {self.node} on this database "
                f"(a second server on {self.path.folder}, or a copy of it): each node needs its own data folder"
            )
        self._serving = True
        self._give_up_claims()

    def _hold_node_lock(self, conn) -> bool:
        """Take this node's session lock on ``conn`` (held until it closes); False when another process holds it."""
        from gateway.store.claims import take_lead

        conn.execute("BEGIN")
        try:
            return take_lead(conn, "node:" + self.node)
        finally:
            conn.execute("COMMIT")

    def _give_up_claims(self) -> None:
        """A node stopping gives up the work it claimed and did not finish, so the others take it at once."""
        from gateway.store.claims import release_messages, release_notifications

        try:
            self._conn.execute("BEGIN")
            messages = release_messages(self._conn, self.node)
            notifications = release_notifications(self._conn, self.node)
            self._conn.execute("COMMIT")
        except sqlite3.Error as e:
            _rollback(self._conn)
            self._log.warn("could not give up this node's claims (their leases will run out): {error}", error=str(e))
            return
        if messages or notifications:
            self._log.info(
                "gave up {messages} message(s) and {notifications} notification(s) claimed and not finished",
                messages=messages,
                notifications=notifications,
            )

    @property
    def postgres(self) -> bool:
        """Whether the store is on PostgreSQL (work is claimed: gateway.store.claims)."""
        return self._postgres

    # -- handing work over -------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``fn(conn, *args)`` in the writer's next transaction; fire with its result.

        ``fn`` may run twice: when another job of its commit fails, the
        commit is rolled back and its jobs run again one savepoint each. So
        it must do nothing but SQL on ``conn``.
        """
        if not self._started:
            return defer.fail(StoreError("the store is not running"))
        d: defer.Deferred = defer.Deferred()
        if self.inline and not self._postgres:
            self._pending.append(_Job(fn, args, d))
            if self._flush_call is None:  # at the end of this turn: the frames read in it share a commit
                self._flush_call = self._reactor.callLater(0, self._flush_pending)
            return d
        self._queue.put(_Job(fn, args, d))
        return d

    def _flush_pending(self) -> None:
        """Commit the jobs :meth:`submit` took this turn, here on the reactor's thread if the writer thread is idle.

        Else (it is busy, work waits in its queue, or another process holds
        the database's write lock) they go to its queue, as without
        :attr:`inline`.
        """
        self._flush_call = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        results = None
        if (
            not self._background
            and self._queue.empty()
            and self._monotonic() >= self._inline_paused_until
            and self._conn_lock.acquire(blocking=False)
        ):
            try:
                results = self._commit_here(batch)
            finally:
                self._conn_lock.release()
        if results is None:
            for job in batch:
                self._queue.put(job)
            return
        self._fire(results)

    def _commit_here(self, batch: list[_Job]) -> list | None:
        """Run ``batch`` and the riders in one transaction on this thread, or return None: the writer thread's then.

        None when another process holds the write lock, and when anything
        fails before the commit (a job, the database): the writer thread runs
        the batch again, and answers each job, as it would have (a failing
        job alone, by its savepoints). Here no lock is waited for
        (``busy_timeout=0``). SQLite's automatic checkpoint may run in the
        COMMIT (a few milliseconds each ~4 MB of log): keeping it off this
        thread let the log grow to ~20 MB between the writer thread's
        truncations and cost more than it saved (bench/README.md). A failed
        COMMIT is answered here (AE).
        """
        conn = self._conn
        started = self._monotonic()
        conn.execute("PRAGMA busy_timeout=0")
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error:
                return None
            self._take_riders(batch)
            try:
                results = self._run_begun(conn, batch, replay=False)
            except Exception:
                results = None
            if results is None:
                _rollback(conn)
                return None
        finally:
            conn.execute("PRAGMA busy_timeout=10000")
        self.commits += 1
        self.inline_commits += 1
        self.jobs += len(batch)
        self._wal_dirty = True
        took = self._monotonic() - started
        if took > self.SLOW_INLINE_COMMIT_SECONDS:
            self._slow_commit(started, took)
        return results

    def _slow_commit(self, started: float, took: float) -> None:
        self.slow_inline_commits += 1
        slow = self._slow_starts
        slow.append(started)
        repeated = len(slow) == slow.maxlen and started - slow[0] <= self.SLOW_INLINE_WINDOW_SECONDS
        if not repeated and took < self.STALLED_INLINE_COMMIT_SECONDS:
            return
        slow.clear()
        self._inline_paused_until = started + took + self.INLINE_PAUSE_SECONDS
        self._log.warn(
            "commits on the listener's thread are slow ({count} over {limit} ms, the last {delay} ms: the disk?): "
            "intake's commits go to the store's writer thread for the next {seconds} s",
            count=1 if not repeated else self.SLOW_INLINE_COMMITS,
            limit=round(self.SLOW_INLINE_COMMIT_SECONDS * 1000),
            delay=round(took * 1000),
            seconds=round(self.INLINE_PAUSE_SECONDS),
        )

    def _take_riders(self, batch: list[_Job]) -> None:
        """Put the riders waiting at the head of ``batch``: they were written down first (an ACK's ``ack-sent``
        before the next frame's ``received``). Both threads take them: popleft until empty, never check then pop.
        """
        riders = self._riders
        taken = []
        while True:
            try:
                taken.append(riders.popleft())
            except IndexError:
                break
        batch[:0] = taken

    def _queue_pending(self) -> None:
        """Hand the jobs waiting for this turn's end to the writer thread (the store is stopping)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        batch, self._pending = self._pending, []
        for job in batch:
            self._queue.put(job)

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

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
        """Run ``fn(conn, *args)`` in the writer's next transaction and wait for its result.

        For threads other than the reactor's: the answer does not pass through
        the reactor, so it works with none running. Raises what ``fn`` raised.
        """
        if not self._started:
            raise StoreError("the store is not running")
        future: Future = Future()
        self._queue.put(_Job(fn, args, future))
        return future.result(timeout)

    def read(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
        """Run ``fn(conn, *args)`` on the reader thread, in a read transaction, and wait for its result.

        Like :meth:`call`, for threads other than the reactor's.
        """
        if not self._started:
            raise StoreError("the store is not running")
        future: Future = Future()
        self._reader.submit(_Job(fn, args, future))
        return future.result(timeout)

    # -- the writer thread -------------------------------------------------------

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
            with self._conn_lock:  # the reactor's thread may be committing (inline)
                if batch:
                    if self._postgres and _lost(conn):
                        conn = self._reconnect(conn)
                    self._commit_group(conn, batch)
                self._bound_wal(conn, idle=not batch)
            if stopping and not background and not self._riders:
                return

    def _bound_wal(self, conn: sqlite3.Connection, idle: bool) -> None:
        """Checkpoint and truncate the write-ahead log when it has grown (between commits; never in one)."""
        if self._postgres:
            return
        if not idle:
            self._wal_dirty = True
            now = time.monotonic()
            if now < self._next_wal_check:
                return
            self._next_wal_check = now + self.WAL_CHECK_SECONDS
        elif not self._wal_dirty:
            return
        try:
            size = os.stat(self._wal).st_size
        except OSError:
            return
        self.wal_peak = max(self.wal_peak, size)
        if size <= (self.wal_limit // 16 if idle else self.wal_limit):
            if idle:
                self._wal_dirty = False
            return
        wait = self.WAL_CHECKPOINT_WAIT_MS if idle else self._checkpoint_wait_ms
        try:
            conn.execute(f"PRAGMA busy_timeout={wait}")
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as e:  # a full disk: said once, tried again after the next commit
            if str(e) != self._checkpoint_error:
                self._log.warn("checkpointing the write-ahead log failed: {error}", error=str(e))
            self._checkpoint_error = str(e)
            self._wal_dirty = False
            return
        finally:
            conn.execute("PRAGMA busy_timeout=10000")
        self._checkpoint_error = ""
        if busy:  # a reader still uses the log: tried again at the next check (past the limit, waiting longer)
            if not idle:
                self._checkpoint_wait_ms = min(2 * self._checkpoint_wait_ms, self.WAL_CHECKPOINT_MAX_WAIT_MS)
            return
        self.checkpoints += 1
        self._wal_dirty = False
        self._checkpoint_wait_ms = self.WAL_CHECKPOINT_WAIT_MS

    def _reconnect(self, lost):
        """A new connection for one the PostgreSQL server ended (a restart, a failover); the old one if none can be had.

        Until one can, every commit fails and intake answers AE/CE (a sender
        sends again); the next commit tries again.
        """
        try:
            conn = open_database(self.path, keys=self.keys)
        except StoreError as e:
            self._log.warn("the database is unreachable: {error}", error=str(e))
            return lost
        if hasattr(lost, "episode_flags"):
            conn.episode_flags = lost.episode_flags
        conn.execute(f"SET lock_timeout = '{LOCK_WAIT_SECONDS}s'")
        if self._serving:  # the node's own lock went with the old connection
            self._hold_node_lock(conn)
        lost.close()
        self._conn = conn
        # Session locks went with the old connection: what this node led (Store.lead) it asks for again.
        self._leading = frozenset()
        self.reconnects += 1
        self._log.info("reconnected to the database")
        return conn

    def _commit_group(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        try:
            results = self._run_batch(conn, batch)
        except Exception as e:  # the writer thread must outlive any failure
            self._log.failure("store writer batch failed")
            _rollback(conn)
            results = [(job, False, StoreError(f"store failure: {e}")) for job in batch]
        self.commits += 1
        self.jobs += len(batch)
        self._deliver(results)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> list:
        try:
            _begin(conn)
        except sqlite3.Error as e:
            err = StoreError(f"could not begin a transaction: {e}")
            return [(job, False, err) for job in batch]
        return self._run_begun(conn, batch)

    def _run_begun(self, conn: sqlite3.Connection, batch: list[_Job], replay: bool = True) -> list | None:
        """Run ``batch`` in the transaction just begun and commit it; each job's (job, ok, value).

        When a job of several fails: with ``replay``, each runs again in its
        savepoint; without, the transaction is rolled back and None returned.
        """
        # Optimistic: every job straight into the transaction, no savepoints
        # (two statements a job saved). Jobs almost never fail; when one does,
        # the whole group is rolled back and run again, one savepoint a job,
        # so that job fails alone.
        try:
            if all(getattr(job.fn, "appends_only", False) for job in batch):
                with gathered(conn):  # intake's frames and events: their audit events chained in one insert
                    results = [(job, True, job.fn(conn, *job.args)) for job in batch]
            else:
                results = [(job, True, job.fn(conn, *job.args)) for job in batch]
        except Exception as e:
            _rollback(conn)
            if len(batch) == 1:
                return [(batch[0], False, e)]
            if not replay:
                return None
            self.replays += 1
            return self._run_isolated(conn, batch)
        return self._commit(conn, results)

    def _run_isolated(self, conn: sqlite3.Connection, batch: list[_Job]) -> list:
        """Run each job in its own savepoint, so that one failing job is undone alone."""
        try:
            _begin(conn)
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

    def _deliver(self, results: list) -> None:
        """Hand results to their waiters: Futures here (any thread), Deferreds on the reactor's thread."""
        deferred = []
        for item in results:
            job, ok, value = item
            if isinstance(job.waiter, Future):
                if ok:
                    job.waiter.set_result(value)
                else:
                    job.waiter.set_exception(value)
            else:
                deferred.append(item)
        if deferred:
            self._reactor.callFromThread(self._fire, deferred)

    def _fire(self, results: list) -> None:
        for job, ok, value in results:
            if job.waiter is None:
                if not ok:
                    self._log.error("background store write failed: {error}", error=repr(value))
                continue
            if ok:
                job.waiter.callback(value)
            else:
                job.waiter.errback(value)


def node_id(folder: Path) -> str:
    """This node's id, kept in its data folder (``node-id``, made at its first start on PostgreSQL)."""
    path = Path(folder) / "node-id"
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    private_folder(path.parent)
    made = uuid.uuid4().hex[:16]
    temp = path.with_name(f".node-id.{os.getpid()}")
    create_private_file(temp)
    temp.write_text(made + "\n", encoding="ascii")
    try:
        os.link(temp, path)  # first writer wins: a second process starting at once reads the same id
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return path.read_text(encoding="ascii").strip()


def _lost(conn) -> bool:
    """Whether a PostgreSQL connection was ended (by the server, or the network): it must be opened again."""
    return conn.raw.closed or conn.raw.broken


def _begin(conn) -> None:
    """Begin a write transaction: SQLite's write lock at once; on PostgreSQL, the nodes' one writer lock."""
    conn.execute("BEGIN IMMEDIATE")
    if is_postgres(conn):
        try:
            conn.take_write_lock()
        except BaseException:
            _rollback(conn)
            raise


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite may have rolled back already (a full disk, an I/O error)
