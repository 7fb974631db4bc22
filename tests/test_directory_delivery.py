"""Notifications through the recipient directory, end to end with real receivers on 127.0.0.1.

A running Herald with three directory entries added by ``herald recipients add --from``:
the member's PCP by Direct secure email (aiosmtpd; the test decrypts and verifies the
S/MIME message as the recipient), the ACO's care team by FHIR with SMART Backend
Services (a test server that validates the Bundle and checks the JWT assertion's
signature), and the HIE by MLLP forward (a test listener that ACKs). Then a digest
recipient, and the faults: a 401 forever, an outage past the old 254 s, a removed entry.
"""

from __future__ import annotations

import email
import json
import sqlite3
from email import policy

import test_end_to_end as e2e
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from fhir.resources.R4B.bundle import Bundle
from test_channel_direct import RECIPIENT, SENDER, Relay, free_port, make_direct_pki
from test_channel_fhir import ProcessMessage, Root
from test_channel_mllp import HieFactory
from test_smart import CLIENT_ID, CountingSite, TokenEndpoint, _scratch, rsa_key, write_key
from twisted.internet import defer, reactor
from twisted.trial import unittest

from gateway.app.cli import main
from gateway.store import open_database

PCP_NPI = "1987654328"  # the sample roster's PCP of the sample ED visit's patient
ACO = "ACO-SHORELINE"


