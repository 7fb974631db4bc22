"""/metrics (issue 15): a running gateway scraped over a real socket, parsed with prometheus-client's own parser,
its counters moving as messages flow over MLLP; the scrape-time gauges read from the store."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent

from gateway.app.certs import make_dev_certs
from gateway.app.metrics import OTHER, GatewayMetrics
from gateway.app.replay import collect_messages, replay_async
from gateway.app.roster import import_roster_file
from gateway.app.service import make_service
from gateway.config import load_config
from gateway.header import read_header
from mllp import connect
from mllp.client import client_endpoint, client_options

SAMPLES = Path(__file__).resolve().parent.parent / "sample_messages"
#: A frame intake refuses (MSH-10, the control id, is empty): AR, error 101.
BAD = b"MSH|^~\\&|BADAPP|BADFAC|||20260101||ADT^A01||P|2.5\rPID|1||1^^^F^MR\r"


def temporary_folder(case) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="herald-metrics-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder


class _Body(protocol.Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done, self.parts = done, []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason=None) -> None:
        self.done.callback(b"".join(self.parts))


@defer.inlineCallbacks
def http_get(url: str):
    """(status, body text, content type) of a GET over a real socket."""
    response = yield Agent(reactor).request(b"GET", url.encode("ascii"))
    done: defer.Deferred = defer.Deferred()
    response.deliverBody(_Body(done))
    body = yield done
    kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
    return response.code, body.decode("utf-8"), kind


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape, by (name, labels), parsed by prometheus-client's parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(scrape: dict, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scrape.items() if n == name and want <= ls)


class GatewayCase(unittest.TestCase):
    """A gateway on loopback (plain MLLP, a health listener on a free port), the sample roster imported."""

    extra = ""
    health = ""  # more [health] settings
    listen = 'listen = ["tcp:0:interface=127.0.0.1"]\nallow_plain = true'

    @defer.inlineCallbacks
    def setUp(self):
        self.data = temporary_folder(self)
        self.before_config()
        path = self.data / "herald.toml"
        path.write_text(
            f'[server]\n{self.listen}\n\n[health]\nlisten = "tcp:0:interface=127.0.0.1"\n{self.health}\n\n'
            f"[pipeline]\nworkers = 0\n{self.extra}\n"
        )
        self.config = load_config(path, data_dir=self.data)
        import_roster_file(self.config.database, SAMPLES / "roster.csv", by="tests")
        self.gw = make_service(self.config, reactor)
        self.gw.service.startService()
        self.addCleanup(self.stop)
        yield defer.gatherResults([lst.ready for lst in self.gw.listeners])
        health_port = yield self.gw.health.ready
        self.base = f"http://127.0.0.1:{health_port}"
        self.port = self.gw.listening_ports()[0]

    def before_config(self) -> None:
        """Hook: make files the config names."""

    @defer.inlineCallbacks
    def stop(self):
        if self.gw.service.running:
            yield self.gw.service.stopService()
        yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def scrape(self):
        code, text, kind = yield http_get(self.base + "/metrics")
        self.assertEqual(code, 200, text)
        self.assertTrue(kind.startswith("text/plain"), kind)
        return samples(text)

    @defer.inlineCallbacks
    def settle(self, seconds: float = 30.0):
        """Wait until no message waits for the pipeline and no notification is pending (scraped, bounded)."""
        for _ in range(int(seconds / 0.1)):
            scrape = yield self.scrape()
            if (
                total(scrape, "herald_pipeline_backlog_messages") == 0
                and total(scrape, "herald_outbox_depth") == 0
                and total(scrape, "herald_messages_processed_total") > 0
            ):
                return scrape
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.fail("the gateway did not settle")


class MetricsTests(GatewayCase):
    @defer.inlineCallbacks
    def test_counters_move_as_messages_flow_and_parse_with_prometheus_client(self):
        """Scraped over HTTP before and after the samples go through: received, ACKed and rejected per sender and
        type, pipeline outcomes, match grades and delivery latency count exactly what happened."""
        before = yield self.scrape()
        self.assertEqual(total(before, "herald_messages_received_total"), 0)
        self.assertEqual(total(before, "herald_store_read_ok"), 1)
        messages = collect_messages(sorted(SAMPLES.glob("*.hl7")))
        report = yield replay_async(reactor, "127.0.0.1", self.port, [*messages, ("bad", BAD)], timeout=10)
        self.assertEqual(report.accepted, len(messages))
        after = yield self.settle()

        per_sender = Counter()
        for _, raw in messages:
            h = read_header(raw)
            per_sender[(h.sending_application, h.sending_facility, f"{h.message_type}^{h.trigger_event}")] += 1
        for (app, fac, kind), n in per_sender.items():
            labels = {"sending_application": app, "sending_facility": fac, "message_type": kind}
            self.assertEqual(total(after, "herald_messages_received_total", **labels), n, labels)
            self.assertEqual(total(after, "herald_acks_sent_total", **labels), n, labels)
        self.assertEqual(total(after, "herald_messages_received_total"), len(messages))
        acked = total(after, "herald_acks_sent_total", code="AA") + total(after, "herald_acks_sent_total", code="CA")
        self.assertEqual(acked, len(messages))
        bad = {"sending_application": "BADAPP", "sending_facility": "BADFAC", "message_type": "ADT^A01"}
        self.assertEqual(total(after, "herald_messages_rejected_total", error="101", **bad), 1)
        self.assertEqual(total(after, "herald_acks_sent_total", code="AR", **bad), 1)
        self.assertEqual(total(after, "herald_messages_received_total", **bad), 0)

        self.assertEqual(total(after, "herald_messages_processed_total"), len(messages))
        self.assertEqual(total(after, "herald_match_grades_total"), len(messages))
        self.assertGreater(total(after, "herald_match_grades_total", grade="certain"), 0)
        notifications = yield self.gw.store.submit_read(
            lambda conn: conn.execute("SELECT COUNT(*) FROM notifications WHERE state = 'sent'").fetchone()[0]
        )
        self.assertGreater(notifications, 0)
        self.assertEqual(total(after, "herald_delivery_attempts_total", state="sent"), notifications)
        self.assertEqual(total(after, "herald_delivery_seconds_count", channel="file", state="sent"), notifications)
        self.assertGreater(total(after, "herald_delivery_seconds_sum"), 0)
        self.assertEqual(total(after, "herald_pipeline_lag_seconds"), 0)

        # A retransmission is ACKed again and counted as one, not received again.
        yield replay_async(reactor, "127.0.0.1", self.port, messages[:1], timeout=10)
        again = yield self.scrape()
        self.assertEqual(total(again, "herald_messages_received_total"), len(messages))
        self.assertEqual(total(again, "herald_messages_retransmitted_total"), 1)
        self.assertEqual(total(again, "herald_acks_sent_total"), total(after, "herald_acks_sent_total") + 1)

    @defer.inlineCallbacks
    def test_a_registry_per_gateway(self):
        """Two gateways in one process count apart: each has its own registry."""
        other = GatewayMetrics(process=False)
        yield replay_async(reactor, "127.0.0.1", self.port, collect_messages([SAMPLES / "cerner-v23-a01-admit.hl7"]))
        mine = yield self.scrape()
        self.assertEqual(total(mine, "herald_messages_received_total"), 1)
        self.assertEqual(total(samples(other.render().decode()), "herald_messages_received_total"), 0)


class DeadLetterGaugeTests(GatewayCase):
    """The HIE's FHIR endpoint refuses connections and one attempt is all a notification gets: dead letters."""

    extra = '[delivery]\nmax_attempts = 1\ntimeout = 2\n\n[recipients.hie]\nchannel = "fhir"\nurl = "{url}"\n'

    def before_config(self) -> None:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.closed = f"http://127.0.0.1:{s.getsockname()[1]}/fhir"
        s.close()  # nobody listens there
        self.extra = self.extra.format(url=self.closed)

    @defer.inlineCallbacks
    def test_outbox_depth_and_dead_letters_per_destination_are_read_from_the_store(self):
        """herald_outbox_dead_letters names the destination whose notifications died; the file drops show 0."""
        messages = collect_messages([SAMPLES / "cerner-v23-a01-admit.hl7", SAMPLES / "cerner-v23-a03-discharge.hl7"])
        yield replay_async(reactor, "127.0.0.1", self.port, messages, timeout=10)
        scrape = yield self.settle()
        target = self.closed + "/$process-message"
        self.assertEqual(total(scrape, "herald_outbox_dead_letters", destination=target), 2)
        self.assertEqual(total(scrape, "herald_outbox_depth", destination=target), 0)
        self.assertEqual(total(scrape, "herald_delivery_attempts_total", channel="fhir", state="dead"), 2)
        self.assertEqual(total(scrape, "herald_outbox_dead_letters"), 2, "only the HIE's died")


