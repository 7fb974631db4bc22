"""Kill -9 under load (issue 16's crash test, short enough for CI).

A client sends ADT messages one at a time over one connection and writes down
every control id it got an accepting ACK for. The server (``herald serve``, a
real process with its pipeline and file-drop delivery) is killed with SIGKILL
at random moments, three times, and started again on the same data folder;
the client sends again whatever was not acknowledged, exactly as an interface
engine does. At the end every acknowledged message is stored once, processed,
and has exactly one notification, delivered once; a message resent after a
kill is recognised as a retransmission, not stored twice.
"""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import HERALD, ROOT, SAMPLES

from gateway.app.replay import split_messages
from gateway.store.postgres import PostgresDatabase
from gateway.store.schema import open_database

ACCEPTED = {"AA", "CA"}
KILLS = 3
MESSAGES = 800
#: Bound on the whole test, whatever happens.
SECONDS = 120


#: In the environment of every server this test starts, so their processes (and their workers) can be found.
TAG = f"herald-crash-test-{os.getpid()}-{time.time_ns()}"


def start(data: Path, store: str = "", config: Path | None = None) -> tuple[subprocess.Popen, int]:
    """A ``herald serve`` on ``data``; its store in ``store`` (a PostgreSQL URL) when given."""
    proc = subprocess.Popen(
        [*HERALD, "serve", "--listen", "tcp:0:interface=127.0.0.1", "--allow-plain", "--data", str(data)]
        + (["--config", str(config)] if config is not None else []),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HERALD_TEST_TAG": TAG, **({"HERALD_STORE": store} if store else {})},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        found = re.search(r"\(ports \[(\d+)\]\)", line)
        if found:
            # Kept (the last 200 lines) for a failing test to show; read on, so the pipe never fills.
            proc.log_lines = collections.deque(maxlen=200)
            threading.Thread(target=proc.log_lines.extend, args=(proc.stderr,), daemon=True).start()
            return proc, int(found.group(1))
    proc.kill()
    proc.wait()
    pytest.fail("herald serve did not start")


def tagged_processes() -> list[int]:
    """Pids of live processes started by this test's servers (the servers, their pipeline workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"HERALD_TEST_TAG={TAG}".encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def message(i: int) -> bytes:
    raw = split_messages((SAMPLES / "meditech-v24-a04-outpatient-unmatched.hl7").read_bytes())[0]
    fields = raw.split(b"|", 10)
    fields[9] = b"CRASH%05d" % i
    return b"|".join(fields)


def send_until_lost(port: int, todo: list[int], acked: list[str], sent: list[int] | None = None) -> None:
    """Send ``todo`` in order on one connection, one at a time; stop at the first lost connection."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            while todo:
                i = todo[0]
                if sent is not None:
                    sent.append(i)
                s.sendall(b"\x0b" + message(i) + b"\x1c\x0d")
                answer = b""
                while not answer.endswith(b"\x1c\x0d"):
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    answer += chunk
                code = re.search(rb"MSA\|([A-Z]{2})\|", answer)
                if code and code.group(1).decode() in ACCEPTED:
                    acked.append(f"CRASH{i:05d}")
                    todo.pop(0)
                else:
                    return
    except OSError:
        return


def test_kill_9_under_load_loses_no_acked_message_and_notifies_each_once(tmp_path, database, record_property):
    """On SQLite (``herald.db`` in the data folder), then on PostgreSQL."""
    data = tmp_path / "data"
    store = database.url if isinstance(database, PostgresDatabase) else ""
    where = database if store else data / "herald.db"
    rng = random.Random(16)
    todo = list(range(MESSAGES))
    acked: list[str] = []
    sent: list[int] = []
    ended = time.monotonic() + SECONDS
    kills = 0
    proc = None
    try:
        while todo and time.monotonic() < ended:
            proc, port = start(data, store)
            if kills < KILLS:
                timer = threading.Timer(rng.uniform(0.3, 0.8), lambda p=proc: p.send_signal(signal.SIGKILL))
                timer.start()
            sender = threading.Thread(target=send_until_lost, args=(port, todo, acked, sent))
            sender.start()
            sender.join(timeout=max(1.0, ended - time.monotonic()))
            if kills < KILLS:
                timer.join()
                proc.wait(timeout=30)
                kills += 1
        assert not todo, f"{len(todo)} messages never acknowledged within {SECONDS} s"
        assert kills == KILLS
        # Let the pipeline and delivery finish the backlog, then stop gracefully.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conn = open_database(where, readonly=True)
            waiting = conn.execute(
                "SELECT (SELECT COUNT(*) FROM messages WHERE state = 'received') + "
                "(SELECT COUNT(*) FROM notifications WHERE state != 'sent')"
            ).fetchone()[0]
            conn.close()
            if not waiting:
                break
            time.sleep(0.2)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # No orphans: a server killed while starting its pipeline workers takes them with it.
    deadline = time.monotonic() + 10
    while tagged_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tagged_processes() == [], "processes of a killed server outlived it"

    assert len(acked) == len(set(acked)) == MESSAGES
    conn = open_database(where, readonly=True)
    stored = conn.execute(
        "SELECT control_id, COUNT(*), MIN(state) FROM messages WHERE state != 'rejected' GROUP BY control_id"
    ).fetchall()
    by_id = {cid: (n, state) for cid, n, state in stored}
    missing = [cid for cid in acked if cid not in by_id]
    assert missing == [], f"ACKed but not stored: {missing[:5]}"
    assert [cid for cid, (n, _) in by_id.items() if n != 1] == [], "a message stored twice"
    assert {state for _, state in by_id.values()} == {"routed"}, "every message processed (the HIE is told)"
    per_message = conn.execute(
        "SELECT m.control_id, COUNT(n.id), SUM(CASE WHEN n.state = 'sent' THEN 1 ELSE 0 END) FROM messages m "
        "JOIN notifications n ON n.message_id = m.id GROUP BY m.id, m.control_id"
    ).fetchall()
    assert len(per_message) == MESSAGES
    wrong = [(cid, count, sent) for cid, count, sent in per_message if not (count == 1 and sent == 1)]
    assert wrong == [], "a notification missing or repeated"
    delivered = conn.execute("SELECT COUNT(*) FROM delivery_attempts WHERE outcome = 'ok'").fetchone()[0]
    retransmissions = conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'retransmission'").fetchone()[0]
    conn.close()
    files = [p for p in (data / "outbox").rglob("*") if p.is_file() and not p.name.startswith(".")]
    # Exactly once: one successful attempt recorded per notification, one file each. (A kill between
    # writing a file and recording its attempt would send it again with the same id and name, so a
    # receiver drops the duplicate; the count of recorded successes is what must not exceed one.)
    assert delivered == MESSAGES
    assert len(files) == MESSAGES
    counts = {
        "store": "postgresql" if store else "sqlite",
        "kills": kills,
        "frames_sent": len(sent),
        "resent": len(sent) - len(set(sent)),
        "acked": len(acked),
        "stored": len(by_id),
        "retransmissions_recognised": retransmissions,
        "notified": delivered,
        "duplicates": sum(n - 1 for n, _ in by_id.values()) + sum(count - 1 for _, count, _ in per_message),
    }
    record_property("crash_counts", counts)  # in the junit XML; printed with -s
    print(f"\ncrash test counts: {counts}")


@pytest.mark.parametrize("told", ["own parent", "another process"])
def test_a_worker_whose_server_is_gone_at_its_start_exits_at_once(told):
    """The check that covers a server killed before its worker asked the kernel for the parent-death signal."""
    code = (
        "import os, sys\n"
        "from gateway.pipeline.workers import _die_with_parent\n"
        "_die_with_parent(os.getppid() if sys.argv[1] == 'own parent' else 1)\n"
        "print('still here')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, told], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert ("still here" in done.stdout) == (told == "own parent")
