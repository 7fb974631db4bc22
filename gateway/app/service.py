"""Wiring: :func:`make_service` builds the whole gateway from a Config.

``herald serve``, ``herald demo`` and the end-to-end tests all start Herald
through this one function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.logger import Logger

from gateway.app.audit import PeriodicPurge
from gateway.app.cds_hooks import CdsHooksListener, cds_hooks_listener
from gateway.app.console import ConsoleService, web_console
from gateway.app.disk import DiskReserve
from gateway.app.health import HealthListener, Readiness, health_site
from gateway.app.logs import delivery_logged
from gateway.app.metrics import GatewayMetrics
from gateway.app.roster import adopt_legacy_roster
from gateway.app.roster_follow import roster_following
from gateway.app.transitions_service import TransitionsService, alert_targets, care_transitions
from gateway.config import Config, Listen, parse_listen
from gateway.conversion.vocabulary import load_vocabulary
from gateway.delivery.worker import DeliveryWorker
from gateway.errors import ConfigError
from gateway.intake.ack import AckBuilder
from gateway.intake.connections import IntakeServerFactory
from gateway.intake.receiver import Intake
from gateway.intake.rejections import RejectionSampler
from gateway.intake.senders import SenderPolicy
from gateway.pipeline.runner import PipelineWorker
from gateway.store import Store
from gateway.store.files import private_data_dir
from gateway.store.keys import KeyRing, load_ring
from mllp.tls import server_options

_MB = 1024 * 1024


class Listener(Service):
    """Listens on one endpoint; fails startService loudly when it cannot bind.

    A plain (``tcp:``) listener that other machines can reach is logged as a
    warning when it starts: its messages cross the network in clear text.
    """

    _log = Logger()

    def __init__(self, spec: str, endpoint, factory, listen: Listen | None = None) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.factory = factory
        self.listen = listen
        self.port = None
        self.ready: defer.Deferred = defer.Deferred()

    def startService(self):
        super().startService()
        if self.listen is not None and not self.listen.tls and not self.listen.loopback:
            self._log.warn(
                "plain (unencrypted) MLLP listener {spec} accepts connections from other machines: "
                "patient data crosses the network in clear text; use a tls: listener",
                spec=self.spec,
            )
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
    disk: DiskReserve | None = None  # the free-space reserve ([storage] reserve_mb), when one is set
    metrics: GatewayMetrics | None = None  # this gateway's own registry (/metrics)
    health: HealthListener | None = None  # the /healthz, /readyz, /metrics listener ([health] enabled)
    transitions: TransitionsService | None = None  # care transitions ([transitions] enabled)
    cds_hooks: CdsHooksListener | None = None  # the CDS Hooks listener ([cds_hooks] listen)
    console: ConsoleService | None = None  # the web console ([console] enabled)

    def listening_ports(self) -> list[int]:
        """The TCP ports actually bound (useful with ``tcp:0``), once started."""
        return [svc.port.getHost().port for svc in self.listeners if svc.port is not None]


def make_service(
    config: Config,
    reactor=None,
    clock: Callable[[], datetime] | None = None,
    acks: AckBuilder | None = None,
    keys: KeyRing | None = None,
) -> Gateway:
    """Build the gateway: store, listeners, intake, pipeline and delivery, as one service tree.

    ``keys`` seals PHI at rest; by default the ring the configuration names
    (``HERALD_KEYS``, else ``[security] key_file``), which the pipeline's
    worker processes read too; :class:`~gateway.store.keys.KeyRingError` when
    there is none and ``encrypt_at_rest`` is on, or it is not the database's.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    # The listeners' TLS material first: a missing certificate fails before anything is opened.
    listens = [parse_listen(spec) for spec in config.listen]
    tls = tls_server_options(config) if any(listen.tls for listen in listens) else None
    vocab = load_vocabulary()
    if keys is None:
        keys = load_ring(config.key_path, config.encrypt_at_rest)
    private_data_dir(config.data_dir)
    store = Store(config.database, reactor=reactor, keys=keys, **({"clock": clock} if clock else {}))
    store.inline = config.storage_commit_on_reactor  # SQLite only (a PostgreSQL store ignores it)
    store.claim_lease = config.storage_claim_lease_seconds
    store.serve_as_node()  # PostgreSQL: this process claims work as this node (refused if another does)
    store.wal_limit = int(config.storage_wal_limit_mb * _MB)
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
    # PostgreSQL: the node's roster file follows the version published from any node (before the
    # pipeline's workers open it; a node with no roster file downloads it at start).
    following = roster_following(config.database, reactor)
    if following is not None:
        following.setServiceParent(top)
    metrics = GatewayMetrics()
    metrics.watch_outcomes(store)
    listeners: list[Listener] = []
    health = None
    if config.health_enabled:
        # Right after the store: it answers while the rest starts, and /readyz says not ready until the
        # listeners are bound; it stops after them, saying not ready meanwhile.
        health = HealthListener(config.health_listen, None, reactor)
        health.setServiceParent(top)

    delivery = DeliveryWorker(
        store,
        reactor,
        max_attempts=config.delivery_max_attempts,
        backoff_initial=config.delivery_backoff_initial,
        backoff_max=config.delivery_backoff_max,
        timeout=config.delivery_timeout,
        concurrency=config.delivery_concurrency,
        poll_interval=config.delivery_poll_interval,
        retry_horizon=config.delivery_retry_hours * 3600,
        per_destination=config.delivery_per_destination,
        fhir_settings={r.target: r.fhir for r in config.recipients.values() if r.channel == "fhir" and r.enabled},
        clock=store.clock,
        keys=keys,
        file_drop_sealed=functools.lru_cache(maxsize=256)(config.file_drop_sealed),
        private_root=config.data_dir,
        direct_relay=config.direct_relay,
        channel_settings=alert_targets(config),
    )
    delivery.observers.append(metrics.delivery_attempted)
    delivery.observers.append(delivery_logged)
    transitions = care_transitions(config, store, reactor, on_queued=delivery.wake)
    on_routed = delivery.wake if transitions is None else _both(delivery.wake, transitions.wake)
    pipeline = PipelineWorker(store, config, vocab, reactor, on_routed=on_routed)
    rejections = RejectionSampler(store, config.rejected_sample, config.rejected_window, reactor)
    # After the store: it stops (writing its last summary) before the store does.
    rejections.setServiceParent(top)
    intake = Intake(
        store,
        acks
        or AckBuilder(
            config.application,
            config.facility,
            **({"clock": clock} if clock else {}),
            control_id_length=config.limits.control_id_length,
        ),
        on_stored=pipeline.wake,
        max_length=config.max_frame_bytes,
        limits=config.limits,
        rejections=rejections,
        rejected_bytes_kept=config.rejected_bytes_kept,
        senders=SenderPolicy.from_config(config),
        watch=metrics,
        reactor=reactor,
    )
    disk = None
    if config.storage_reserve_mb > 0:
        # Before delivery and the pipeline: they start paused when the disk is already short.
        disk = DiskReserve(config.data_dir, int(config.storage_reserve_mb * _MB), reactor, [pipeline, delivery])
        disk.setServiceParent(top)
    if config.retention_days > 0:
        PeriodicPurge(store, config.data_dir, config.retention_days, reactor).setServiceParent(top)
    delivery.setServiceParent(top)
    if transitions is not None:
        transitions.setServiceParent(top)  # after delivery (it queues e-alerts), before the pipeline (it wakes it)
    if config.pipeline_enabled:
        pipeline.setServiceParent(top)
    # Listeners last: they start last and stop first.
    factory = IntakeServerFactory(
        intake,
        maxLength=config.max_frame_bytes,
        idleTimeout=config.idle_timeout,
        reactor=reactor,
        frameTimeout=config.frame_timeout,
        maxConnections=config.max_connections,
        maxConnectionsPerPeer=config.max_connections_per_peer,
    )
    for listen in listens:
        if listen.tls:
            endpoint = SSL4ServerEndpoint(reactor, listen.port, tls, listen.backlog, listen.interface)
        else:
            endpoint = serverFromString(reactor, listen.spec)
        svc = Listener(listen.spec, endpoint, factory, listen)
        svc.setServiceParent(top)
        listeners.append(svc)
    cds_hooks = cds_hooks_listener(config, reactor, store, transitions)
    if cds_hooks is not None:
        cds_hooks.setServiceParent(top)
    if health is not None:
        health.site = health_site(Readiness(store, config, listeners, pipeline, reactor, disk), metrics, store)
    gateway = Gateway(top, store, intake, pipeline, delivery, listeners, disk, metrics, health)
    gateway.transitions, gateway.cds_hooks = transitions, cds_hooks
    # The web console: after the store (its pages read and write through it), and stopped before it.
    gateway.console = web_console(config, store, keys, reactor)
    if gateway.console is not None:
        gateway.console.setServiceParent(top)
    return gateway


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        first()
        second()

    return call


def tls_server_options(config: Config):
    """The mutual-TLS options of the ``tls:`` listeners, from ``[tls]``.

    Raises :class:`ConfigError` naming the key when a file is missing,
    unreadable or not what it should be (the message says how to make
    development certificates).
    """
    files = dict(zip(("cert", "key", "ca"), config.tls_files, strict=True))
    data = {}
    for name, path in files.items():
        try:
            data[name] = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"tls.{name}",
                f"{path} does not exist: a tls: listener needs a server certificate, its key and the CA that "
                f"issues client certificates. For development run `herald certs init --dir {path.parent}`; "
                "otherwise set [tls] cert, key and ca to your PKI's files",
            ) from None
        except OSError as e:
            raise ConfigError(f"tls.{name}", f"{path}: {e.strerror}") from None
    if files["key"].stat().st_mode & 0o077:
        Listener._log.warn("the TLS key {path} is readable by other users; chmod 600 it", path=str(files["key"]))
    try:
        return server_options(data["cert"], data["key"], data["ca"], config.tls_min_version)
    except ValueError as e:
        raise ConfigError("tls", f"{e} (cert {files['cert']}, key {files['key']}, ca {files['ca']})") from None
