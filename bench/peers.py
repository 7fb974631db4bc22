"""Peers in one run (issue 16): Herald and other MLLP listeners under the same yardstick, on this machine, now.

Each listener runs in its own process on 127.0.0.1 and gets, from the shared
yardstick ``mllp-load`` (``../shared/tools/mllp-load``: one message in flight
per connection, each with its own MSH-10 and patient), in this order:

* ``-c 1`` as fast as ACKs come back (``-n1`` messages);
* ``-c 8`` likewise (``-n8`` messages);
* ``-c 8 --rate R`` (default 500 msgs/s in all, ``--paced-seconds`` long): ACK latency at equal work.

A fresh listener process (and for Herald a fresh data folder with a throwaway
key ring) serves each row; a Herald server idles ``--settle`` seconds (5)
after its port opens, while its pipeline workers start, the others 1 s. The
listeners:

* ``herald-intake``: ``herald serve --allow-plain`` with ``[pipeline] enabled = false``: store and ACK only;
* ``herald``: ``herald serve`` as deployed, the pipeline converting and routing in the background (default
  recipients: file drops, fsynced);
* ``python-hl7``: python-hl7's asyncio MLLP server (``hl7.mllp.start_hl7_server``), a handler that reads each
  message (``readmessage``, which parses it with ``hl7.parse``) and answers ``message.create_ack()``; stores
  nothing;
* ``hl7apy``: hl7apy's ``MLLPServer`` (a ``ThreadingTCPServer``) with a handler per ADT event that parses the
  message (``parse_message``) and answers an ``ACK`` built with ``hl7apy.core.Message``, as hl7apy's own
  example does; stores nothing. It closes the connection after every answer, so mllp-load, which keeps its
  connections, gets one ACK a connection and counts the rest as errors. One more row measures it with
  ``reconnect``: this script's client, which takes mllp-load's own message generator and ACK check (the
  yardstick module, imported unchanged) but opens a new connection for every message;
* ``echo``: ``bench/floor.py``'s socket listener: split frames, answer a fixed ACK echoing MSH-10 (the least
  work an answer mllp-load accepts needs);
* ``durable-floor``: asyncio streams plus one SQLite insert and commit (WAL, ``synchronous=FULL``) a
  message before its fixed ACK: the durable floor, no other work.

It prints msgs/s, ACK p50/p99, errors, and the CPU microseconds a message of
the listener (with its child processes: Herald's pipeline workers) and of the
client, the core count and load average, and the issue's ratios: Herald at
``-c 1`` against the durable floor, Herald at ``-c 8`` against python-hl7.
ACK-to-notification latency is ``bench/delivery.py``'s figure.

Every run is bounded (mllp-load's ``--max-seconds``, a deadline on every
wait), every process is stopped by its pid, temporary folders are deleted.

    .venv/bin/python bench/peers.py
    .venv/bin/python bench/peers.py -n1 2000 -n8 4000 --servers herald python-hl7 durable-floor
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import ROOT, code_under_test, cpu_seconds, descendants, free_port, running_server  # noqa: E402
from delivery import load_yardstick, machine, percentiles, stop_process, wait_for_port  # noqa: E402
from floor import _SOCKET_SERVER  # noqa: E402

THIS = Path(__file__).resolve()
SERVERS = ("herald-intake", "herald", "python-hl7", "hl7apy", "echo", "durable-floor")
ADT_TYPES = ("ADT^A01^ADT_A01", "ADT^A03^ADT_A03", "ADT^A04^ADT_A01")  # mllp-load's events


# -- the peers (child processes of this script) ------------------------------------------


def peer_python_hl7(port: int) -> None:
    """python-hl7's asyncio MLLP server answering ``create_ack()`` to every message."""
    import hl7.mllp

    async def handle(reader, writer):
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                writer.writemessage(message.create_ack())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def serve():
        server = await hl7.mllp.start_hl7_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def peer_hl7apy(port: int) -> None:
    """hl7apy's MLLPServer with a handler that parses each message and answers an hl7apy-built ACK."""
    from hl7apy.core import Message
    from hl7apy.mllp import AbstractHandler, MLLPServer
    from hl7apy.parser import parse_message

    class AckHandler(AbstractHandler):
        def reply(self):
            incoming = parse_message(self.incoming_message, find_groups=False)
            ack = Message("ACK", version=incoming.msh.msh_12.value or "2.5.1")
            ack.msh.msh_3 = "PEER"
            ack.msh.msh_4 = "PEER"
            ack.msh.msh_5 = incoming.msh.msh_3.value
            ack.msh.msh_6 = incoming.msh.msh_4.value
            ack.msh.msh_9 = "ACK"
            ack.msh.msh_10 = "A" + incoming.msh.msh_10.value[:19]
            ack.msa.msa_1 = "AA"
            ack.msa.msa_2 = incoming.msh.msh_10.value
            return ack.to_mllp()

    server = MLLPServer("127.0.0.1", port, {kind: (AckHandler,) for kind in ADT_TYPES})
    server.serve_forever()


