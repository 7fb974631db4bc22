"""The ED e-alert end to end over real sockets: an ED registration in over MLLP, the v2 alert out to the
ED's own MLLP interface (a local receiver), and a CDS Hooks card over TLS for a call signed by the EHR's key.
An opted-out member gets neither."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from test_channel_mllp import HieFactory
from transitions_harness import ACO, MEMBERS, TransitionsTestCase, adt
from twisted.internet import defer, reactor, ssl, task
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from gateway.app.certs import make_dev_certs
from gateway.header import read_msh
from gateway.store.sealing import attribution_context

EHR = "https://ehr.lakeshore.example"
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


class EdAlertTests(TransitionsTestCase):
    start_at = T0

    def prepare(self) -> None:
        self.ed = HieFactory()  # the ED's inbound interface: ACKs every frame with AA
        self.ed_port = reactor.listenTCP(0, self.ed, interface="127.0.0.1")
        self.addCleanup(self.ed_port.stopListening)
        self.certs = make_dev_certs(self.data / "certs")
        self.ehr_key = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ehr_key.public_key()))
        jwk.update({"kid": "ehr-1", "alg": "ES384", "use": "sig"})
        (self.data / "ehr-jwks.json").write_text(json.dumps({"keys": [jwk]}))
        (self.data / "pcp-phones.csv").write_text("npi,phone\n1234567893,203-555-0100\n")
        self.extra_config = f"""pcp_phones = "pcp-phones.csv"

[transitions.acos."{ACO}"]
name = "Lakeshore ACO"
care_manager_phone = "203-555-0188"

[alerts."LSR"]
mllp = {{ host = "127.0.0.1", port = {self.ed_port.getHost().port} }}

[cds_hooks]
listen = "tls:0:interface=127.0.0.1"

