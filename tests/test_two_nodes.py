"""Two Herald nodes sharing one PostgreSQL store, one of them killed mid-run (issue 17).

Two real ``herald serve`` processes on 127.0.0.1, each with its own data
folder, share one database on a real PostgreSQL server. Two senders, one per
node, send ADT messages one at a time and write down every control id they got
an accepting ACK for; when a node's connection is lost the sender goes on at
the other node, sending again what was not acknowledged, as an interface engine
behind a load balancer does. Node A is killed with SIGKILL while both work.
Node B takes over what A had claimed once A's leases run out.

At the end every acknowledged message is stored once (a message A had stored
and B was sent again is recognised as a retransmission), routed, and has one
notification, recorded as delivered once; both nodes did work; and no file was
dropped twice.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

from test_crash import send_until_lost, start

from gateway.store.schema import open_database

MESSAGES = 600
#: Short leases, so node B takes node A's claims within the test (the default is 300 s).
LEASE = 4
SECONDS = 150

CONFIG = """
[storage]
claim_lease_seconds = {lease}

[delivery]
timeout = 1
poll_interval = 0.2

[recipients.hie]
directory = "{shared}"
"""


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sender(ports: list[int], todo: list[int], acked: list[str], sent: list[int], ended: float) -> None:
    """Send ``todo`` to the first node; when its connection is lost, go on at the next one."""
    at = 0
    while todo and time.monotonic() < ended:
        send_until_lost(ports[at % len(ports)], todo, acked, sent)
        if todo:
            at += 1
            time.sleep(0.05)


def test_two_nodes_one_killed_notify_every_acked_message_once(pg_database, tmp_path, record_property):
    shared = tmp_path / "shared-outbox"
    config = tmp_path / "herald.toml"
    config.write_text(CONFIG.format(lease=LEASE, shared=shared), encoding="utf-8")
    url = pg_database.url
    a, port_a = start(tmp_path / "node-a", url, config)
    b, port_b = start(tmp_path / "node-b", url, config)
    ended = time.monotonic() + SECONDS
    todo_a, todo_b = list(range(0, MESSAGES, 2)), list(range(1, MESSAGES, 2))
    acked: list[str] = []  # both senders append (list.append is atomic)
    sent: list[int] = []
    try:
        senders = [
            threading.Thread(target=sender, args=([port_a, port_b], todo_a, acked, sent, ended)),
            threading.Thread(target=sender, args=([port_b], todo_b, acked, sent, ended)),
        ]
        for t in senders:
            t.start()
        # Kill A while it holds work: messages or notifications it claimed and has not finished (a node is
        # named host:the id in its data folder).
        node_a = f"{socket.gethostname()}:{(tmp_path / 'node-a' / 'node-id').read_text().strip()}"
        held_at_kill = 0
        watch = open_database(pg_database, readonly=True)
        try:
            kill_by = time.monotonic() + 60
            while time.monotonic() < kill_by:
                (held,) = watch.execute(
                    "SELECT (SELECT COUNT(*) FROM messages WHERE claimed_by = ? AND state = 'received') + "
                    "(SELECT COUNT(*) FROM notifications WHERE claimed_by = ? AND state != 'sent')",
                    (node_a, node_a),
                ).fetchone()
                if held and len(acked) >= 20:
                    a.send_signal(signal.SIGKILL)
                    held_at_kill = held
                    break
                time.sleep(0.005)
        finally:
            watch.close()
        if not held_at_kill:
            a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        assert held_at_kill, "node A was never seen holding work; its log ends:\n" + "".join(a.log_lines)
        for t in senders:
            t.join(timeout=max(1.0, ended - time.monotonic()))
        assert not todo_a and not todo_b, f"{len(todo_a) + len(todo_b)} messages never acknowledged"
        conn = open_database(pg_database, readonly=True)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                waiting = conn.execute(
                    "SELECT (SELECT COUNT(*) FROM messages WHERE state = 'received') + "
                    "(SELECT COUNT(*) FROM notifications WHERE state != 'sent')"
                ).fetchone()[0]
                if not waiting:
                    break
                time.sleep(0.2)
            assert waiting == 0, f"{waiting} messages or notifications still waiting after A's leases ran out"
            stored = conn.execute(
                "SELECT control_id, COUNT(*), MIN(state) FROM messages WHERE state != 'rejected' GROUP BY control_id"
            ).fetchall()
            per_message = conn.execute(
                "SELECT m.control_id, COUNT(n.id), SUM(CASE WHEN n.state = 'sent' THEN 1 ELSE 0 END) "
                "FROM messages m JOIN notifications n ON n.message_id = m.id GROUP BY m.id, m.control_id"
            ).fetchall()
            delivered = conn.execute(
                "SELECT notification_id, COUNT(*) FROM delivery_attempts WHERE outcome = 'ok' GROUP BY notification_id"
            ).fetchall()
            retransmissions = conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'retransmission'").fetchone()[0]
            # Which node's pipeline converted each message (its claim stays on the row).
            nodes = conn.execute("SELECT claimed_by, COUNT(*) FROM messages GROUP BY claimed_by").fetchall()
        finally:
            conn.close()
    finally:
        stop(a)
        stop(b)

    assert len(acked) == len(set(acked)) == MESSAGES
    by_id = {cid: (n, state) for cid, n, state in stored}
    missing = [cid for cid in acked if cid not in by_id]
    assert missing == [], f"ACKed but not stored: {missing[:5]}"
    assert [cid for cid, (n, _) in by_id.items() if n != 1] == [], "a message stored twice"
    assert {state for _, state in by_id.values()} == {"routed"}
    assert len(per_message) == MESSAGES
    assert all(count == 1 and ok == 1 for _, count, ok in per_message), "a notification missing or repeated"
    assert len(delivered) == MESSAGES and all(n == 1 for _, n in delivered), "a notification recorded sent twice"
    files = [p for p in shared.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert len(files) == MESSAGES
    assert None not in dict(nodes), f"every message converted by a node: {nodes}"
    counts = {
        "messages": MESSAGES,
        "held_by_a_at_kill": held_at_kill,
        "frames_sent": len(sent),
        "resent": len(sent) - len(set(sent)),
        "acked": len(acked),
        "stored": len(by_id),
        "retransmissions_recognised": retransmissions,
        "notified": len(delivered),
        "converted_per_node": sorted(n for _, n in nodes),
        "duplicates": sum(n - 1 for n, _ in by_id.values()) + sum(n - 1 for _, n in delivered),
    }
    record_property("two_node_counts", counts)
    print(f"\ntwo-node test counts: {counts}")
