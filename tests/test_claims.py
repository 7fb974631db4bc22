"""Claims: several nodes on one PostgreSQL store never take the same work (gateway.store.claims).

Each "node" here is a Store of its own (its own writer and reader
connections, its own data folder, so its own name) on one real database.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import UTC, datetime

import pytest

from gateway.records import RECEIVED, SENT, DeliveryAttempt, IntakeRecord, MessageOutcome, Notification
from gateway.store import Store, _claimed_pending, claims, integrity, messages
from gateway.store.postgres import PostgresDatabase

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
STAMP = NOW.isoformat(timespec="milliseconds")


def node(location: PostgresDatabase, name: str, tmp_path) -> Store:
    """A started Store on ``location``'s database, as a node whose data folder is ``tmp_path / name``."""
    store = Store(PostgresDatabase(location.url, tmp_path / name), reactor=object(), clock=lambda: NOW)
    store.serve_as_node()
    store.start()
    return store


@pytest.fixture
def nodes(pg_database, tmp_path):
    made = [node(pg_database, "a", tmp_path), node(pg_database, "b", tmp_path)]
    yield made
    for s in made:
        s.close()


def record(i: int) -> IntakeRecord:
    return IntakeRecord(
        raw=f"MSH|^~\\&|EHR|FAC|||20261203||ADT^A01|C{i}|P|2.5.1\r".encode(),
        peer="test",
        state=RECEIVED,
        ack_code="AA",
        sending_application="EHR",
        sending_facility="FAC",
        message_type="ADT",
        trigger_event="A01",
        control_id=f"C{i}",
    )


def store_messages(s: Store, count: int) -> list[int]:
    return [s.call(messages.record_frame, record(i), STAMP).message_id for i in range(count)]


def routed(message_id: int, patient: str = "P1") -> MessageOutcome:
    note = Notification(
        id=f"n-{message_id}",
        message_id=message_id,
        recipient_role="hie",
        recipient="HIE",
        channel="file",
        target="/tmp/hie",
        event_code="notification-admit",
        payload="{}",
        patient_key=patient,
    )
    return MessageOutcome(message_id, "routed", None, "{}", None, [note], [("converted", {})])


def sent(n: Notification) -> DeliveryAttempt:
    return DeliveryAttempt(n.id, n.message_id, 1, "ok", "written", SENT, 0.0)


