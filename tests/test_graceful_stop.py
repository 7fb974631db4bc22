"""SIGTERM under load (issue 16): in-flight messages are committed and answered, the process exits 0
within a bounded time, and a restart finishes the pipeline's and delivery's work."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time

from test_crash import send_until_lost, start

MESSAGES = 2000
#: SIGTERM must end the process within this many seconds, load or not.
STOP_BOUND = 20.0


def test_sigterm_under_load_acks_only_what_it_stored_exits_0_and_a_restart_finishes_the_work(tmp_path):
    data = tmp_path / "data"
    proc, port = start(data)
    todo = list(range(MESSAGES))
    acked: list[str] = []
    sender = threading.Thread(target=send_until_lost, args=(port, todo, acked))
    sender.start()
    time.sleep(1.0)
    assert acked, "the load had not begun"
    stopping = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=STOP_BOUND + 10)
    took = time.monotonic() - stopping
    sender.join(timeout=30)
    assert code == 0
    assert took < STOP_BOUND, f"SIGTERM took {took:.1f} s"
    assert todo, "the load ended before the stop: nothing was tested"

    conn = sqlite3.connect(data / "herald.db")
    stored = {cid for (cid,) in conn.execute("SELECT control_id FROM messages WHERE state != 'rejected'")}
    conn.close()
    assert [cid for cid in acked if cid not in stored] == [], "an ACKed message was not stored"

    # A restart picks up whatever the pipeline and delivery had not finished.
    proc, port = start(data)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conn = sqlite3.connect(data / "herald.db")
            waiting = conn.execute(
                "SELECT (SELECT COUNT(*) FROM messages WHERE state = 'received') + "
                "(SELECT COUNT(*) FROM notifications WHERE state != 'sent')"
            ).fetchone()[0]
            conn.close()
            if not waiting:
                break
            time.sleep(0.2)
        assert waiting == 0, f"{waiting} messages or notifications left after the restart"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_BOUND + 10) == 0
    conn = sqlite3.connect(data / "herald.db")
    per_message = conn.execute("SELECT COUNT(*) FROM notifications GROUP BY message_id HAVING COUNT(*) != 1").fetchall()
    conn.close()
    assert per_message == [], "a message with other than one notification"
