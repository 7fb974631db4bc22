"""The tamper-evident trail: the event chain, message digests, `herald audit verify` and `export`, audited reads.

Each tampering is done the way an attacker with a copy of the database would: a
connection editing rows, with no key. Every test runs on SQLite and on
PostgreSQL (the ``data_dir`` fixture) but the migration's, which is SQLite's.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from fhir.resources.R4B.auditevent import AuditEvent
from test_intake import STORED_AT, accepted_record, drain, success

from gateway.app.cli import main
from gateway.app.replay import split_messages
from gateway.config import default_recipients, load_config
from gateway.conversion.vocabulary import load_vocabulary
from gateway.pipeline.process import process_message
from gateway.records import FAILED, SENT, DeliveryAttempt
from gateway.store import Store, StoredRoster, open_database, open_roster_snapshot
from gateway.store.integrity import verify
from gateway.store.keys import KEYS_ENV, KeyRing, new_key_file
from gateway.store.messages import apply_outcomes, pending_messages, record_frame
from gateway.store.outbox import due_notifications, record_attempts

SAMPLES = Path(__file__).resolve().parent.parent / "sample_messages"
NOW = datetime(2026, 11, 20, 8, 0, 0, tzinfo=UTC)
MESSAGES = [
    "epic-v251-a01-admit-from-ed.hl7",
    "meditech-v24-a04-outpatient-unmatched.hl7",
    "cerner-v23-a03-discharge.hl7",
]


@pytest.fixture(autouse=True)
def _no_keys_from_the_environment(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)


def sample(name: str) -> bytes:
    return split_messages((SAMPLES / name).read_bytes())[0]


def gateway_data(data: Path, names=MESSAGES, *, at: datetime = NOW, encrypted: bool = True) -> KeyRing:
    """A data folder as a running gateway leaves it: ``names`` stored by intake, processed, each
    notification delivered once; the key ring at ``data/keys/herald.key`` (or none). Returns the ring."""
    keys = KeyRing.load(new_key_file(data / "keys" / "herald.key"), environ={}) if encrypted else KeyRing.disabled()
    store = Store(store_of(data), reactor=object(), clock=lambda: at, keys=keys)  # never started: its SQL only
    conn = store._conn
    now = at.isoformat(timespec="milliseconds")
    for name in names:
        record_frame(conn, accepted_record(sample(name)), now)
    roster = open_roster_snapshot(store_of(data), keys)
    lookups = StoredRoster(roster, conn)
    vocab = load_vocabulary()
    outcomes = [
        process_message(p, vocab, UTC, lookups, default_recipients(data)) for p in pending_messages(conn, 0, 100)
    ]
    apply_outcomes(conn, outcomes, now, 0.0)
    delivered = [
        DeliveryAttempt(n.id, n.message_id, 1, "ok", f"wrote {n.id}.json", SENT, 0.0)
        for n in due_notifications(conn, 1e12, 100, ())
    ]
    record_attempts(conn, delivered, now)
    roster.close()
    conn.close()
    return keys


def store_of(data: Path):
    """The store of a data folder, as the CLI finds it: its herald.db, or the database HERALD_STORE names."""
    return load_config(None, data_dir=data).database


def attacker(data: Path) -> sqlite3.Connection:
    """A connection to the database with no key, as someone with a copy of it (or its password) has."""
    return open_database(store_of(data))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def explain(result) -> str:
    return f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


def chain(data: Path, keys: KeyRing) -> sqlite3.Connection:
    return open_database(store_of(data), readonly=True, keys=keys)


# -- the chain and the digests ---------------------------------------------------------------


def test_an_intact_trail_verifies(data_dir):
    """A database as the gateway wrote it verifies, every event and message checked."""
    data = data_dir
    gateway_data(data)
    result = run("audit", "verify", "--data", data)
    assert result.exit_code == 0, explain(result)
    assert "the audit trail is intact" in result.output
    events = attacker(data).execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert f"events: {events} checked" in result.output
    assert "messages: 3 checked" in result.output


def test_every_event_row_carries_a_mac_chained_to_the_one_before(data_dir):
    """Each row's MAC is the chain MAC of its canonical bytes after the previous row's MAC."""
    from gateway.store.events import event_bytes

    data = data_dir
    keys = gateway_data(data)
    previous = b""
    for row in attacker(data).execute(
        "SELECT id, at, message_id, notification_id, actor, kind, detail, mac FROM events"
    ):
        assert row[7] == keys.chain_mac(previous, event_bytes(*row[:7])), row[0]
        previous = row[7]


def _edit_event(db, n):
    db.execute("UPDATE events SET detail = ? WHERE id = ?", ('{"code": "AE"}', n))


def _delete_event(db, n):
    db.execute("DELETE FROM events WHERE id = ?", (n,))


def _reorder_events(db, n):
    # Two rows change places (each keeps its content and MAC): the trail tells another story.
    db.execute("UPDATE events SET id = -1 WHERE id = ?", (n,))
    db.execute("UPDATE events SET id = ? WHERE id = ?", (n, n + 1))
    db.execute("UPDATE events SET id = ? WHERE id = -1", (n + 1,))


@pytest.mark.parametrize(
    ("tamper", "what"),
    [(_edit_event, "edited"), (_delete_event, "deleted"), (_reorder_events, "reordered")],
    ids=["edited", "deleted", "reordered"],
)
@pytest.mark.parametrize("row", [1, 6, "last-but-one"])
def test_verify_fails_at_the_event_row_that_was_tampered_with(data_dir, tamper, what, row):
    """Editing, deleting or moving one event makes verify exit 1 naming that event and what happened."""
    data = data_dir
    gateway_data(data)
    db = attacker(data)
    if row == "last-but-one":
        row = db.execute("SELECT MAX(id) FROM events").fetchone()[0] - 1
    tamper(db, row)
    result = run("audit", "verify", "--data", data)
    assert result.exit_code == 1, explain(result)
    assert f"BROKEN at event {row}: {what}:" in result.output, explain(result)


def test_a_deleted_delivery_event_is_named(data_dir):
    """The attack found: a message's delivery events deleted; verify names the first of them."""
    data = data_dir
    gateway_data(data)
    db = attacker(data)
    ids = [r[0] for r in db.execute("SELECT id FROM events WHERE message_id = 1 AND kind = 'delivered' ORDER BY id")]
    assert ids
    db.execute("DELETE FROM events WHERE message_id = 1 AND kind = 'delivered'")
    result = run("audit", "verify", "--data", data)
    assert result.exit_code == 1, explain(result)
    assert f"BROKEN at event {ids[0]}: deleted:" in result.output, explain(result)


