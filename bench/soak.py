"""Soak (issue 16): a steady rate for a long time with delivery on; memory, files, latency and backlog over time.

A fresh ``herald serve`` (pipeline on, the HIE as a ``fhir`` recipient at a
local FHIR receiver, PCP and care team off, no roster: one notification a
message; see ``bench/delivery.py``), warmed up with ``--warm-up`` messages
(20, sent and delivered, not counted), takes ``--rate`` messages a second
(default 100) from the yardstick mllp-load (through ``delivery.py``'s
``_load`` wrapper, which notes each ACK's arrival per control id) for
``--seconds`` (default 3600). Every ``--interval`` seconds (default 10) it
samples:

* RSS of the server process and, summed, of the processes it started (the
  pipeline's workers), from ``/proc``; their CPU over the interval;
* the sizes of ``herald.db`` and ``herald.db-wal``;
* ACKs in the interval and their latency (mllp-load's own, p50 and p99);
* notifications delivered in the interval and ACK-to-delivery latency
  (receiver arrival minus the ACK's arrival at the client, p50 and p99);
* backlog: messages still ``received`` (stored, not yet routed) and
  notifications ``pending`` or ``retrying``, ``dead`` (read-only queries).

After the load it keeps sampling until the backlog is gone (bounded by
``--drain-seconds``). It writes ``samples.csv``, ``soak.png`` (matplotlib)
and ``summary.json`` to ``--out`` (default ``bench/results/soak-<time>/``,
which git ignores) and prints the summary. Every process it starts is
stopped by its pid; the data folder (under the system's temporary folder) is
deleted unless ``--keep``.

Run from the repository root::

    .venv/bin/python bench/soak.py                      # one hour at 100 msgs/s
    .venv/bin/python bench/soak.py --seconds 600        # ten minutes
    .venv/bin/python bench/soak.py --seconds 120 --rate 50 --interval 5 --out /tmp/soak-try
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import ROOT, code_under_test, cpu_seconds, descendants, free_port  # noqa: E402
from delivery import (  # noqa: E402
    LineReader,
    Receiver,
    TrackedLoad,
    herald_config,
    machine,
    percentiles,
    read_acks,
    read_arrivals,
    smart_keys,
    start_herald,
    warm_up,
)

_MB = 1024 * 1024
COLUMNS = (
    "t_s",
    "server_rss_mb",
    "workers_rss_mb",
    "workers",
    "server_cpu_pct",
    "workers_cpu_pct",
    "db_mb",
    "wal_mb",
    "acks",
    "ack_ms_p50",
    "ack_ms_p99",
    "delivered",
    "ack_to_delivery_ms_p50",
    "ack_to_delivery_ms_p99",
    "messages_received_not_routed",
    "notifications_pending",
    "notifications_dead",
    "load_average_1m",
)


def rss_mb(pid: int) -> float:
    """Resident set size of a live process in MiB (VmRSS from /proc; 0 when gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def file_mb(path: Path) -> float:
    try:
        return path.stat().st_size / _MB
    except FileNotFoundError:
        return 0.0


def backlog(database: Path) -> tuple[int | None, int | None, int | None]:
    """(messages still received, notifications pending or retrying, dead): short read-only queries on indexes."""
    try:
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None, None, None
    try:
        received = conn.execute("SELECT COUNT(*) FROM messages WHERE state = 'received'").fetchone()[0]
        states = dict(
            conn.execute(
                "SELECT state, COUNT(*) FROM notifications WHERE state IN ('pending', 'retrying', 'dead') "
                "GROUP BY state"
            ).fetchall()
        )
        return received, states.get("pending", 0) + states.get("retrying", 0), states.get("dead", 0)
    except sqlite3.Error:
        return None, None, None
    finally:
        conn.close()


class Matcher:
    """ACK times by control id, and the receiver's arrivals matched to them (an arrival may come before its
    ACK's line is read: it waits for the next sample)."""

    def __init__(self) -> None:
        self.acked: dict[str, float] = {}
        self.delivered: set[str] = set()
        self.waiting: list[tuple[float, str]] = []
        self.duplicates = 0

    def add_acks(self, acks: list[tuple[float, str, str, float]]) -> None:
        for when, cid, verdict, _ in acks:
            if verdict == "ok":
                self.acked[cid] = when

    def match(self, posts: list[tuple[float, str, str]]) -> tuple[int, list[float]]:
        """New deliveries (first arrivals) and the ACK-to-delivery milliseconds of those matched now."""
        fresh = 0
        for when, cid, _ in posts:
            if cid in self.delivered:
                self.duplicates += 1
                continue
            self.delivered.add(cid)
            fresh += 1
            self.waiting.append((when, cid))
        delays, still = [], []
        for when, cid in self.waiting:
            if cid in self.acked:
                delays.append(1000 * (when - self.acked[cid]))
            else:
                still.append((when, cid))
        self.waiting = still
        return fresh, delays


def soak(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-soak-"))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"machine_at_start": machine(), "code": code_under_test(), "started": datetime.now().isoformat()}
    summary["settings"] = {k: getattr(args, k) for k in ("rate", "seconds", "interval", "connections", "smart")}
    receiver = server = load = None
    rows: list[dict] = []
    try:
        smart_key = None
        public = None
        if args.smart:
            smart_key, public = smart_keys(tmp)
        receiver = Receiver(free_port(), tmp / "arrivals.csv", public_key=public)
        receiver.start()
        server = start_herald(tmp / "data", herald_config(tmp, receiver, smart_key, "soak.toml"))
        arrivals_reader = LineReader(receiver.arrivals)
        summary["warm_up"] = {"messages": args.warm_up, "seconds": warm_up(server, arrivals_reader, args.warm_up, tmp)}
        n = int(round(args.rate * args.seconds))
        load = TrackedLoad(server.port, n, args.connections, args.rate, args.seconds + 30, tmp / "acks.csv")
        acks_reader = LineReader(load.log)
        matcher = Matcher()
        all_ack_ms: list[float] = []
        all_delays: list[float] = []
        start = time.monotonic()
        load.start()
        last = start
        cpu_last = (cpu_seconds(server.proc.pid), _workers_cpu(server.proc.pid))
        load_done_at = None
        with open(out / "samples.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            while True:
                time.sleep(max(0.0, last + args.interval - time.monotonic()))
                now = time.monotonic()
                if load_done_at is None and load.done():
                    load_done_at = now
                acks = read_acks(acks_reader.new_lines())
                matcher.add_acks(acks)
                delivered, delays = matcher.match(read_arrivals(arrivals_reader.new_lines())[0])
                ack_ms = [a[3] for a in acks]
                all_ack_ms += ack_ms
                all_delays += delays
                pid = server.proc.pid
                workers = [p for p, _ in descendants(pid)]
                cpu_now = (cpu_seconds(pid), _workers_cpu(pid))
                span = now - last
                received, pending, dead = backlog(server.database)
                a, d = percentiles(ack_ms), percentiles(delays)
                row = {
                    "t_s": round(now - start, 1),
                    "server_rss_mb": round(rss_mb(pid), 1),
                    "workers_rss_mb": round(sum(rss_mb(p) for p in workers), 1),
                    "workers": len(workers),
                    "server_cpu_pct": round(100 * (cpu_now[0] - cpu_last[0]) / span, 1),
                    "workers_cpu_pct": round(100 * (cpu_now[1] - cpu_last[1]) / span, 1),
                    "db_mb": round(file_mb(server.database), 2),
                    "wal_mb": round(file_mb(server.database.with_name("herald.db-wal")), 2),
                    "acks": len(acks),
                    "ack_ms_p50": a["p50"],
                    "ack_ms_p99": a["p99"],
                    "delivered": delivered,
                    "ack_to_delivery_ms_p50": d["p50"],
                    "ack_to_delivery_ms_p99": d["p99"],
                    "messages_received_not_routed": received,
                    "notifications_pending": pending,
                    "notifications_dead": dead,
                    "load_average_1m": round(os.getloadavg()[0], 2),
                }
                writer.writerow(row)
                f.flush()
                rows.append(row)
                if not args.quiet:
                    print(_progress(row), file=sys.stderr, flush=True)
                last, cpu_last = now, cpu_now
                if load_done_at is not None:
                    drained = received == 0 and pending == 0 and not matcher.waiting
                    if drained or now - load_done_at > args.drain_seconds:
                        summary["drained"] = drained
                        break
        result = load.result()
        summary["load"] = result
        summary["acked"] = len(matcher.acked)
        summary["delivered"] = len(matcher.delivered)
        summary["missing"] = len(set(matcher.acked) - matcher.delivered)
        summary["duplicates"] = matcher.duplicates
        summary["ack_ms"] = percentiles(all_ack_ms)
        summary["ack_to_delivery_ms"] = percentiles(all_delays)
        summary["after_drain_s"] = round(last - load_done_at, 1) if load_done_at else None
    finally:
        if load is not None:
            load.stop()
        if server is not None:
            server.stop()
        if receiver is not None:
            receiver.stop()
        if args.keep:
            print(f"soak: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summary["machine_at_end"] = machine()
    summary["samples"] = len(rows)
    if rows:
        first, final = rows[0], rows[-1]
        summary["rss_mb"] = {
            "server_first": first["server_rss_mb"],
            "server_last": final["server_rss_mb"],
            "server_max": max(r["server_rss_mb"] for r in rows),
            "workers_first": first["workers_rss_mb"],
            "workers_last": final["workers_rss_mb"],
            "workers_max": max(r["workers_rss_mb"] for r in rows),
        }
        summary["files_mb"] = {
            "db_last": final["db_mb"],
            "wal_max": max(r["wal_mb"] for r in rows),
            "wal_last": final["wal_mb"],
        }
        summary["backlog_max"] = {
            "messages_received_not_routed": max((r["messages_received_not_routed"] or 0) for r in rows),
            "notifications_pending": max((r["notifications_pending"] or 0) for r in rows),
        }
        summary["load_average_1m"] = [min(r["load_average_1m"] for r in rows), max(r["load_average_1m"] for r in rows)]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if rows:
        plot(rows, out / "soak.png", summary)
    return summary


def _workers_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p, _ in descendants(pid))


def _progress(row: dict) -> str:
    return (
        f"t={row['t_s']:>7.1f}s rss {row['server_rss_mb']:.0f}+{row['workers_rss_mb']:.0f} MB  db {row['db_mb']:.1f} "
        f"wal {row['wal_mb']:.1f} MB  acks {row['acks']} p99 {row['ack_ms_p99']}  delivered {row['delivered']} "
        f"p50 {row['ack_to_delivery_ms_p50']} p99 {row['ack_to_delivery_ms_p99']} ms  backlog "
        f"{row['messages_received_not_routed']}/{row['notifications_pending']}  load {row['load_average_1m']}"
    )


def plot(rows: list[dict], path: Path, summary: dict) -> None:
    """Four panels over time: memory, files, latency (log scale), backlog and rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["t_s"] / 60 for r in rows]
    interval = summary["settings"]["interval"]

    def series(key: str) -> list[float]:
        return [float("nan") if r[key] is None else r[key] for r in rows]

    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    ax = axes[0]
    ax.plot(minutes, series("server_rss_mb"), label="server RSS")
    ax.plot(minutes, series("workers_rss_mb"), label="pipeline workers RSS (sum)")
    ax.set_ylabel("MiB")
    ax.legend(loc="upper left")
    ax.set_ylim(bottom=0)
    ax = axes[1]
    ax.plot(minutes, series("db_mb"), label="herald.db")
    ax.plot(minutes, series("wal_mb"), label="herald.db-wal")
    ax.set_ylabel("MiB")
    ax.legend(loc="upper left")
    ax.set_ylim(bottom=0)
    ax = axes[2]
    ax.plot(minutes, series("ack_ms_p50"), label="ACK p50")
    ax.plot(minutes, series("ack_ms_p99"), label="ACK p99")
    ax.plot(minutes, series("ack_to_delivery_ms_p50"), label="ACK to delivery p50")
    ax.plot(minutes, series("ack_to_delivery_ms_p99"), label="ACK to delivery p99")
    ax.set_yscale("log")
    ax.set_ylabel(f"ms (per {interval:g} s)")
    ax.legend(loc="upper left", fontsize="small")
    ax = axes[3]
    ax.plot(minutes, series("messages_received_not_routed"), label="messages not yet routed")
    ax.plot(minutes, series("notifications_pending"), label="notifications pending/retrying")
    ax.set_ylabel("backlog")
    ax.legend(loc="upper left")
    rate = ax.twinx()
    rate.plot(minutes, [r["acks"] / interval for r in rows], color="grey", alpha=0.5, label="ACKs/s")
    rate.plot(minutes, [r["delivered"] / interval for r in rows], color="black", alpha=0.5, label="delivered/s")
    rate.set_ylabel("per second")
    rate.legend(loc="upper right")
    ax.set_xlabel("minutes")
    s = summary["settings"]
    m = summary["machine_at_start"]
    fig.suptitle(
        f"Herald soak: {s['rate']:g} msgs/s for {s['seconds']:g} s, FHIR delivery "
        f"({'SMART' if s['smart'] else 'no auth'}); {m['cores']} cores; {summary['started'][:16]}",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_summary(summary: dict, out: Path) -> None:
    s, load = summary["settings"], summary.get("load", {})
    print(summary["code"])
    m0, m1 = summary["machine_at_start"], summary["machine_at_end"]
    print(f"machine: {m0['cores']} cores; load average {m0['load_average']} at the start, {m1['load_average']} at end")
    print(
        f"soak: {s['rate']:g} msgs/s for {s['seconds']:g} s (mllp-load -c {s['connections']}), sampled every "
        f"{s['interval']:g} s, FHIR delivery {'with SMART' if s['smart'] else 'without auth'}; "
        f"{summary['samples']} samples"
    )
    if load:
        print(
            f"ACKed {load['ok']} of {load['requested']} ({load['msgs_per_s']} msgs/s); nacks {load['nack']}, "
            f"errors {load['timeout'] + load['conn_error']}"
        )
    for key, label in (("ack_ms", "ACK latency"), ("ack_to_delivery_ms", "ACK to delivery")):
        p = summary.get(key)
        if p and p["p50"] is not None:
            print(
                f"{label}, whole run: p50 {p['p50']:.1f} / p95 {p['p95']:.1f} / p99 {p['p99']:.1f} / "
                f"max {p['max']:.1f} ms"
            )
    if "delivered" in summary:
        print(
            f"delivered {summary['delivered']} of {summary['acked']} ACKed: missing {summary['missing']}, "
            f"duplicates {summary['duplicates']}; backlog drained: {summary.get('drained')}, "
            f"{summary['after_drain_s']} s after the first sample that found the load finished"
        )
    if "rss_mb" in summary:
        r, f = summary["rss_mb"], summary["files_mb"]
        print(
            f"RSS MiB: server {r['server_first']} -> {r['server_last']} (max {r['server_max']}); workers "
            f"{r['workers_first']} -> {r['workers_last']} (max {r['workers_max']})"
        )
        print(f"files MiB: herald.db {f['db_last']} at the end; WAL max {f['wal_max']}, at the end {f['wal_last']}")
        b = summary["backlog_max"]
        print(
            f"backlog max: {b['messages_received_not_routed']} messages not yet routed, "
            f"{b['notifications_pending']} notifications pending; load average (1 min) {summary['load_average_1m']}"
        )
    print(f"written: {out / 'samples.csv'}, {out / 'soak.png'}, {out / 'summary.json'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See bench/README.md, Soak.")
    ap.add_argument("--rate", type=float, default=100.0, help="messages a second (default 100)")
    ap.add_argument("--seconds", type=float, default=3600.0, help="length of the load (default 3600)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--connections", type=int, default=1, help="mllp-load connections (default 1)")
    ap.add_argument("--smart", action="store_true", help="SMART Backend Services auth on the FHIR delivery")
    ap.add_argument(
        "--drain-seconds", type=float, default=300.0, help="bound on sampling after the load, for the backlog (300)"
    )
    ap.add_argument(
        "--warm-up", type=int, default=20, help="messages sent and delivered before the load, not counted (20)"
    )
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/soak-<time>/)")
    ap.add_argument("--quiet", action="store_true", help="no progress line a sample")
    ap.add_argument("--keep", action="store_true", help="keep the data folder (prints its path)")
    args = ap.parse_args(argv)
    if min(args.rate, args.seconds, args.interval, args.drain_seconds) <= 0 or args.connections < 1 or args.warm_up < 0:
        ap.error("--rate, --seconds, --interval, --drain-seconds and --connections must be positive")
    if args.out is None:
        args.out = ROOT / "bench" / "results" / f"soak-{datetime.now():%Y%m%d-%H%M%S}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = soak(args)
    print_summary(summary, args.out)
    return 0 if summary.get("drained") and summary.get("missing") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