def peer_echo(port: int) -> None:
    """``bench/floor.py``'s storeless socket listener (it binds port 0 and prints it; here it is told the port)."""
    exec(_SOCKET_SERVER.replace('listener.bind(("127.0.0.1", 0))', f'listener.bind(("127.0.0.1", {port}))'))  # noqa: S102


def peer_durable_floor(port: int, folder: Path) -> None:
    """Frames plus one durable SQLite commit (WAL, synchronous=FULL) a message, then a fixed ACK echoing MSH-10."""
    import sqlite3

    db = sqlite3.connect(folder / "floor.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, control_id TEXT, raw BLOB)")

    async def handle(reader, writer):
        try:
            while True:
                frame = await reader.readuntil(b"\x1c\r")
                message = frame[frame.find(b"\x0b") + 1 : -2]
                msh = message[: message.find(b"\r")]
                cid = msh.split(msh[3:4])[9]
                db.execute("BEGIN")
                db.execute("INSERT INTO messages (control_id, raw) VALUES (?, ?)", (cid.decode(), message))
                db.execute("COMMIT")
                writer.write(b"\x0bMSH|^~\\&|R|R|||20260101||ACK|" + cid + b"|P|2.5.1\rMSA|AA|" + cid + b"\r\x1c\r")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def run_peer(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="peers.py _peer")
    ap.add_argument("kind", choices=["python-hl7", "hl7apy", "echo", "durable-floor"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--folder", type=Path, default=None)
    opts = ap.parse_args(argv)
    if opts.kind == "python-hl7":
        peer_python_hl7(opts.port)
    elif opts.kind == "hl7apy":
        peer_hl7apy(opts.port)
    elif opts.kind == "echo":
        peer_echo(opts.port)
    else:
        peer_durable_floor(opts.port, opts.folder)


class Peer:
    """A peer listener process on a free port, in its own temporary folder."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="herald-bench-peer-"))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Peer:
        cmd = [sys.executable, str(THIS), "_peer", self.kind, "--port", str(self.port), "--folder", str(self.folder)]
        log = self.folder / "peer.log"
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, self.proc, 30, log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.folder, ignore_errors=True)


# -- the load ----------------------------------------------------------------------------


def run_yardstick(port: int, n: int, connections: int, rate: float, max_seconds: float) -> dict:
    """mllp-load once (bounded), its JSON result plus its CPU seconds (from wait4)."""
    mllp_load = ROOT.parent / "shared" / "tools" / "mllp-load"
    cmd = [sys.executable, str(mllp_load), "--port", str(port), "-n", str(n), "-c", str(connections)]
    cmd += ["--max-seconds", str(max_seconds), "--json"]
    if rate:
        cmd += ["--rate", str(rate)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        deadline = time.monotonic() + max_seconds + 60
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
        err.seek(0)
        lines = [ln for ln in out.read().decode(errors="replace").splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"mllp-load printed no result ({proc.returncode}): {err.read().decode()[-1500:]}")
    return json.loads(lines[-1]) | {"client_cpu_s": usage.ru_utime + usage.ru_stime}


def reconnecting_load(port: int, n: int, connections: int, max_seconds: float, timeout: float = 10.0) -> dict:
    """Like mllp-load (its messages and ACK check, imported unchanged), but a new connection for every message."""
    yardstick = load_yardstick()
    counts = {"ok": 0, "nack": 0, "mismatch": 0, "garbled": 0, "timeout": 0, "conn_error": 0}
    latencies: list[float] = []
    rng = __import__("random").Random(6872)
    run_id = f"{os.getpid() % 100000:05d}{int(time.time()) % 100000:05d}"
    taken = [0]
    deadline = time.monotonic() + max_seconds

    async def one_connection():
        while taken[0] < n and time.monotonic() < deadline:
            i = taken[0]
            taken[0] += 1
            control_id, text = yardstick.synthetic_message(i, ("A04", "A01", "A03")[i % 3], rng, run_id)
            sent = time.perf_counter()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
            except (TimeoutError, OSError):
                counts["conn_error"] += 1
                continue
            try:
                writer.write(b"\x0b" + text.encode() + b"\x1c\r")
                await writer.drain()
                ack = await yardstick.read_frame(reader, timeout)
                latencies.append(time.perf_counter() - sent)
                counts[yardstick.check_ack(ack, control_id)] += 1
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                counts["timeout"] += 1
            finally:
                writer.close()

    async def main():
        await asyncio.gather(*(one_connection() for _ in range(connections)))

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - t0
    p = percentiles([x * 1000 for x in latencies])
    return {
        "connections": connections,
        "requested": n,
        "answered": len(latencies),
        **counts,
        "elapsed_s": round(elapsed, 3),
        "msgs_per_s": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "ack_ms_p50": p["p50"],
        "ack_ms_p99": p["p99"],
        "ack_ms_max": p["max"],
        "client_cpu_s": time.process_time() - cpu0,
    }


# -- one run -------------------------------------------------------------------------------


def plans(args) -> list[tuple[str, int, int, float]]:
    """(label, connections, messages, rate) of the rows every listener gets."""
    paced = int(round(args.paced_rate * args.paced_seconds))
    out = [("c=1", 1, args.n1, 0.0), ("c=8", 8, args.n8, 0.0)]
    if args.paced_rate:
        out.append((f"c=8 @{args.paced_rate:g}/s", 8, paced, args.paced_rate))
    return out


def measure(kind: str, label: str, connections: int, n: int, rate: float, args, tmp: Path, client: str) -> dict:
    """One row: a fresh listener, one load, the figures."""

    def with_pid(pid: int) -> dict:
        # Herald's pipeline workers start (and import fhir.resources) after the port opens: not in the figures.
        time.sleep(args.settle if kind.startswith("herald") else 1.0)
        load_before = os.getloadavg()[0]
        before = cpu_seconds(pid) + sum(cpu_seconds(p) for p, _ in descendants(pid))
        if client == "reconnect":
            result = reconnecting_load(port, n, connections, args.max_seconds)
        else:
            result = run_yardstick(port, n, connections, rate, args.max_seconds)
        after = cpu_seconds(pid) + sum(cpu_seconds(p) for p, _ in descendants(pid))
        answered = result["answered"]
        return {
            "server": kind,
            "plan": label,
            "client": client,
            "connections": connections,
            "rate": rate,
            "requested": n,
            "answered": answered,
            "ok": result["ok"],
            "errors": n - result["ok"],
            "msgs_per_s": result["msgs_per_s"],
            "ack_ms_p50": result["ack_ms_p50"],
            "ack_ms_p99": result["ack_ms_p99"],
            "ack_ms_max": result["ack_ms_max"],
            "server_cpu_us_per_msg": round(1e6 * (after - before) / answered) if answered else None,
            "client_cpu_us_per_msg": round(1e6 * result["client_cpu_s"] / answered) if answered else None,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }

    if kind.startswith("herald"):
        config = None
        if kind == "herald-intake":
            config = tmp / "intake-only.toml"
            config.write_text("[pipeline]\nenabled = false\n", encoding="utf-8")
        with running_server("herald", True, config=config) as server:
            port = server.port
            return with_pid(server.proc.pid)
    with Peer(kind) as peer:
        port = peer.port
        return with_pid(peer.proc.pid)


def print_table(rows: list[dict], report: dict) -> None:
    m0, m1 = report["machine"], report["machine_at_end"]
    print(code_under_test())
    print(f"machine: {m0['cores']} cores; load average {m0['load_average']} at the start, {m1['load_average']} at end")
    print("client: mllp-load (one message in flight a connection), unless the client column says reconnect\n")
    head = (
        f"{'listener':<14} {'load':<13} {'client':<10} {'ok':>6} {'of':>6} {'msgs/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>8} {'errors':>6} {'server us':>9} {'client us':>9} {'load avg':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['server']:<14} {r['plan']:<13} {r['client']:<10} {r['ok']:>6} {r['requested']:>6} "
            f"{r['msgs_per_s']:>8.1f} {_ms(r['ack_ms_p50'], 7)} {_ms(r['ack_ms_p99'], 8)} {r['errors']:>6} "
            f"{_us(r['server_cpu_us_per_msg']):>9} {_us(r['client_cpu_us_per_msg']):>9} "
            f"{r['load_average'][0]:>5.2f}-{r['load_average'][1]:<5.2f}"
        )
    print()
    print("server us: CPU microseconds a message of the listener process and its children (Herald's pipeline")
    print("workers); client us: of the load client. errors: requested minus ok ACKs (nacks, timeouts, refused or")
    print("closed connections; mllp-load stops a connection at its first error).")
    for name, value in report["ratios"].items():
        print(f"{name}: {value}")


def ratios(rows: list[dict]) -> dict:
    def rate(server: str, plan: str) -> float | None:
        for r in rows:
            if r["server"] == server and r["plan"] == plan and r["client"] == "mllp-load":
                return r["msgs_per_s"]
        return None

    out = {}
    pairs = (
        ("herald-intake c=1 / durable-floor c=1 (goal >= 0.6)", ("herald-intake", "c=1"), ("durable-floor", "c=1")),
        ("herald c=1 / durable-floor c=1 (goal >= 0.6)", ("herald", "c=1"), ("durable-floor", "c=1")),
        ("herald-intake c=8 / python-hl7 c=8 (goal >= 2)", ("herald-intake", "c=8"), ("python-hl7", "c=8")),
        ("herald c=8 / python-hl7 c=8 (goal >= 2)", ("herald", "c=8"), ("python-hl7", "c=8")),
    )
    for name, a, b in pairs:
        x, y = rate(*a), rate(*b)
        if x is not None and y:
            out[name] = round(x / y, 2)
    return out


def _ms(value, width: int) -> str:
    return f"{value:>{width}.2f}" if value is not None else f"{'n/a':>{width}}"


def _us(value) -> str:
    return f"{value}" if value is not None else "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See bench/README.md, Peers in one run.")
    ap.add_argument("-n1", type=int, default=3000, help="messages at -c 1 (default 3000)")
    ap.add_argument("-n8", type=int, default=6000, help="messages at -c 8 (default 6000)")
    ap.add_argument("--paced-rate", type=float, default=500.0, help="the paced row's rate, 0 for none (500)")
    ap.add_argument("--paced-seconds", type=float, default=5.0, help="the paced row's length (default 5)")
    ap.add_argument(
        "--reconnect-n", type=int, default=300, help="messages a reconnecting row sends (hl7apy; default 300)"
    )
    ap.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS), help="listeners (default all)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="bound on each load (default 60)")
    ap.add_argument(
        "--settle", type=float, default=5.0, help="seconds a Herald server idles before its load (default 5)"
    )
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    if min(args.n1, args.n8, args.reconnect_n) < 1 or args.paced_rate < 0 or args.max_seconds <= 0:
        ap.error("message counts and --max-seconds must be positive, --paced-rate not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_peer"]:
        run_peer(argv[1:])
        return 0
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-peers-"))
    report: dict = {"machine": machine()}
    rows = []
    try:
        for kind in args.servers:
            for label, c, n, rate in plans(args):
                print(f"peers: {kind} {label} ...", file=sys.stderr, flush=True)
                rows.append(measure(kind, label, c, n, rate, args, tmp, "mllp-load"))
            if kind == "hl7apy":
                for c in (1, 8):
                    print(f"peers: {kind} c={c} reconnecting ...", file=sys.stderr, flush=True)
                    rows.append(measure(kind, f"c={c}", c, args.reconnect_n, 0.0, args, tmp, "reconnect"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["machine_at_end"] = machine()
    report["ratios"] = ratios(rows)
    report["rows"] = rows
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(rows, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
