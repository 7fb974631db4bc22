"""End to end on real sockets: MLLP in, SQLite log, pipeline, file drop and a FHIR endpoint out.

These run the real reactor (twisted.trial's TestCase under pytest) and the
whole service from ``make_service``; the only fakes are injected failures.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from postgres_server import create_database, drop_database
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from gateway.app.certs import make_dev_certs
from gateway.app.replay import read_ack, split_messages
from gateway.app.roster import import_roster_file
from gateway.app.service import make_service
from gateway.config import load_config
from gateway.delivery.routing import notification_payload
from gateway.delivery.worker import open_file_drop
from gateway.errors import StoreError
from gateway.records import IntakeRecord, Notification
from gateway.store import Store, open_database
from gateway.store import messages as store_messages
from gateway.store.sealing import message_context
from mllp import connect, frame
from mllp.client import client_endpoint, client_options

SAMPLES = Path(__file__).resolve().parent.parent / "sample_messages"
ED_VISIT = "epic-v251-a04-ed-registration.hl7"
ADMIT = "epic-v251-a01-admit-from-ed.hl7"
DISCHARGE = "epic-v251-a03-ed-discharge-utf8.hl7"
UNMATCHED = "meditech-v24-a04-outpatient-unmatched.hl7"


NOTIFICATION_FIELDS = (
    "id",
    "message_id",
    "recipient_role",
    "recipient",
    "channel",
    "target",
    "event_code",
    "payload",
)


def temporary_folder(case: unittest.TestCase) -> Path:
    """A fresh folder outside the work tree, removed after the test.

    Trial runs cleanups *before* tearDown, so a test whose tearDown still
    uses the folder removes it there instead (see GatewayTestCase).
    """
    folder = Path(tempfile.mkdtemp(prefix="herald-test-"))
    if not isinstance(case, GatewayTestCase):
        case.addCleanup(shutil.rmtree, folder, True)
    return folder


def sample(name: str) -> bytes:
    return split_messages((SAMPLES / name).read_bytes())[0]


class FhirReceiver(Resource):
    """A FHIR $process-message endpoint that records what it is sent."""

    isLeaf = True

    def __init__(self, status: int = 200) -> None:
        super().__init__()
        self.status = status
        self.requests: list[tuple[str, str, dict]] = []
        self.bodies: list[bytes] = []

    def render_POST(self, request):
        body = request.content.read()
        self.bodies.append(body)
        self.requests.append(
            (request.path.decode(), request.getHeader("content-type") or "", json.loads(body.decode("utf-8")))
        )
        request.setResponseCode(self.status)
        request.setHeader("content-type", "application/fhir+json")
        return b'{"resourceType":"Bundle","type":"message"}'


class GatewayTestCase(unittest.TestCase):
    """Starts Herald on 127.0.0.1 with an HTTP FHIR receiver for the HIE.

    Plain TCP (``allow_plain``) unless ``tls``: then a tls: listener with
    certificates made by `herald certs init`'s code, a client certificate per
    name in ``tls_clients``, and the ``senders`` allowlist.
    """

    hie_status = 200
    #: Where the store is: "sqlite" (herald.db in the data folder) or "postgresql" (a new database on
    #: the test server, ``postgres_admin``, which the autouse fixture below sets).
    backend = "sqlite"
    postgres_admin = ""
    postgres_database = ""
    extra_config = ""
    server_extra = ""
    tls = False
    tls_clients = ("e2e-client",)
    senders = '[[senders]]\napplication = "*"\nfacility = "*"\nidentities = ["e2e-client"]\n'

    def make_receiver(self) -> Resource:
        """The HIE's FHIR endpoint (a subclass may stall or refuse)."""
        return FhirReceiver(self.hie_status)

    @defer.inlineCallbacks
    def setUp(self):
        self.data = temporary_folder(self)
        self.receiver = self.make_receiver()
        self.http = reactor.listenTCP(0, Site(self.receiver), interface="127.0.0.1")
        http_port = self.http.getHost().port
        config_file = self.data / "herald.toml"
        listen = 'listen = ["tcp:0:interface=127.0.0.1"]\nallow_plain = true'
        if self.tls:
            self.certs = make_dev_certs(self.data / "certs", clients=self.tls_clients)
            listen = 'listen = ["tls:0:interface=127.0.0.1"]'
        config_file.write_text(
            f"""
{self.senders if self.tls else ""}
[server]
{listen}
{self.server_extra}

[recipients.hie]
channel = "fhir"
url = "http://127.0.0.1:{http_port}/fhir"

[recipients.pcp]
directory = "drop/pcp"

[recipients.care_team]
directory = "drop/care-team"
{self.extra_config}
"""
        )
        self.config = load_config(config_file, data_dir=self.data)
        if self.backend == "postgresql":
            url = self.postgres_database = create_database(self.postgres_admin)  # dropped in tearDown
            self.config = dataclasses.replace(self.config, storage_store=url)
        import_roster_file(self.config.database, SAMPLES / "roster.csv", by="tests")
        yield self.start()

    @defer.inlineCallbacks
    def start(self):
        self.gw = make_service(self.config, reactor)
        self.gw.service.startService()
        yield defer.gatherResults([lst.ready for lst in self.gw.listeners])
        self.port = self.gw.listening_ports()[0]
        self.clients = []

    @defer.inlineCallbacks
    def tearDown(self):
        for c in self.clients:
            c.transport.loseConnection()
        # A TLS close takes a close_notify round: wait for each, so no server-side timer outlives the test.
        yield defer.DeferredList([c.closed for c in self.clients]).addTimeout(10, reactor)
        if self.gw.service.running:
            yield self.gw.service.stopService()
        yield self.http.stopListening()
        # Let closed connections finish closing so the reactor is clean.
        yield task.deferLater(reactor, 0.05, lambda: None)
        shutil.rmtree(self.data, True)
        if self.postgres_database:  # after the service stopped (trial runs cleanups before tearDown)
            drop_database(self.postgres_admin, self.postgres_database)

    def tls_options(self, name: str | None = None):
        """Client TLS with the certificate of ``name`` (default: the first of ``tls_clients``); None on plain."""
        if not self.tls:
            return None
        cert, key = self.certs.client(name or self.tls_clients[0])
        return client_options("localhost", self.certs.ca.read_bytes(), cert.read_bytes(), key.read_bytes())

    @defer.inlineCallbacks
    def client(self, name: str | None = None):
        c = yield connect(client_endpoint(reactor, "127.0.0.1", self.port, self.tls_options(name)), reactor)
        self.clients.append(c)
        return c

    def db(self) -> sqlite3.Connection:
        return open_database(self.config.database, readonly=True)

    @defer.inlineCallbacks
    def wait_for(self, sql: str, args=(), expected=0, seconds: float = 15.0):
        """Poll a COUNT query until it equals ``expected`` (bounded)."""
        deadline = time.monotonic() + seconds
        conn = self.db()
        try:
            while True:
                value = conn.execute(sql, args).fetchone()[0]
                if value == expected:
                    return value
                if time.monotonic() > deadline:
                    self.fail(f"waited {seconds} s: {sql} gave {value}, expected {expected}")
                yield task.deferLater(reactor, 0.02, lambda: None)
        finally:
            conn.close()

    @defer.inlineCallbacks
    def settled(self):
        """Wait until nothing is left to convert or deliver."""
        yield self.wait_for("SELECT COUNT(*) FROM messages WHERE state = 'received'")
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE state = 'pending'")


