"""The pipeline's service: takes stored messages in batches, processes them off the reactor, writes back.

Started by :func:`gateway.app.service.make_service` after the store; it
stops before the store, after the batch in hand is written.

It owns the sender profiles in use (a :class:`~gateway.conversion.profiles.ProfileRegistry`,
loaded and checked when it is made, so a bad profile stops the start). They are
loaded again on SIGHUP or when ``herald reload`` touches the data folder's
``reload-profiles`` file (looked at every :data:`RELOAD_POLL_SECONDS`); a folder
that no longer loads is refused, logged, and the running profiles kept.
Connections are not touched: the next batch uses the new profiles.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gateway.config import Config
from gateway.conversion.profiles import ProfileRegistry
from gateway.conversion.vocabulary import Vocabulary
from gateway.pipeline.workers import BatchContext, WorkerPool
from gateway.records import MessageOutcome
from gateway.store import Store

__all__ = ["RELOAD_POLL_SECONDS", "RELOAD_REQUEST", "PipelineWorker", "reload_request_path"]

#: The file in the data folder whose change asks the running server to reload the sender profiles.
RELOAD_REQUEST = "reload-profiles"
#: How often the server looks at it.
RELOAD_POLL_SECONDS = 2.0


def reload_request_path(data_dir: Path | str) -> Path:
    """Where ``herald reload`` writes, for the server of ``data_dir`` to see."""
    return Path(data_dir) / RELOAD_REQUEST


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class PipelineWorker(Service):
    """Takes stored messages in batches, processes them off the reactor, writes the outcomes back.

    With ``pipeline.workers`` > 0 a batch is split across that many worker
    processes (see :mod:`gateway.pipeline.workers`); with 0 it runs on one thread of
    this process, which is simpler to debug but competes with intake for the
    GIL. Outcomes of a batch are written in one transaction. On start it picks
    up anything left ``received`` by an earlier run, so an acknowledged
    message is never forgotten.
    """

    _log = Logger()

    #: Batches converting or being written at once.
    DEPTH = 2
    #: On PostgreSQL (several nodes), how often the pipeline looks for messages nobody woke it for.
    SHARED_POLL_SECONDS = 1.0

    def __init__(
        self,
        store: Store,
        config: Config,
        vocab: Vocabulary,
        reactor,
        on_routed: Callable[[], None],
        profiles: ProfileRegistry | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.vocab = vocab
        #: The sender profiles in use (``[profiles]``); ProfileError here when one is bad.
        self.profiles = profiles or ProfileRegistry.from_config(config, vocab)
        self._reload_watch: task.LoopingCall | None = None
        self._reload_seen: int | None = None
        self._sighup: tuple | None = None  # (the handler SIGHUP had before), while ours is installed
        self.reactor = reactor
        self.on_routed = on_routed
        self.batch = config.pipeline_batch
        self.workers = config.pipeline_workers
        self._pool: WorkerPool | None = None
        self._thread: ThreadPool | None = None
        #: The pipeline thread's context (``pipeline.workers = 0``), made on its first batch.
        self._context: BatchContext | None = None
        self._running_batch = False
        self._unknown_said: set[str] = set()
        #: Fires when the drain loop in progress ends (None when none runs).
        self._drained: defer.Deferred | None = None
        self._again = False
        self._last_id = 0
        self._shared_poll: task.LoopingCall | None = None
        self.processed = 0
        self._retry = None
        #: Paused (:meth:`pause`): no new batch is taken until :meth:`resume`.
        self.paused = False

    def startService(self) -> None:
        super().startService()
        self._watch_reload_requests()
        if self.workers > 0:
            self._pool = WorkerPool(self.store.path, self.config, self.workers)
        else:
            self._thread = ThreadPool(1, 1, name="herald-pipeline")
            self._thread.start()
        if self.store.postgres:
            # Several nodes: messages other nodes stored, and those a dead node held until its
            # leases ran out, wake nobody here; they are looked for every SHARED_POLL_SECONDS.
            self._shared_poll = task.LoopingCall(self.wake)
            self._shared_poll.clock = self.reactor
            self._shared_poll.start(self.SHARED_POLL_SECONDS, now=False)
        self.wake()

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        self._unwatch_reload_requests()
        if self._shared_poll is not None and self._shared_poll.running:
            self._shared_poll.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._drained is not None:
            yield self._drained  # the batch in hand is written before the pool goes
        if self._pool is not None:
            pool, self._pool = self._pool, None
            yield threads.deferToThread(pool.shutdown)
        if self._thread is not None:
            pool, self._thread = self._thread, None
            yield threads.deferToThread(pool.stop)
        if self._context is not None:
            self._context.close()
            self._context = None

    def reload_profiles(self) -> bool:
        """Load the sender profiles again; a folder that does not load is refused and the running set kept."""
        ok, said = self.profiles.reload()
        if ok:
            self._log.info("sender profiles reloaded: {loaded}", loaded=said)
        else:
            # ProfileError's text: file, key and reason (no message content).
            self._log.warn(
                "sender profiles not reloaded, the running ones (generation {generation}) stay in use: {error}",
                generation=self.profiles.generation,
                error=said,
            )
        return ok

    def _watch_reload_requests(self) -> None:
        path = reload_request_path(self.config.data_dir)
        self._reload_seen = _mtime(path)

        def look() -> None:
            seen = _mtime(path)
            if seen is not None and seen != self._reload_seen:
                self._reload_seen = seen
                self.reload_profiles()

        self._reload_watch = task.LoopingCall(look)
        self._reload_watch.clock = self.reactor
        self._reload_watch.start(RELOAD_POLL_SECONDS, now=False)
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            # SIGHUP is free in Twisted (it handles INT, TERM, CHLD); the handler only schedules the reload.
            previous = signal.signal(
                signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reload_profiles)
            )
            self._sighup = (previous if previous is not None else signal.SIG_DFL,)

    def _unwatch_reload_requests(self) -> None:
        if self._reload_watch is not None and self._reload_watch.running:
            self._reload_watch.stop()
        self._reload_watch = None
        if self._sighup is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._sighup[0])
        self._sighup = None

    def pause(self) -> None:
        """Take no new batch (the disk is short of space: intake comes first); the batches in hand are written."""
        self.paused = True

    def resume(self) -> None:
        """Take batches again, starting with the messages stored meanwhile."""
        self.paused = False
        self.wake()

    def wake(self) -> None:
        """New messages were stored: process them soon."""
        if not self.running or self.paused:
            return
        if self._running_batch:
            self._again = True
            return
        self._drained = self._drain()

    @defer.inlineCallbacks
    def _drain(self):
        # Up to DEPTH batches are in flight: while one batch's outcomes are
        # written, the next is already being converted.
        self._running_batch = True
        inflight: deque[tuple[list, defer.Deferred]] = deque()
        fetched = self._last_id
        try:
            while self.running or inflight:
                self._again = False
                while self.running and not self.paused and len(inflight) < self.DEPTH:
                    pending = yield self.store.pending_messages(fetched, self.batch * max(1, self.workers))
                    if not pending:
                        break
                    fetched = pending[-1].id
                    inflight.append((pending, self._process(pending)))
                if not inflight:
                    if self._again and self.running and not self.paused:
                        continue
                    break
                pending, d = inflight.popleft()
                outcomes = yield d
                yield self.store.record_outcomes(outcomes)
                self._last_id = pending[-1].id
                self.processed += len(outcomes)
                self._say_unknown_senders(outcomes)
                if any(o.notifications for o in outcomes):
                    self.on_routed()
        except Exception:
            self._log.failure("pipeline batch failed; retrying in 5 s")
            # Batches still converting are dropped; their messages are still
            # 'received' and are fetched again on the retry.
            for _, d in inflight:
                d.addBoth(lambda _: None)
            if self.running:
                self._retry = self.reactor.callLater(5, self.wake)
        finally:
            self._running_batch = False
            self._drained = None

    def _say_unknown_senders(self, outcomes) -> None:
        """Log, once per sender while the server runs, that a sender has no profile (MSH-3/MSH-4 only)."""
        for o in outcomes:
            for kind, detail in o.events:
                why = detail.get("unknown_sender") if kind == "parsed" and isinstance(detail, dict) else None
                if why and why not in self._unknown_said:
                    self._unknown_said.add(why)
                    self._log.warn(
                        "message {id}: {why}; converted with the default profile (add one in mappings/senders/)",
                        id=o.message_id,
                        why=why,
                    )

    def _process(self, pending) -> defer.Deferred:
        if self._pool is None:
            return threads.deferToThreadPool(self.reactor, self._thread, self._process_here, pending)
        size = max(1, -(-len(pending) // self.workers))
        chunks = [pending[i : i + size] for i in range(0, len(pending), size)]
        ds = [self._submit(chunk) for chunk in chunks]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addCallback(lambda parts: [o for part in parts for o in part])
        return d

    def _submit(self, chunk) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        future = self._pool.submit(chunk, self.profiles.state)

        def done(f):
            error = f.exception()
            if error is not None:
                self.reactor.callFromThread(d.errback, error)
            else:
                self.reactor.callFromThread(d.callback, f.result())

        future.add_done_callback(done)
        return d

    def _process_here(self, batch) -> list[MessageOutcome]:
        if self._context is None:
            self._context = BatchContext(
                self.store.path, self.config, self.vocab, self.store.keys, profiles=self.profiles
            )
        return self._context.process(batch)