def _edit_raw(db, n):
    raw = sample(MESSAGES[n - 1]).replace(b"|M|", b"|F|")
    db.execute("UPDATE messages SET raw = ? WHERE id = ?", (raw, n))


def _edit_sealed_raw(db, n):
    sealed = bytearray(db.execute("SELECT raw FROM messages WHERE id = ?", (n,)).fetchone()[0])
    sealed[-20] ^= 1
    db.execute("UPDATE messages SET raw = ? WHERE id = ?", (bytes(sealed), n))


def _edit_peer(db, n):
    db.execute("UPDATE messages SET peer = 'tcp:10.6.6.6:4444' WHERE id = ?", (n,))


def _edit_control_id(db, n):
    db.execute("UPDATE messages SET control_id = 'FORGED' WHERE id = ?", (n,))


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (_edit_raw, "its raw message was changed"),
        (_edit_sealed_raw, "its raw message does not open"),
        (_edit_peer, "its peer was changed (it was received from tcp:127.0.0.1:50000"),
        (_edit_control_id, "do not match its digest"),
    ],
    ids=["raw-replaced", "sealed-raw-edited", "peer", "control-id"],
)
def test_verify_fails_at_the_message_that_was_altered(data_dir, tamper, why):
    """A message's raw text or header changed after it was stored: verify exits 1 naming the message."""
    data = data_dir
    gateway_data(data)
    tamper(attacker(data), 2)
    result = run("audit", "verify", "--data", data)
    assert result.exit_code == 1, explain(result)
    assert "BROKEN at message 2: altered:" in result.output, explain(result)
    assert why in result.output, explain(result)