class EndToEndTests(GatewayTestCase):
    @defer.inlineCallbacks
    def test_admit_discharge_and_ed_visit_reach_every_recipient(self):
        """A04, A01 and A03 over MLLP are ACKed, converted, matched and delivered to file drops and the HIE."""
        c = yield self.client()
        acks = []
        for name in (ED_VISIT, ADMIT, DISCHARGE):
            raw = sample(name)
            ack = yield c.send(raw, timeout=10)
            acks.append(read_ack(ack))
        self.assertEqual([a[0] for a in acks], ["CA", "CA", "CA"])
        self.assertEqual([a[1] for a in acks], ["LSR8841200193", "LSR8841200377", "LSR8841200611"])
        yield self.settled()
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE state != 'sent'")

        conn = self.db()
        states = [r[0] for r in conn.execute("SELECT state FROM messages ORDER BY id")]
        self.assertEqual(states, ["routed", "routed", "routed"])
        notes = conn.execute("SELECT id, recipient_role, event_code, message_id FROM notifications").fetchall()
        self.assertEqual(len(notes), 9, [tuple(n) for n in notes])

        # File drops: one JSON Bundle per PCP and care-team notification, named by its id; under the
        # data folder they are sealed (<id>.json.sealed) with the gateway's key ring.
        keys = self.gw.store.keys
        for role, folder in (("pcp", "drop/pcp"), ("care_team", "drop/care-team")):
            expected = {n["id"] for n in notes if n["recipient_role"] == role}
            files = {p.name.removesuffix(".json.sealed") for p in (self.data / folder).glob("*.json.sealed")}
            self.assertEqual(files, expected)
            for nid in expected:
                opened, written = open_file_drop(self.data / folder / f"{nid}.json.sealed", keys)
                self.assertEqual(opened, nid)
                bundle = json.loads(written)
                self.assertEqual(bundle["id"], nid)
                # Built from the message's Bundle, stored once; the outbox row stores no copy.
                row = conn.execute(
                    "SELECT n.*, m.fhir FROM notifications n JOIN messages m ON m.id = n.message_id WHERE n.id = ?",
                    (nid,),
                ).fetchone()
                self.assertIsNone(row["payload"])
                note = Notification(**{k: row[k] for k in NOTIFICATION_FIELDS})
                fhir = keys.open_text(row["fhir"], message_context("fhir", row["message_id"]))
                self.assertEqual(written, notification_payload(fhir, note).encode())
                self.assertEqual(bundle["type"], "message")
                self.assertEqual(bundle["entry"][0]["resource"]["resourceType"], "MessageHeader")
        leftovers = list((self.data / "drop").rglob(".*.tmp"))
        self.assertEqual(leftovers, [])

        # The HIE's FHIR endpoint got one $process-message POST per message.
        self.assertEqual(len(self.receiver.requests), 3)
        events = sorted(b["entry"][0]["resource"]["eventCoding"]["code"] for _, _, b in self.receiver.requests)
        self.assertEqual(events, ["notification-admit", "notification-admit", "notification-discharge"])
        for path, ctype, bundle in self.receiver.requests:
            self.assertEqual(path, "/fhir/$process-message")
            self.assertEqual(ctype, "application/fhir+json")
            focus = bundle["entry"][0]["resource"]["focus"][0]["reference"]
            self.assertIn(
                focus, [e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter"]
            )

        # The audit trail has every step for every message.
        for (mid,) in conn.execute("SELECT id FROM messages"):
            kinds = [r[0] for r in conn.execute("SELECT kind FROM events WHERE message_id = ? ORDER BY id", (mid,))]
            for step in ("received", "ack-sent", "parsed", "converted", "matched", "routed", "delivered"):
                self.assertIn(step, kinds, f"message {mid}: {kinds}")
            self.assertEqual(kinds.count("routed"), 3)
            self.assertEqual(kinds.count("delivered"), 3)
        conn.close()

    @defer.inlineCallbacks
    def test_unmatched_patient_notifies_only_the_hie(self):
        """A patient not on the roster produces an HIE notification and no PCP or care-team one."""
        c = yield self.client()
        ack = yield c.send(sample(UNMATCHED), timeout=10)
        self.assertEqual(read_ack(ack)[0], "AA")
        yield self.settled()
        conn = self.db()
        roles = [r[0] for r in conn.execute("SELECT recipient_role FROM notifications")]
        self.assertEqual(roles, ["hie"])
        kinds = [r[0] for r in conn.execute("SELECT kind FROM events WHERE message_id = 1 ORDER BY id")]
        self.assertIn("unmatched", kinds)
        conn.close()

    @defer.inlineCallbacks
    def test_retransmission_is_acked_again_and_processed_once(self):
        """The same message sent twice is ACKed twice, stored once and notified once."""
        c = yield self.client()
        raw = sample(ADMIT)
        first = yield c.send(raw, timeout=10)
        yield self.settled()
        second = yield c.send(raw, timeout=10)
        self.assertEqual(read_ack(first)[:2], read_ack(second)[:2])
        yield self.settled()
        conn = self.db()
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0], 1)
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0], 3)
        kinds = [r[0] for r in conn.execute("SELECT kind FROM events WHERE message_id = 1")]
        self.assertIn("retransmission", kinds)
        conn.close()

    @defer.inlineCallbacks
    def test_reused_control_id_with_new_content_is_stored_and_flagged(self):
        """Same MSH-10 with different bytes is a new message, flagged control-id-reused."""
        c = yield self.client()
        raw = sample(ADMIT)
        yield c.send(raw, timeout=10)
        changed = raw.replace(b"CARD^4104^A", b"CARD^4105^A")
        ack = yield c.send(changed, timeout=10)
        self.assertEqual(read_ack(ack)[0], "CA")
        yield self.settled()
        conn = self.db()
        rows = conn.execute("SELECT flag, state FROM messages ORDER BY id").fetchall()
        self.assertEqual([tuple(r) for r in rows], [(None, "routed"), ("control-id-reused", "routed")])
        ids = [r[0] for r in conn.execute("SELECT id FROM notifications")]
        self.assertEqual(len(set(ids)), 6, "each stored message gets its own notification ids")
        conn.close()

    @defer.inlineCallbacks
    def test_ack_only_after_commit_store_failure_gives_error_ack(self):
        """When the store cannot commit, the sender gets AE (CE in enhanced mode), never AA/CA."""

        def broken(*args, **kwargs):
            raise sqlite3.OperationalError("disk I/O error")

        self.patch(store_messages, "record_frame", broken)
        c = yield self.client()
        enhanced = yield c.send(sample(ADMIT), timeout=10)
        original = yield c.send(sample(UNMATCHED), timeout=10)
        self.assertEqual(read_ack(enhanced)[0], "CE")
        self.assertEqual(read_ack(original)[0], "AE")
        self.assertIn(b"ERR|", original)
        self.assertIn(b"207", original)
        conn = self.db()
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0], 0)
        conn.close()

    @defer.inlineCallbacks
    def test_commit_failure_after_insert_gives_error_ack(self):
        """A failure of the COMMIT itself (not just the insert) still gives AE and stores nothing."""
        store = self.gw.store
        real = store._commit

        def failing_commit(conn, results):
            # Every job ran; the COMMIT fails (on the reactor's thread or the writer's, whichever commits).
            conn.execute("ROLLBACK")
            return [(job, False, StoreError("commit failed: disk full")) for job, _, _ in results]

        self.patch(store, "_commit", failing_commit)
        c = yield self.client()
        ack = yield c.send(sample(UNMATCHED), timeout=10)
        self.assertEqual(read_ack(ack)[0], "AE")
        self.patch(store, "_commit", real)
        ack = yield c.send(sample(UNMATCHED), timeout=10)
        self.assertEqual(read_ack(ack)[0], "AA")
        conn = self.db()
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0], 1)
        conn.close()
        # The pipeline and delivery polls that ran into the failed commits logged it.
        self.flushLoggedErrors(StoreError)

    @defer.inlineCallbacks
    def test_unreadable_frames_get_ar_and_are_logged(self):
        """Garbage and a frame with a bad MSH-2 get AR with an ERR segment and are logged as rejected."""
        c = yield self.client()
        ack = yield c.send(b"this is not HL7 at all", timeout=10)
        code, control, reason = read_ack(ack)
        self.assertEqual(code, "AR")
        self.assertIn(b"ERR|", ack)
        self.assertIn("MSH", reason)
        ack = yield c.send(b"MSH|^^\\&|EHR|FAC|||20260101||ADT^A01|X1|P|2.5\rPID|1||1^^^F^MR", timeout=10)
        self.assertEqual(read_ack(ack)[:2], ("AR", "X1"))
        conn = self.db()
        rows = conn.execute("SELECT state, reason FROM messages ORDER BY id").fetchall()
        self.assertEqual([r["state"] for r in rows], ["rejected", "rejected"])
        self.assertIn("MSH-2", rows[1]["reason"])
        conn.close()

    @defer.inlineCallbacks
    def test_connection_closed_mid_frame_is_logged(self):
        """Bytes of a frame cut off by the sender closing are logged as rejected, nothing is ACKed."""
        c = yield self.client()
        c.transport.write(b"\x0b" + sample(ADMIT)[:120])
        yield task.deferLater(reactor, 0.05, lambda: None)
        c.transport.loseConnection()
        yield self.wait_for("SELECT COUNT(*) FROM messages WHERE state = 'rejected'", expected=1)
        conn = self.db()
        reason = conn.execute("SELECT reason FROM messages").fetchone()[0]
        self.assertIn("closed in the middle of a frame", reason)
        conn.close()

    @defer.inlineCallbacks
    def test_split_and_batched_frames_over_tcp(self):
        """Frames split across writes and several frames in one write are all answered, in order."""
        c = yield self.client()
        a, b = sample(ADMIT), sample(UNMATCHED)
        got = []
        c.frameReceived = got.append
        data = frame(a) + frame(b)
        for i in range(0, len(data), 7):
            c.transport.write(data[i : i + 7])
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual([read_ack(x)[:2] for x in got], [("CA", "LSR8841200377"), ("AA", "PCH.A04.000415")])


