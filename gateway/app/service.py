"""Wiring: :func:`make_service` builds the whole gateway from a Config.

``herald serve``, ``herald demo`` and the end-to-end tests all start Herald
through this one function.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gateway.app.roster import adopt_legacy_roster
from gateway.config import Config
from gateway.conversion.vocabulary import Vocabulary, load_vocabulary
from gateway.delivery.worker import DeliveryWorker
from gateway.intake.ack import AckBuilder
from gateway.intake.receiver import Intake
from gateway.pipeline.workers import make_pool, process_batch, process_batch_here
from gateway.records import ROLES, MessageOutcome
from gateway.store import RosterReader, Store, open_database
from mllp import MLLPServerFactory


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
        self._pool = None
        self._thread = None
        self._conn = None
        self._roster: RosterReader | None = None
        self._running_batch = False
        #: Fires when the drain loop in progress ends (None when none runs).
        self._drained: defer.Deferred | None = None
        self._again = False
        self._last_id = 0
        self.processed = 0
        self.recipients = {role: config.recipient(role) for role in ROLES}
        self._retry = None

    def startService(self) -> None:
        super().startService()
        if self.workers > 0:
            self._pool = make_pool(self.store.path, self.config, self.workers)
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
            yield threads.deferToThread(pool.shutdown, True)
        if self._thread is not None:
            pool, self._thread = self._thread, None
            yield threads.deferToThread(pool.stop)

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
        future = self._pool.submit(process_batch, chunk)

        def done(f):
            error = f.exception()
            if error is not None:
                self.reactor.callFromThread(d.errback, error)
            else:
                self.reactor.callFromThread(d.callback, f.result())

        future.add_done_callback(done)
        return d

    def _process_here(self, batch) -> list[MessageOutcome]:
        if self._conn is None:
            self._conn = open_database(self.store.path, readonly=True)
            self._roster = RosterReader(self.store.path)
        return process_batch_here(
            batch, self._conn, self._roster, self.config, self.vocab, self.recipients, self.config.tzinfo
        )


class Listener(Service):
    """Listens on one endpoint; fails startService loudly when it cannot bind."""

    _log = Logger()

    def __init__(self, spec: str, endpoint, factory) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.factory = factory
        self.port = None
        self.ready: defer.Deferred = defer.Deferred()

    def startService(self):
        super().startService()
        d = self.endpoint.listen(self.factory)

        def bound(port):
            self.port = port
            self._log.info("MLLP listening on {spec}", spec=self.spec)
            self.ready.callback(port)
            return port

        d.addCallback(bound)
        d.addErrback(self.ready.errback)
        return d

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


class OrderedService(MultiService):
    """A MultiService that stops its children one at a time, last started first.

    Twisted's MultiService stops children all at once; Herald's must stop in
    order: listeners before the pipeline, the pipeline before the store.
    """

    @defer.inlineCallbacks
    def stopService(self):
        Service.stopService(self)
        for child in reversed(list(self)):
            if child.running:
                yield defer.maybeDeferred(child.stopService)


@dataclass
class Gateway:
    """The running pieces, for tests and the demo to reach into."""

    service: OrderedService
    store: Store
    intake: Intake
    pipeline: PipelineWorker
    delivery: DeliveryWorker
    listeners: list[Listener]

    def listening_ports(self) -> list[int]:
        """The TCP ports actually bound (useful with ``tcp:0``), once started."""
        return [svc.port.getHost().port for svc in self.listeners if svc.port is not None]


def make_service(
    config: Config,
    reactor=None,
    clock: Callable[[], datetime] | None = None,
    acks: AckBuilder | None = None,
) -> Gateway:
    """Build the gateway: store, listeners, intake, pipeline and delivery, as one service tree."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    vocab = load_vocabulary()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.database, reactor=reactor, **({"clock": clock} if clock else {}))
    top = OrderedService()

    class _StoreService(Service):
        def startService(self) -> None:
            super().startService()
            store.start()
            adopt_legacy_roster(store)  # a version-1 database's roster, once

        def stopService(self):
            super().stopService()
            return store.stop()

    store_service = _StoreService()
    store_service.setServiceParent(top)

    delivery = DeliveryWorker(
        store,
        reactor,
        max_attempts=config.delivery_max_attempts,
        backoff_initial=config.delivery_backoff_initial,
        backoff_max=config.delivery_backoff_max,
        timeout=config.delivery_timeout,
        concurrency=config.delivery_concurrency,
        poll_interval=config.delivery_poll_interval,
    )
    pipeline = PipelineWorker(store, config, vocab, reactor, on_routed=delivery.wake)
    intake = Intake(
        store,
        acks or AckBuilder(config.application, config.facility, **({"clock": clock} if clock else {})),
        on_stored=pipeline.wake,
        max_length=config.max_frame_bytes,
    )
    delivery.setServiceParent(top)
    if config.pipeline_enabled:
        pipeline.setServiceParent(top)
    # Listeners last: they start last and stop first.
    factory = MLLPServerFactory(
        intake, maxLength=config.max_frame_bytes, idleTimeout=config.idle_timeout, reactor=reactor
    )
    listeners = []
    for spec in config.listen:
        svc = Listener(spec, serverFromString(reactor, spec), factory)
        svc.setServiceParent(top)
        listeners.append(svc)
    return Gateway(top, store, intake, pipeline, delivery, listeners)