class TlsFailureTests(GatewayCase):
    """A mutual-TLS listener: a client without a certificate is refused in the handshake."""

    listen = 'listen = ["tls:0:interface=127.0.0.1"]'

    def before_config(self) -> None:
        self.certs = make_dev_certs(self.data / "certs", clients=("metrics-client",))

    @defer.inlineCallbacks
    def test_tls_handshake_failures_are_counted_by_reason(self):
        """A handshake without a client certificate moves herald_tls_handshake_failures_total by one."""
        before = yield self.scrape()
        self.assertEqual(total(before, "herald_tls_handshake_failures_total"), 0)
        no_cert = client_options("localhost", self.certs.ca.read_bytes())
        try:
            client = yield connect(client_endpoint(reactor, "127.0.0.1", self.port, no_cert, 5), reactor)
            yield client.send(collect_messages([SAMPLES / "cerner-v23-a01-admit.hl7"])[0][1], 5)
        except Exception:
            pass  # refused: the server closes the connection
        for _ in range(50):
            after = yield self.scrape()
            if total(after, "herald_tls_handshake_failures_total"):
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(
            total(after, "herald_tls_handshake_failures_total", reason="no client certificate was presented"), 1
        )


def test_label_sets_are_bounded():
    """Past MAX_LABEL_SETS senders, a metric counts the rest under (other): garbage cannot grow it forever."""
    from gateway.app import metrics as m

    gm = GatewayMetrics(process=False)
    gm.tls_failures.limit = 3
    for i in range(10):
        gm.tls_refused(f"reason {i}")
    scrape = samples(gm.render().decode())
    assert total(scrape, "herald_tls_handshake_failures_total") == 10
    assert total(scrape, "herald_tls_handshake_failures_total", reason=OTHER) == 7
    assert m.MAX_LABEL_SETS >= 100