def test_a_plaintext_database_is_checked_the_same_way(data_dir, tmp_path):
    """Without encryption at rest the chain uses the disabled ring's key: an edit is still found."""
    data = data_dir
    gateway_data(data, encrypted=False)
    config = tmp_path / "herald.toml"
    config.write_text("[security]\nencrypt_at_rest = false\n")
    assert run("audit", "verify", "--data", data, "--config", config).exit_code == 0
    _edit_raw(attacker(data), 1)
    result = run("audit", "verify", "--data", data, "--config", config)
    assert result.exit_code == 1 and "BROKEN at message 1: altered: its raw message was changed" in result.output, (
        explain(result)
    )


def test_the_end_of_the_trail_deleted_with_a_message_is_named(data_dir):
    """A message's every event deleted from the end of the trail (no gap left): its message is named."""
    data = data_dir
    gateway_data(data)
    db = attacker(data)
    first = db.execute("SELECT MIN(id) FROM events WHERE message_id = 3").fetchone()[0]
    db.execute("DELETE FROM events WHERE id >= ?", (first,))
    result = run("audit", "verify", "--data", data)
    assert result.exit_code == 1, explain(result)
    assert "BROKEN at message 3: missing" in result.output, explain(result)


def test_rows_from_before_the_chain_are_chained_by_the_migration_and_anchored(tmp_path):
    """A database of schema 5 (no MACs) is chained as it stands: a chain-started anchor, then it verifies."""
    data = tmp_path / "data"
    keys = gateway_data(data)
    db = attacker(data)
    count = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    for sql in (
        "ALTER TABLE events DROP COLUMN mac",
        "ALTER TABLE messages DROP COLUMN digest",
        "ALTER TABLE messages DROP COLUMN purged_at",
        # and what came after 6 (the recipient directory, version 7)
        "DROP TABLE recipients",
        "DROP INDEX notifications_order",
        "ALTER TABLE notifications DROP COLUMN recipient_id",
        "ALTER TABLE notifications DROP COLUMN channel_index",
        "ALTER TABLE notifications DROP COLUMN patient_key",
        "ALTER TABLE notifications DROP COLUMN attribution",
        "ALTER TABLE delivery_attempts DROP COLUMN status",
        "ALTER TABLE delivery_attempts DROP COLUMN elapsed_ms",
        # and care transitions (version 8)
        "DROP TABLE episode_events",
        "DROP TABLE episodes",
        "DROP TABLE tasks",
        # and the web console (version 9)
        "DROP TABLE console_users",
        "DROP TABLE console_sessions",
        "DROP TABLE console_meta",
        "DROP TABLE message_terms",
        "DROP INDEX messages_control",
        "DROP INDEX messages_received",
        "DROP INDEX messages_sender_time",
        "DROP INDEX messages_state_time",
        "DROP INDEX matches_member",
        # and claims (version 10) and the roster's published versions (version 11)
        "ALTER TABLE messages DROP COLUMN claimed_by",
        "ALTER TABLE messages DROP COLUMN claim_expires",
        "ALTER TABLE notifications DROP COLUMN claimed_by",
        "ALTER TABLE notifications DROP COLUMN claim_expires",
        "DROP TABLE roster_chunks",
        "DROP TABLE roster_versions",
        "DELETE FROM migrations WHERE version >= 6",
    ):
        db.execute(sql)
    db.close()
    Store(store_of(data), reactor=object(), clock=lambda: NOW, keys=keys)._conn.close()
    anchor = attacker(data).execute("SELECT id, actor, kind, detail FROM events ORDER BY id DESC LIMIT 1").fetchone()
    assert anchor[1:3] == ("store", "chain-started")
    assert json.loads(anchor[3])["chained"] == count
    report = verify(chain(data, keys))
    assert report.intact, report.findings
    assert report.legacy_events == count


