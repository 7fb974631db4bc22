"""ACK throughput and latency of a running Herald, measured over real MLLP sockets.

What is measured: for each connection count (1 and 8 by default) a fresh
``herald serve`` is started on a free loopback port with an empty data folder,
and the shared yardstick ``mllp-load`` (../shared/tools/mllp-load) sends
synthetic ADT messages, one in flight per connection, waiting for each ACK.
An ACK means the raw message was committed to SQLite (WAL, synchronous=FULL),
so this is the durable-intake rate a sending EHR sees: messages answered per
second and the ACK round-trip latency (p50, p99, max) at the client.

By default the server runs as deployed: its pipeline converts, matches, routes
and delivers (file drops, fsynced) the same messages in the background while
the load runs, on the same two cores and the same single SQLite writer.
``--pipeline off`` measures the intake path alone (see below).

Servers:

* ``--server herald`` (default): ``herald serve`` exactly as an operator runs it.
  It does not expose its commit counter, so "commits" shows n/a.
* ``--server instrumented``: the same ``make_service(config)`` in a small
  process of this script, which also reports ``Store.commits`` (SQLite
  transactions the writer thread committed) on SIGUSR1.
* ``--pipeline off`` implies ``instrumented`` and disconnects intake from the
  pipeline (``intake.on_stored`` does nothing), so messages stay ``received``.
  ``herald serve`` had no such switch when this was written.
* ``--config FILE`` gives either server a Herald TOML config (recipients
  disabled, ``[pipeline] workers``, ...) to see what each part costs.

Transports (``--transport``):

* ``tcp`` (default): a plain ``tcp:`` listener on 127.0.0.1 (``--allow-plain``).
* ``tls``: a mutual-TLS ``tls:`` listener, as deployed: throwaway certificates
  made by ``herald certs init``'s code in the run's temporary folder, mllp-load
  presenting the client certificate, and mllp-load's sender (LOADGEN|LOADHOSP)
  bound to that certificate in ``[[senders]]``, so the allowlist check is paid.
* ``both``: for each connection count, ``--rounds`` rounds of tcp then tls,
  alternating, each on a fresh server, with the medians side by side. mllp-load
  opens its connections once, so the handshakes are a fixed cost and the
  figures are the per-message cost of TLS records and the allowlist.

Encryption at rest (``--encryption``):

* ``on`` (default): as deployed, with a throwaway key ring in the run's data
  folder: every body sealed (AES-256-GCM) and its digest a keyed hash.
* ``off``: ``[security] encrypt_at_rest = false`` (appended to a copy of the
  config): bodies stored as received.
* ``both``: for each connection count and transport, ``--rounds`` rounds of on
  then off, alternating, each on a fresh server, with the medians side by side.

Every run is bounded (``--max-seconds`` is always passed to mllp-load), every
wait has a deadline, and the server is stopped by its pid (SIGTERM, then
SIGKILL) and its temporary folder deleted, whatever happens.

Run from the repository root::

    .venv/bin/python bench/ack_throughput.py
    .venv/bin/python bench/ack_throughput.py --pipeline off -n1 5000 -n8 10000
    .venv/bin/python bench/ack_throughput.py --transport both --rounds 3 -n1 3000 -n8 6000
    .venv/bin/python bench/ack_throughput.py --pipeline off --encryption both --rounds 3 -n1 5000 -n8 10000
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLLP_LOAD = ROOT.parent / "shared" / "tools" / "mllp-load"
STATS_FILE = "bench-stats.json"
#: The client certificate mllp-load presents over mutual TLS, and the sender (MSH-3, MSH-4) it sends as.
TLS_CLIENT = "bench-client"
LOAD_SENDER = ("LOADGEN", "LOADHOSP")


# -- the server under test ---------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def herald_command() -> list[str]:
    """The ``herald`` console script next to this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "herald"
    profile = os.environ.get("HERALD_BENCH_PROFILE")  # a file: run the server under cProfile, stats written there
    if beside.exists():
        return [sys.executable, "-m", "cProfile", "-o", profile, str(beside)] if profile else [str(beside)]
    found = shutil.which("herald")
    if found is None:
        raise SystemExit("bench: no herald console script next to this Python or on PATH")
    return [found]