def herald(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


class DirectoryTestCase(e2e.GatewayTestCase):
    """A gateway whose directory sends to a Direct relay, a FHIR server with SMART auth and an MLLP listener."""

    token_status = 200
    entries = "all"

    @defer.inlineCallbacks
    def setUp(self):
        self.pki = make_direct_pki(_scratch(self) / "pki")
        self.relay = Relay()
        self.smtp_port = free_port()
        self.controller = Controller(self.relay, hostname="127.0.0.1", port=self.smtp_port)
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.token = TokenEndpoint(rsa_key().public_key())
        self.fhir = ProcessMessage(self.token)
        self.site = CountingSite(Root(self.token, self.fhir))
        self.fhir_port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.fhir_base = f"http://127.0.0.1:{self.fhir_port.getHost().port}"
        self.token.url = f"{self.fhir_base}/token"
        self.hie = HieFactory()
        self.mllp_port = reactor.listenTCP(0, self.hie, interface="127.0.0.1")
        self.extra_config = f"""
[direct]
smtp_host = "127.0.0.1"
smtp_port = {self.smtp_port}
starttls = false
sender = "{SENDER}"
sign_cert = "{self.pki / "sender.pem"}"
sign_key = "{self.pki / "sender-key.pem"}"

[delivery]
poll_interval = 0.05
backoff_initial = 0.2
backoff_max = 0.5
"""
        yield super().setUp()
        self.add_entries()

    @defer.inlineCallbacks
    def tearDown(self):
        for finished in self.fhir.stalled:
            finished.addErrback(lambda _: None)
        yield super().tearDown()
        yield self.fhir_port.stopListening()
        yield self.mllp_port.stopListening()
        yield self.site.closed()

    def directory_file(self) -> str:
        key = write_key(self.pki, rsa_key(), "smart-key.pem")
        return f"""
[[recipient]]
kind = "pcp"
name = "Dr. Priya Halvorsen"
npi = "{PCP_NPI}"
timezone = "America/New_York"
channels = [{{channel = "direct", to = "{RECIPIENT}", certificate = "pki/recipient.pem"}}]

[[recipient]]
kind = "care_team"
name = "Shoreline ACO care team"
aco_id = "{ACO}"
channels = [{{channel = "fhir", url = "{self.fhir_base}/fhir", auth = {{token_url = "{self.token.url}", \
client_id = "{CLIENT_ID}", key_file = "{key}", kid = "test-kid"}}}}]

[[recipient]]
kind = "hie"
name = "State HIE"
channels = [{{channel = "mllp", host = "127.0.0.1", port = {self.mllp_port.getHost().port}}}]
"""

    def add_entries(self) -> None:
        path = self.pki.parent / "directory.toml"
        path.write_text(self.directory_file())
        code, out = herald("recipients", "add", "--from", str(path), "--data", str(self.data), "--by", "tests")
        self.assertEqual(code, 0, out)

    def count(self, sql: str, args=()) -> int:
        conn = open_database(self.config.database, readonly=True)
        try:
            return conn.execute(sql, args).fetchone()[0]
        finally:
            conn.close()

    @defer.inlineCallbacks
    def send_ed_visit(self, control_id: bytes = b"LSR8841200193"):
        c = yield self.client()
        raw = e2e.sample(e2e.ED_VISIT).replace(b"LSR8841200193", control_id, 1)
        yield c.send(raw, timeout=10)
        return raw


class ThreeChannelsTests(DirectoryTestCase):
    @defer.inlineCallbacks
    def test_an_ed_visit_reaches_the_pcp_by_direct_the_care_team_by_fhir_and_the_hie_by_mllp(self):
        """One ED visit: one signed and encrypted email the PCP can open, one valid Bundle posted with a
        SMART token whose assertion verified, one v2 forward ACKed AA; each outbox row sent, once."""
        raw = yield self.send_ed_visit()
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE state = 'sent'", expected=3)
        rows = dict(
            sqlite3.connect(self.config.database).execute("SELECT channel, recipient_id FROM notifications").fetchall()
        )
        self.assertEqual(rows, {"direct": f"pcp:{PCP_NPI}", "fhir": f"care_team:{ACO}", "mllp": "hie:state-hie"})

        # Direct: the recipient decrypts, the signature verifies, the summary and the Bundle are inside.
        (mail_from, rcpt_tos, content, _) = self.relay.received[0]
        self.assertEqual((mail_from, rcpt_tos), (SENDER, [RECIPIENT]))
        from test_channel_direct import DirectTestCase

        opener = DirectTestCase("run")
        opener.folder = self.pki
        signed = opener.open_as_recipient(content)
        verified = opener.openssl_verify(signed)
        self.assertEqual(verified.returncode, 0, verified.stderr)
        inner = email.message_from_bytes(signed, policy=policy.default)
        parts = list(next(p for p in inner.iter_parts()).iter_parts())
        summary = parts[0].get_content()
        self.assertIn("Brightwater", summary.title())
        self.assertIn("Dr. Priya Halvorsen", summary)
        Bundle.model_validate_json(parts[1].get_payload(decode=True))
        self.assertNotIn(b"Brightwater", content)  # encrypted: the name is not in clear

        # FHIR: validated, with a token the token endpoint issued after checking the signed assertion.
        (posted,) = [r for r in self.fhir.received if "bundle" in r]
        self.assertTrue(posted["authorization"].startswith("Bearer token-"))
        self.assertEqual(self.token.problems, [])
        self.assertEqual(len(self.token.issued), 1)

        # MLLP: the message as received, once.
        self.assertEqual(self.hie.frames, [raw])
        self.assertEqual(self.count("SELECT COUNT(*) FROM delivery_attempts"), 3)


class FourOhOneTests(DirectoryTestCase):
    @defer.inlineCallbacks
    def test_a_receiver_answering_401_forever_ends_in_a_dead_letter_not_endless_retries(self):
        """The FHIR server refuses every token: one refresh, then dead with the reason; the others are sent."""
        self.token.valid = _RejectsAll()
        yield self.send_ed_visit()
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE state = 'dead'", expected=1)
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE state = 'sent'", expected=2)
        conn = sqlite3.connect(self.config.database)
        (error, attempts) = conn.execute(
            "SELECT last_error, attempts FROM notifications WHERE channel = 'fhir'"
        ).fetchone()
        conn.close()
        self.assertIn("401", error)
        self.assertEqual(attempts, 1)
        self.assertEqual(len([r for r in self.fhir.received if r["path"] == b"/fhir/$process-message"]), 2)
        code, out = herald("log", "list", "--data", str(self.data))
        self.assertIn("dead", out)
        (nid,) = (
            sqlite3.connect(self.config.database)
            .execute("SELECT id FROM notifications WHERE state = 'dead'")
            .fetchone()
        )
        code, out = herald("outbox", "show", nid, "--data", str(self.data))
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"attempt 1 .* error 401 \d+ ms")

        # The receiver's credentials are fixed; the operator re-sends the dead letter, and it arrives.
        self.token.valid = set(self.token.issued)
        self.token.valid.update(f"token-{i}" for i in range(1, 20))
        code, out = herald("outbox", "retry", "--all-dead", "--by", "ops", "--data", str(self.data))
        self.assertEqual(code, 0, out)
        self.gw.delivery.wake()
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE state = 'sent'", expected=3)
        self.assertEqual(len([r for r in self.fhir.received if "bundle" in r]), 1)


