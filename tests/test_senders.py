"""The sender allowlist: a connection may send only as the senders ([[senders]]) it is bound to.

The attacker's finding was a frame claiming ``EVILAPP|EVILFAC`` with a roster
member's MRN getting AA and being routed. Here such frames get AR/CR with an
ERR segment, are stored as rejected with the reason, are audited
(``sender-refused``) and route nothing.
"""

from __future__ import annotations

import ipaddress
import json

import pytest
import test_end_to_end as e2e
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher

from gateway.app.certs import issue, make_ca
from gateway.app.replay import read_ack
from gateway.config import Config, SenderRule, load_config, sender_identity
from gateway.errors import ConfigError
from gateway.header import read_header
from gateway.intake.senders import ERR_SENDER_REFUSED, SenderPolicy
from mllp import Peer, PeerCertificate

ADMIT = e2e.sample(e2e.ADMIT)  # EPIC|LSR, MSH-15 AL (enhanced mode), a roster member's MRN in PID-3


def claiming(raw: bytes, application: str, facility: str, control_id: str = "", ack_type: str | None = None) -> bytes:
    """``raw`` with MSH-3/MSH-4 (and optionally MSH-10 and MSH-15) replaced."""
    msh, sep, rest = raw.partition(b"\r")
    f = msh.split(b"|")
    f[2], f[3] = application.encode(), facility.encode()
    if control_id:
        f[9] = control_id.encode()
    if ack_type is not None:
        f[14] = ack_type.encode()
    return b"|".join(f) + sep + rest


def certificate(name: str, *dns: str) -> PeerCertificate:
    return PeerCertificate.of(issue(make_ca(), name, "client", dns).certificate)


EPIC = certificate("epic-prod", "epic.example.org")
CERNER = certificate("cerner-prod")


def tls_peer(cert: PeerCertificate | None, host: str = "10.20.0.5") -> Peer:
    return Peer(host, 40001, tls=True, certificate=cert)


def header(application: str, facility: str):
    return read_header(claiming(ADMIT, application, facility))


RULES = (
    SenderRule("EPIC", "LSR", frozenset({"epic-prod"})),
    SenderRule("CERNER", "NRG", frozenset({CERNER.fingerprint})),
    SenderRule("MEDITECH", "*", networks=(ipaddress.ip_network("10.30.0.0/16"),)),
    SenderRule("LAB", "PCH", frozenset({"epic.example.org"}), (ipaddress.ip_network("10.20.0.0/24"),)),
)


@pytest.mark.parametrize(
    ("sender", "peer", "allowed"),
    [
        (("EPIC", "LSR"), tls_peer(EPIC), True),  # by subject CN
        (("EPIC", "LSR"), tls_peer(CERNER), False),
        (("EPIC", "LSR"), tls_peer(None), False),
        (("CERNER", "NRG"), tls_peer(CERNER), True),  # by fingerprint
        (("CERNER", "NRG"), tls_peer(certificate("cerner-prod")), False),  # same CN, another key: not it
        (("MEDITECH", "PCH"), Peer("10.30.4.4", 5000), True),  # by network, any facility
        (("MEDITECH", "XYZ"), tls_peer(EPIC, "10.30.0.9"), True),
        (("MEDITECH", "PCH"), Peer("10.31.0.1", 5000), False),
        (("MEDITECH", "PCH"), Peer("::ffff:10.30.1.1", 5000), True),  # IPv4 on a dual-stack socket
        (("LAB", "PCH"), tls_peer(EPIC, "10.20.0.9"), True),  # SAN DNS name and network: both needed
        (("LAB", "PCH"), tls_peer(EPIC, "10.99.0.9"), False),
        (("LAB", "PCH"), tls_peer(CERNER, "10.20.0.9"), False),
    ],
)
def test_a_sender_is_allowed_only_for_its_identities_and_networks(sender, peer, allowed):
    """Identities (CN, SAN DNS name, fingerprint) and networks bind a sender; with both, both must match."""
    refusal = SenderPolicy(RULES).check(header(*sender), peer)
    assert (refusal is None) == allowed, refusal
    if refusal is not None:
        assert refusal.sender == "|".join(sender)
        assert (
            refusal.answer == f"sending application {sender[0]}, facility {sender[1]} is not allowed on this connection"
        )
        assert str(peer.host) in refusal.reason


