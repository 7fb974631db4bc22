"""The gateway's Prometheus metrics, served at ``/metrics`` (see :mod:`gateway.app.health`).

Counters move as the work happens: intake tells :class:`GatewayMetrics` of each
message received, each ACK sent and each frame rejected (``Intake.watch``), and
of each TLS handshake refused; the pipeline's outcomes are counted as the
store writes them (:meth:`GatewayMetrics.watch_outcomes`); delivery tells it of
each attempt (``DeliveryWorker.observers``). Gauges of what waits (the
pipeline's backlog, each destination's unsent and dead notifications) are read
from the store when scraped: they are the database's figures, not this
process's memory.

Each gateway has a registry of its own, so several gateways in one process (the
tests) do not share counters. No label carries patient data: senders are MSH-3
and MSH-4, types MSH-9, then ACK and error codes, match grades, channels and
destinations. Because sender and type come off the wire, each metric keeps at
most :data:`MAX_LABEL_SETS` label sets; further ones are counted as ``(other)``
so a sender sending garbage cannot grow the process without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import ProcessCollector as _ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.records import MessageOutcome, Notification
from gateway.store.health import Snapshot

__all__ = ["CONTENT_TYPE", "MAX_LABEL_SETS", "OTHER", "GatewayMetrics", "seconds_since", "waited"]

#: The exposition format's content type (Prometheus text format).
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Label sets one metric keeps before it counts the rest as :data:`OTHER`.
MAX_LABEL_SETS = 500
OTHER = "(other)"
#: A rejected frame whose header could not be read has no sender or type.
UNREADABLE = "(unreadable)"
#: Delivery latency buckets (seconds): a file drop takes milliseconds, a FHIR POST up to its timeout.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Bounded:
    """A labelled metric that keeps at most ``limit`` label sets; the rest go under ``(other)``."""

    def __init__(self, metric, limit: int = MAX_LABEL_SETS) -> None:
        self.metric = metric
        self.limit = limit
        self._seen: set[tuple[str, ...]] = set()

    def labels(self, *values: str):
        key = tuple(str(v) for v in values)
        if key not in self._seen:
            if len(self._seen) >= self.limit:
                key = (OTHER,) * len(key)
            self._seen.add(key)
        return self.metric.labels(*key)


def _sender_labels(header) -> tuple[str, str, str]:
    """(sending application, sending facility, message type as ``ADT^A01``) of a header, or unreadable."""
    if header is None:
        return UNREADABLE, UNREADABLE, UNREADABLE
    kind = header.message_type + (f"^{header.trigger_event}" if header.trigger_event else "")
    return header.sending_application or "", header.sending_facility or "", kind


class _Backlog:
    """The scrape-time gauges: what the store says waits, as of the last :meth:`GatewayMetrics.refresh`."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.lag_seconds = 0.0
        self.waits: dict[str, float] = {}
        self.read_ok = False
        #: Destinations seen once stay at 0 when they have nothing waiting (a series that drops is an alert gap).
        self.destinations: set[str] = set()

    def describe(self):
        return []  # collected at every scrape; nothing to declare at registration

    def collect(self):
        ok = GaugeMetricFamily("herald_store_read_ok", "1 when the last scrape could read the store's backlog")
        ok.add_metric([], 1.0 if self.read_ok else 0.0)
        yield ok
        snap = self.snapshot
        if snap is None or not self.read_ok:
            return
        yield GaugeMetricFamily(
            "herald_pipeline_backlog_messages", "Messages stored and ACKed but not yet processed", value=snap.backlog
        )
        yield GaugeMetricFamily(
            "herald_pipeline_lag_seconds",
            "Age of the oldest message not yet processed (0 when none waits)",
            value=self.lag_seconds,
        )
        depth = GaugeMetricFamily(
            "herald_outbox_depth", "Notifications waiting to be sent (pending or retrying)", labels=["destination"]
        )
        dead = GaugeMetricFamily(
            "herald_outbox_dead_letters",
            "Notifications given up on (dead), until retried or cancelled",
            labels=["destination"],
        )
        wait = GaugeMetricFamily(
            "herald_outbox_oldest_wait_seconds",
            "How long the oldest notification due or failing has waited (0 when none)",
            labels=["destination"],
        )
        found = {b.destination: b for b in snap.destinations}
        for destination in sorted(set(found) | self.destinations):
            b = found.get(destination)
            depth.add_metric([destination], (b.pending + b.retrying) if b else 0)
            dead.add_metric([destination], b.dead if b else 0)
            wait.add_metric([destination], self.waits.get(destination, 0.0))
        yield depth
        yield dead
        yield wait


