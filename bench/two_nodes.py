"""One ``herald serve`` node against two on the same PostgreSQL database, alternating in one run.

What is measured: ``herald serve`` as deployed (the pipeline on: convert,
match, route, deliver; two pipeline workers a node, one a core; plain TCP on
127.0.0.1; encryption at rest on), its store on a PostgreSQL database, one
node or two nodes sharing that database. Each round makes a fresh database
and fresh data folders for each of its two rows:

* ``one``: one node; one ``mllp-load`` sends ``-n`` messages at ``-c 8``;
* ``two``: two nodes, each with its own data folder; two ``mllp-load``
  processes, started together, each send ``n/2`` messages to its node at
  ``-c 4``.

The rows alternate (``one`` first in odd rounds, ``two`` first in even ones),
so drift in the machine's speed falls on both.

Every node has the same configuration file and the same key ring: a
throwaway ring in ``HERALD_KEYS`` in every node's environment (as
``tests/conftest.py`` does), so any node can open what another sealed. Every
recipient role (pcp, care_team, hie) is a file drop in one folder the nodes
share (``[recipients.<role>] directory``), so the files dropped can be
counted in one place; a node's health listener is on a free port
(``[health] listen = "tcp:0:..."``), since two nodes share this machine.

The load: mllp-load's own synthetic ADT messages (A04, A01, A03 in turn,
HL7 v2.5.1, sender LOADGEN|LOADHOSP), every one a distinct patient (a random
eight-digit MRN, name, birth date, sex, address and phone from its
``--seed``), so notifications are not serialised behind one patient. Each
load gets its own ``--seed`` (the two loads of a ``two`` row, and the
warm-up, send different patients) and its own control ids: mllp-load has no
option for their prefix, but makes them from its process id and the time
(``<pid % 100000><time % 100000><index>``), so two loads running at once
never send the same MSH-10 and nothing is taken for a retransmission. The
script checks that: every accepted message must be in the database.

Before each row's load, ``--warm`` messages (200, split over the nodes) go
unmeasured and are waited for until routed and delivered (the pipeline's
workers start and import their libraries at the first message), then the
database is analyzed (``ANALYZE``), as autovacuum does within a minute or so
in service (see ``bench/postgres_ack.py``: without statistics intake's
duplicate check reads every earlier message of the sender).

Printed per row:

* ACK msgs/s: every ACKed (accepting ACK) message of the row's loads over
  the wall time of the slowest load (mllp-load's own elapsed time);
  ACK p50/p99: each load's, ``a / b`` for two loads;
* end to end: from just before the loads are started until the database
  holds no message still ``received`` and no notification ``pending`` or
  ``retrying`` (polled every ``--poll`` seconds, 0.1; a count query on the
  database), and the row's messages routed and delivered a second over that
  time;
* CPU microseconds a message (an accepted one) between those two moments:
  of the Herald nodes (each node's process and every process under it: its
  pipeline workers) and of the PostgreSQL server (the postmaster and every
  process under it, with the CPU of those it reaped: the nodes' backends,
  autovacuum, the WAL writer, the checkpointer and the script's own polling
  connection);
* the transactions the database committed a message over that window
  (``pg_stat_database.xact_commit``, read ``--stats-wait`` seconds after the
  nodes went idle, since PostgreSQL counts them late; the script's own
  polls taken out): how many transactions, each holding Herald's one
  advisory lock, a message took;
* the machine's 1-minute load average before and after the row, and at the
  end the messages by state, the notifications by state, the files dropped,
  the delivery attempts, which node converted how many messages, and any
  error line in the nodes' logs.

The PostgreSQL server: ``HERALD_TEST_POSTGRES`` (a URL to a database on a
server that lets its user create databases), else one started here with
``tests/postgres_server.py`` (Debian's ``postgresql`` package: a temporary
folder, a free 127.0.0.1 port, ``fsync=on``) and stopped at the end. Every
load is bounded (``--max-seconds``), every wait has a deadline (the drain:
``--drain-seconds``), every process started here is stopped by its pid,
every database and folder made here is removed.

Run from the repository root::

    .venv/bin/python bench/two_nodes.py
    .venv/bin/python bench/two_nodes.py -n 2000 --rounds 2
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import MLLP_LOAD, ROOT, Server, code_under_test, descendants, free_port  # noqa: E402
from delivery import machine  # noqa: E402
from postgres_ack import PostgresServer  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

import postgres_server  # noqa: E402  (tests/postgres_server.py: create and drop databases)

from gateway.store.keys import KEYS_ENV  # noqa: E402

ROWS = ("one", "two")
#: Environment variables a node must not inherit from this shell: the store and the validation sample are
#: the config's (the test suite sets the sample to every Bundle).
NOT_INHERITED = ("HERALD_STORE", "HERALD_VALIDATE_SAMPLE")
ROLE_FOLDERS = {"pcp": "pcp", "care_team": "care-team", "hie": "hie"}
ERROR_LINE = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|\berror\b|\bfailed\b|exception", re.IGNORECASE)


# -- CPU -----------------------------------------------------------------------------------


def _cpu_fields(pid: int) -> float:
    """utime + stime + cutime + cstime of a live process, seconds (0.0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    if fields[0] in ("Z", "X"):
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int | None) -> float | None:
    """CPU seconds of ``pid`` and every live process under it, each with the children it reaped.

    A process's own time and its reaped children's (cutime, cstime) together:
    a PostgreSQL backend or autovacuum worker that ended during the window is
    in its postmaster's count. None without a pid.
    """
    if pid is None:
        return None
    return _cpu_fields(pid) + sum(_cpu_fields(p) for p, _ in descendants(pid))