class FrameLimitTests(GatewayTestCase):
    server_extra = "max_frame_bytes = 4096"

    @defer.inlineCallbacks
    def test_oversized_frame_is_refused_and_logged(self):
        """A frame over the size limit gets AR with code 104 and the connection is closed."""
        c = yield self.client()
        big = sample(ADMIT) + b"NTE|1||" + b"x" * 8000 + b"\r"
        ack = yield c.send(big, timeout=10)
        self.assertEqual(read_ack(ack)[0], "CR")
        self.assertIn(b"104", ack)
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(c._closed)
        conn = self.db()
        row = conn.execute("SELECT state, reason, length(raw) AS n FROM messages").fetchone()
        self.assertEqual(row["state"], "rejected")
        self.assertIn("4096-byte limit", row["reason"])
        conn.close()


class DeliveryRetryTests(GatewayTestCase):
    hie_status = 503
    extra_config = """
[delivery]
max_attempts = 3
backoff_initial = 0.05
backoff_max = 0.2
poll_interval = 0.05
"""

    @defer.inlineCallbacks
    def test_failing_endpoint_is_retried_then_dead_lettered(self):
        """An HIE answering 503 is retried with backoff and the notification marked dead at the configured limit."""
        c = yield self.client()
        yield c.send(sample(UNMATCHED), timeout=10)
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE state = 'dead'", expected=1)
        self.assertEqual(len(self.receiver.requests), 3)
        ids = {b["id"] for _, _, b in self.receiver.requests}
        self.assertEqual(len(ids), 1, "the notification id must stay the same across retries")
        self.assertEqual(len(set(self.receiver.bodies)), 1, "every retry must send the same bytes")
        conn = self.db()
        attempts = conn.execute("SELECT attempt, outcome, detail FROM delivery_attempts ORDER BY id").fetchall()
        where = f"127.0.0.1:{self.http.getHost().port}"
        self.assertEqual(
            [(a["attempt"], a["outcome"], a["detail"]) for a in attempts],
            [(n, "error", f"HTTP 503 from {where}") for n in (1, 2, 3)],
        )
        kinds = [r[0] for r in conn.execute("SELECT kind FROM events WHERE message_id = 1 ORDER BY id")]
        self.assertEqual(kinds.count("delivery-failed"), 2)
        self.assertIn("dead-letter", kinds)
        conn.close()


class RestartTests(GatewayTestCase):
    @defer.inlineCallbacks
    def test_message_stored_before_a_crash_is_processed_after_restart(self):
        """A message ACKed (stored as received) but not yet processed is picked up on the next start."""
        yield self.gw.service.stopService()
        store = Store(self.config.database, reactor=reactor, keys=self.gw.store.keys)
        store.start()
        raw = sample(ADMIT)
        yield store.record_frame(
            IntakeRecord(
                raw=raw,
                peer="test",
                state="received",
                ack_code="CA",
                sending_application="EPIC",
                sending_facility="LSR",
                message_type="ADT",
                trigger_event="A01",
                control_id="LSR8841200377",
            )
        )
        yield store.stop()
        yield self.start()
        yield self.settled()
        conn = self.db()
        self.assertEqual(conn.execute("SELECT state FROM messages").fetchone()[0], "routed")
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0], 3)
        conn.close()


class EndToEndOnPostgres(EndToEndTests):
    """The same, with the store on PostgreSQL."""

    backend = "postgresql"


class RestartOnPostgres(RestartTests):
    """A message stored before a crash is processed after the restart, on PostgreSQL."""

    backend = "postgresql"
