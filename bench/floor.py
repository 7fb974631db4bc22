"""The floor under Herald's ACK figures on this machine: what the yardstick and the disk allow.

Measures, in one run:

1. ``mllp-load`` against two storeless listeners, at ``-c 1`` and ``-c 8``:

   * ``twisted``: Herald's own framing, MSH reader and ACK builder on
     Twisted, with no store;
   * ``socket``: a minimal non-Twisted reference, one ``selectors`` loop on
     plain sockets that finds MSH-10 and answers a fixed ACK echoing it
     (as little server work as an answer that mllp-load accepts allows).

   For each run it reports the CPU seconds the client (``mllp-load``, read
   from ``wait4``) and the server (``/proc/<pid>/stat``) used, per message
   and as a share of the run's wall time. A client near 100 % of one core is
   the bottleneck: no server can be measured faster than that with it.
2. The disk: raw ``fdatasync`` of a 4 KiB block overwritten in place and
   appended, and SQLite (WAL, ``synchronous=FULL``) one-row commits alone and
   in groups of 8.

An ACK on one connection can be no faster than the storeless round trip plus
one durable commit; at 8 connections Herald shares two cores with the client.
The script prints both bounds.

    .venv/bin/python bench/floor.py [-n1 10000] [-n8 40000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLLP_LOAD = ROOT.parent / "shared" / "tools" / "mllp-load"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

_TWISTED_SERVER = r"""
import sys
from twisted.internet import reactor
from gateway.intake.ack import ACCEPTED, AckBuilder
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

# The least work an answer mllp-load accepts needs: split frames, echo MSH-10.
_SOCKET_SERVER = r"""
import selectors, socket
sel = selectors.DefaultSelector()
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(64)
listener.setblocking(False)
sel.register(listener, selectors.EVENT_READ, None)
print(listener.getsockname()[1], flush=True)
buffers = {}
while True:
    for key, _ in sel.select():
        if key.data is None:
            conn, _ = listener.accept()
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffers[conn] = bytearray()
            sel.register(conn, selectors.EVENT_READ, True)
            continue
        conn = key.fileobj
        data = conn.recv(65536)
        if not data:
            sel.unregister(conn)
            del buffers[conn]
            conn.close()
            continue
        buf = buffers[conn]
        buf += data
        out = []
        while (end := buf.find(b"\x1c\r")) >= 0:
            msg = bytes(buf[buf.find(b"\x0b") + 1 : end])
            del buf[: end + 2]
            msh = msg[: msg.find(b"\r")]
            cid = msh.split(msh[3:4])[9]
            out.append(b"\x0bMSH|^~\\&|R|R|||20260101||ACK|" + cid + b"|P|2.5.1\rMSA|AA|" + cid + b"\r\x1c\r")
        if out:
            conn.sendall(b"".join(out))
"""

