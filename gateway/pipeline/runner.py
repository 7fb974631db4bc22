"""The pipeline's service: takes stored messages in batches, processes them off the reactor, writes back.

Started by :func:`gateway.app.service.make_service` after the store; it
stops before the store, after the batch in hand is written.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gateway.config import Config
from gateway.conversion.vocabulary import Vocabulary
from gateway.pipeline.workers import BatchContext, WorkerPool
from gateway.records import MessageOutcome
from gateway.store import Store

__all__ = ["PipelineWorker"]


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

    def __init__(self, store: Store, config: Config, vocab: Vocabulary, reactor, on_routed: Callable[[], None]) -> None:
        self.store = store
        self.config = config
        self.vocab = vocab
        self.reactor = reactor
        self.on_routed = on_routed
        self.batch = config.pipeline_batch
        self.workers = config.pipeline_workers
        self._pool: WorkerPool | None = None
        self._thread: ThreadPool | None = None
        #: The pipeline thread's context (``pipeline.workers = 0``), made on its first batch.
        self._context: BatchContext | None = None
        self._running_batch = False
        #: Fires when the drain loop in progress ends (None when none runs).
        self._drained: defer.Deferred | None = None
        self._again = False
        self._last_id = 0
        self.processed = 0
        self._retry = None

    def startService(self) -> None:
        super().startService()
        if self.workers > 0:
            self._pool = WorkerPool(self.store.path, self.config, self.workers)
        else:
            self._thread = ThreadPool(1, 1, name="herald-pipeline")
            self._thread.start()
        self.wake()

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
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

    def wake(self) -> None:
        """New messages were stored: process them soon."""
        if not self.running:
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
                while self.running and len(inflight) < self.DEPTH:
                    pending = yield self.store.pending_messages(fetched, self.batch * max(1, self.workers))
                    if not pending:
                        break
                    fetched = pending[-1].id
                    inflight.append((pending, self._process(pending)))
                if not inflight:
                    if self._again and self.running:
                        continue
                    break
                pending, d = inflight.popleft()
                outcomes = yield d
                yield self.store.record_outcomes(outcomes)
                self._last_id = pending[-1].id
                self.processed += len(outcomes)
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
        future = self._pool.submit(chunk)

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
            self._context = BatchContext(self.store.path, self.config, self.vocab)
        return self._context.process(batch)
