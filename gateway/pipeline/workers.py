"""Pipeline work in separate processes.

Conversion and validation are CPU-bound Python; run in the server process they
hold the GIL for up to the interpreter's switch interval (5 ms) at a time and
every ACK waits behind them. So the server hands batches to worker processes.

Each worker process builds one :class:`BatchContext` when it starts (the
vocabulary, a read-only connection to the database for confirmed MRN links,
the published roster file, which it reopens between batches when an import
has replaced it) and keeps it in its serving loop: no module-level state. It
does no writes. A worker reads the key ring that opens the sealed messages and
roster itself, from the configuration's key source (``[security] key_file``, or
``HERALD_KEYS`` in the environment it inherits): no key travels to it.
:class:`WorkerPool` is the server's side: it hands batches over a queue and
collects the answers on a thread of its own. If a worker
dies, the batches in flight fail (the pipeline takes their messages up again:
they are still ``received``) and the workers start again with a later batch,
after a wait that grows while crashes keep coming.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from twisted.logger import Logger

from gateway.config import Config
from gateway.conversion.profiles import ProfileRegistry, ProfileSet
from gateway.conversion.vocabulary import Vocabulary, load_vocabulary
from gateway.delivery.directory_cache import DirectoryCache
from gateway.errors import HeraldError
from gateway.pipeline.process import MatchPolicy, process_message
from gateway.records import ROLES, MessageOutcome, PendingMessage
from gateway.store import RosterReader, RosterSnapshot, StoredRoster, open_database, read_transaction
from gateway.store.keys import KeyRing, load_ring
from gateway.store.postgres import PostgresDatabase

__all__ = ["BatchContext", "WorkerCrashed", "WorkerPool", "policy_for", "process_batch_here"]

#: Scheduling priority of worker processes, below the server's.
WORKER_NICENESS = 10


class WorkerCrashed(HeraldError):
    """A worker process ended while batches were in flight."""


def process_batch_here(
    batch: list[PendingMessage],
    conn,
    roster: RosterReader,
    config: Config,
    vocab,
    recipients,
    tz,
    profiles: ProfileSet | None = None,
    directory=None,
) -> list[MessageOutcome]:
    """Process a batch: one roster version throughout (the newest published when it starts), the
    confirmed MRN links of ``conn`` in one read snapshot per message, one set of sender profiles.

    Not one snapshot for the whole batch: the workers' batches overlap, and a
    reader always in the write-ahead log keeps the writer from ever emptying it
    (it grew without bound under a steady load).
    """
    snapshot = roster.current()
    sample = config.pipeline_validate_sample
    lookups = StoredRoster(snapshot, conn)
    policy = policy_for(snapshot, config)
    outcomes = []
    for p in batch:
        with read_transaction(conn):
            outcomes.append(
                process_message(
                    p,
                    vocab,
                    tz,
                    lookups,
                    recipients,
                    policy=policy,
                    limits=config.limits,
                    profiles=profiles,
                    directory=directory,
                    validate=validated(p.id, sample),
                )
            )
    return outcomes


def validated(message_id: int, sample: float) -> bool:
    """Whether the pipeline validates this message's Bundle: every one at 1, none at 0, else a spread
    ``sample`` of them, chosen by the message's id (the same choice on a re-run)."""
    if sample >= 1:
        return True
    if sample <= 0:
        return False
    # Fibonacci hashing spreads consecutive ids evenly over [0, 1).
    return ((message_id * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) / 2**64 < sample


def policy_for(snapshot: RosterSnapshot, config: Config) -> MatchPolicy:
    """The match policy for this roster version (its size sets the thresholds).

    No cache needed here: the snapshot counts its members once a day and
    :meth:`MatchPolicy.from_config` loads each model once per setting.
    """
    return MatchPolicy.from_config(config, snapshot.size())


class BatchContext:
    """What processing batches needs in one process, opened once: vocabulary, database, roster.

    The server's pipeline thread keeps one (``pipeline.workers = 0``); each
    worker process keeps one in its serving loop.
    """

    def __init__(
        self,
        database: Path | str | PostgresDatabase,
        config: Config,
        vocab: Vocabulary | None = None,
        keys: KeyRing | None = None,
        profiles: ProfileRegistry | None = None,
    ) -> None:
        self.database = database if isinstance(database, PostgresDatabase) else Path(database)
        self.config = config
        #: The ring that opens sealed values: given (the server's thread), else read from the config's source.
        self.keys = keys
        self.vocab = vocab or load_vocabulary()
        self.recipients = {role: config.recipient(role) for role in ROLES}
        self.tz = config.tzinfo
        #: The server's profile registry (its thread), else the set handed over with the batches (a worker
        #: process: :meth:`adopt_profiles`), else the configuration's, loaded on the first batch.
        self._registry = profiles
        self._profiles: ProfileSet | None = None
        self._profiles_generation = 0
        self._conn = None
        self._roster: RosterReader | None = None
        self._directory = DirectoryCache()

    def adopt_profiles(self, generation: int, profiles: ProfileSet | bytes) -> None:
        """Use ``profiles`` (a set, or one pickled by the server's registry) from now on, unless they are
        the generation in use already."""
        if generation != self._profiles_generation:
            if isinstance(profiles, bytes):
                profiles = pickle.loads(profiles)  # from the server process, which loaded and checked them
            self._profiles, self._profiles_generation = profiles, generation

    @property
    def profiles(self) -> ProfileSet:
        """The sender profiles the next batch is converted with."""
        if self._profiles is not None:  # handed over with the batches (a worker process)
            return self._profiles
        if self._registry is None:
            self._registry = ProfileRegistry.from_config(self.config, self.vocab)
        return self._registry.current

    def process(self, batch: list[PendingMessage]) -> list[MessageOutcome]:
        """The outcomes of a batch of stored messages (see :func:`process_batch_here`)."""
        if self._conn is None:
            if self.keys is None:
                self.keys = load_ring(self.config.key_path, self.config.encrypt_at_rest)
            self._conn = open_database(self.database, readonly=True, keys=self.keys)
            self._roster = RosterReader(self.database, self.keys)
        return process_batch_here(
            batch,
            self._conn,
            self._roster,
            self.config,
            self.vocab,
            self.recipients,
            self.tz,
            self.profiles,
            self._directory.entries(self._conn),
        )

    def close(self) -> None:
        """Close the database and the roster file."""
        if self._roster is not None:
            self._roster.close()
        if self._conn is not None:
            self._conn.close()
        self._conn = self._roster = None


def _die_with_parent(parent: int) -> None:
    """End this worker when the server process (pid ``parent``) dies: now, if it already has; later, on Linux.

    The kernel's parent-death signal covers a death after the ``prctl`` call;
    a server killed while it was starting this worker (kill -9 in its first
    second) died before it, and the worker would wait on its queue for ever,
    an orphan holding the database open. So the parent is looked at once
    the signal is asked for.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass
    if os.getppid() != parent:
        os._exit(0)  # nothing of ours to flush: the batch queue's owner is gone


def _serve(requests, replies, parent: int, database: str | PostgresDatabase, config: Config) -> None:
    """A worker process: build the context once, then answer batches until told to stop (``None``)."""
    _die_with_parent(parent)
    # Conversion soaks up idle CPU; the server's intake (the ACK path) comes first.
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # pragma: no cover - not permitted
        pass
    from fhir.resources.R4B.bundle import Bundle  # noqa: F401 - import the FHIR models now, not on the first message

    context = BatchContext(database, config)
    try:
        while True:
            job = requests.get()
            if job is None:
                return
            job_id, batch, profiles = job
            if profiles is not None:
                context.adopt_profiles(*profiles)
            try:
                replies.put((job_id, True, context.process(batch)))
            except Exception as e:  # the database's errors; process_message keeps a message's own problems
                # The type and text of a store error (no message content: process_message never raises one).
                replies.put((job_id, False, RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        context.close()


class WorkerPool:
    """``workers`` processes (started with 'spawn': the server has threads, fork is unsafe) serving batches.

    The processes start with the first batch (as a ProcessPoolExecutor's
    would): a server with nothing to convert spends no CPU importing the
    converter in each of them. When one dies, the batches in flight fail, all
    workers are stopped, and they start again with a later batch, after a
    wait that doubles (1 s to 60 s) while crashes keep coming, so a worker
    that cannot start does not take the CPU from intake.
    """

    _log = Logger()

    #: How often the collector looks for a worker that died, when no answer comes.
    POLL_SECONDS = 0.5
    #: How long :meth:`shutdown` waits for a worker to finish its batch before ending it.
    STOP_SECONDS = 30.0
    #: The wait before workers start again after a crash, doubling up to the maximum.
    RESTART_MIN_SECONDS = 1.0
    RESTART_MAX_SECONDS = 60.0

    def __init__(self, database: Path | str | PostgresDatabase, config: Config, workers: int) -> None:
        self._mp = multiprocessing.get_context("spawn")
        self._args = (database if isinstance(database, PostgresDatabase) else str(database), config)
        self._workers = workers
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        #: How many times the workers were stopped because one died.
        self.restarts = 0
        self._backoff = 0.0
        self._last_crash = float("-inf")
        self._start_after = 0.0
        self._requests = self._replies = None
        self._processes: list = []
        self._collector = threading.Thread(target=self._collect, name="herald-pipeline-replies", daemon=True)

    def _start_workers(self) -> None:
        """Start the processes on new queues (under the lock)."""
        requests, replies = self._mp.Queue(), self._mp.Queue()
        processes = []
        for n in range(self._workers):
            p = self._mp.Process(
                target=_serve,
                args=(requests, replies, os.getpid(), *self._args),
                name=f"herald-pipeline-{n}",
                daemon=True,
            )
            p.start()
            processes.append(p)
        self._requests, self._replies, self._processes = requests, replies, processes
        if not self._collector.is_alive():
            self._collector.start()

    def submit(self, batch: list[PendingMessage], profiles: tuple[int, ProfileSet | bytes] | None = None) -> Future:
        """Hand ``batch`` to the next free worker; the Future gets its outcomes.

        ``profiles`` is the server's (generation, sender profiles, pickled): sent with every batch (a
        few kilobytes), so each worker converts with the set the server loaded and checked, reloads
        included; a worker unpickles it only when the generation changes.
        """
        future: Future = Future()
        with self._lock:
            if self._closing.is_set():
                future.set_exception(RuntimeError("the worker pool is shut down"))
                return future
            if not self._processes:
                wait = self._start_after - time.monotonic()
                if wait > 0:
                    future.set_exception(WorkerCrashed(f"the pipeline workers start again in {wait:.1f} s"))
                    return future
                self._start_workers()
            job_id = next(self._ids)
            self._pending[job_id] = future
            self._requests.put((job_id, batch, profiles))
        return future

    def _collect(self) -> None:
        while True:
            with self._lock:
                if self._closing.is_set() and not self._pending:
                    return
                replies, processes = self._replies, self._processes
            if replies is None:  # stopped after a crash: nothing to read until the next start
                time.sleep(self.POLL_SECONDS)
                continue
            try:
                job_id, ok, value = replies.get(timeout=self.POLL_SECONDS)
            except queue.Empty:
                dead = [p for p in processes if not p.is_alive()]
                if dead and not self._closing.is_set():
                    self._stop_after_crash(processes, dead[0].exitcode)
                continue
            except (OSError, ValueError):  # the queue was closed under us by a crash stop
                continue
            with self._lock:
                future = self._pending.pop(job_id, None)
            if future is None:  # failed already, when a worker died; a late answer is dropped
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _stop_after_crash(self, processes: list, exitcode) -> None:
        """A worker died: fail the batches in flight and stop every worker; the next batch starts them again.

        A process killed while reading a queue can leave the queue's lock
        held, so the queues are not used again. Which batch the dead worker
        held is unknown: every batch in flight fails, and the pipeline
        fetches their messages again (they are still ``received``).
        """
        with self._lock:
            if self._closing.is_set() or processes is not self._processes:
                return  # shutting down, or already handled
            requests, replies = self._requests, self._replies
            pending, self._pending = self._pending, {}
            self._requests = self._replies = None
            self._processes = []
            now = time.monotonic()
            recent = now - self._last_crash < self.RESTART_MAX_SECONDS
            self._backoff = min(self._backoff * 2, self.RESTART_MAX_SECONDS) if recent else self.RESTART_MIN_SECONDS
            self._last_crash = now
            self._start_after = now + self._backoff
            self.restarts += 1
            backoff = self._backoff
        self._log.warn(
            "a pipeline worker process ended (exit code {code}); {batches} batch(es) in flight will be retried; "
            "the workers start again in {seconds:.0f} s",
            code=exitcode,
            batches=len(pending),
            seconds=backoff,
        )
        for future in pending.values():
            future.set_exception(WorkerCrashed("a pipeline worker process ended; its batch will be retried"))
        for p in processes:
            p.kill()
            p.join()
        for q in (requests, replies):
            q.cancel_join_thread()
            q.close()

    def shutdown(self) -> None:
        """Let the workers finish their batches, then stop them (blocking: call it off the reactor)."""
        with self._lock:
            self._closing.set()
            processes, requests, replies = list(self._processes), self._requests, self._replies
            for _ in processes:
                requests.put(None)
        for p in processes:
            p.join(self.STOP_SECONDS)
            if p.is_alive():
                p.terminate()
                p.join()
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(RuntimeError("the worker pool is shut down"))
        if self._collector.is_alive():
            self._collector.join()
        for q in (requests, replies):
            if q is not None:
                q.close()
                q.join_thread()

    @property
    def pids(self) -> list[int]:
        """The worker processes' pids."""
        return [p.pid for p in self._processes]