class GatewayMetrics:
    """One gateway's metrics, in a registry of its own (:attr:`registry`)."""

    def __init__(self, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        senders = ["sending_application", "sending_facility", "message_type"]
        r = self.registry
        self.received = _Bounded(
            Counter("herald_messages_received", "Messages stored and accepted, by sender and type", senders, registry=r)
        )
        self.retransmitted = _Bounded(
            Counter(
                "herald_messages_retransmitted",
                "Retransmissions recognised (same sender, control id and content): ACKed again, not stored again",
                senders,
                registry=r,
            )
        )
        self.acked = _Bounded(
            Counter("herald_acks_sent", "ACKs sent, by sender, type and MSA-1 code", [*senders, "code"], registry=r)
        )
        self.rejected = _Bounded(
            Counter(
                "herald_messages_rejected",
                "Frames refused (AR/CR), by sender, type and HL7 table 0357 error code",
                [*senders, "error"],
                registry=r,
            )
        )
        self.tls_failures = _Bounded(
            Counter("herald_tls_handshake_failures", "TLS handshakes refused, by reason", ["reason"], registry=r), 64
        )
        self.processed = _Bounded(
            Counter(
                "herald_messages_processed", "Pipeline outcomes written, by the message's state", ["state"], registry=r
            )
        )
        self.grades = _Bounded(
            Counter(
                "herald_match_grades",
                "Roster matches by grade (certain, probable, possible, none)",
                ["grade"],
                registry=r,
            )
        )
        self.attempts = _Bounded(
            Counter(
                "herald_delivery_attempts",
                "Delivery attempts, by channel and outcome",
                ["channel", "state"],
                registry=r,
            )
        )
        self.latency = _Bounded(
            Histogram(
                "herald_delivery_seconds",
                "Time from a delivery attempt's start to its outcome, by channel and outcome",
                ["channel", "state"],
                buckets=DELIVERY_BUCKETS,
                registry=r,
            )
        )
        self.backlog = _Backlog()
        r.register(self.backlog)
        if process:
            _ProcessCollector(registry=r)

    # -- intake (``Intake.watch``) ------------------------------------------------------------

    def message_received(self, header, duplicate: bool = False) -> None:
        """A message passed intake's checks and is stored (or was, when ``duplicate``)."""
        (self.retransmitted if duplicate else self.received).labels(*_sender_labels(header)).inc()

    def ack_sent(self, header, code: str) -> None:
        """An ACK went back with MSA-1 ``code`` (AA, AE, AR, CA, CE, CR)."""
        self.acked.labels(*_sender_labels(header), code).inc()

    def frame_rejected(self, header, error: str) -> None:
        """A frame was refused with HL7 table 0357 ``error``; ``header`` None when it could not be read."""
        self.rejected.labels(*_sender_labels(header), error or "").inc()

    def tls_refused(self, reason: str) -> None:
        """A TLS client was refused in the handshake (``reason``: plain words, no patient data)."""
        self.tls_failures.labels(reason).inc()

    # -- the pipeline ----------------------------------------------------------------------------

    def outcomes_written(self, outcomes: Iterable[MessageOutcome]) -> None:
        """The pipeline's outcomes the store committed: states and match grades."""
        for o in outcomes:
            self.processed.labels(o.state).inc()
            if o.match is not None:
                self.grades.labels(o.match.grade).inc()

    def watch_outcomes(self, store) -> None:
        """Count the outcomes ``store.record_outcomes`` commits (wraps that method of this one store object).

        The pipeline writes every outcome through it and has no hook of its
        own; a write that fails is not counted (the batch is retried).
        """
        record: Callable = store.record_outcomes

        def record_outcomes(outcomes):
            outcomes = list(outcomes)
            d = record(outcomes)
            d.addCallback(lambda applied: (self.outcomes_written(outcomes), applied)[1])
            return d

        store.record_outcomes = record_outcomes

    # -- delivery (``DeliveryWorker.observers``) ------------------------------------------------

    def delivery_attempted(self, notification: Notification, state: str, seconds: float) -> None:
        """One delivery attempt ended: ``state`` sent, retrying or dead, after ``seconds``."""
        self.attempts.labels(notification.channel, state).inc()
        self.latency.labels(notification.channel, state).observe(max(0.0, seconds))

    # -- scraping -------------------------------------------------------------------------------

    def refresh(self, snapshot: Snapshot | None, now_seconds: float, now: datetime) -> None:
        """Set the scrape-time gauges from a store snapshot (None: the store could not be read).

        ``now_seconds`` is the reactor's clock (notifications fall due in it),
        ``now`` the store's (what ``received_at`` and ``created_at`` are written with).
        """
        b = self.backlog
        b.read_ok = snapshot is not None
        b.snapshot = snapshot
        if snapshot is None:
            return
        b.lag_seconds = seconds_since(snapshot.oldest_received_at, now)
        b.waits = {d.destination: waited(d, now_seconds, now) for d in snapshot.destinations}
        for d in snapshot.destinations:
            if len(b.destinations) < MAX_LABEL_SETS:
                b.destinations.add(d.destination)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def waited(backlog, now_seconds: float, now: datetime) -> float:
    """How long a destination's oldest notification due or failing has waited, in seconds (0 when none)."""
    due = now_seconds - backlog.due_since if backlog.due_since is not None else 0.0
    return max(0.0, due, seconds_since(backlog.failing_since, now))


def seconds_since(stamp: str | None, now: datetime) -> float:
    """Seconds from an ISO 8601 stamp to ``now`` (0 for none, or one in the future)."""
    if not stamp:
        return 0.0
    try:
        return max(0.0, (now - datetime.fromisoformat(stamp)).total_seconds())
    except (TypeError, ValueError):
        return 0.0