def test_turning_encryption_on_rekeys_the_chain_instead_of_breaking_it(data_dir):
    """A trail written without a key, then opened with one: a chain-rekeyed anchor, and it still verifies."""
    data = data_dir
    gateway_data(data, encrypted=False)
    keys = KeyRing.load(new_key_file(data / "keys" / "herald.key"), environ={})
    Store(store_of(data), reactor=object(), clock=lambda: NOW, keys=keys)._conn.close()
    kinds = [r[0] for r in attacker(data).execute("SELECT kind FROM events WHERE actor = 'store'")]
    assert kinds == ["chain-rekeyed"]
    report = verify(chain(data, keys))
    assert report.intact, report.findings
    assert report.rekeyed_at is not None
    # The part before the anchor stays tamper-evident.
    _edit_event(attacker(data), 2)
    assert [str(f) for f in verify(chain(data, keys)).findings][0].startswith("event 2: edited")


def test_a_trail_rewritten_under_the_public_key_is_not_adopted(data_dir):
    """Every MAC of an encrypted database recomputed with the disabled ring's (public) key: a restart does
    not take it for a trail written before encryption, and verify says no row checks."""
    from gateway.store.events import event_bytes

    data = data_dir
    keys = gateway_data(data)
    db = attacker(data)
    previous = b""
    rows = db.execute("SELECT id, at, message_id, notification_id, actor, kind, detail FROM events ORDER BY id")
    for row in rows.fetchall():
        previous = KeyRing.disabled().chain_mac(previous, event_bytes(*row))
        db.execute("UPDATE events SET mac = ? WHERE id = ?", (previous, row[0]))
    Store(store_of(data), reactor=object(), clock=lambda: NOW, keys=keys)._conn.close()  # a restart
    assert attacker(data).execute("SELECT COUNT(*) FROM events WHERE actor = 'store'").fetchone()[0] == 0
    [finding, *_] = verify(chain(data, keys)).findings
    assert (finding.where, finding.what) == ("event 1", "unverifiable")
    assert "the whole trail was rewritten" in finding.why


# -- reading an altered message --------------------------------------------------------------


def test_log_show_of_an_altered_message_warns(data_dir):
    """`herald log show` of a message whose peer was changed says so first, last and on stderr."""
    data = data_dir
    gateway_data(data)
    _edit_peer(attacker(data), 1)
    result = run("log", "show", "1", "--data", data)
    assert result.exit_code == 0, explain(result)
    warning = "WARNING: message 1: this message's record was altered after it was stored: its peer was changed"
    lines = result.output.splitlines()
    assert lines[0].startswith(warning), explain(result)
    assert result.output.count(warning) == 4, explain(result)  # first and last, each on stdout and stderr
    assert "MSH|^~\\&|EPIC|LSR|" in result.output  # the record is still shown, under the warning


def test_log_show_of_an_intact_message_has_no_warning(data_dir):
    """No warning when nothing was changed."""
    data = data_dir
    gateway_data(data)
    result = run("log", "show", "1", "--data", data)
    assert result.exit_code == 0, explain(result)
    assert "WARNING" not in result.output


def test_the_pipeline_refuses_an_altered_message(data_dir, reactor):
    """A pending message whose row was altered is not processed: it is failed, with the reason, and audited."""
    store = Store(store_of(data_dir), reactor=reactor, clock=lambda: STORED_AT)
    store.start()
    try:
        for name in MESSAGES[:2]:
            success(drain(reactor, store.record_frame(accepted_record(sample(name)))))
        _edit_raw(attacker(data_dir), 1)
        pending = success(drain(reactor, store.pending_messages(0, 10)))
        assert [p.id for p in pending] == [2]
        row = attacker(data_dir).execute("SELECT state, reason FROM messages WHERE id = 1").fetchone()
        assert row[0] == FAILED
        assert row[1].startswith("this message's record was altered after it was stored: its raw message was changed")
        event = (
            attacker(data_dir)
            .execute("SELECT actor, kind, detail FROM events WHERE message_id = 1 ORDER BY id DESC LIMIT 1")
            .fetchone()
        )
        assert event[:2] == ("pipeline", "failed") and json.loads(event[2])["stage"] == "integrity"
        # The refusal itself is chained: the trail verifies up to the altered message.
        findings = verify(open_database(store_of(data_dir), readonly=True)).findings
        assert [str(f).split(":")[0] for f in findings] == ["message 1"]
    finally:
        success(drain(reactor, store.stop()))


