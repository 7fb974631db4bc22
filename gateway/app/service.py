"""Wiring: :func:`make_service` builds the whole gateway from a Config.

``herald serve``, ``herald demo`` and the end-to-end tests all start Herald
through this one function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from gateway.app.roster import adopt_legacy_roster
from gateway.config import Config
from gateway.conversion.vocabulary import load_vocabulary
from gateway.delivery.worker import DeliveryWorker
from gateway.intake.ack import AckBuilder
from gateway.intake.receiver import Intake
from gateway.pipeline.runner import PipelineWorker
from gateway.store import Store
from mllp import MLLPServerFactory


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