@dataclass
class Server:
    """A Herald server process started for one benchmark run."""

    kind: str  # "herald" or "instrumented"
    pipeline: bool
    data_dir: Path
    port: int
    switch_interval: float | None = None  # instrumented only: sys.setswitchinterval in the server
    config: Path | None = None  # a Herald TOML config (--config)
    tls_dir: Path | None = None  # mutual TLS: the certificates (made by make_dev_certs); None: plain TCP
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"

    @property
    def database(self) -> Path:
        return self.data_dir / "herald.db"

    def command(self) -> list[str]:
        if self.tls_dir is None:
            listen = [f"tcp:{self.port}:interface=127.0.0.1", "--allow-plain"]
        else:
            listen = [f"tls:{self.port}:interface=127.0.0.1"]
        if self.kind == "herald":
            cmd = [*herald_command(), "serve", "--listen", *listen, "--data", str(self.data_dir)]
            return cmd if self.config is None else [*cmd, "--config", str(self.config)]
        cmd = [sys.executable, str(Path(__file__).resolve()), "_serve", "--data", str(self.data_dir)]
        cmd += ["--listen", *listen]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        if self.switch_interval is not None:
            cmd += ["--switch-interval", str(self.switch_interval)]
        return cmd if self.pipeline else [*cmd, "--no-pipeline"]

    def start(self, ready_seconds: float = 30.0) -> None:
        """Start the process and wait (bounded) until its port accepts connections."""
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the server did not accept connections within {ready_seconds:g} s:\n{self.log_tail()}")

    def stop(self, grace_seconds: float = 15.0) -> int | None:
        """SIGTERM by pid, SIGKILL if it has not exited after ``grace_seconds``; return its status.

        Processes the server started (pipeline workers, multiprocessing's
        resource tracker) are noted first and stopped the same way if they
        outlive it: a killed server leaves them orphaned otherwise.
        """
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        children = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        try:
            status = proc.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            print(
                f"bench: the server (pid {proc.pid}) did not exit within {grace_seconds:g} s of SIGTERM; SIGKILL",
                file=sys.stderr,
            )
            os.kill(proc.pid, signal.SIGKILL)
            status = proc.wait(timeout=10)
        stop_leftovers(children)
        return status

    def stats(self, wait_seconds: float = 10.0) -> dict | None:
        """Ask an instrumented server for its counters (SIGUSR1); None for ``herald serve``."""
        if self.kind != "instrumented" or self.proc is None or self.proc.poll() is not None:
            return None
        path = self.data_dir / STATS_FILE
        path.unlink(missing_ok=True)
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            time.sleep(0.05)
        return None

    def load_args(self) -> list[str]:
        """mllp-load's arguments for this server's transport (the client certificate, over TLS)."""
        if self.tls_dir is None:
            return []
        d = self.tls_dir
        cert, key = d / f"{TLS_CLIENT}.pem", d / f"{TLS_CLIENT}-key.pem"
        return [
            "--tls",
            "--ca",
            str(d / "ca.pem"),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--server-name",
            "localhost",
        ]

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process from /proc; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[1]), fields[19])


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below ``pid`` (Linux /proc; empty elsewhere)."""
    if not os.path.isdir("/proc"):
        return []
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append((int(entry), st[1]))
    found: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def stop_leftovers(processes: list[tuple[int, str]], grace_seconds: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, each listed process still alive (same pid and start time)."""

    def alive() -> list[int]:
        return [pid for pid, start in processes if (st := _stat(pid)) is not None and st[1] == start]

    for pid in alive():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive():
        print(f"bench: pid {pid}, started by the server, outlived it; SIGKILL", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_server(
    kind: str = "herald",
    pipeline: bool = True,
    keep: bool = False,
    switch_interval=None,
    config: Path | None = None,
    transport: str = "tcp",
    encryption: str = "on",
):
    """Start a server in a fresh temporary folder; always stop it and delete the folder.

    ``pipeline=False`` and ``switch_interval`` need the instrumented server.
    ``transport="tls"``: mutual TLS with throwaway certificates (see the module docstring).
    ``encryption="off"``: PHI stored unsealed (``encrypt_at_rest = false``); "on": a throwaway key.
    """
    if not pipeline or switch_interval is not None:
        kind = "instrumented"
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    tls_dir = None
    try:
        if transport == "tls":
            tls_dir, config = tls_material(tmp, config)
        if encryption == "off":
            config = encryption_off_config(tmp, config)
        server = Server(kind, pipeline, tmp / "data", free_port(), switch_interval, config, tls_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        server.data_dir.mkdir(exist_ok=True)
        if encryption == "on":
            throwaway_key(server.data_dir)
        server.start()
        yield server
    finally:
        status = server.stop()
        if status not in (None, 0, -signal.SIGTERM):
            print(f"bench: the server exited with status {status}; log tail:\n{server.log_tail(8)}", file=sys.stderr)
        if keep:
            print(f"bench: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def throwaway_key(data_dir: Path) -> None:
    """A key ring for the run where Herald looks by default (it seals PHI at rest and will not start without one)."""
    try:
        from gateway.store.keys import new_key_file
    except ImportError:  # a revision from before the key ring
        return
    new_key_file(data_dir / "keys" / "herald.key")


def encryption_off_config(folder: Path, config: Path | None) -> Path:
    """A copy of ``config`` (or an empty one) with ``[security] encrypt_at_rest = false``."""
    text = config.read_text(encoding="utf-8") if config is not None else ""
    if "[security]" in text:
        text = text.replace("[security]", "[security]\nencrypt_at_rest = false", 1)
    else:
        text += "\n[security]\nencrypt_at_rest = false\n"
    path = folder / "bench-plain-at-rest.toml"
    path.write_text(text, encoding="utf-8")
    return path


def tls_material(folder: Path, config: Path | None) -> tuple[Path, Path]:
    """Certificates for a mutual-TLS run, and a config binding mllp-load's sender to its certificate.

    The certificates go where the server looks by default (``<data>/certs``);
    ``config`` (the --config file, if any) is copied with the [[senders]] entry
    appended.
    """
    import tomllib

    from gateway.app.certs import make_dev_certs

    made = make_dev_certs(folder / "data" / "certs", clients=(TLS_CLIENT,), days=1)
    text = config.read_text(encoding="utf-8") if config is not None else ""
    if "senders" in tomllib.loads(text):
        raise SystemExit("bench: --transport tls adds its own [[senders]]; the --config file must have none")
    application, facility = LOAD_SENDER
    text += f'\n[[senders]]\napplication = "{application}"\nfacility = "{facility}"\nidentities = ["{TLS_CLIENT}"]\n'
    path = folder / "bench-tls.toml"
    path.write_text(text, encoding="utf-8")
    return made.directory, path


# -- the load ----------------------------------------------------------------


def run_mllp_load(port: int, n: int, connections: int, max_seconds: float, extra: list[str] | None = None) -> dict:
    """Run mllp-load once and return its JSON result (bounded by --max-seconds, plus a margin).

    The result also has ``client_cpu_s``: the CPU seconds mllp-load used (user + system, from wait4).
    """
    if not MLLP_LOAD.exists():
        raise SystemExit(f"bench: the yardstick {MLLP_LOAD} is missing")
    cmd = [sys.executable, str(MLLP_LOAD), "--port", str(port), "-n", str(n), "-c", str(connections)]
    cmd += ["--max-seconds", str(max_seconds), "--json", *(extra or [])]
    # mllp-load stops taking messages at --max-seconds; each in-flight one may wait up to --timeout (10 s).
    deadline = time.monotonic() + max_seconds + 60
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().decode(errors="replace").splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(
                f"mllp-load printed no result (status {proc.returncode}): {err.read().decode(errors='replace')}"
            )
    result = json.loads(lines[-1])
    result["client_cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a live process has used (Linux /proc; zeros when unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (Linux /proc; 0.0 when unreadable)."""
    return sum(cpu_split(pid))


def server_cpu(server: Server) -> tuple[float, float]:
    """CPU seconds so far of the server process, and of the processes it started (pipeline workers)."""
    if server.proc is None:
        return 0.0, 0.0
    return cpu_seconds(server.proc.pid), sum(cpu_seconds(pid) for pid, _ in descendants(server.proc.pid))


def state_counts(database: Path) -> dict[str, int]:
    """Messages per state, read through a read-only connection (empty if unreadable)."""
    from gateway.store import count_by_state, open_database

    try:
        conn = open_database(database, readonly=True)
    except Exception:
        return {}
    try:
        return count_by_state(conn)
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def durability_note(database: Path) -> str:
    """Say how commits are made durable: journal mode read from the file, synchronous from the code.

    ``PRAGMA synchronous`` is a per-connection setting, so reading it from
    another connection would say nothing about the server's; the setting is
    taken from the source of ``gateway.store.open_database`` instead.
    """
    from gateway import store

    source = inspect.getsource(store.open_database)
    with contextlib.suppress(AttributeError, OSError, TypeError):  # the pragmas live in the helper it calls
        source += inspect.getsource(store.schema._open)
    sync = "FULL" if "synchronous=FULL" in source else "not FULL (check gateway/store/schema.py open_database)"
    journal = "?"
    with contextlib.suppress(Exception):
        conn = store.open_database(database, readonly=True)
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0].upper()
        conn.close()
    return f"SQLite journal_mode={journal} (read from the file), synchronous={sync} (per connection, open_database)"


def code_under_test() -> str:
    """Which Herald code the servers run: the gateway package's folder and its git state."""
    import gateway

    folder = Path(gateway.__file__).resolve().parent.parent
    where = f"Herald code from {folder}"
    with contextlib.suppress(Exception):
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--", "gateway", "mllp", "mappings"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if head:
            where += f" (git {head}{', with uncommitted changes in gateway/ mllp/ mappings/' if dirty else ''})"
    return where


# -- one measurement ---------------------------------------------------------


def measure(connections: int, n: int, args, transport: str = "tcp", encryption: str = "on") -> dict:
    """Start a fresh server, drive it with mllp-load, collect the figures, stop it."""
    with running_server(
        args.server, args.pipeline == "on", args.keep, args.switch_interval, args.config, transport, encryption
    ) as server:
        load_before = os.getloadavg()[0]
        cpu_before = server_cpu(server)
        extra = (["--rate", str(args.rate)] if args.rate else []) + server.load_args()
        load = run_mllp_load(server.port, n, connections, args.max_seconds, extra)
        cpu_after = server_cpu(server)
        stats = server.stats()
        states = state_counts(server.database)
        note = durability_note(server.database)
    answered = load["answered"]
    row = {
        "transport": transport,
        "encryption": encryption,
        "connections": connections,
        "requested": n,
        "answered": answered,
        "ok": load["ok"],
        "not_ok": load["nack"] + load["mismatch"] + load["garbled"],
        "timeouts": load["timeout"] + load["conn_error"],
        "msgs_per_s": load["msgs_per_s"],
        "ack_ms_p50": load["ack_ms_p50"],
        "ack_ms_p95": load["ack_ms_p95"],
        "ack_ms_p99": load["ack_ms_p99"],
        "ack_ms_max": load["ack_ms_max"],
        "elapsed_s": load["elapsed_s"],
        "server_cpu_us_per_msg": _per_msg(cpu_after[0] - cpu_before[0], answered),
        "workers_cpu_us_per_msg": _per_msg(cpu_after[1] - cpu_before[1], answered),
        "client_cpu_us_per_msg": _per_msg(load["client_cpu_s"], answered),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "stopped_at_max_seconds": answered < n and load["elapsed_s"] >= 0.99 * args.max_seconds,
        "commits": stats["commits"] if stats else None,
        "store_jobs": stats["jobs"] if stats else None,
        "still_received": states.get("received", 0),
        "states": states,
        "durability": note,
    }
    return row


def print_table(rows: list[dict], args) -> None:
    pipeline = (
        "ON: the server converts, matches, routes and delivers in the background during the load (realistic)"
        if args.pipeline == "on"
        else "OFF: intake only (instrumented server; intake.on_stored disconnected; messages stay 'received')"
    )
    instrumented = args.server == "instrumented" or args.pipeline == "off" or args.switch_interval is not None
    server = "instrumented (same make_service as herald serve)" if instrumented else "herald serve"
    if args.switch_interval is not None:
        server += f", sys.setswitchinterval({args.switch_interval:g}) [experiment]"
    if args.config is not None:
        server += f", --config {args.config}"
    print(f"server: {server}, fresh data folder per row; pipeline {pipeline}")
    print(code_under_test())
    if rows:
        print(rows[0]["durability"])
    paced = f", paced at {args.rate:g} msgs/s in all" if args.rate else ""
    print(f"client: {MLLP_LOAD.name}, synthetic ADT mix, one message in flight per connection{paced}\n")
    head = (
        f"{'transport':>9} {'conns':>5} {'messages':>9} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'nacks':>6} {'errors':>6} {'commits':>8} {'msgs/commit':>11} {'unconverted':>11} "
        f"{'server us':>9} {'workers us':>10} {'client us':>9} {'load avg':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        commits = r["commits"]
        per = f"{r['answered'] / commits:.2f}" if commits else "n/a"
        print(
            f"{_label(r):>9} {r['connections']:>5} {r['answered']:>9} {r['msgs_per_s']:>9.1f} "
            f"{_ms(r['ack_ms_p50'])} {_ms(r['ack_ms_p99'])} {_ms(r['ack_ms_max'])} {r['not_ok']:>6} {r['timeouts']:>6} "
            f"{commits if commits is not None else 'n/a':>8} {per:>11} {r['still_received']:>11} "
            f"{_us(r['server_cpu_us_per_msg']):>9} {_us(r['workers_cpu_us_per_msg']):>10} "
            f"{_us(r['client_cpu_us_per_msg']):>9} {r['load_average'][0]:>5.2f}-{r['load_average'][1]:<5.2f}"
        )
    print()
    print("msgs/s and latencies are mllp-load's (client side). nacks: AE/AR/CE/CR, mismatched or garbled ACKs;")
    print("errors: ACK timeouts and failed connections. commits: SQLite transactions committed by the store's")
    print("writer thread during the run (all work: intake, ack-sent events, pipeline, delivery), instrumented")
    print("server only. unconverted: messages still 'received' when the load ended (pipeline backlog).")
    print("server us / workers us / client us: CPU microseconds per answered message used during the load by")
    print("the server process, by the processes it started (pipeline workers), and by mllp-load. load avg: the")
    print("machine's 1-minute load average before and after the row (other work on the machine shows here).")
    print("transport: tcp = plain loopback listener; tls = mutual TLS (client certificate, [[senders]] check);")
    print("/plain: encryption at rest off ([security] encrypt_at_rest = false), else on (a throwaway key ring).")
    for r in rows:
        if r["stopped_at_max_seconds"]:
            print(f"note: the c={r['connections']} run stopped at --max-seconds after {r['answered']} messages.")
    print_medians(rows)


def print_medians(rows: list[dict]) -> None:
    """With more than one row per (connections, transport, encryption): the medians side by side, TLS against
    TCP and encryption at rest on against off."""
    import statistics

    groups: dict[tuple[int, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["connections"], r["transport"], r.get("encryption", "on")), []).append(r)
    if len(groups) == len(rows):
        return
    print("\nmedians (alternating rounds, a fresh server each; at rest: encryption at rest on or off):")
    print(
        f"{'conns':>5} {'transport':>9} {'at rest':>7} {'rounds':>6} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'server us':>9}"
    )
    for c in sorted({c for c, _, _ in groups}):
        med = {}
        for t in ("tcp", "tls"):
            for e in ("on", "off"):
                g = groups.get((c, t, e))
                if not g:
                    continue
                m = {
                    k: statistics.median(x[k] for x in g if x[k] is not None)
                    for k in ("msgs_per_s", "ack_ms_p50", "ack_ms_p99")
                }
                cpu = [x["server_cpu_us_per_msg"] for x in g if x["server_cpu_us_per_msg"] is not None]
                m["cpu"] = statistics.median(cpu) if cpu else None
                med[t, e] = m
                print(
                    f"{c:>5} {t:>9} {e:>7} {len(g):>6} {m['msgs_per_s']:>9.1f} {m['ack_ms_p50']:>8.2f} "
                    f"{m['ack_ms_p99']:>8.2f} {_us(m['cpu']):>9}"
                )
        for e in ("on", "off"):
            if ("tcp", e) in med and ("tls", e) in med and med["tcp", e]["msgs_per_s"]:
                ratio = med["tls", e]["msgs_per_s"] / med["tcp", e]["msgs_per_s"]
                print(f"{c:>5} {'tls/tcp':>9} {e:>7} {'':>6} {ratio:>9.2f}")
        for t in ("tcp", "tls"):
            on, off = med.get((t, "on")), med.get((t, "off"))
            if on and off and off["msgs_per_s"]:
                cost = f"{on['cpu'] - off['cpu']:+.0f}" if on["cpu"] is not None and off["cpu"] is not None else "n/a"
                print(
                    f"{c:>5} {t:>9} {'on/off':>7} {'':>6} {on['msgs_per_s'] / off['msgs_per_s']:>9.2f} "
                    f"{'':>8} {'':>8} {cost:>9}"
                )


def _label(row: dict) -> str:
    """The row's transport, marked when encryption at rest was off."""
    return row["transport"] + ("/plain" if row.get("encryption") == "off" else "")


def _us(value) -> str:
    return f"{value:.0f}" if value is not None else "n/a"


def _per_msg(seconds: float, messages: int) -> float | None:
    return round(seconds / messages * 1e6, 1) if messages else None


def _ms(value) -> str:
    return f"{value:>8.2f}" if value is not None else f"{'n/a':>8}"


# -- the instrumented server (run by this script as a child process) -----------


def serve_instrumented(argv: list[str]) -> None:
    """Run Herald as ``herald serve`` does, plus: SIGUSR1 writes the store's counters to a file.

    With ``--no-pipeline`` intake no longer wakes the pipeline, so the ACK
    path is measured alone (the pipeline still starts; it finds nothing).
    """
    ap = argparse.ArgumentParser(prog="ack_throughput.py _serve")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--allow-plain", action="store_true")
    ap.add_argument("--no-pipeline", action="store_true")
    ap.add_argument("--switch-interval", type=float, default=None)
    ap.add_argument("--config", type=Path, default=None)
    opts = ap.parse_args(argv)
    if opts.switch_interval is not None:
        sys.setswitchinterval(opts.switch_interval)

    from twisted.internet import defer, task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from gateway.app.service import make_service
    from gateway.config import load_config

    cfg = load_config(opts.config, data_dir=opts.data, listen=[opts.listen], allow_plain=opts.allow_plain or None)

    def run(reactor):
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
        gw = make_service(cfg, reactor)
        if opts.no_pipeline:
            gw.intake.on_stored = lambda: None

        def dump() -> None:
            # getattr: counters an older or newer revision may not have are reported as null.
            counters = {
                "commits": getattr(gw.store, "commits", None),
                "jobs": getattr(gw.store, "jobs", None),
                "pipeline_processed": getattr(gw.pipeline, "processed", None),
                "delivered": getattr(gw.delivery, "delivered", None),
            }
            tmp = cfg.data_dir / (STATS_FILE + ".tmp")
            tmp.write_text(json.dumps(counters))
            os.replace(tmp, cfg.data_dir / STATS_FILE)

        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dump))
        gw.service.startService()
        if hasattr(gc, "freeze"):
            gc.freeze()  # as `herald serve` does once its service has started
        reactor.addSystemEventTrigger("before", "shutdown", gw.service.stopService)
        return defer.Deferred()  # until SIGTERM

    task.react(run)


# -- command line --------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See bench/README.md for what each figure means.",
    )
    ap.add_argument("-n1", type=int, default=20000, help="messages for the 1-connection run (default 20000)")
    ap.add_argument("-n8", type=int, default=40000, help="messages for the 8-connection run (default 40000)")
    ap.add_argument(
        "--connections",
        type=int,
        nargs="+",
        default=[1, 8],
        help="connection counts to run (default 1 8); counts other than 1 and 8 send -n8 messages",
    )
    ap.add_argument(
        "--max-seconds", type=float, default=120.0, help="bound on each mllp-load run (default 120; always passed)"
    )
    ap.add_argument(
        "--pipeline",
        choices=["on", "off"],
        default="on",
        help="on (default): the server processes messages in the background, as deployed; "
        "off: intake only (implies --server instrumented)",
    )
    ap.add_argument(
        "--server",
        choices=["herald", "instrumented"],
        default="herald",
        help="herald: `herald serve` (default); instrumented: the same service in a child of this script, "
        "which can report SQLite commits",
    )
    ap.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="experiment: set sys.setswitchinterval(S) in the server (implies --server instrumented; "
        "Python's default is 0.005)",
    )
    ap.add_argument(
        "--config", type=Path, default=None, help="a Herald TOML config for the server (default: none, the defaults)"
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="pace mllp-load to this many messages per second in all (default: as fast as ACKs come back); "
        "a rate the pipeline sustains compares ACK latency at equal work",
    )
    ap.add_argument(
        "--transport",
        choices=["tcp", "tls", "both"],
        default="tcp",
        help="tcp (default): plain loopback listener; tls: mutual TLS as deployed; "
        "both: alternate tcp and tls rounds for each connection count",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="rounds per transport and connection count (default 1); medians shown"
    )
    ap.add_argument(
        "--encryption",
        choices=["on", "off", "both"],
        default="on",
        help="encryption at rest: on (default, a throwaway key ring), off (encrypt_at_rest = false), "
        "both: alternate on and off rounds",
    )
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folders (prints their paths)")
    args = ap.parse_args(argv)
    if args.n1 < 1 or args.n8 < 1 or args.rounds < 1 or any(c < 1 for c in args.connections):
        ap.error("message and connection counts must be at least 1")
    if args.max_seconds <= 0:
        ap.error("--max-seconds must be positive")
    if args.config is not None:
        args.config = args.config.resolve()  # the server runs in the repository root
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:
        serve_instrumented(argv[1:])
        return 0
    args = parse_args(argv)
    rows = []
    transports = ["tcp", "tls"] if args.transport == "both" else [args.transport]
    encryptions = ["on", "off"] if args.encryption == "both" else [args.encryption]
    for c in args.connections:
        n = args.n1 if c == 1 else args.n8
        for round_number in range(1, args.rounds + 1):
            for transport in transports:  # alternating, so drift in the machine's speed hits both alike
                for encryption in encryptions:
                    if not args.json:
                        print(
                            f"running c={c}, n={n}, {transport}, at rest {encryption}, round {round_number} ...",
                            file=sys.stderr,
                        )
                    rows.append(measure(c, n, args, transport, encryption) | {"round": round_number})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, args)
    return 0 if all(r["not_ok"] == 0 and r["timeouts"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