class _RejectsAll(set):
    def __contains__(self, item) -> bool:
        return False


class RemovedEntryTests(DirectoryTestCase):
    @defer.inlineCallbacks
    def test_a_notification_for_an_entry_removed_since_is_dead_lettered_saying_why(self):
        """The HIE's entry is removed while its notification waits (its listener is down): dead, with the reason."""
        yield self.mllp_port.stopListening()
        yield self.send_ed_visit()
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE channel = 'mllp' AND attempts > 0", expected=1)
        code, out = herald("recipients", "remove", "hie:state-hie", "--data", str(self.data))
        self.assertEqual(code, 0, out)
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE channel = 'mllp' AND state = 'dead'", expected=1)
        conn = sqlite3.connect(self.config.database)
        (error,) = conn.execute("SELECT last_error FROM notifications WHERE channel = 'mllp'").fetchone()
        conn.close()
        self.assertIn("no longer has this mllp channel", error)
        self.mllp_port = reactor.listenTCP(0, self.hie, interface="127.0.0.1")  # for tearDown


class DigestTests(DirectoryTestCase):
    def directory_file(self) -> str:
        return f"""
[[recipient]]
kind = "care_team"
name = "Shoreline ACO care team"
aco_id = "{ACO}"
mode = "digest"
digest_at = "07:30"
timezone = "America/Chicago"
channels = [{{channel = "file", directory = "{self.data / "digest"}", format = "ndjson"}},
            {{channel = "direct", to = "{RECIPIENT}", certificate = "pki/recipient.pem"}}]
"""

    @defer.inlineCallbacks
    def test_a_digest_recipient_gets_one_file_and_one_email_at_its_time_with_every_event(self):
        """Three ED visits for a digest recipient wait until 07:30 Chicago; made due, they go as one NDJSON file
        (sealed: it is under the data folder) and one email with three Bundles, each row recorded sent."""
        for i in range(3):
            yield self.send_ed_visit(b"DIGEST%04d" % i)
        yield self.wait_for("SELECT COUNT(*) FROM notifications", expected=6)
        conn = sqlite3.connect(self.config.database)
        due = {r[0] for r in conn.execute("SELECT next_attempt_at FROM notifications")}
        conn.close()
        self.assertEqual(len(due), 1, "every row waits for the same digest time")
        (at,) = due
        from datetime import UTC, datetime
        from zoneinfo import ZoneInfo

        local = datetime.fromtimestamp(at, UTC).astimezone(ZoneInfo("America/Chicago"))
        self.assertEqual((local.hour, local.minute), (7, 30))
        self.assertEqual(self.count("SELECT COUNT(*) FROM delivery_attempts"), 0)
        # The digest time comes (the rows made due now, as the clock would).
        conn = sqlite3.connect(self.config.database)
        with conn:
            conn.execute("UPDATE notifications SET next_attempt_at = 0")
        conn.close()
        self.gw.delivery.wake()
        yield self.wait_for("SELECT COUNT(*) FROM notifications WHERE state = 'sent'", expected=6)
        files = list((self.data / "digest").iterdir())
        self.assertEqual(len(files), 1, files)
        self.assertTrue(files[0].name.endswith(".ndjson.sealed"))
        keys = self.gw.store.keys if hasattr(self.gw.store, "keys") else None
        from gateway.store.keys import KeyRing
        from gateway.store.sealing import file_drop_context

        ring = keys or KeyRing.load(self.config.key_path)
        data = ring.open(files[0].read_bytes(), file_drop_context(files[0].name.removesuffix(".ndjson.sealed")))
        lines = data.decode().splitlines()
        self.assertEqual(len(lines), 3)
        for line in lines:
            self.assertEqual(json.loads(line)["resourceType"], "Bundle")
        self.assertEqual(len(self.relay.received), 1)
        from test_channel_direct import DirectTestCase

        opener = DirectTestCase("run")
        opener.folder = self.pki
        signed = opener.open_as_recipient(self.relay.received[0][2])
        inner = email.message_from_bytes(signed, policy=policy.default)
        parts = list(next(p for p in inner.iter_parts()).iter_parts())
        self.assertIn("Daily digest: 3", parts[0].get_content())
        self.assertEqual(len(parts), 4)  # the summary and three Bundles


