"""The pipeline's worker processes: real spawned processes, a real SQLite file, a worker killed on purpose."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.pipeline.workers import BatchContext, WorkerCrashed, WorkerPool
from gateway.records import FAILED, ROUTED, PendingMessage
from gateway.store import Store

SAMPLES = Path(__file__).resolve().parent.parent / "sample_messages"
ADMIT = (SAMPLES / "epic-v251-a04-ed-registration.hl7").read_bytes()


def batch(message_id: int = 1, raw: bytes = ADMIT) -> list[PendingMessage]:
    return [PendingMessage(message_id, raw, "2026-03-01T12:00:00.000+00:00", "")]


@pytest.fixture
def setup(tmp_path):
    """A migrated, empty database and a configuration whose HIE gets a file drop."""
    cfg = load_config(None, data_dir=tmp_path / "data")
    Store(cfg.database, reactor=object())._conn.close()  # creates and migrates the file
    return cfg


def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_context_processes_a_batch_in_this_process(setup):
    """BatchContext opens the database and roster once and turns a batch into outcomes."""
    context = BatchContext(setup.database, setup)
    try:
        (outcome,) = context.process(batch())
        (bad,) = context.process(batch(2, b"MSH|^~\\&|A|B|||20260301||ADT^A04|X|P|2.5.1\rPV1|1|E\r"))
    finally:
        context.close()
    assert outcome.state == ROUTED and [n.recipient_role for n in outcome.notifications] == ["hie"]
    assert bad.state == FAILED and "PID" in bad.reason


def test_a_worker_process_answers_a_batch(setup):
    """A batch handed to the pool is processed in a worker process and its outcomes come back."""
    pool = WorkerPool(setup.database, setup, 1)
    try:
        (outcome,) = pool.submit(batch()).result(timeout=60)
        assert outcome.message_id == 1 and outcome.state == ROUTED
        assert all(pid != os.getpid() for pid in pool.pids)
    finally:
        pool.shutdown()


def test_a_dead_worker_fails_its_batches_and_is_started_again(setup):
    """When a worker dies, the batches in flight fail (to be retried); after a wait, new workers serve the next ones."""
    pool = WorkerPool(setup.database, setup, 1)
    pool.RESTART_MIN_SECONDS = 0.5
    try:
        pool.submit(batch()).result(timeout=60)  # the worker is up
        (pid,) = pool.pids
        os.kill(pid, signal.SIGSTOP)  # it takes no job now: the next batch stays in flight
        in_flight = pool.submit(batch(2))
        with pytest.raises(FutureTimeout):
            in_flight.result(timeout=1)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed):
            in_flight.result(timeout=30)
        wait_for(lambda: pool.restarts == 1)
        assert pool.pids == []  # stopped; they start again with a batch, once the wait is over
        with pytest.raises(WorkerCrashed, match="start again in"):
            pool.submit(batch(3)).result(timeout=1)
        time.sleep(0.6)
        (outcome,) = pool.submit(batch(3)).result(timeout=60)
        assert pool.pids and pool.pids != [pid]
        assert outcome.message_id == 3 and outcome.state == ROUTED
    finally:
        pool.shutdown()


def test_shutdown_stops_every_worker_and_refuses_more_work(setup):
    """shutdown() ends the worker processes; a batch submitted afterwards fails at once."""
    pool = WorkerPool(setup.database, setup, 2)
    pool.submit(batch()).result(timeout=60)
    pids = pool.pids
    pool.shutdown()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(batch()).result(timeout=1)


def test_no_process_starts_before_the_first_batch(setup):
    """An idle gateway spends nothing on workers: they start with the first batch, and an unused pool stops at once."""
    pool = WorkerPool(setup.database, setup, 2)
    assert pool.pids == []
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(batch()).result(timeout=1)


def test_records_cross_to_and_from_workers_whole():
    """The records a worker sends back pickle as their field values and come back equal, every field kept."""
    import pickle

    from gateway.records import DeliveryAttempt, MatchRecord, MessageOutcome, Notification, PatientFacts, PendingMessage

    notification = Notification(
        "n1",
        7,
        "pcp",
        "Dr A",
        "fhir",
        "https://example.org",
        "A03",
        None,
        "pending",
        2,
        None,
        "2026-01-01",
        "d1",
        1,
        "key",
        {"aco": "ACO1"},
        12.5,
        b"MSH|",
    )
    match = MatchRecord("probable", "probabilistic", 9.5, "ACO1", "M1", {"candidates": [1, 2]})
    facts = PatientFacts(mbi="1EG4TE5MK73", mrns=(("123", "HOSP"),), given="Alex", zip="02139", suffix="JR")
    attempt = DeliveryAttempt("n1", 7, 1, "ok", "200", "sent", 0.0, 200, 12)
    outcome = MessageOutcome(7, "routed", match=match, notifications=[notification], patient={"id": "p"})
    for record in (notification, match, facts, attempt, PendingMessage(7, b"MSH|", "t", "UNICODE UTF-8"), outcome):
        assert pickle.loads(pickle.dumps(record)) == record