# -- export ----------------------------------------------------------------------------------------


def test_export_is_valid_fhir_auditevent_ndjson_without_patient_data(data_dir, tmp_path):
    """Every line is an R4 AuditEvent that fhir.resources validates; no name, MRN or birth date leaves."""
    data = data_dir
    gateway_data(data)
    out = tmp_path / "audit.ndjson"
    result = run("audit", "export", "--data", data, "--out", out)
    assert result.exit_code == 0, explain(result)
    lines = out.read_text().splitlines()
    events = attacker(data).execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert len(lines) == events
    resources = [json.loads(line) for line in lines]
    for r in resources:
        AuditEvent.model_validate(r)
    received = [r for r in resources if r["subtype"][0]["code"] == "received"]
    assert received[0]["type"]["code"] == "110107" and received[0]["action"] == "C"
    assert {"system": "urn:herald:message", "value": "1"} in [
        e["what"].get("identifier") for e in received[0]["entity"]
    ]
    text = out.read_text()
    for raw in (sample(n) for n in MESSAGES):
        pid = next(s for s in re.split(rb"[\r\n]+", raw) if s.startswith(b"PID"))
        fields = pid.split(b"|")
        for value in (fields[3].split(b"^")[0], fields[5].split(b"^")[0], fields[7][:8]):
            assert value and value.decode() not in text, value


def test_export_since_keeps_the_later_events(data_dir):
    """--since takes an ISO time: only events stamped from then are exported."""
    data = data_dir
    gateway_data(data)
    result = run("audit", "export", "--data", data, "--since", "2026-11-20T09:00:00")
    assert result.exit_code == 0, explain(result)
    assert result.output == ""
    result = run("audit", "export", "--data", data, "--since", "2026-11-20")
    assert len(result.output.splitlines()) > 0


# -- reading PHI is audited ------------------------------------------------------------------------


def phi_reads(data: Path) -> list[tuple]:
    return (
        attacker(data)
        .execute("SELECT actor, kind, message_id, detail FROM events WHERE kind = 'phi-read' ORDER BY id")
        .fetchall()
    )


def test_log_show_appends_a_phi_read_event(data_dir):
    """`herald log show 2` leaves a phi-read event by cli:<user> about message 2, and the trail verifies."""
    import getpass

    data = data_dir
    gateway_data(data)
    assert phi_reads(data) == []
    result = run("log", "show", "2", "--data", data)
    assert result.exit_code == 0, explain(result)
    [(actor, kind, message_id, detail)] = phi_reads(data)
    assert (actor, kind, message_id) == (f"cli:{getpass.getuser()}", "phi-read", 2)
    assert json.loads(detail) == {"command": "log show"}
    assert run("audit", "verify", "--data", data).exit_code == 0


def test_match_appends_a_phi_read_event(data_dir):
    """`herald match` shows roster members: the read is audited (no file names, a count)."""
    data = data_dir
    gateway_data(data)
    result = run("match", SAMPLES / MESSAGES[0], "--data", data)
    assert result.exit_code in (0, 2), explain(result)
    [(_, _, message_id, detail)] = phi_reads(data)
    assert message_id is None and json.loads(detail) == {"command": "match", "files": 1}


def test_a_read_that_cannot_be_audited_shows_nothing(data_dir, monkeypatch):
    """When the phi-read event cannot be written, log show fails and prints no patient data."""
    from gateway.errors import StoreError
    from gateway.store import Store as RealStore

    data = data_dir
    gateway_data(data)

    def refuse(self, *args, **kwargs):
        raise StoreError("disk full")  # failure injection: the audit write fails

    monkeypatch.setattr(RealStore, "record_reads", refuse)
    result = run("log", "show", "1", "--data", data)
    assert result.exit_code == 1, explain(result)
    assert "could not be recorded in the audit trail" in result.output
    assert "MSH|" not in result.output