# -- the loads -----------------------------------------------------------------------------


@dataclass
class Load:
    """One mllp-load process, started now, waited for with :meth:`poll` (bounded)."""

    port: int
    n: int
    connections: int
    seed: int
    max_seconds: float
    proc: subprocess.Popen | None = None
    result: dict | None = None
    status: int | None = None
    _out: object = None
    _err: object = None
    deadline: float = 0.0
    started: float = field(default=0.0)

    def start(self) -> Load:
        if not MLLP_LOAD.exists():
            raise SystemExit(f"bench: the yardstick {MLLP_LOAD} is missing")
        cmd = [sys.executable, str(MLLP_LOAD), "--port", str(self.port), "-n", str(self.n)]
        cmd += ["-c", str(self.connections), "--seed", str(self.seed), "--max-seconds", str(self.max_seconds)]
        cmd += ["--json"]
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        # mllp-load stops taking messages at --max-seconds; each in-flight one may wait up to --timeout (10 s).
        self.deadline = time.monotonic() + self.max_seconds + 60
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err)
        return self

    def poll(self) -> bool:
        """Whether it has ended (killed by its pid past its deadline); its result read when it has."""
        if self.result is not None:
            return True
        if self.proc is None:
            return True
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if not pid:
            if time.monotonic() < self.deadline:
                return False
            print(f"bench: mllp-load (pid {self.proc.pid}) outlived its deadline; SIGKILL", file=sys.stderr)
            os.kill(self.proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = self.status = os.waitstatus_to_exitcode(status)
        self._out.seek(0)
        self._err.seek(0)
        lines = [ln for ln in self._out.read().decode(errors="replace").splitlines() if ln.startswith("{")]
        err = self._err.read().decode(errors="replace")
        self._out.close()
        self._err.close()
        if not lines:
            raise RuntimeError(f"mllp-load printed no result (status {self.status}): {err[-1500:]}")
        self.result = json.loads(lines[-1]) | {"client_cpu_s": usage.ru_utime + usage.ru_stime}
        return True

    def kill(self) -> None:
        """Stop it by its pid if it still runs (an exception elsewhere)."""
        if self.proc is not None and self.result is None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def run_loads(loads: list[Load], on_wait=None) -> None:
    """Start every load at once and wait for all (each bounded by its deadline)."""
    try:
        for load in loads:
            load.start()
        while not all([load.poll() for load in loads]):  # a list: poll every one each time
            if on_wait is not None:
                on_wait()
            time.sleep(0.02)
    finally:
        for load in loads:
            load.kill()


# -- the database --------------------------------------------------------------------------


class Watch:
    """The script's own connection to the row's database (autocommit), counting the statements it runs:
    each is a transaction of its own, taken out of the server's commit count."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        self.statements = 0

    def execute(self, sql: str):
        self.statements += 1
        return self.conn.execute(sql)

    def close(self) -> None:
        self.conn.close()


def xact_counts(watch: Watch) -> tuple[int, int]:
    """The database's committed and rolled-back transactions so far (``pg_stat_database``).

    PostgreSQL 15's backends flush their counts to the shared statistics at a
    transaction's end at most once a second, and an idle one after 10 s: read
    ``--stats-wait`` seconds after the nodes went idle.
    """
    commits, rollbacks = watch.execute(
        "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    return int(commits), int(rollbacks)


def progress(conn: Watch) -> dict:
    """Messages stored, still ``received``; notifications, not yet sent (pending or retrying)."""
    stored, received, notifications, unsent = conn.execute(
        "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM messages WHERE state = 'received'), "
        "(SELECT count(*) FROM notifications), "
        "(SELECT count(*) FROM notifications WHERE state IN ('pending', 'retrying'))"
    ).fetchone()
    return {"stored": stored, "received": received, "notifications": notifications, "unsent": unsent}


def drained(p: dict, expected: int) -> bool:
    return p["stored"] >= expected and p["received"] == 0 and p["unsent"] == 0


def wait_drained(conn, expected: int, bound: float, poll: float) -> tuple[bool, float, dict]:
    """Poll until every message expected is stored, routed and delivered; (done, when, last counts)."""
    deadline = time.monotonic() + bound
    while True:
        p = progress(conn)
        now = time.monotonic()
        if drained(p, expected):
            return True, now, p
        if now >= deadline:
            return False, now, p
        time.sleep(poll)


def final_counts(conn) -> dict:
    def by(sql: str) -> dict:
        return {str(k): v for k, v in conn.execute(sql).fetchall()}

    return {
        "messages": by("SELECT state, count(*) FROM messages GROUP BY state ORDER BY state"),
        "notifications": by("SELECT state, count(*) FROM notifications GROUP BY state ORDER BY state"),
        "attempts": by("SELECT outcome, count(*) FROM delivery_attempts GROUP BY outcome ORDER BY outcome"),
        "converted_by": by(
            "SELECT coalesce(claimed_by, '(none)'), count(*) FROM messages WHERE state != 'received' "
            "GROUP BY claimed_by ORDER BY claimed_by"
        ),
        "notifications_sent_twice": conn.execute(
            "SELECT count(*) FROM (SELECT notification_id FROM delivery_attempts WHERE outcome = 'ok' "
            "GROUP BY notification_id HAVING count(*) > 1) AS twice"
        ).fetchone()[0],
    }


# -- one row -------------------------------------------------------------------------------


def node_config(folder: Path, url: str, shared: Path) -> Path:
    """The configuration every node of a row shares."""
    text = f'[storage]\nstore = "{url}"\n\n[health]\nlisten = "tcp:0:interface=127.0.0.1"\n'
    for role, sub in ROLE_FOLDERS.items():
        text += f'\n[recipients.{role}]\ndirectory = "{shared / sub}"\n'
    path = folder / "herald.toml"
    path.write_text(text, encoding="utf-8")
    return path


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def log_errors(nodes: list[Server], limit: int = 8) -> list[str]:
    """Lines of the nodes' logs that look like errors (the first few of each node)."""
    found = []
    for i, node in enumerate(nodes):
        with contextlib.suppress(OSError):
            lines = [ln for ln in node.log_path.read_text(errors="replace").splitlines() if ERROR_LINE.search(ln)]
            found += [f"node {i + 1}: {ln[:300]}" for ln in lines[:limit]]
            if len(lines) > limit:
                found.append(f"node {i + 1}: ... and {len(lines) - limit} more such lines")
    return found


def measure(kind: str, round_number: int, args, pg: PostgresServer, tmp: Path) -> dict:
    """A fresh database, one or two fresh nodes on it, a warm-up, the load, the drain, the figures."""
    count = 1 if kind == "one" else 2
    folder = tmp / f"round-{round_number}-{kind}"
    folder.mkdir()
    shared = folder / "shared-outbox"
    url = postgres_server.create_database(pg.admin_url)
    nodes: list[Server] = []
    watch = None
    try:
        config = node_config(folder, url, shared)
        for i in range(count):  # one after the other: each takes its port before the next looks for a free one
            node = Server("herald", True, folder / f"node-{i + 1}" / "data", free_port(), config=config)
            node.data_dir.mkdir(parents=True)
            nodes.append(node)
            node.start(ready_seconds=60)
        time.sleep(args.settle)
        watch = Watch(url)
        seed = 1000 * round_number + (0 if kind == "one" else 100)
        warmed = 0
        if args.warm:
            warm = [
                Load(n.port, w, 1, seed + 50 + i, args.max_seconds)
                for i, (n, w) in enumerate(zip(nodes, split(args.warm, count), strict=True))
            ]
            run_loads(warm)
            warmed = sum(w.result["ok"] for w in warm)
            done, _, p = wait_drained(watch, warmed, args.drain_seconds, args.poll)
            if not done:
                raise RuntimeError(f"{kind}: the warm-up did not drain within {args.drain_seconds:g} s: {p}")
        if args.analyze:
            watch.execute("ANALYZE")
        time.sleep(args.stats_wait)  # the warm-up's transactions counted before the load's start
        connections = split(args.connections, count)
        loads = [
            Load(n.port, m, c, seed + i, args.max_seconds)
            for i, (n, m, c) in enumerate(zip(nodes, split(args.n, count), connections, strict=True))
        ]
        pids = [n.proc.pid for n in nodes]
        load_before = os.getloadavg()[0]
        herald0 = sum(tree_cpu(p) for p in pids)
        pg0 = tree_cpu(pg.postmaster)
        xact0 = xact_counts(watch)
        statements0 = watch.statements
        t0 = time.monotonic()
        run_loads(loads)
        loads_ended = time.monotonic()
        ok = sum(ld.result["ok"] for ld in loads)
        done, t1, last = wait_drained(watch, warmed + ok, args.drain_seconds, args.poll)
        herald1 = sum(tree_cpu(p) for p in pids)
        pg1 = tree_cpu(pg.postmaster)
        load_after = os.getloadavg()[0]
        polls = watch.statements - statements0
        time.sleep(args.stats_wait)  # the nodes idle: their counts flushed
        xact1 = xact_counts(watch)
        final = final_counts(watch)
        files = sum(1 for p in shared.rglob("*") if p.is_file()) if shared.exists() else 0
        alive = [n.proc.poll() is None for n in nodes]
        errors = log_errors(nodes)
    finally:
        if watch is not None:
            with contextlib.suppress(Exception):
                watch.close()
        statuses = []
        try:
            for node in nodes:  # each stopped even when stopping another failed
                try:
                    status = node.stop()
                except Exception as e:
                    print(f"bench: stopping a node (pid {node.proc.pid}) failed: {e!r}", file=sys.stderr)
                    status = None
                statuses.append(status)
                if status not in (None, 0, -signal.SIGTERM):
                    print(f"bench: a node exited with status {status}; log tail:\n{node.log_tail(8)}", file=sys.stderr)
            postgres_server.drop_database(pg.admin_url, url)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    results = [ld.result for ld in loads]
    answered = sum(r["answered"] for r in results)
    slowest = max(r["elapsed_s"] for r in results)
    e2e = t1 - t0

    def per_msg(seconds: float | None) -> float | None:
        return round(1e6 * seconds / ok) if ok and seconds is not None else None

    return {
        "kind": kind,
        "round": round_number,
        "nodes": count,
        "connections": connections,
        "requested": args.n,
        "answered": answered,
        "ok": ok,
        "not_ok": sum(r["nack"] + r["mismatch"] + r["garbled"] for r in results),
        "timeouts": sum(r["timeout"] + r["conn_error"] for r in results),
        "warmed": warmed,
        "stored": last["stored"] - warmed,
        "ack_msgs_per_s": round(ok / slowest, 1) if slowest else 0.0,
        "load_msgs_per_s": [r["msgs_per_s"] for r in results],
        "load_elapsed_s": [r["elapsed_s"] for r in results],
        "ack_ms_p50": [r["ack_ms_p50"] for r in results],
        "ack_ms_p99": [r["ack_ms_p99"] for r in results],
        "drained": done,
        "e2e_s": round(e2e, 2),
        "drain_after_loads_s": round(t1 - loads_ended, 2),
        "e2e_msgs_per_s": round(ok / e2e, 1) if done and e2e > 0 else None,
        "left": last,
        # The window's transactions but the script's own statements (its polls and the read of the counts).
        "pg_commits_per_msg": round((xact1[0] - xact0[0] - polls - 1) / ok, 2) if ok else None,
        "pg_rollbacks": xact1[1] - xact0[1],
        "herald_cpu_us_per_msg": per_msg(herald1 - herald0),
        "postgres_cpu_us_per_msg": per_msg(pg1 - pg0 if pg0 is not None and pg1 is not None else None),
        "client_cpu_us_per_msg": per_msg(sum(r["client_cpu_s"] for r in results)),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "final": final,
        "files_dropped": files,
        "nodes_alive_at_end": alive,
        "node_exit_status": statuses,
        "log_errors": errors,
    }


# -- the report ----------------------------------------------------------------------------


def medians(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for kind in ROWS:
        group = [r for r in rows if r["kind"] == kind]
        if not group:
            continue
        m = {"rows": len(group)}
        for k in ("ack_msgs_per_s", "e2e_msgs_per_s", "herald_cpu_us_per_msg", "postgres_cpu_us_per_msg"):
            values = [r[k] for r in group if r[k] is not None]
            m[k] = statistics.median(values) if values else None
        out[kind] = m
    return out


def ratios(rows: list[dict]) -> dict:
    m = medians(rows)
    if "one" not in m or "two" not in m:
        return {}

    def ratio(k: str) -> float | None:
        a, b = m["two"][k], m["one"][k]
        return round(a / b, 2) if a is not None and b else None

    return {"ack_msgs_per_s": ratio("ack_msgs_per_s"), "e2e_msgs_per_s": ratio("e2e_msgs_per_s")}


def _pair(values: list) -> str:
    return " / ".join(f"{v:.2f}" if v is not None else "n/a" for v in values)


def _num(value, fmt: str = ".0f") -> str:
    return format(value, fmt) if value is not None else "n/a"


def print_table(rows: list[dict], report: dict) -> None:
    m0, m1 = report["machine"], report["machine_at_end"]
    print(code_under_test())
    print(f"machine: {m0['cores']} cores; load average {m0['load_average']} at the start, {m1['load_average']} at end")
    print(report["postgres"])
    print("nodes: herald serve, pipeline on (default workers), file drops in one shared folder, plain tcp on")
    print("127.0.0.1, encryption at rest on (one throwaway ring in HERALD_KEYS for every node); a fresh database")
    print("and fresh data folders a row. client: mllp-load's synthetic ADT, a distinct patient a message")
    print(report["setup"] + "\n")
    head = (
        f"{'round':>5} {'row':<4} {'conns':>5} {'ok':>5} {'stored':>6} {'ACK/s':>7} {'ACK p50 ms':>13} "
        f"{'ACK p99 ms':>15} {'e2e s':>6} {'e2e/s':>6} {'herald us':>9} {'pg us':>6} {'total us':>8} {'xact/msg':>8} "
        f"{'load avg':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        total = (
            r["herald_cpu_us_per_msg"] + r["postgres_cpu_us_per_msg"]
            if r["herald_cpu_us_per_msg"] is not None and r["postgres_cpu_us_per_msg"] is not None
            else None
        )
        conns = "+".join(str(c) for c in r["connections"])
        e2e = f"{r['e2e_s']:.1f}" + ("" if r["drained"] else "!")
        print(
            f"{r['round']:>5} {r['kind']:<4} {conns:>5} {r['ok']:>5} {r['stored']:>6} {r['ack_msgs_per_s']:>7.1f} "
            f"{_pair(r['ack_ms_p50']):>13} {_pair(r['ack_ms_p99']):>15} {e2e:>6} {_num(r['e2e_msgs_per_s'], '.1f'):>6} "
            f"{_num(r['herald_cpu_us_per_msg']):>9} {_num(r['postgres_cpu_us_per_msg']):>6} {_num(total):>8} "
            f"{_num(r['pg_commits_per_msg'], '.2f'):>8} "
            f"{r['load_average'][0]:>5.2f}-{r['load_average'][1]:<5.2f}"
        )
    print()
    print("ACK/s: accepted ACKs of the row's loads / the slowest load's wall time; p50/p99: each load's.")
    print("e2e s: from the loads' start until no message is 'received' and no notification pending or retrying")
    print("('!': not within --drain-seconds); e2e/s: the row's messages routed and delivered a second.")
    print("herald us / pg us: CPU microseconds an accepted message, over the e2e window, of the Herald nodes")
    print("(with their pipeline workers) and of the PostgreSQL server; total us = the two. xact/msg: transactions")
    print("the database committed over the window (pg_stat_database, the script's own polls taken out) a message.")
    print("\nafter each row:")
    for r in rows:
        f = r["final"]
        print(
            f"  round {r['round']} {r['kind']}: messages {f['messages']}; notifications {f['notifications']}; "
            f"files dropped {r['files_dropped']}; delivery attempts {f['attempts']}; notifications sent more "
            f"than once {f['notifications_sent_twice']}; converted by {list(f['converted_by'].values())}; "
            f"nacks {r['not_ok']}, errors {r['timeouts']}; drain after the loads {r['drain_after_loads_s']} s; "
            f"rolled back transactions {r['pg_rollbacks']}"
        )
        if not r["drained"]:
            print(f"    NOT DRAINED within --drain-seconds: {r['left']}")
        for line in r["log_errors"]:
            print(f"    log: {line}")
    med = medians(rows)
    print("\nmedians:")
    for kind, m in med.items():
        print(
            f"  {kind}: {m['rows']} rows, ACK {_num(m['ack_msgs_per_s'], '.1f')} msgs/s, end to end "
            f"{_num(m['e2e_msgs_per_s'], '.1f')} msgs/s, herald {_num(m['herald_cpu_us_per_msg'])} us, "
            f"pg {_num(m['postgres_cpu_us_per_msg'])} us a message"
        )
    rt = report["ratios"]
    if rt:
        print(
            f"two / one: ACK msgs/s {_num(rt['ack_msgs_per_s'], '.2f')}, "
            f"end-to-end msgs/s {_num(rt['e2e_msgs_per_s'], '.2f')}"
        )


# -- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See bench/README.md, One node against two."
    )
    ap.add_argument("-n", type=int, default=2000, help="messages a row, split over its nodes (default 2000)")
    ap.add_argument(
        "--connections", type=int, default=8, help="connections a row, split over its nodes (default 8: 8, or 4 + 4)"
    )
    ap.add_argument("--rounds", type=int, default=2, help="rounds of one and two, alternating (default 2)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="bound on each load (default 120)")
    ap.add_argument(
        "--drain-seconds", type=float, default=300.0, help="bound on the wait for routing and delivery (default 300)"
    )
    ap.add_argument("--poll", type=float, default=0.1, help="seconds between the database polls (default 0.1)")
    ap.add_argument(
        "--stats-wait",
        type=float,
        default=11.0,
        help="seconds idle before each read of pg_stat_database's transaction counts (default 11: PostgreSQL 15 "
        "flushes an idle backend's counts after 10 s)",
    )
    ap.add_argument("--settle", type=float, default=2.0, help="seconds the nodes idle after starting (default 2)")
    ap.add_argument(
        "--warm", type=int, default=200, help="messages before the load, not measured, drained (default 200)"
    )
    ap.add_argument(
        "--analyze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ANALYZE the database after the warm-up, as autovacuum would in service (default)",
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if min(args.n, args.rounds) < 1 or args.connections < 2 or args.n < 2:
        ap.error("-n must be at least 2, --connections at least 2 (one a node), --rounds at least 1")
    if min(args.max_seconds, args.drain_seconds, args.poll) <= 0 or min(args.settle, args.warm, args.stats_wait) < 0:
        ap.error(
            "--max-seconds, --drain-seconds and --poll must be positive, --settle, --warm and --stats-wait not negative"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # One key ring for every node, in the environment they inherit (as tests/conftest.py does).
    os.environ[KEYS_ENV] = f"bench {base64.b64encode(os.urandom(32)).decode('ascii')}"
    for name in NOT_INHERITED:
        os.environ.pop(name, None)
    report: dict = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    analyzed = "then ANALYZEd" if args.analyze else "never analyzed (--no-analyze)"
    report["setup"] = (
        f"n={args.n} a row, {args.connections} connections a row; before each load {args.warm} messages, "
        f"not measured, routed and delivered, the database {analyzed}"
    )
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-two-nodes-"))
    try:
        with PostgresServer() as pg:
            report["postgres"] = pg.settings()
            for round_number in range(1, args.rounds + 1):
                order = ROWS if round_number % 2 else ROWS[::-1]
                for kind in order:
                    print(
                        f"two_nodes: round {round_number}, {kind}, n={args.n}, load average "
                        f"{os.getloadavg()[0]:.2f} ...",
                        file=sys.stderr,
                    )
                    rows.append(measure(kind, round_number, args, pg, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["machine_at_end"] = machine()
    report["ratios"] = ratios(rows)
    report["rows"] = rows
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(rows, report)
    good = all(
        r["not_ok"] == 0
        and r["timeouts"] == 0
        and r["drained"]
        and r["stored"] >= r["ok"]
        and all(r["nodes_alive_at_end"])
        for r in rows
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