@pytest.mark.parametrize(
    ("unknown", "peer", "allowed"),
    [
        (None, tls_peer(EPIC, "127.0.0.1"), False),  # default: TLS rejects unknown senders
        (None, Peer("127.0.0.1", 5000), True),  # default: plain from loopback accepts them
        (None, Peer("::1", 5000), True),
        (None, Peer("10.0.0.1", 5000), False),  # default: plain from elsewhere rejects them
        (None, "127.0.0.1:5000", True),  # a peer string is a plain connection
        ("accept", tls_peer(EPIC), True),
        ("reject", Peer("127.0.0.1", 5000), False),
    ],
)
def test_unknown_senders_follow_the_setting_or_the_default(unknown, peer, allowed):
    """A sender with no entry: [security] unknown_senders, else reject except plain loopback."""
    refusal = SenderPolicy(RULES, unknown).check(header("EVILAPP", "EVILFAC"), peer)
    assert (refusal is None) == allowed
    if refusal is not None:
        assert "unknown sender EVILAPP|EVILFAC" in refusal.reason


def test_senders_are_read_from_the_config(tmp_path):
    """[[senders]] tables become SenderRules; fingerprints may be written as OpenSSL prints them."""
    colons = ":".join(CERNER.fingerprint[7:][i : i + 2] for i in range(0, 64, 2)).upper()
    path = tmp_path / "herald.toml"
    path.write_text(
        f"""
[security]
unknown_senders = "accept"

[[senders]]
application = "EPIC"
facility = "LSR"
identities = ["Epic-Prod", "{colons}"]
networks = ["10.20.0.0/16", "192.0.2.7"]
"""
    )
    cfg = load_config(path)
    assert cfg.unknown_senders == "accept"
    [rule] = cfg.senders
    assert rule.identities == {"epic-prod", CERNER.fingerprint}
    assert rule.networks == (ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("192.0.2.7/32"))
    assert Config().senders == () and Config().unknown_senders is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[senders]]\napplication = "EPIC"\nfacility = "LSR"\n', "senders[1]"),
        ('[[senders]]\napplication = "EPIC"\nidentities = ["x"]\n', "senders[1].facility"),
        ('[[senders]]\napplication = "EP|IC"\nfacility = "LSR"\nidentities = ["x"]\n', "senders[1].application"),
        ('[[senders]]\napplication = "E"\nfacility = "L"\nnetworks = ["10.0.0.0/33"]\n', "senders[1].networks"),
        ('[[senders]]\napplication = "E"\nfacility = "L"\nidentities = ["sha256:abc"]\n', "senders[1].identities"),
        ('[[senders]]\napplication = "E"\nfacility = "L"\nidentities = [""]\n', "senders[1].identities"),
        ('[[senders]]\napplication = "E"\nfacility = "L"\ncn = "x"\n', "senders[1].cn"),
        ('senders = "all"\n', "senders"),
        ('[security]\nunknown_senders = "maybe"\n', "security.unknown_senders"),
    ],
)
def test_bad_sender_settings_name_the_key(tmp_path, text, key):
    """A wrong [[senders]] table or unknown_senders value fails at load naming it."""
    path = tmp_path / "herald.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key


def test_identities_are_compared_in_one_form():
    """Names are case-folded; a fingerprint in any common spelling is sha256: and lowercase hex."""
    assert sender_identity("Epic-Prod") == "epic-prod"
    hex64 = "AB" * 32
    assert sender_identity(hex64) == sender_identity(f"SHA256:{hex64}") == "sha256:" + "ab" * 32
    assert sender_identity(":".join(["AB"] * 32)) == "sha256:" + "ab" * 32


# -- on real sockets, over mutual TLS ---------------------------------------------------------


