"""Fixtures shared by several test modules."""

from __future__ import annotations

import base64
import itertools
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.app.roster import import_roster_file
from gateway.config import VALIDATE_SAMPLE_ENV, load_config
from gateway.conversion.vocabulary import Vocabulary, load_vocabulary
from gateway.intake.ack import AckBuilder
from gateway.pipeline.process import MatchPolicy
from gateway.store import StoredRoster, open_roster_snapshot
from gateway.store.keys import KEYS_ENV

# Every Herald the tests start, in this process or as a subprocess (which inherits the
# environment), seals PHI at rest with this throwaway key ring, as a deployed Herald does:
# encrypt_at_rest is on by default and a gateway without a key refuses to start.
os.environ[KEYS_ENV] = f"test {base64.b64encode(os.urandom(32)).decode('ascii')}"
# The pipeline validates a sample of Bundles in production; under test, every one.
os.environ[VALIDATE_SAMPLE_ENV] = "1"

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_messages"
#: Herald's CLI as a separate process, the way an operator runs it.
HERALD = [sys.executable, "-m", "gateway.app.cli"]

#: The moment every pinned ACK is stamped with (MSH-7 ``20260301120000+0000``).
ACK_TIME = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def pinned_acks() -> AckBuilder:
    """An AckBuilder with a fixed clock and control ids ACK0001, ACK0002, ... so ACKs compare byte for byte."""
    counter = itertools.count(1)
    return AckBuilder("HERALD", "HIE", clock=lambda: ACK_TIME, next_control_id=lambda: f"ACK{next(counter):04d}")


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    """Herald's mapping tables (mappings/), loaded once per test module."""
    return load_vocabulary()


@pytest.fixture(scope="session")
def sample_roster(tmp_path_factory) -> StoredRoster:
    """The sample roster imported into a real SQLite store, read through the production lookups."""
    db = tmp_path_factory.mktemp("sample-roster") / "herald.db"
    import_roster_file(db, SAMPLES / "roster.csv", by="tests")
    roster = open_roster_snapshot(db)
    yield StoredRoster(roster)
    roster.close()


@pytest.fixture(scope="session")
def sample_policy(tmp_path_factory) -> MatchPolicy:
    """The default match policy for the sample roster's size (as the pipeline workers load it)."""
    db = tmp_path_factory.mktemp("sample-roster-size") / "herald.db"
    import_roster_file(db, SAMPLES / "roster.csv", by="tests")
    roster = open_roster_snapshot(db)
    try:
        return MatchPolicy.from_config(load_config(None), roster.size())
    finally:
        roster.close()


# -- PostgreSQL (tests/postgres_server.py) ----------------------------------------------


@pytest.fixture(scope="session")
def postgres_server():
    """The admin URL of a real PostgreSQL server: ``.ci/run``'s, or one started for this session."""
    from postgres_server import REQUIRE_ENV, URL_ENV, binaries, start, stop

    url = os.environ.get(URL_ENV)
    if url:
        yield url
        return
    if binaries() is None:
        reason = f"PostgreSQL is not installed (apt-get install postgresql, or set {URL_ENV})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="herald-pg-"))
    url = start(folder)
    yield url
    stop(folder)


@pytest.fixture
def pg_database(postgres_server, tmp_path):
    """A new, empty PostgreSQL database for one test, as a store location (the node's folder is ``tmp_path``)."""
    from postgres_server import create_database, drop_database

    from gateway.store.postgres import PostgresDatabase

    url = create_database(postgres_server)
    yield PostgresDatabase(url, tmp_path)
    drop_database(postgres_server, url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """Where a test's store is: a new SQLite file, then a new PostgreSQL database (the store on both backends)."""
    if request.param == "sqlite":
        return tmp_path / "herald.db"
    return request.getfixturevalue("pg_database")


@pytest.fixture
def data_dir(database, tmp_path, monkeypatch):
    """A node's data folder (``tmp_path / "data"``) whose store is ``database``: ``herald.db`` in it, or the
    PostgreSQL database, which ``HERALD_STORE`` then names to the CLI and ``load_config`` (as an operator sets it).

    ``load_config(None, data_dir=folder).database`` is the store wherever it is.
    """
    from gateway.config import STORE_ENV
    from gateway.store.postgres import PostgresDatabase

    if isinstance(database, PostgresDatabase):
        monkeypatch.setenv(STORE_ENV, database.url)
    else:
        monkeypatch.delenv(STORE_ENV, raising=False)
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def _postgres_for_postgresql_cases(request):
    """A trial case whose class says ``backend = "postgresql"`` learns the test server's admin URL
    (``postgres_admin``; the case is skipped without a server, as the ``database`` fixture's are)."""
    if getattr(request.cls, "backend", "sqlite") == "postgresql":
        request.cls.postgres_admin = request.getfixturevalue("postgres_server")


@pytest.fixture
def herald_server(tmp_path):
    """A `herald serve` process (defaults: pipeline on) on a free loopback port, its data in
    ``tmp_path / "data"``. Yields ``(port, data, proc)``; stopped with SIGTERM afterwards."""
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [*HERALD, "serve", "--listen", "tcp:0:interface=127.0.0.1", "--allow-plain", "--data", str(data)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    port = None
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"\(ports \[(\d+)\]\)", line)
        if found:
            port = int(found.group(1))
            break
    if port is None:
        proc.kill()
        proc.wait()
        pytest.fail("herald serve did not start:\n" + "".join(lines))
    # Keep reading its log so the pipe never fills and blocks the server.
    drain = threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True)
    drain.start()
    yield port, data, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    drain.join(timeout=5)


# -- a running Store without a running reactor (test_intake, test_store_threads) ----------


@pytest.fixture
def reactor():
    """test_intake's QueueReactor: the Store's threads hand results back through it and the test drains it."""
    from test_intake import QueueReactor

    return QueueReactor()


@pytest.fixture
def store(database, reactor):
    """A running Store on a fresh database (SQLite, then PostgreSQL); stopped (and its threads joined) after the test.

    test_store.py has its own ``store``: a Store that is never started.
    """
    from test_intake import STORED_AT, drain, success

    from gateway.store import Store

    s = Store(database, reactor=reactor, clock=lambda: STORED_AT)
    s.start()
    yield s
    success(drain(reactor, s.stop()))
