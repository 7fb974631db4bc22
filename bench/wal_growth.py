"""How large SQLite's write-ahead log grows under a long load, and what it is at the end.

Starts a fresh ``herald serve`` (pipeline on, as deployed: it converts,
routes and delivers the messages in the background) and sends it ``-n``
synthetic ADT messages with the shared yardstick ``mllp-load``. While the
load runs, and after it until the pipeline has worked off its backlog, the
size of ``herald.db-wal`` is sampled every 50 ms: the report gives its peak
and its size at the end, beside the database's. Before issue 11 the log grew
without bound under a steady load (readers always overlapping, SQLite's own
checkpoints never reset it); the writer now truncates it once it passes
``[storage] wal_limit_mb``.

Run from the repository root::

    .venv/bin/python bench/wal_growth.py                       # 20,000 messages, 1 connection
    .venv/bin/python bench/wal_growth.py -n 20000 -c 8 --wal-limit-mb 16

Every wait is bounded, the server is stopped by its pid and its folder deleted
(``ack_throughput.running_server``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import code_under_test, run_mllp_load, running_server, state_counts  # noqa: E402

_MB = 1024 * 1024


class Sampler(threading.Thread):
    """Samples a file's size every ``interval`` seconds until stopped; keeps the peak."""

    def __init__(self, path: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.size())
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def measure(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="herald-wal-") as tmp:
        key = Path(tmp) / "herald.key"
        from gateway.store.keys import new_key_file

        new_key_file(key)  # encryption at rest on, as deployed
        config = Path(tmp) / "herald.toml"
        config.write_text(
            "[server]\nallow_plain = true\n"
            f"[storage]\nwal_limit_mb = {args.wal_limit_mb}\n"
            f'[security]\nkey_file = "{key}"\n'
        )
        with running_server("herald", True, args.keep, None, config) as server:
            wal = server.database.with_name("herald.db-wal")
            sampler = Sampler(wal)
            sampler.start()
            started = time.monotonic()
            load = run_mllp_load(server.port, args.n, args.connections, args.max_seconds)
            loaded = time.monotonic() - started
            wal_after_load = sampler.size()
            deadline = time.monotonic() + args.drain_seconds
            while time.monotonic() < deadline and state_counts(server.database).get("received", 0) > 0:
                time.sleep(0.5)
            drained = time.monotonic() - started
            time.sleep(args.idle_seconds)  # the writer idles: it empties the log
            sampler.stop()
            states = state_counts(server.database)
            return {
                "messages": args.n,
                "connections": args.connections,
                "answered": load["answered"],
                "ok": load["ok"],
                "msgs_per_s": load["msgs_per_s"],
                "load_seconds": round(loaded, 1),
                "drained_seconds": round(drained, 1),
                "still_received": states.get("received", 0),
                "states": states,
                "wal_limit_mb": args.wal_limit_mb,
                "wal_peak_mb": round(sampler.peak / _MB, 2),
                "wal_after_load_mb": round(wal_after_load / _MB, 2),
                "wal_end_mb": round(sampler.size() / _MB, 2),
                "db_mb": round(os.stat(server.database).st_size / _MB, 1),
                "samples": sampler.samples,
            }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20000, help="messages to send (default 20000)")
    ap.add_argument("-c", "--connections", type=int, default=1, help="connections (default 1)")
    ap.add_argument("--wal-limit-mb", type=float, default=64.0, help="[storage] wal_limit_mb (default 64)")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="bound on the load (default 600)")
    ap.add_argument("--drain-seconds", type=float, default=600.0, help="bound on waiting for the backlog (600)")
    ap.add_argument("--idle-seconds", type=float, default=3.0, help="idle time sampled after the backlog (3)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    args = ap.parse_args(argv)
    row = measure(args)
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        print(code_under_test())
        print(
            f"{row['answered']} of {row['messages']} messages answered ({row['ok']} accepted) on "
            f"{row['connections']} connection(s), {row['msgs_per_s']:.0f} msgs/s; load {row['load_seconds']} s, "
            f"backlog processed by {row['drained_seconds']} s (still received: {row['still_received']})"
        )
        print(
            f"WAL: peak {row['wal_peak_mb']} MB, {row['wal_after_load_mb']} MB when the load ended, "
            f"{row['wal_end_mb']} MB at the end (limit {row['wal_limit_mb']} MB); database {row['db_mb']} MB"
        )
    return 0 if row["ok"] == row["messages"] else 1


if __name__ == "__main__":
    sys.exit(main())
