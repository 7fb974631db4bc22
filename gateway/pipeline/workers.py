"""Pipeline work in separate processes.

Conversion and validation are CPU-bound Python; run in the server process they
hold the GIL for up to the interpreter's switch interval (5 ms) at a time and
every ACK waits behind them. So the server hands batches to a pool of worker
processes. Each worker loads the vocabulary once and keeps its own read-only
connection to the database (confirmed MRN links) and to the published roster
file, which it reopens between batches when an import has replaced it; it
does no writes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from gateway.config import Config
from gateway.conversion.vocabulary import load_vocabulary
from gateway.pipeline.process import MatchPolicy, process_message
from gateway.records import MessageOutcome, PendingMessage
from gateway.store import RosterReader, RosterSnapshot, StoredRoster, open_database

_state: dict = {}

#: Scheduling priority of worker processes, below the server's.
WORKER_NICENESS = 10


def _die_with_parent() -> None:
    """On Linux, ask the kernel to end this worker when the server process dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _init(database: str, config: Config) -> None:
    _die_with_parent()
    # Conversion soaks up idle CPU; the server's intake (the ACK path) comes first.
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # pragma: no cover - not permitted
        pass
    _state["database"] = database
    _state["config"] = config
    _state["vocab"] = load_vocabulary()
    _state["recipients"] = {role: config.recipient(role) for role in ("pcp", "care_team", "hie")}
    _state["tz"] = config.tzinfo
    # Import the FHIR models now, not on the first message.
    from fhir.resources.R4B.bundle import Bundle  # noqa: F401


def _connection() -> sqlite3.Connection:
    conn = _state.get("conn")
    if conn is None:
        conn = open_database(_state["database"], readonly=True)
        _state["conn"] = conn
    return conn


def _roster() -> RosterReader:
    reader = _state.get("roster")
    if reader is None:
        reader = RosterReader(_state["database"])
        _state["roster"] = reader
    return reader


def process_batch_here(
    batch: list[PendingMessage], conn: sqlite3.Connection, roster: RosterReader, config: Config, vocab, recipients, tz
) -> list[MessageOutcome]:
    """Process a batch: one roster version throughout (the newest published when it starts) and
    the confirmed MRN links of ``conn`` in one read snapshot."""
    snapshot = roster.current()
    conn.execute("BEGIN")
    try:
        lookups = StoredRoster(snapshot, conn)
        policy = policy_for(snapshot, config)
        return [process_message(p, vocab, tz, lookups, recipients, policy=policy) for p in batch]
    finally:
        conn.execute("COMMIT")


def policy_for(snapshot: RosterSnapshot, config: Config) -> MatchPolicy:
    """The match policy for this roster version (its size sets the thresholds).

    No cache needed here: the snapshot counts its members once a day and
    :meth:`MatchPolicy.from_config` loads each model once per setting.
    """
    return MatchPolicy.from_config(config, snapshot.size())


def process_batch(batch: list[PendingMessage]) -> list[MessageOutcome]:
    """Entry point in a worker process."""
    s = _state
    return process_batch_here(batch, _connection(), _roster(), s["config"], s["vocab"], s["recipients"], s["tz"])


def make_pool(database: Path, config: Config, workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes, started with 'spawn' (the server has threads; fork is unsafe)."""
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(str(database), config))
