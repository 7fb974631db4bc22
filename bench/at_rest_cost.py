"""What sealing PHI at rest costs per message, measured inside the store's jobs, on against off.

The end-to-end figures (``ack_throughput.py --encryption both``,
``pipeline_throughput.py --encryption both``) carry the whole server and the
machine's noise; this isolates the work encryption adds, in this process, on
real SQLite files: the same jobs on a database whose connection seals with a
throwaway key ring (``on``) and on one with encryption at rest off (``off``),
alternating in chunks, the CPU time of each chunk (``time.process_time``)
kept, the medians compared.

* ``intake``: ``record_frame`` (what the writer runs for one frame before the
  commit that lets the ACK go): the keyed digest, the message's id read under
  the write lock, the body sealed, the row and its ``received`` event.
* ``pipeline store``: ``pending_messages`` (each body opened) and
  ``apply_outcomes`` (each Bundle sealed, the match, the outbox rows), per
  message.
* ``roster lookups``: ``match_patient`` (what ``process_message`` asks of the
  roster) over a sealed roster against a plain one: each identifier, blocking
  key and term hashed, each candidate opened. The conversion around it is the
  same either way and is not timed.

Commits are not timed (rolled back): their fsync is the same either way.

Run from the repository root::

    .venv/bin/python bench/at_rest_cost.py
    .venv/bin/python bench/at_rest_cost.py -n 2000 --rounds 7 --roster 10000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import code_under_test  # noqa: E402
from pipeline_throughput import BATCH, bench_keys, make_messages, make_roster  # noqa: E402

from gateway.app.roster import import_members  # noqa: E402
from gateway.config import Config, default_recipients  # noqa: E402
from gateway.conversion.convert import convert  # noqa: E402
from gateway.conversion.v2 import V2Message  # noqa: E402
from gateway.conversion.vocabulary import load_vocabulary  # noqa: E402
from gateway.header import read_header  # noqa: E402
from gateway.matching import match_patient, query_from_facts  # noqa: E402
from gateway.pipeline.process import MatchPolicy, process_message  # noqa: E402
from gateway.records import RECEIVED, IntakeRecord  # noqa: E402
from gateway.store import Store, StoredRoster, open_roster_snapshot  # noqa: E402
from gateway.store.messages import apply_outcomes, pending_messages, record_frame  # noqa: E402

NOW = "2026-11-20T12:00:00.000+00:00"


def intake_record(raw: bytes) -> IntakeRecord:
    h = read_header(raw)
    return IntakeRecord(
        raw,
        "127.0.0.1:50000",
        RECEIVED,
        "CA",
        h.sending_application,
        h.sending_facility,
        h.message_type,
        h.trigger_event,
        h.control_id,
        h.version,
        h.processing_id,
        h.accept_ack_type,
        h.application_ack_type,
        h.charset,
    )


class Side:
    """One data folder (roster imported, a store's connection) sealed with ``encryption`` on or off."""

    def __init__(self, folder: Path, encryption: str, roster) -> None:
        folder.mkdir(parents=True)
        self.encryption = encryption
        self.keys = bench_keys(folder, encryption)
        self.db = folder / "herald.db"
        import_members(self.db, roster, "bench-roster.csv", keys=self.keys)
        self.store = Store(self.db, reactor=object(), keys=self.keys)  # never started: its SQL only
        self.conn = self.store._conn
        self.snapshot = open_roster_snapshot(self.db, self.keys)

    def queries(self, pending, vocab) -> list:
        """(query, encounter date) of each message, converted once."""
        if not hasattr(self, "_queries"):
            self._queries = []
            for p in pending:
                conversion = convert(V2Message(p.raw, p.charset), vocab, UTC, datetime.fromisoformat(p.received_at))
                self._queries.append((query_from_facts(conversion.patient), conversion.encounter_date))
        return self._queries

    def close(self) -> None:
        self.snapshot.close()
        self.conn.close()


def timed(conn, fn, *args) -> tuple[float, object]:
    """CPU seconds of ``fn(*args)`` inside a transaction that is then rolled back (no commit, no fsync)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        started = time.process_time()
        result = fn(*args)
        return time.process_time() - started, result
    finally:
        conn.execute("ROLLBACK")


def _record_all(conn, records) -> None:
    for r in records:
        record_frame(conn, r, NOW)


def _apply_all(conn, outcomes) -> None:
    for i in range(0, len(outcomes), BATCH):
        apply_outcomes(conn, outcomes[i : i + BATCH], NOW, 0.0)


def measure_side(side: Side, records, match_n: int, context) -> dict[str, float]:
    """One round on one side: CPU microseconds per message of each stage."""
    vocab, policy, recipients = context
    conn = side.conn
    out = {}
    seconds, _ = timed(conn, _record_all, conn, records)
    out["intake: record_frame"] = 1e6 * seconds / len(records)
    seconds, pending = timed(conn, pending_messages, conn, 0, len(records))
    out["pipeline: pending_messages"] = 1e6 * seconds / len(pending)
    lookups = StoredRoster(side.snapshot, conn)
    queries = side.queries(pending[:match_n], vocab)
    conn.execute("BEGIN")
    try:
        started = time.process_time()
        for query, encounter_date in queries:
            match_patient(query, encounter_date, lookups, policy.model)
        out["roster lookups: match_patient"] = 1e6 * (time.process_time() - started) / len(queries)
        outcomes = [process_message(p, vocab, UTC, lookups, recipients, policy=policy) for p in pending[:match_n]]
    finally:
        conn.execute("COMMIT")
    seconds, _ = timed(conn, _apply_all, conn, outcomes)
    out["pipeline: apply_outcomes"] = 1e6 * seconds / len(outcomes)
    return out


def run(args) -> dict[str, dict[str, list[float]]]:
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-at-rest-"))
    try:
        roster = make_roster(args.roster)
        raws, _ = make_messages(args.n, roster, 0.6)
        records = [intake_record(raw) for raw in raws]
        sides = {e: Side(tmp / e, e, roster) for e in ("on", "off")}
        context = (
            load_vocabulary(),
            MatchPolicy.from_config(Config(), roster_size=len(roster)),
            default_recipients(tmp),
        )
        # The messages stored once on each side (committed), for the pipeline's store jobs to work on.
        for side in sides.values():
            side.conn.execute("BEGIN IMMEDIATE")
            _record_all(side.conn, records)
            side.conn.execute("COMMIT")
        per_message: dict[str, dict[str, list[float]]] = {}
        for _ in range(args.rounds):
            for encryption, side in sides.items():  # alternating, so drift in the machine hits both alike
                for stage, us in measure_side(side, records, args.match_n, context).items():
                    per_message.setdefault(stage, {}).setdefault(encryption, []).append(us)
        for side in sides.values():
            side.close()
        return per_message
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="messages (default 1000)")
    ap.add_argument("--match-n", type=int, default=300, help="messages run through process_message (default 300)")
    ap.add_argument("--roster", type=int, default=10_000, help="roster members (default 10000)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds, medians kept (default 5)")
    args = ap.parse_args(argv)
    started = datetime.now(UTC)
    figures = run(args)
    print(code_under_test())
    print(
        f"{args.n} synthetic ADT messages ({args.match_n} through process_message), roster of {args.roster}, "
        f"{args.rounds} alternating rounds; CPU microseconds per message, medians ({started:%Y-%m-%d})"
    )
    print(f"{'stage':<36} {'on':>9} {'off':>9} {'on - off':>9}")
    total = 0.0
    for stage, by in figures.items():
        on, off = statistics.median(by["on"]), statistics.median(by["off"])
        if not stage.startswith("roster"):
            total += on - off
        print(f"{stage:<36} {on:>9.1f} {off:>9.1f} {on - off:>+9.1f}")
    print(f"{'store jobs, in all (intake + pipeline)':<36} {'':>9} {'':>9} {total:>+9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