def test_two_nodes_claiming_at_once_share_the_messages_without_overlap(nodes):
    a, b = nodes
    ids = store_messages(a, 60)
    taken: dict[str, list[int]] = {"a": [], "b": []}

    def take(name: str, s: Store) -> None:
        while True:  # as the pipeline asks: after the last id it has in hand
            _, pending = s.read(_claimed_pending, s.node, 7, 60.0, max(taken[name], default=0))
            if not pending:
                return
            taken[name].extend(p.id for p in pending)

    threads = [threading.Thread(target=take, args=(n, s)) for n, s in zip("ab", nodes, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(taken["a"] + taken["b"]) == ids, "every message claimed exactly once"
    assert not set(taken["a"]) & set(taken["b"])


def test_a_claim_holds_until_its_lease_runs_out_then_another_node_takes_it(nodes):
    a, b = nodes
    store_messages(a, 3)
    _, mine = a.read(_claimed_pending, a.node, 10, 1.0)
    assert len(mine) == 3
    _, theirs = b.read(_claimed_pending, b.node, 10, 60.0)
    assert theirs == [], "A holds them"
    time.sleep(1.2)
    _, theirs = b.read(_claimed_pending, b.node, 10, 60.0)
    assert [p.id for p in theirs] == [p.id for p in mine], "A's lease ran out: B takes them, oldest first"


def test_a_node_restarted_takes_back_at_once_what_it_held(pg_database, tmp_path):
    a = node(pg_database, "a", tmp_path)
    ids = store_messages(a, 2)
    a.close()
    # As if A had died holding them: claimed under its name, the lease far from over (set by a command's store,
    # which gives up nothing when it closes).
    command = Store(PostgresDatabase(pg_database.url, tmp_path / "a"), reactor=object(), clock=lambda: NOW)
    command.start()
    command.call(lambda conn: conn.execute("UPDATE messages SET claimed_by = ?, claim_expires = 1e12", (command.node,)))
    command.close()
    b = node(pg_database, "b", tmp_path)
    try:
        assert b.read(_claimed_pending, b.node, 10, 600.0)[1] == [], "A holds them"
        restarted = node(pg_database, "a", tmp_path)  # the same data folder: the same node
        try:
            _, back = restarted.read(_claimed_pending, restarted.node, 10, 600.0)
            assert [p.id for p in back] == ids
        finally:
            restarted.close()
    finally:
        b.close()


def test_a_command_opening_the_store_on_a_serving_node_leaves_the_node_s_claims_alone(nodes, pg_database, tmp_path):
    """``herald review`` and the like open a Store with the node's folder: they are not its server."""
    a, b = nodes
    store_messages(a, 3)
    _, held = a.read(_claimed_pending, a.node, 10, 600.0)
    command = Store(PostgresDatabase(pg_database.url, tmp_path / "a"), reactor=object(), clock=lambda: NOW)
    command.start()
    assert command.node == a.node
    command.close()
    _, theirs = b.read(_claimed_pending, b.node, 10, 600.0)
    assert len(held) == 3 and theirs == [], "A still holds them"


def test_a_second_server_as_the_same_node_is_refused(nodes, pg_database, tmp_path):
    from gateway.errors import StoreError

    twin = Store(PostgresDatabase(pg_database.url, tmp_path / "a"), reactor=object(), clock=lambda: NOW)
    try:
        with pytest.raises(StoreError, match="another Herald server runs as node"):
            twin.serve_as_node()
    finally:
        twin.close()


def test_notifications_for_one_patient_keep_their_order_across_nodes(nodes):
    a, b = nodes
    first, second = store_messages(a, 2)
    a.call(messages.apply_outcomes, [routed(first), routed(second)], STAMP, 0.0)
    now = time.time()
    got_a = a.read(claims.claim_notifications, a.node, now, 10, (), 60.0)
    assert [n.id for n in got_a] == [f"n-{first}"], "the second waits for the first"
    assert b.read(claims.claim_notifications, b.node, now, 10, (), 60.0) == [], "B may not send the second yet"
    a.call(claims.record_attempts, a.node, [sent(got_a[0])], STAMP)
    got_b = b.read(claims.claim_notifications, b.node, now, 10, (), 60.0)
    assert [n.id for n in got_b] == [f"n-{second}"], "sent: the next one is free, to any node"
    assert got_b[0].payload == "{}", "read whole, sealed values opened"


def test_other_patients_go_in_parallel_and_no_notification_is_claimed_twice(nodes):
    a, b = nodes
    ids = store_messages(a, 20)
    a.call(messages.apply_outcomes, [routed(m, patient=f"P{m}") for m in ids], STAMP, 0.0)
    now = time.time()
    got_a = a.read(claims.claim_notifications, a.node, now, 12, (), 60.0)
    got_b = b.read(claims.claim_notifications, b.node, now, 12, (), 60.0)
    assert len(got_a) == 12 and len(got_b) == 8
    assert not {n.id for n in got_a} & {n.id for n in got_b}


def test_a_recorded_attempt_gives_up_the_claim(nodes):
    a, b = nodes
    (m,) = store_messages(a, 1)
    a.call(messages.apply_outcomes, [routed(m)], STAMP, 0.0)
    (n,) = a.read(claims.claim_notifications, a.node, time.time(), 10, (), 60.0)
    retry = DeliveryAttempt(n.id, m, 1, "error", "refused", "retrying", 0.0)
    a.call(claims.record_attempts, a.node, [retry], STAMP)
    again = b.read(claims.claim_notifications, b.node, time.time(), 10, (), 60.0)
    assert [x.id for x in again] == [n.id], "a retry is free for any node at once"


def test_one_node_leads_until_its_connection_ends(pg_database, tmp_path):
    a, b = node(pg_database, "a", tmp_path), node(pg_database, "b", tmp_path)
    try:
        assert a.call(claims.take_lead, "transitions") is True
        assert b.call(claims.take_lead, "transitions") is False
        assert b.call(claims.take_lead, "other-role") is True
        a.close()
        assert b.call(claims.take_lead, "transitions") is True
    finally:
        if a._started:
            a.close()
        b.close()


def test_intake_on_two_nodes_at_once_keeps_one_unbroken_audit_chain(nodes):
    """The writer lock: both nodes append to one chain, interleaved, and every row follows the one before."""
    a, b = nodes
    done: list[int] = []

    def send(s: Store, start: int) -> None:
        for i in range(start, start + 40):
            done.append(s.call(messages.record_frame, record(i), STAMP).message_id)

    threads = [threading.Thread(target=send, args=(s, k * 1000)) for k, s in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(done) == list(range(1, 81)), "ids in commit order, none taken twice"
    report = a.read(integrity.verify)
    assert report.intact, report.findings
    assert report.messages == 80


def test_a_node_whose_connections_the_server_ended_fails_one_commit_then_reconnects(pg_database, tmp_path):
    """A PostgreSQL restart or failover ends every connection: the write in hand fails (intake answers AE/CE
    and the sender sends again), the next opens a new connection; reads recover the same way."""
    import psycopg

    from gateway.errors import StoreError

    a = node(pg_database, "a", tmp_path)
    try:
        store_messages(a, 1)
        assert len(a.read(messages.list_messages)) == 1
        name = pg_database.url.rsplit("/", 1)[1]
        with psycopg.connect(pg_database.url, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid != pg_backend_pid()",
                (name,),
            ).fetchone()[0]
        assert ended >= 2, "the writer's and the reader's connections"
        with pytest.raises(StoreError):
            a.call(messages.record_frame, record(1), STAMP)
        assert a.call(messages.record_frame, record(2), STAMP).message_id == 2
        assert a.reconnects == 1
        with pytest.raises(StoreError):
            a.read(messages.list_messages)
        assert len(a.read(messages.list_messages)) == 2
    finally:
        a.close()


def test_what_a_node_claimed_and_left_waiting_it_takes_again_and_no_other_node_does(nodes):
    """A destination resting or busy: the node keeps the notification, and takes it again on a later poll."""
    a, b = nodes
    (m,) = store_messages(a, 1)
    a.call(messages.apply_outcomes, [routed(m)], STAMP, 0.0)
    (n,) = a.read(claims.claim_notifications, a.node, time.time(), 10, (), 60.0)
    assert a.read(claims.claim_notifications, a.node, time.time(), 10, (n.id,), 60.0) == [], "in hand: excluded"
    assert b.read(claims.claim_notifications, b.node, time.time(), 10, (), 60.0) == []
    assert [x.id for x in a.read(claims.claim_notifications, a.node, time.time(), 10, (), 60.0)] == [n.id]


def test_a_notification_waits_while_an_earlier_message_from_its_sender_is_unconverted_on_another_node(nodes):
    """Node B converted message 2 first; message 1 (same sender), which A holds, may still bring an earlier
    notification about the same patient: 2's waits until 1 is converted."""
    a, b = nodes
    first, second = store_messages(a, 2)
    _, held = a.read(_claimed_pending, a.node, 1, 60.0)
    assert [p.id for p in held] == [first]
    b.call(messages.apply_outcomes, [routed(second)], STAMP, 0.0)
    assert b.read(claims.claim_notifications, b.node, time.time(), 10, (), 60.0) == []
    a.call(messages.apply_outcomes, [routed(first)], STAMP, 0.0)
    got = b.read(claims.claim_notifications, b.node, time.time(), 10, (), 60.0)
    assert [n.id for n in got] == [f"n-{first}"], "then in order"


def test_a_batch_the_pipeline_dropped_is_taken_back_by_its_node_at_once(nodes):
    a, b = nodes
    ids = store_messages(a, 3)
    _, first = a.read(_claimed_pending, a.node, 3, 600.0, 0)
    assert [p.id for p in first] == ids
    _, in_hand = a.read(_claimed_pending, a.node, 3, 600.0, ids[-1])
    assert in_hand == [], "what the pipeline has in hand (up to after_id) is not taken twice"
    _, again = a.read(_claimed_pending, a.node, 3, 600.0, 0)
    assert [p.id for p in again] == ids, "dropped (the drain starts again from its last written id): taken back"
    assert b.read(_claimed_pending, b.node, 3, 600.0)[1] == []


def test_a_digest_takes_only_what_the_order_allows_and_no_other_node_holds(nodes):
    a, b = nodes
    ids = store_messages(a, 3)
    outcomes = [routed(m, patient="P1") for m in ids[:2]] + [routed(ids[2], patient="P2")]
    for o in outcomes:
        for n in o.notifications:
            object.__setattr__(n, "recipient_id", "hie-1")
    a.call(messages.apply_outcomes, outcomes, STAMP, 0.0)
    (held,) = b.read(claims.claim_notifications, b.node, time.time(), 1, (), 60.0)
    assert held.id == f"n-{ids[0]}"
    group = a.read(claims.claim_recipient_notifications, a.node, "hie-1", 0, time.time(), (), 60.0)
    assert [n.id for n in group] == [f"n-{ids[2]}"], "n-1 is B's; n-2 waits behind it; P2's is free"


def test_a_constraint_error_names_the_constraint_never_the_row(pg_database, tmp_path):
    """PostgreSQL's DETAIL quotes the failing row (patient data): it stays out of the error the store raises."""
    import sqlite3

    a = node(pg_database, "a", tmp_path)
    try:
        (m,) = store_messages(a, 1)
        a.call(messages.apply_outcomes, [routed(m)], STAMP, 0.0)

        def duplicate(conn):
            conn.execute(
                "INSERT INTO notifications (id, message_id, recipient_role, recipient, channel, target, event_code, "
                "state, next_attempt_at, created_at, updated_at) VALUES (?, ?, 'hie', 'SMITH JOHN', 'file', 't', "
                "'e', 'pending', 0, 'x', 'x')",
                (f"n-{m}", m),
            )

        with pytest.raises(sqlite3.IntegrityError) as e:
            a.call(duplicate)
        assert "constraint notifications_v4_pkey" in str(e.value), "what broke is named"
        assert "n-1" not in str(e.value), "not the key's value (its DETAIL)"
    finally:
        a.close()


def test_a_nul_in_a_header_field_is_stored_not_refused(nodes):
    """PostgreSQL's text cannot hold NUL; SQLite's can. The frame is stored (its body sealed whole as bytes)."""
    a, _ = nodes
    r = record(1)
    r = dataclasses.replace(r, sending_application="EH\x00R")
    result = a.call(messages.record_frame, r, STAMP)
    row = a.read(lambda conn: conn.execute("SELECT sending_application FROM messages WHERE id = ?", (1,)).fetchone())
    assert result.message_id == 1 and row[0] == "EH\ufffdR"
