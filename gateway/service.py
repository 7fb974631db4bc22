"""Wiring: :func:`make_service` builds the whole gateway from a Config.

``herald serve``, ``herald demo`` and the end-to-end tests all start Herald
through this one function.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gateway.ack import AckBuilder
from gateway.config import ROLES, Config
from gateway.delivery import DeliveryWorker
from gateway.intake import Intake
from gateway.pipeline import MessageOutcome, RosterLookups, process_message
from gateway.store import (
    Store,
    members_by_mbi,
    members_by_mrn,
    members_by_name_key,
    open_database,
)
from gateway.vocabulary import Vocabulary, load_vocabulary
from mllp import MLLPServerFactory


class PipelineWorker(Service):
    """Takes stored messages in batches and runs :func:`process_message` off the reactor thread.

    A batch is read from the store, processed on the pipeline thread (which
    has its own read connection for roster lookups), and its outcomes written
    back in one transaction. On start it picks up anything left ``received``
    by an earlier run, so an acknowledged message is never forgotten.
    """

    _log = Logger()

    def __init__(self, store: Store, config: Config, vocab: Vocabulary, reactor, on_routed: Callable[[], None]) -> None:
        self.store = store
        self.config = config
        self.vocab = vocab
        self.reactor = reactor
        self.on_routed = on_routed
        self.batch = config.pipeline_batch
        self._pool = ThreadPool(1, 1, name="herald-pipeline")
        self._local = threading.local()
        self._running_batch = False
        self._again = False
        self._last_id = 0
        self.processed = 0
        self.recipients = {role: config.recipient(role) for role in ROLES}
        self._retry = None

    def startService(self) -> None:
        super().startService()
        self._pool.start()
        self.wake()

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        return threads.deferToThread(self._pool.stop)

    def wake(self) -> None:
        """New messages were stored: process them soon."""
        if not self.running:
            return
        if self._running_batch:
            self._again = True
            return
        self._drain()

    @defer.inlineCallbacks
    def _drain(self):
        self._running_batch = True
        try:
            while self.running:
                self._again = False
                pending = yield self.store.pending_messages(self._last_id, self.batch)
                if not pending:
                    if not self._again:
                        break
                    continue
                outcomes = yield threads.deferToThreadPool(self.reactor, self._pool, self._process, pending)
                yield self.store.record_outcomes(outcomes)
                self._last_id = pending[-1].id
                self.processed += len(outcomes)
                if any(o.notifications for o in outcomes):
                    self.on_routed()
        except Exception:
            self._log.failure("pipeline batch failed; retrying in 5 s")
            self._retry = self.reactor.callLater(5, self.wake)
        finally:
            self._running_batch = False

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = open_database(self.store.path)
            self._local.conn = conn
        return conn

    def _process(self, batch) -> list[MessageOutcome]:
        conn = self._connection()
        conn.execute("BEGIN")  # one consistent roster snapshot per batch
        try:
            lookups = RosterLookups(
                by_mbi=lambda mbi: members_by_mbi(conn, mbi),
                by_mrn=lambda mrn, authority: members_by_mrn(conn, mrn, authority),
                by_name_key=lambda key: members_by_name_key(conn, key),
            )
            tz = self.config.tzinfo
            return [process_message(p, self.vocab, tz, lookups, self.recipients) for p in batch]
        finally:
            conn.execute("COMMIT")


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


@dataclass
class Gateway:
    """The running pieces, for tests and the demo to reach into."""

    service: MultiService
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
    top = MultiService()

    class _StoreService(Service):
        def startService(self) -> None:
            super().startService()
            store.start()

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
    factory = MLLPServerFactory(intake, maxLength=config.max_frame_bytes, idleTimeout=config.idle_timeout)
    listeners = []
    for spec in config.listen:
        svc = Listener(spec, serverFromString(reactor, spec), factory)
        svc.setServiceParent(top)
        listeners.append(svc)
    pipeline.setServiceParent(top)
    delivery.setServiceParent(top)
    return Gateway(top, store, intake, pipeline, delivery, listeners)
