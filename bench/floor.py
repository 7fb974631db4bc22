"""The floor under Herald's ACK figures on this machine: what the yardstick and the disk allow.

Measures, in one run:

1. ``mllp-load`` against a bare MLLP listener made of Herald's own framing,
   MSH reader and ACK builder, but no store: the round trip of the client,
   loopback TCP and Twisted, with nothing durable in it.
2. The cost of one durable SQLite commit here (WAL, ``synchronous=FULL``,
   one small row per transaction), and of the same rows committed in groups.

An ACK on one connection can be no faster than (1) plus (2): that bounds
what ``bench/ack_throughput.py`` can show at ``-c 1``.

    .venv/bin/python bench/floor.py [-n1 10000] [-n8 40000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLLP_LOAD = ROOT.parent / "shared" / "tools" / "mllp-load"

_SERVER = r"""
import sys
from twisted.internet import reactor
from gateway.ack import ACCEPTED, AckBuilder
from gateway.header import read_header
from mllp import MLLPServerFactory

acks = AckBuilder()

class Bare:
    def frameReceived(self, message, peer):
        return acks.build(read_header(message), ACCEPTED)
    def frameTooLong(self, prefix, peer):
        return None
    def frameIncomplete(self, partial, peer):
        pass

port = reactor.listenTCP(0, MLLPServerFactory(Bare()), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def bare_listener_rates(n1: int, n8: int, max_seconds: int) -> list[dict]:
    """mllp-load -c 1 and -c 8 against the storeless listener."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        rows = []
        for c, n in ((1, n1), (8, n8)):
            out = subprocess.run(
                [
                    sys.executable,
                    str(MLLP_LOAD),
                    "--port",
                    str(port),
                    "-n",
                    str(n),
                    "-c",
                    str(c),
                    "--max-seconds",
                    str(max_seconds),
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=max_seconds + 30,
            )
            rows.append(json.loads(out.stdout))
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def commit_costs(rows: int = 2000, group: int = 8) -> tuple[float, float]:
    """Microseconds per row: one commit per row, and ``group`` rows per commit."""
    with tempfile.TemporaryDirectory(prefix="herald-floor-") as folder:
        conn = sqlite3.connect(os.path.join(folder, "f.db"), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, raw BLOB)")
        raw = b"x" * 700
        start = time.perf_counter()
        for _ in range(rows):
            conn.execute("BEGIN")
            conn.execute("INSERT INTO m (raw) VALUES (?)", (raw,))
            conn.execute("COMMIT")
        single = (time.perf_counter() - start) / rows * 1e6
        start = time.perf_counter()
        for _ in range(rows // group):
            conn.execute("BEGIN")
            for _ in range(group):
                conn.execute("INSERT INTO m (raw) VALUES (?)", (raw,))
            conn.execute("COMMIT")
        grouped = (time.perf_counter() - start) / (rows // group * group) * 1e6
        conn.close()
    return single, grouped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n1", type=int, default=10000, help="messages on one connection")
    parser.add_argument("-n8", type=int, default=40000, help="messages on eight connections")
    parser.add_argument("--max-seconds", type=int, default=60)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; client: ../shared/tools/mllp-load")
    for row in bare_listener_rates(args.n1, args.n8, args.max_seconds):
        print(
            f"bare MLLP listener (framing + MSH read + ACK, no store), c={row['connections']}: "
            f"{row['msgs_per_s']:.0f} msgs/s, ACK p50 {row['ack_ms_p50']} ms, p99 {row['ack_ms_p99']} ms"
        )
    single, grouped = commit_costs()
    print(f"SQLite WAL synchronous=FULL: {single:.0f} us per one-row commit; {grouped:.0f} us per row in groups of 8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
