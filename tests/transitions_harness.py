"""A gateway for the care-transitions tests: real MLLP in, the real pipeline and transitions service.

ADT messages are written here (synthetic people, no real ones) with the times a
test needs; the roster has four members of one ACO, one of them opted out.
The gateway's clock (``now``) is the test's: the transitions service reads
"now" from it, and a test runs the service itself (``transition``) rather than wait
for its poll.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from postgres_server import create_database, drop_database
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from gateway.app.replay import read_ack
from gateway.app.roster import import_roster_file
from gateway.app.service import make_service
from gateway.config import STORE_ENV, load_config
from gateway.store import open_database
from mllp import connect
from mllp.client import client_endpoint

ACO = "ACO-LAKE"
#: member id -> MBI (CMS's format; synthetic values).
MEMBERS = {"M-1": "1EG4TE5MK73", "M-2": "2HX7RA1PK83", "M-3": "7KD3MP4QR21", "M-4": "3JF8WN2RT64"}
OPTED_OUT = "M-2"
_COLUMNS = "member_id,mbi,last_name,first_name,birth_date,sex,aco_id,pcp_npi,pcp_name,care_manager,effective_start"
ROSTER = f"""{_COLUMNS},opted_out
M-1,{MEMBERS["M-1"]},Testpatient,Alex,1950-01-02,F,{ACO},1234567893,Dr. Rina Lee,Sam Ortiz RN,2025-01-01,0
M-2,{MEMBERS["M-2"]},Optout,Olive,1951-03-04,F,{ACO},1234567893,Dr. Rina Lee,Sam Ortiz RN,2025-01-01,1
M-3,{MEMBERS["M-3"]},Sample,Bo,1944-05-06,M,{ACO},1987654328,Dr. Priya Halvorsen,Sam Ortiz RN,2025-01-01,0
M-4,{MEMBERS["M-4"]},Example,Cy,1939-07-08,M,{ACO},1987654328,Dr. Priya Halvorsen,Sam Ortiz RN,2025-01-01,0
"""
_NAMES = {"M-1": "TESTPATIENT^ALEX", "M-2": "OPTOUT^OLIVE", "M-3": "SAMPLE^BO", "M-4": "EXAMPLE^CY"}
_BIRTH = {"M-1": "19500102", "M-2": "19510304", "M-3": "19440506", "M-4": "19390708"}
_SEX = {"M-1": "F", "M-2": "F", "M-3": "M", "M-4": "M"}


def hl7_time(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S%z")


def adt(
    trigger: str,
    member: str,
    visit: str,
    at: datetime,
    *,
    klass: str = "I",
    facility: str = "LSR",
    admitted: datetime | None = None,
    discharged: datetime | None = None,
    disposition: str = "",
    destination: str = "",
    control: str = "",
) -> bytes:
    """An ADT message of ``member`` for visit ``visit`` at ``facility``, sent at ``at`` (MSH-7, EVN-2)."""
    pv1 = [""] * 46
    pv1[0], pv1[1], pv1[2] = "PV1", "1", klass
    pv1[3] = f"{'ED' if klass == 'E' else 'WARD'}^1^1^{facility}"
    pv1[19] = f"{visit}^^^{facility}^VN"
    pv1[36], pv1[37] = disposition, destination
    pv1[44] = hl7_time(admitted) if admitted else ""
    pv1[45] = hl7_time(discharged) if discharged else ""
    control = control or f"{facility}{trigger}{visit}{at:%m%d%H%M%S}"
    segments = [
        f"MSH|^~\\&|EPIC|{facility}|HERALD|ACO|{hl7_time(at)}||ADT^{trigger}^ADT_A01|{control}|P|2.5.1",
        f"EVN|{trigger}|{hl7_time(at)}",
        f"PID|1||MR{member[2:]}^^^{facility}^MR~{MEMBERS[member]}^^^CMS^MB||{_NAMES[member]}||{_BIRTH[member]}|{_SEX[member]}",
        "|".join(pv1).rstrip("|"),
    ]
    return ("\r".join(segments) + "\r").encode("ascii")


class TransitionsTestCase(unittest.TestCase):
    """A gateway on 127.0.0.1 (plain MLLP in), the roster above, the test's clock; ``extra_config`` is added."""

    extra_config = ""
    start_at = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    #: "sqlite", or "postgresql": a new database on the test server (``postgres_admin``, set by conftest).
    backend = "sqlite"
    postgres_admin = ""
    postgres_database = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.data = Path(tempfile.mkdtemp(prefix="herald-transitions-"))
        self.now = self.start_at
        roster = self.data / "roster.csv"
        roster.write_text(ROSTER, encoding="utf-8")
        self.prepare()
        config_file = self.data / "herald.toml"
        config_file.write_text(
            f"""
[server]
listen = ["tcp:0:interface=127.0.0.1"]
allow_plain = true

[pipeline]
workers = 0

[transitions]
poll_seconds = 3600
{self.extra_config}
"""
        )
        self.config = load_config(config_file, data_dir=self.data)
        if self.backend == "postgresql":
            self.postgres_database = create_database(self.postgres_admin)  # dropped in tearDown
            self.config = dataclasses.replace(self.config, storage_store=self.postgres_database)
            # The CLI a test runs (``--data``) finds the store as an operator's would: in the environment.
            self._store_env = os.environ.get(STORE_ENV)
            os.environ[STORE_ENV] = self.postgres_database
        import_roster_file(self.config.database, roster, by="tests")
        self.gw = make_service(self.config, reactor, clock=lambda: self.now)
        self.gw.transitions.sweep_seconds = 0
        # The test runs the service itself, at the times it sets (not when the pipeline wakes it).
        self.gw.pipeline.on_routed = self.gw.delivery.wake
        self.gw.service.startService()
        yield defer.gatherResults([lst.ready for lst in self.gw.listeners])
        self.client = yield connect(client_endpoint(reactor, "127.0.0.1", self.gw.listening_ports()[0], None), reactor)

    def prepare(self) -> None:
        """Before the config is read: a subclass writes the files its ``extra_config`` names into ``self.data``."""

    @defer.inlineCallbacks
    def tearDown(self):
        self.client.transport.loseConnection()
        yield defer.DeferredList([self.client.closed]).addTimeout(10, reactor)
        yield self.gw.service.stopService()
        yield task.deferLater(reactor, 0.05, lambda: None)
        shutil.rmtree(self.data, True)
        if self.postgres_database:  # after the service stopped (trial runs cleanups before tearDown)
            if self._store_env is None:
                os.environ.pop(STORE_ENV, None)
            else:
                os.environ[STORE_ENV] = self._store_env
            drop_database(self.postgres_admin, self.postgres_database)

    @defer.inlineCallbacks
    def send(self, *messages: bytes):
        """Send each message, check it is acknowledged, wait until the pipeline has processed them all."""
        for raw in messages:
            ack = yield self.client.send(raw, timeout=10)
            self.assertIn(read_ack(ack)[0], ("AA", "CA"))
        yield self.wait_for("SELECT COUNT(*) FROM messages WHERE state = 'received'", expected=0)

    @defer.inlineCallbacks
    def transition(self, at: datetime | None = None):
        """Set the clock (when given) and run the transitions service once; fires with what it wrote."""
        if at is not None:
            self.now = at
        written = yield self.gw.transitions.run_once()
        return written

    def db(self) -> sqlite3.Connection:
        return open_database(self.config.database, readonly=True, keys=self.gw.store.keys)

    @defer.inlineCallbacks
    def wait_for(self, sql: str, args=(), expected=0, seconds: float = 15.0):
        deadline = time.monotonic() + seconds
        conn = self.db()
        try:
            while True:
                value = conn.execute(sql, args).fetchone()[0]
                if value == expected:
                    return value
                if time.monotonic() > deadline:
                    self.fail(f"waited {seconds} s: {sql} gave {value}, expected {expected}")
                yield task.deferLater(reactor, 0.02, lambda: None)
        finally:
            conn.close()

    def episodes(self, member: str = "M-1") -> list[dict]:
        """The member's stored episodes' states (opened)."""
        from gateway.store.transitions import episodes_of

        conn = self.db()
        try:
            return [r["state"] for r in episodes_of(conn, ACO, member)]
        finally:
            conn.close()

    def tasks(self, statuses=("requested",), member: str | None = None) -> list[dict]:
        """Task rows (the Task opened as ``resource``)."""
        from gateway.store.transitions import task_rows

        conn = self.db()
        try:
            rows = task_rows(conn, statuses)
        finally:
            conn.close()
        return [r for r in rows if member is None or r["member_id"] == member]

    def kinds(self, message_id: int | None = None) -> list[str]:
        conn = self.db()
        try:
            sql, args = "SELECT kind FROM events WHERE actor = 'transitions'", ()
            if message_id is not None:
                sql, args = sql + " AND message_id = ?", (message_id,)
            return [r[0] for r in conn.execute(sql + " ORDER BY id", args)]
        finally:
            conn.close()