class SenderAllowlist(e2e.GatewayTestCase):
    """Two interface engines, each bound to its own sender; the test roster is loaded."""

    tls = True
    tls_clients = ("epic-interface", "cerner-interface")
    senders = """
[[senders]]
application = "EPIC"
facility = "LSR"
identities = ["epic-interface"]

[[senders]]
application = "CERNER"
facility = "NRG"
identities = ["cerner-interface"]
"""

    def refused_events(self) -> list[dict]:
        conn = self.db()
        try:
            rows = conn.execute("SELECT * FROM events WHERE kind = 'sender-refused' ORDER BY id").fetchall()
        finally:
            conn.close()
        return [dict(r) | {"detail": json.loads(r["detail"])} for r in rows]

    @defer.inlineCallbacks
    def test_a_message_claiming_another_sender_is_refused_and_routes_nothing(self):
        """The EPIC engine sends as CERNER|NRG: CR with ERR 103 at MSH-3, stored rejected, audited, not routed."""
        logs = []
        observer = lambda e: logs.append(formatEvent(e))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        epic = yield self.client("epic-interface")
        own = yield epic.send(ADMIT, timeout=10)
        self.assertEqual(read_ack(own)[0], "CA")
        forged = claiming(ADMIT, "CERNER", "NRG", control_id="FORGED1")
        ack = yield epic.send(forged, timeout=10)
        code, control_id, reason = read_ack(ack)
        self.assertEqual((code, control_id), ("CR", "FORGED1"))
        self.assertEqual(reason, "sending application CERNER, facility NRG is not allowed on this connection")
        err = [s for s in ack.decode().split("\r") if s.startswith("ERR")]
        self.assertEqual(len(err), 1)
        self.assertIn(f"|MSH^1^3|{ERR_SENDER_REFUSED}^", err[0])
        self.assertNotIn("epic-interface", ack.decode())  # the answer tells nothing of the allowlist
        yield self.settled()
        conn = self.db()
        try:
            rows = conn.execute("SELECT id, state, reason, control_id FROM messages ORDER BY id").fetchall()
            forged_id = rows[1]["id"]
            routed = conn.execute("SELECT COUNT(*) FROM notifications WHERE message_id = ?", (forged_id,)).fetchone()
        finally:
            conn.close()
        self.assertEqual([r["state"] for r in rows], ["routed", "rejected"])
        self.assertEqual(rows[1]["control_id"], "FORGED1")
        self.assertIn("sender CERNER|NRG is not allowed for this connection", rows[1]["reason"])
        self.assertIn("CN=epic-interface", rows[1]["reason"])
        self.assertEqual(routed[0], 0)
        [event] = self.refused_events()
        self.assertEqual((event["actor"], event["message_id"]), ("intake", None))
        detail = event["detail"]
        self.assertEqual((detail["sender"], detail["control_id"], detail["tls"]), ("CERNER|NRG", "FORGED1", True))
        self.assertEqual(detail["certificate"]["subject"], "CN=epic-interface,O=Herald development")
        self.assertTrue(detail["certificate"]["fingerprint"].startswith("sha256:"))
        self.assertTrue(detail["peer"].startswith("127.0.0.1:"))
        self.assertTrue([line for line in logs if "refused a message from 127.0.0.1:" in line and "CERNER|NRG" in line])

    @defer.inlineCallbacks
    def test_the_attackers_frame_from_an_unknown_sender_gets_AR(self):
        """EVILAPP|EVILFAC with a roster member's MRN (original mode): AR with an ERR, stored rejected, audited."""
        cerner = yield self.client("cerner-interface")
        evil = claiming(ADMIT, "EVILAPP", "EVILFAC", control_id="EVIL1", ack_type="")
        ack = yield cerner.send(evil, timeout=10)
        self.assertEqual(read_ack(ack)[:2], ("AR", "EVIL1"))
        self.assertIn("ERR|", ack.decode())
        yield self.settled()
        conn = self.db()
        try:
            row = conn.execute("SELECT state, reason FROM messages").fetchone()
            notes = conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0]
        finally:
            conn.close()
        self.assertEqual((row["state"], notes), ("rejected", 0))
        self.assertIn("unknown sender EVILAPP|EVILFAC", row["reason"])
        [event] = self.refused_events()
        self.assertEqual(event["detail"]["certificate"]["subject"], "CN=cerner-interface,O=Herald development")

    @defer.inlineCallbacks
    def test_each_engine_sends_as_itself(self):
        """Each client is accepted for its own sender on the same listener."""
        epic = yield self.client("epic-interface")
        cerner = yield self.client("cerner-interface")
        a = yield epic.send(ADMIT, timeout=10)
        b = yield cerner.send(e2e.sample("cerner-v23-a01-admit.hl7"), timeout=10)
        self.assertEqual([read_ack(a)[0], read_ack(b)[0]], ["CA", "CA"])
        self.assertEqual(self.refused_events(), [])


class PlainLoopbackListener(e2e.GatewayTestCase):
    """A plain listener on 127.0.0.1 (allow_plain): unknown senders are accepted by default, listed ones bound."""

    extra_config = '\n[[senders]]\napplication = "EPIC"\nfacility = "LSR"\nnetworks = ["10.0.0.0/8"]\n'

    @defer.inlineCallbacks
    def test_unknown_is_accepted_but_a_bound_sender_is_not(self):
        """MEDITECH (no entry) is accepted from loopback; EPIC|LSR, bound to 10.0.0.0/8, is refused."""
        c = yield self.client()
        unknown = yield c.send(e2e.sample(e2e.UNMATCHED), timeout=10)
        bound = yield c.send(ADMIT, timeout=10)
        self.assertEqual([read_ack(unknown)[0], read_ack(bound)[0]], ["AA", "CR"])