SERVERS = {"twisted": _TWISTED_SERVER, "socket": _SOCKET_SERVER}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def run_load(port: int, connections: int, n: int, max_seconds: float) -> dict:
    """Run mllp-load once; its JSON result plus the client's CPU seconds (from wait4)."""
    cmd = [sys.executable, str(MLLP_LOAD), "--port", str(port), "-n", str(n), "-c", str(connections)]
    cmd += ["--max-seconds", str(max_seconds), "--json"]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + max_seconds + 30
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = [ln for ln in out.read().decode().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"mllp-load printed no result (status {proc.returncode})")
    result = json.loads(lines[-1])
    result["client_cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def storeless_rates(kind: str, plan: list[tuple[int, int]], max_seconds: float) -> list[dict]:
    """mllp-load at each (connections, messages) against one storeless listener of ``kind``."""
    proc = subprocess.Popen([sys.executable, "-c", SERVERS[kind]], cwd=ROOT, stdout=subprocess.PIPE, text=True)
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
        for c, n in plan:
            before = _cpu_seconds(proc.pid)
            row = run_load(port, c, n, max_seconds)
            row["server_cpu_s"] = _cpu_seconds(proc.pid) - before
            row["server"] = kind
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fdatasync_costs(rounds: int = 1000) -> tuple[float, float]:
    """Median microseconds of write+fdatasync of 4 KiB: overwriting a block in place, and appending."""
    block = b"x" * 4096
    with tempfile.TemporaryDirectory(prefix="herald-floor-", dir=ROOT) as folder:
        path = os.path.join(folder, "f")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.write(fd, block)
            os.fsync(fd)
            overwrite = []
            for _ in range(rounds):
                t = time.perf_counter()
                os.pwrite(fd, block, 0)
                os.fdatasync(fd)
                overwrite.append(time.perf_counter() - t)
            append = []
            for i in range(rounds):
                t = time.perf_counter()
                os.pwrite(fd, block, 4096 * (i + 1))
                os.fdatasync(fd)
                append.append(time.perf_counter() - t)
        finally:
            os.close(fd)
    return statistics.median(overwrite) * 1e6, statistics.median(append) * 1e6


def commit_costs(rows: int = 2000, group: int = 8) -> tuple[float, float]:
    """Microseconds per row: one commit per row, and ``group`` rows per commit."""
    # In the repository's folder: the same filesystem as a server's data folder here.
    with tempfile.TemporaryDirectory(prefix="herald-floor-", dir=ROOT) as folder:
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


def describe(row: dict) -> str:
    """One line per storeless run: rate, latency, and the CPU each side used."""
    answered = max(1, row["answered"])
    elapsed = row["elapsed_s"]
    client, server = row["client_cpu_s"], row["server_cpu_s"]
    return (
        f"  {row['server']:<8} c={row['connections']}: {row['msgs_per_s']:>7.0f} msgs/s, "
        f"ACK p50 {row['ack_ms_p50']:.3f} ms, p99 {row['ack_ms_p99']:.3f} ms; "
        f"client CPU {client / answered * 1e6:.0f} us/msg ({100 * client / elapsed:.0f} % of a core), "
        f"server CPU {server / answered * 1e6:.0f} us/msg ({100 * server / elapsed:.0f} %)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n1", type=int, default=10000, help="messages on one connection")
    parser.add_argument("-n8", type=int, default=40000, help="messages on eight connections")
    parser.add_argument("--max-seconds", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over both servers, interleaved")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args()
    if not MLLP_LOAD.exists():
        raise SystemExit(f"floor: the yardstick {MLLP_LOAD} is missing")
    plan = [(1, args.n1), (8, args.n8)]
    rows = []
    for _ in range(args.repeat):
        for kind in SERVERS:
            rows += storeless_rates(kind, plan, args.max_seconds)
    overwrite, append = fdatasync_costs()
    single, grouped = commit_costs()
    if args.json:
        print(json.dumps({"storeless": rows, "fdatasync_us": [overwrite, append], "commit_us": [single, grouped]}))
        return 0
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; client: {MLLP_LOAD.name}")
    print("storeless listeners (no disk), mllp-load one message in flight per connection:")
    for row in rows:
        print(describe(row))
    print(f"disk: write+fdatasync of 4 KiB, median: {overwrite:.0f} us overwriting in place, {append:.0f} us appending")
    print(f"SQLite WAL synchronous=FULL: {single:.0f} us per one-row commit; {grouped:.0f} us per row in groups of 8")
    best_c1 = max((r for r in rows if r["connections"] == 1), key=lambda r: r["msgs_per_s"])
    rtt_ms = best_c1["ack_ms_p50"]
    print(
        f"bound at c=1: one commit per ACK, so at most 1 / ({rtt_ms:.3f} ms round trip + {single / 1000:.3f} ms "
        f"commit) = {1000 / (rtt_ms + single / 1000):.0f} msgs/s with zero server work"
    )
    best_c8 = max((r for r in rows if r["connections"] == 8), key=lambda r: r["msgs_per_s"])
    client_us = best_c8["client_cpu_s"] / max(1, best_c8["answered"]) * 1e6
    print(
        f"bound at c=8: the client alone needs {client_us:.0f} us of CPU a message on its one thread: at most "
        f"{1e6 / client_us:.0f} msgs/s, reached only if the server's work fits on the other core"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