[[cds_hooks.issuers]]
iss = "{EHR}"
jwks = "ehr-jwks.json"
facility = "LSR"
"""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.gw.cds_hooks.ready
        trust = ssl.Certificate.loadPEM(self.certs.ca.read_bytes())
        self.agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
        self.base = self.gw.cds_hooks.resource.base_url

    def token(self, service: str) -> str:
        now = int(time.time())
        claims = {
            "iss": EHR,
            "sub": "ehr-client",
            "aud": f"{self.base}/{service}",
            "iat": now,
            "exp": now + 120,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(claims, self.ehr_key, algorithm="ES384", headers={"kid": "ehr-1", "typ": "JWT"})

    @defer.inlineCallbacks
    def hook(self, member: str, service: str = "herald-aco-encounter-start"):
        """A CDS Hooks call as the EHR makes it: its signed JWT, the Patient prefetched (MBI among its ids)."""
        patient = {
            "resourceType": "Patient",
            "id": f"ehr-{member}",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-mbi", "value": MEMBERS[member]}],
        }
        body = {
            "hook": "encounter-start",
            "hookInstance": str(uuid.uuid4()),
            "context": {"patientId": patient["id"], "userId": "Practitioner/ed-doc"},
            "prefetch": {"patient": patient},
        }
        from io import BytesIO

        response = yield self.agent.request(
            b"POST",
            f"{self.base}/{service}".encode(),
            Headers(
                {b"Content-Type": [b"application/json"], b"Authorization": [f"Bearer {self.token(service)}".encode()]}
            ),
            FileBodyProducer(BytesIO(json.dumps(body).encode())),
        )
        data = yield readBody(response)
        return response.code, json.loads(data)

    @defer.inlineCallbacks
    def wait_frames(self, count: int, seconds: float = 15.0):
        deadline = time.monotonic() + seconds
        while len(self.ed.frames) < count:
            if time.monotonic() > deadline:
                self.fail(f"the ED got {len(self.ed.frames)} frames, expected {count}")
            yield task.deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_an_ed_registration_of_a_member_gets_the_v2_alert_and_the_card(self):
        """A04 of an attributed member: an MDM^T02 bound to the ED's patient and visit, and a card naming the PCP."""
        registration = adt("A04", "M-1", "E1", h(0), klass="E", admitted=h(0))
        yield self.send(registration)
        written = yield self.transition(h(0.1))
        self.assertEqual(written["notifications"], 1)
        yield self.wait_frames(1)
        frame = self.ed.frames[0]
        self.assertEqual(read_msh(frame).message_type, "MDM")
        text = frame.decode("utf-8")
        segments = text.split("\r")
        inbound_pid = next(s for s in registration.decode().split("\r") if s.startswith("PID|"))
        self.assertIn(inbound_pid, segments, "the ED's own PID, as it came")
        pv1 = next(s for s in segments if s.startswith("PV1|")).split("|")
        self.assertEqual(pv1[19], "E1^^^LSR^VN")
        msh = segments[0].split("|")
        self.assertEqual((msh[4], msh[5]), ("EPIC", "LSR"), "addressed back to the sender")
        for said in (
            "attributed to Lakeshore ACO (ACO-LAKE)",
            "Dr. Rina Lee, phone 203-555-0100",
            "Sam Ortiz RN, phone 203-555-0188",
            "ED visits in the last 60 days, this one included: 1",
            "contact the PCP before the patient is discharged",
        ):
            self.assertIn(said, text)
        yield self.wait_for(
            "SELECT COUNT(*) FROM notifications WHERE recipient_role = 'ed-alert' AND state = 'sent'", expected=1
        )
        # Processing the same message's events again queues no second alert.
        yield self.transition(h(0.2))
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE recipient_role = 'ed-alert'", expected=1)

        code, body = yield self.hook("M-1")
        self.assertEqual(code, 200, body)
        (card,) = body["cards"]
        self.assertIn("Dr. Rina Lee", card["summary"])
        self.assertIn("203-555-0100", card["summary"])
        self.assertIn("ED visits in the last 60 days, this one included: 1", card["detail"])
        yield self.wait_for("SELECT COUNT(*) FROM events WHERE actor = 'cds-hooks'", expected=1)
        conn = self.db()
        detail = conn.execute(
            "SELECT detail FROM events WHERE actor = 'cds-hooks' AND kind = 'cds-hooks-call' ORDER BY id DESC"
        ).fetchone()[0]
        conn.close()
        self.assertEqual(json.loads(detail)["member"], "M-1")
        self.assertEqual(json.loads(detail)["cards"], 1)

    @defer.inlineCallbacks
    def test_an_opted_out_member_gets_neither_alert_nor_card(self):
        """A04 of an opted-out member: no e-alert queued or sent, and the CDS Hooks call gets no card."""
        yield self.send(adt("A04", "M-2", "E2", h(0), klass="E", admitted=h(0)))
        yield self.transition(h(0.1))
        # A member's alert right after shows the ED listener works: it gets exactly that one.
        yield self.send(adt("A04", "M-1", "E3", h(1), klass="E", admitted=h(1)))
        yield self.transition(h(1.1))
        yield self.wait_frames(1)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(self.ed.frames), 1)
        self.assertNotIn(b"OPTOUT", self.ed.frames[0])
        conn = self.db()
        alerts = conn.execute("SELECT message_id FROM notifications WHERE recipient_role = 'ed-alert'").fetchall()
        conn.close()
        self.assertEqual([r[0] for r in alerts], [2])
        code, body = yield self.hook("M-2")
        self.assertEqual((code, body), (200, {"cards": []}))
        code, body = yield self.hook("M-2", "herald-aco-patient-view")
        self.assertEqual((code, body), (200, {"cards": []}))

    @defer.inlineCallbacks
    def test_the_third_ed_visit_in_60_days_is_flagged_on_the_alert_and_the_notifications(self):
        """Two earlier ED visits: the third's alert says 3 and the flag; the care team's notification carries it."""
        for n, hours in enumerate((-24 * 40, -24 * 10)):
            yield self.send(
                adt("A04", "M-3", f"P{n}", h(hours), klass="E", admitted=h(hours)),
                adt("A03", "M-3", f"P{n}", h(hours + 3), klass="E", admitted=h(hours), discharged=h(hours + 3)),
            )
        yield self.transition(h(-1))
        yield self.send(adt("A04", "M-3", "E4", h(0), klass="E", admitted=h(0)))
        yield self.transition(h(0.1))
        yield self.wait_frames(1)
        text = self.ed.frames[-1].decode()
        self.assertIn("ED visits in the last 60 days, this one included: 3", text)
        self.assertIn("Flag: 3 or more ED visits in 60 days.", text)
        conn = self.db()
        last = conn.execute("SELECT MAX(id) FROM messages").fetchone()[0]
        rows = conn.execute(
            "SELECT id, recipient_role, attribution FROM notifications WHERE message_id = ? AND recipient_role != ?",
            (last, "ed-alert"),
        ).fetchall()
        conn.close()
        keys = self.gw.store.keys
        opened = {r[1]: json.loads(keys.open_text(r[2], attribution_context(r[0]))) for r in rows}
        self.assertEqual(opened["care_team"]["flags"], ["ed-3-in-60d"])
        self.assertNotIn("flags", opened["hie"], "the HIE is not told the ACO's flags")


class EdAlertOnPostgres(EdAlertTests):
    """The same, with the store on PostgreSQL (the service leads care transitions: gateway.store.claims)."""

    backend = "postgresql"
