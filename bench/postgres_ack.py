"""ACK throughput of ``herald serve`` with its store on SQLite against PostgreSQL, alternating in one run.

What is measured: intake alone (``[pipeline] enabled = false``, as
``peers.py``'s ``herald-intake``: store and ACK, nothing converted), over a
plain loopback listener, encryption at rest on (a throwaway key ring), driven
by the shared yardstick ``mllp-load`` (``../shared/tools/mllp-load``, one
message in flight a connection) at ``-c 1`` and ``-c 8``. Each row is a fresh
``herald serve`` and a fresh store:

* ``sqlite``: ``<data_dir>/herald.db`` (the default: WAL, ``synchronous=FULL``);
* ``postgresql``: ``[storage] store = "postgresql://..."``, a new database on
  a PostgreSQL server on this machine (Herald sets ``synchronous_commit = on``;
  the server has ``fsync = on`` and no standby).

Before each load ``--warm`` messages (200) go unmeasured, and the
PostgreSQL database is then analyzed (``ANALYZE``), as autovacuum does
within a minute or so in service: a database with no statistics plans
intake's duplicate check badly (see :func:`analyze`); ``--no-analyze``
measures that first minute.

The two alternate (``--rounds`` rounds, the order swapped each round), so
drift in the machine's speed falls on both. Printed per row: msgs/s, ACK
p50/p99 (mllp-load's), the CPU microseconds a message of the Herald process
and of the PostgreSQL server (the postmaster and every process under it:
the node's backends, the WAL writer, the checkpointer), and the messages the
store holds afterwards; then the medians and PostgreSQL over SQLite.

The PostgreSQL server: ``HERALD_TEST_POSTGRES`` (a URL to a database on a
server that lets its user create databases, as ``.ci/run`` sets), else one
started here with ``tests/postgres_server.py`` (Debian's ``postgresql``
package) in a temporary folder on a free 127.0.0.1 port, and stopped at the
end. Every load is bounded (``--max-seconds``), every wait has a deadline,
every process started here is stopped by its pid, every database and folder
made here is removed.

Run from the repository root::

    .venv/bin/python bench/postgres_ack.py
    .venv/bin/python bench/postgres_ack.py -n1 3000 -n8 3000 --rounds 2
    .venv/bin/python bench/postgres_ack.py --no-analyze --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import (  # noqa: E402
    ROOT,
    code_under_test,
    cpu_seconds,
    descendants,
    running_server,
    state_counts,
)
from delivery import machine  # noqa: E402
from peers import run_yardstick  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

import postgres_server  # noqa: E402  (tests/postgres_server.py: start, stop, create and drop databases)

from gateway.store.postgres import PostgresDatabase, redacted  # noqa: E402

BACKENDS = ("sqlite", "postgresql")


# -- the PostgreSQL server -----------------------------------------------------------------


class PostgresServer:
    """The server the PostgreSQL rows use: ``HERALD_TEST_POSTGRES``'s, or one started (and stopped) here."""

    def __init__(self) -> None:
        self.admin_url = os.environ.get(postgres_server.URL_ENV, "")
        self.folder: Path | None = None
        self.postmaster: int | None = None  # the server's pid, when it can be found (for its CPU)
        self.started_here = False

    def __enter__(self) -> PostgresServer:
        if not self.admin_url:
            if postgres_server.binaries() is None:
                raise SystemExit(
                    f"bench: PostgreSQL is not installed (apt-get install postgresql, or set {postgres_server.URL_ENV})"
                )
            self.folder = Path(tempfile.mkdtemp(prefix="herald-bench-pg-"))
            try:
                self.admin_url = postgres_server.start(self.folder)  # pg_ctl -w -t 60: bounded
            except BaseException:
                self._stop()
                raise
            self.started_here = True
        self.postmaster = self._find_postmaster()
        return self

    def __exit__(self, *exc) -> None:
        if self.started_here:
            self._stop()

    def _find_postmaster(self) -> int | None:
        """The postmaster's pid, from its data directory's ``postmaster.pid`` (None when it cannot be read)."""
        import psycopg

        with contextlib.suppress(Exception):
            with contextlib.closing(psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10)) as conn:
                data = conn.execute("SHOW data_directory").fetchone()[0]
            return int((Path(data) / "postmaster.pid").read_text().split()[0])
        return None

    def settings(self) -> str:
        """The settings that decide what a commit waits for."""
        import psycopg

        names = ("server_version", "fsync", "wal_sync_method", "synchronous_standby_names", "shared_buffers")
        with contextlib.closing(psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10)) as conn:
            values = {n: conn.execute(f"SHOW {n}").fetchone()[0] for n in names}
        standby = values["synchronous_standby_names"] or "none"
        return (
            f"PostgreSQL {values['server_version']} at {redacted(self.admin_url)}"
            f"{' (started here)' if self.started_here else ''}: fsync={values['fsync']}, "
            f"wal_sync_method={values['wal_sync_method']}, synchronous standby {standby}, "
            f"shared_buffers={values['shared_buffers']}; Herald's sessions: synchronous_commit=on"
        )

    def cpu(self) -> float | None:
        """CPU seconds so far of the postmaster and every process under it (None without its pid)."""
        if self.postmaster is None:
            return None
        return cpu_seconds(self.postmaster) + sum(cpu_seconds(pid) for pid, _ in descendants(self.postmaster))

    def _stop(self) -> None:
        """``pg_ctl stop -m fast`` (it signals the postmaster by the pid in its data folder); then, by that pid,
        an immediate shutdown (SIGQUIT) if it still runs; the folder removed."""
        if self.folder is None:
            return
        pid = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        postgres_server.stop(self.folder)  # removes the folder too
        if pid is not None and _alive(pid):
            print(f"bench: the PostgreSQL server (pid {pid}) outlived pg_ctl stop; SIGQUIT", file=sys.stderr)
            os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no one has reaped yet does not: a container's init may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# -- one row -------------------------------------------------------------------------------