class CliTests(unittest.TestCase):
    def test_a_bad_entry_is_refused_naming_the_file_entry_and_field(self):
        """`recipients add --from` with a bad NPI: exit 2, the entry and the field named, nothing changed."""
        folder = _scratch(self)
        code, out = herald("certs", "init", "--dir", str(folder / "certs"))
        path = folder / "d.toml"
        path.write_text('[[recipient]]\nkind = "pcp"\nname = "X"\nnpi = "123"\nchannels = []\n')
        result = CliRunner().invoke(main, ["recipients", "add", "--from", str(path), "--data", str(folder / "data")])
        self.assertEqual(result.exit_code, 2, result.output)
        self.assertIn("recipient 1: npi:", result.output)


def test_recipients_add_list_show_missing_and_remove_from_the_command_line(tmp_path, monkeypatch):
    """A PCP added with options is listed and shown (its certificate path made absolute); `missing` names the
    roster's other PCPs with their member counts and exits 3; removing an entry is said, an unknown one refused."""
    from test_cli import SAMPLES

    from gateway.app.roster import import_roster_file
    from gateway.store.keys import KeyRing

    data = tmp_path / "data"
    import_roster_file(data / "herald.db", SAMPLES / "roster.csv", by="tests", keys=KeyRing.load(None))
    (tmp_path / "dr.pem").write_text("not read until sent")
    monkeypatch.chdir(tmp_path)
    code, out = herald(
        "recipients", "add", "--kind", "pcp", "--name", "Dr. Priya Halvorsen", "--npi", PCP_NPI,
        "--direct", "dr.halvorsen@direct.example.org", "--certificate", "dr.pem", "--digest", "07:30",
        "--timezone", "America/Chicago", "--data", str(data),
    )  # fmt: skip
    assert code == 0, out
    assert f"added pcp:{PCP_NPI}" in out
    code, out = herald("recipients", "list", "--data", str(data))
    assert f"pcp:{PCP_NPI}" in out and "digest 07:30 America/Chicago" in out, out
    code, out = herald("recipients", "show", f"pcp:{PCP_NPI}", "--data", str(data))
    shown = json.loads(out)
    assert shown["channels"][0]["certificate"] == str(tmp_path / "dr.pem")
    assert shown["updated_by"]
    code, out = herald("recipients", "missing", "--data", str(data))
    assert code == 3, out
    assert "1234567893  2 member(s)" in out and "1345678902  1 member(s)" in out, out
    assert PCP_NPI not in out.split("PCPs on the roster")[0]
    assert "without a directory entry: 2" in out
    code, out = herald("recipients", "remove", f"pcp:{PCP_NPI}", "--data", str(data))
    assert code == 0 and f"removed pcp:{PCP_NPI}" in out
    result = CliRunner().invoke(main, ["recipients", "remove", "pcp:0000000000", "--data", str(data)])
    assert result.exit_code == 2 and "no entry" in result.output
