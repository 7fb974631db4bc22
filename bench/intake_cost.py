"""Where intake's CPU goes: user and system CPU a message of a server, and of the store's job alone.

Two figures, each from the kernel's accounting (no profiler in the way):

* ``server``: a fresh intake-only server (``ack_throughput.py``'s
  instrumented server, pipeline disconnected), mllp-load at ``-c 1`` and
  ``-c 8``; the server's user and system CPU a message from
  ``/proc/<pid>/stat`` before and after each load, and its CPU while idle
  for ``--idle`` seconds (pollers and timers);
* ``store``: the store's share alone, in this process: ``record_frame``
  (the MSH fields, the sealed body, its digest, the ``received`` event)
  plus the previous message's ``ack-sent`` event and the commit
  (``synchronous=FULL``), on a fresh database with a throwaway key ring,
  ``-n`` times; user and system CPU a message from ``getrusage``, and the
  bytes each commit appends to the write-ahead log (pages a commit). Beside
  it, in the same run, the durable floor's commit (``peers.py``'s: one row
  of control id and body in a table with no index) on another fresh file.

What the first has beyond the second is the reactor's side (framing, the
MSH read and limit scan, the sender check, the Deferred chain, the log
line, the metrics, the ACK) and the hand-offs between the reactor's thread
and the store's writer thread.

Run from the repository root::

    .venv/bin/python bench/intake_cost.py
    .venv/bin/python bench/intake_cost.py -n 2000 --only store
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import ROOT, code_under_test, cpu_split, running_server  # noqa: E402
from peers import run_yardstick  # noqa: E402

from gateway.records import RECEIVED, IntakeRecord  # noqa: E402
from gateway.store.events import append_event  # noqa: E402
from gateway.store.keys import KeyRing  # noqa: E402
from gateway.store.messages import record_frame  # noqa: E402
from gateway.store.schema import migrate, open_database  # noqa: E402

SAMPLE = "cerner-v23-a01-admit.hl7"
CONTROL_ID = b"NRG20261118091500001"  # the sample's MSH-10, made unique a message


def server_figures(n1: int, n8: int, idle: float, max_seconds: float) -> list[dict]:
    rows = []
    with running_server("instrumented", pipeline=False) as server:
        time.sleep(4)  # its start-up is not in the figures
        pid = server.proc.pid
        u0, s0 = cpu_split(pid)
        time.sleep(idle)
        u1, s1 = cpu_split(pid)
        rows.append({"what": f"server idle {idle:g} s", "user_s": u1 - u0, "sys_s": s1 - s0})
        for connections, n in ((1, n1), (8, n8)):
            u0, s0 = cpu_split(pid)
            result = run_yardstick(server.port, n, connections, 0.0, max_seconds)
            u1, s1 = cpu_split(pid)
            answered = result["answered"] or 1
            rows.append(
                {
                    "what": f"server, mllp-load -c {connections}",
                    "messages": answered,
                    "msgs_per_s": result["msgs_per_s"],
                    "user_us": 1e6 * (u1 - u0) / answered,
                    "sys_us": 1e6 * (s1 - s0) / answered,
                }
            )
    return rows


def _commit_loop(what: str, db, wal: Path, n: int, commit_one) -> dict:
    """Time ``commit_one(i)`` for i < ``n`` on ``db``; CPU and wall a message, and what each commit wrote to ``wal``."""
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA wal_autocheckpoint=0")  # the log only grows: its size is what the commits wrote
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(n):
        commit_one(i)
    after, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return {
        "what": what,
        "messages": n,
        "user_us": 1e6 * (after.ru_utime - before.ru_utime) / n,
        "sys_us": 1e6 * (after.ru_stime - before.ru_stime) / n,
        "wall_us": 1e6 * (t1 - t0) / n,
        "wal_kib": wal.stat().st_size / n / 1024,
    }


def store_figures(n: int) -> dict:
    raw = (ROOT / "sample_messages" / SAMPLE).read_bytes().replace(b"\n", b"\r")
    folder = Path(tempfile.mkdtemp(prefix="herald-bench-intake-cost-"))
    try:
        conn = open_database(folder / "herald.db", keys=KeyRing([("bench", os.urandom(32))]))
        migrate(conn)
        now = "2026-12-03T00:00:00.000+00:00"

        def commit_one(i: int) -> None:
            record = IntakeRecord(
                raw=raw.replace(CONTROL_ID, b"C%d" % i, 1),
                peer="127.0.0.1:5000",
                state=RECEIVED,
                ack_code="AA",
                sending_application="EHR",
                sending_facility="FAC",
                message_type="ADT",
                trigger_event="A01",
                control_id=f"C{i}",
            )
            conn.execute("BEGIN IMMEDIATE")
            stored = record_frame(conn, record, now)
            if i:  # the ACK of the message before rides this commit, as in the writer
                append_event(conn, now, stored.message_id - 1, None, "intake", "ack-sent", {"code": "AA"})
            conn.execute("COMMIT")

        what = "store job alone (record_frame + ack-sent event + commit)"
        row = _commit_loop(what, conn, folder / "herald.db-wal", n, commit_one)
        conn.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def floor_figures(n: int) -> dict:
    """The durable floor's commit (peers.py's durable-floor: one unindexed row a commit), as store_figures."""
    raw = (ROOT / "sample_messages" / SAMPLE).read_bytes().replace(b"\n", b"\r")
    folder = Path(tempfile.mkdtemp(prefix="herald-bench-intake-cost-"))
    try:
        db = sqlite3.connect(folder / "floor.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, control_id TEXT, raw BLOB)")

        def commit_one(i: int) -> None:
            db.execute("BEGIN")
            db.execute(
                "INSERT INTO messages (control_id, raw) VALUES (?, ?)",
                (f"C{i}", raw.replace(CONTROL_ID, b"C%d" % i, 1)),
            )
            db.execute("COMMIT")

        what = "durable floor's commit alone (one unindexed row)"
        row = _commit_loop(what, db, folder / "floor.db-wal", n, commit_one)
        db.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See bench/README.md.")
    ap.add_argument("-n", type=int, default=3000, help="store loop: messages (default 3000)")
    ap.add_argument("-n1", type=int, default=4000, help="server: messages at -c 1 (default 4000)")
    ap.add_argument("-n8", type=int, default=8000, help="server: messages at -c 8 (default 8000)")
    ap.add_argument("--idle", type=float, default=10.0, help="server: seconds measured idle (default 10)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="bound on each load (default 60)")
    ap.add_argument("--only", choices=["server", "store"], default=None, help="one of the two figures")
    args = ap.parse_args(argv)
    print(code_under_test())
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}\n")
    if args.only in (None, "server"):
        for row in server_figures(args.n1, args.n8, args.idle, args.max_seconds):
            if "user_us" in row:
                print(
                    f"{row['what']:<58} {row['msgs_per_s']:>8.1f} msgs/s  user {row['user_us']:>6.0f} us  "
                    f"system {row['sys_us']:>5.0f} us a message"
                )
            else:
                print(f"{row['what']:<58} user {row['user_s']:.2f} s  system {row['sys_s']:.2f} s")
    if args.only in (None, "store"):
        for row in (store_figures(args.n), floor_figures(args.n)):
            print(
                f"{row['what']:<58} user {row['user_us']:>6.0f} us  system {row['sys_us']:>5.0f} us  "
                f"wall {row['wall_us']:>5.0f} us a message ({row['messages']}); "
                f"{row['wal_kib']:.1f} KiB of write-ahead log a commit ({row['wal_kib'] * 1024 / 4120:.1f} pages)"
            )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