def measure(backend: str, connections: int, n: int, args, pg: PostgresServer, tmp: Path) -> dict:
    """A fresh ``herald serve`` (intake only) on a fresh store, one load, the figures."""
    url = postgres_server.create_database(pg.admin_url) if backend == "postgresql" else None
    try:
        text = "[pipeline]\nenabled = false\n"
        if url is not None:
            text += f'\n[storage]\nstore = "{url}"\n'
        config = tmp / f"{backend}.toml"
        config.write_text(text, encoding="utf-8")
        with running_server("herald", True, config=config) as server:
            time.sleep(args.settle)  # its start-up (migrations, the key check) is not in the figures
            warmed = 0
            if args.warm:  # not measured: the store is not empty, as in service
                warmed = run_yardstick(server.port, args.warm, 1, 0.0, args.max_seconds)["ok"]
            if url is not None and args.analyze:
                analyze(url)
            pid = server.proc.pid
            load_before = os.getloadavg()[0]
            herald0 = cpu_seconds(pid) + sum(cpu_seconds(p) for p, _ in descendants(pid))
            pg0 = pg.cpu()
            result = run_yardstick(server.port, n, connections, 0.0, args.max_seconds)
            herald1 = cpu_seconds(pid) + sum(cpu_seconds(p) for p, _ in descendants(pid))
            pg1 = pg.cpu()
            store = PostgresDatabase(url, server.data_dir) if url is not None else server.database
            stored = sum(state_counts(store).values()) - warmed
    finally:
        if url is not None:
            postgres_server.drop_database(pg.admin_url, url)
    answered = result["answered"]

    def per_msg(seconds: float | None) -> float | None:
        return round(1e6 * seconds / answered) if answered and seconds is not None else None

    return {
        "backend": backend,
        "connections": connections,
        "requested": n,
        "answered": answered,
        "ok": result["ok"],
        "errors": n - result["ok"],
        "stored": stored,
        "msgs_per_s": result["msgs_per_s"],
        "ack_ms_p50": result["ack_ms_p50"],
        "ack_ms_p99": result["ack_ms_p99"],
        "ack_ms_max": result["ack_ms_max"],
        "herald_cpu_us_per_msg": per_msg(herald1 - herald0),
        # SQLite's work is in Herald's process; PostgreSQL's server is idle but for this node.
        "postgres_cpu_us_per_msg": per_msg(pg1 - pg0 if pg0 is not None and pg1 is not None else None),
        "client_cpu_us_per_msg": per_msg(result["client_cpu_s"]),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def analyze(url: str) -> None:
    """``ANALYZE`` the run's database, as autovacuum does within a minute or so in service.

    A new database has no statistics: PostgreSQL then plans intake's duplicate
    check (sender and MSH-10) on the index of sender and receipt time and reads
    every earlier message of the sender, so each message costs more than the
    last until autovacuum first analyzes the table. ``--no-analyze`` measures that.
    """
    import psycopg

    with contextlib.closing(psycopg.connect(url, autocommit=True, connect_timeout=10)) as conn:
        conn.execute("ANALYZE")


# -- the report ----------------------------------------------------------------------------


def print_table(rows: list[dict], report: dict) -> None:
    m0, m1 = report["machine"], report["machine_at_end"]
    print(code_under_test())
    print(f"machine: {m0['cores']} cores; load average {m0['load_average']} at the start, {m1['load_average']} at end")
    print(report["postgres"])
    print("server: herald serve, [pipeline] enabled = false (intake only), plain tcp on 127.0.0.1, encryption")
    print("at rest on; a fresh server and store a row. client: mllp-load, one message in flight a connection")
    print(report["setup"] + "\n")
    head = (
        f"{'round':>5} {'backend':<10} {'conns':>5} {'ok':>6} {'of':>6} {'stored':>6} {'msgs/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'herald us':>9} {'pg us':>6} {'total us':>8} {'client us':>9} {'load avg':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['round']:>5} {r['backend']:<10} {r['connections']:>5} {r['ok']:>6} {r['requested']:>6} "
            f"{r['stored']:>6} {r['msgs_per_s']:>8.1f} {_ms(r['ack_ms_p50'])} {_ms(r['ack_ms_p99'])} "
            f"{_us(r['herald_cpu_us_per_msg']):>9} {_us(_pg_us(r)):>6} {_us(_total_us(r)):>8} "
            f"{_us(r['client_cpu_us_per_msg']):>9} {r['load_average'][0]:>5.2f}-{r['load_average'][1]:<5.2f}"
        )
    print()
    print("herald us / pg us / client us: CPU microseconds a message of the Herald process, of the PostgreSQL")
    print("server's processes (postgresql rows only; SQLite works inside Herald's process) and of mllp-load;")
    print("total us = herald us + pg us. stored: messages of the load in the store afterwards (each ok ACK's).")
    print("load avg: the machine's 1-minute load average before and after the row.")
    print("\nmedians:")
    print(f"{'conns':>5} {'backend':<10} {'rows':>4} {'msgs/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'total us':>8}")
    for c, backend, m in medians(rows):
        print(
            f"{c:>5} {backend:<10} {m['rows']:>4} {m['msgs_per_s']:>8.1f} {_ms(m['ack_ms_p50'])} "
            f"{_ms(m['ack_ms_p99'])} {_us(m['total_us']):>8}"
        )
    for c, ratio in report["ratios"].items():
        print(f"c={c}: postgresql / sqlite msgs/s = {ratio}")


def medians(rows: list[dict]) -> list[tuple[int, str, dict]]:
    out = []
    for c in sorted({r["connections"] for r in rows}):
        for backend in BACKENDS:
            group = [r for r in rows if r["connections"] == c and r["backend"] == backend]
            if not group:
                continue
            m = {k: statistics.median(r[k] for r in group) for k in ("msgs_per_s", "ack_ms_p50", "ack_ms_p99")}
            totals = [t for r in group if (t := _total_us(r)) is not None]
            m["total_us"] = statistics.median(totals) if totals else None
            m["rows"] = len(group)
            out.append((c, backend, m))
    return out


def ratios(rows: list[dict]) -> dict:
    by = {(c, b): m for c, b, m in medians(rows)}
    return {
        c: round(by[c, "postgresql"]["msgs_per_s"] / by[c, "sqlite"]["msgs_per_s"], 2)
        for c in sorted({r["connections"] for r in rows})
        if (c, "postgresql") in by and (c, "sqlite") in by and by[c, "sqlite"]["msgs_per_s"]
    }


def _pg_us(row: dict) -> float | None:
    return row["postgres_cpu_us_per_msg"] if row["backend"] == "postgresql" else None


def _total_us(row: dict) -> float | None:
    if row["herald_cpu_us_per_msg"] is None:
        return None
    if row["backend"] == "sqlite":
        return row["herald_cpu_us_per_msg"]
    pg = row["postgres_cpu_us_per_msg"]
    return None if pg is None else row["herald_cpu_us_per_msg"] + pg


def _ms(value) -> str:
    return f"{value:>7.2f}" if value is not None else f"{'n/a':>7}"


def _us(value) -> str:
    return f"{value:.0f}" if value is not None else "n/a"


# -- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See bench/README.md, SQLite against PostgreSQL."
    )
    ap.add_argument("-n1", type=int, default=3000, help="messages a row at -c 1 (default 3000)")
    ap.add_argument("-n8", type=int, default=3000, help="messages a row at -c 8 (default 3000)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of sqlite and postgresql, alternating (default 2)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="bound on each load (default 60)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds a server idles before its load (default 2)")
    ap.add_argument(
        "--warm", type=int, default=200, help="messages sent before the load, not measured (default 200; 0: none)"
    )
    ap.add_argument(
        "--analyze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ANALYZE the PostgreSQL database after the warm-up, as autovacuum would in service (default); "
        "--no-analyze: a new database's first minute",
    )
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    if min(args.n1, args.n8, args.rounds) < 1 or args.max_seconds <= 0 or min(args.settle, args.warm) < 0:
        ap.error("message counts, --rounds and --max-seconds must be positive, --settle and --warm not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict = {"machine": machine()}
    analyzed = "then ANALYZEd (as autovacuum does in service)" if args.analyze else "never analyzed (--no-analyze)"
    report["setup"] = f"before each load: {args.warm} messages, not measured; the PostgreSQL database {analyzed}"
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-postgres-ack-"))
    try:
        with PostgresServer() as pg:
            report["postgres"] = pg.settings()
            for round_number in range(1, args.rounds + 1):
                # Swapped each round: neither backend always runs first after the other's row.
                order = BACKENDS if round_number % 2 else BACKENDS[::-1]
                for c, n in ((1, args.n1), (8, args.n8)):
                    for backend in order:
                        print(f"postgres_ack: round {round_number}, {backend}, c={c}, n={n} ...", file=sys.stderr)
                        rows.append(measure(backend, c, n, args, pg, tmp) | {"round": round_number})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["machine_at_end"] = machine()
    report["ratios"] = ratios(rows)
    report["rows"] = rows
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(rows, report)
    return 0 if all(r["errors"] == 0 and r["stored"] >= r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
