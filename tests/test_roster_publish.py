"""The roster file: an import never holds up intake, and a query never sees half of one.

The roster lives in ``roster.db``, replaced whole by each import (a copy is
changed, made durable and renamed into place). These tests pin what that is
for: a running server keeps acknowledging messages while a roster import
runs, readers see one version or the next and never a mix, and the pipeline
picks up a new version without a restart.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

import gateway.store.roster_import
from gateway.app.roster import import_roster_file
from gateway.errors import RosterError
from gateway.matching.roster import RosterOptions
from gateway.store import RosterReader, StoredRoster, open_database, open_roster_snapshot, roster_count, roster_path

ROOT = Path(__file__).resolve().parent.parent
HERALD = [sys.executable, "-m", "gateway.app.cli"]
ADMIT = ROOT / "sample_messages" / "epic-v251-a01-admit-from-ed.hl7"
NOW = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
TODAY = RosterOptions(today=date(2026, 11, 20))
HEADER = "member_id,mbi,mrn,mrn_authority,last_name,first_name,birth_date,sex,aco_id,pcp_name,address_line,zip"
GIVEN = ["Ada", "Bram", "Calla", "Dorian", "Esme", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Katya", "Linus"]
FAMILY = ["Ashford", "Belmere", "Carrow", "Dunley", "Ellery", "Fenwick", "Garrow", "Halden", "Ivers", "Jessop"]


def roster_text(count: int, pcp_name: str, start: int = 0, extra: tuple[str, ...] = ()) -> str:
    """``count`` synthetic members M-<n> (invented names), each with an MRN and the given PCP name."""
    rows = [HEADER]
    for n in range(start, start + count):
        given, family = GIVEN[n % len(GIVEN)], FAMILY[(n // len(GIVEN)) % len(FAMILY)] + str(n // 120)
        birth = f"19{40 + n % 50:02d}-{1 + n % 12:02d}-{1 + n % 28:02d}"
        rows.append(
            f"M-{n},,MRN{n},TESTFAC,{family},{given},{birth},{'MF'[n % 2]},ACO-TEST,{pcp_name},"
            f"{1 + n % 900} Birch St,{10000 + n % 500:05d}"
        )
    rows.extend(extra)
    return "\n".join(rows) + "\n"


def import_text(where, text: str, name: str = "members.csv", **kwargs):
    """Import ``text`` into ``where``: a test's folder (its herald.db), or a store (the ``database`` fixture)."""
    database = where / "herald.db" if isinstance(where, Path) and where.is_dir() else where
    path = Path(os.fspath(database)).parent / name
    path.write_text(text, encoding="utf-8")
    return import_roster_file(database, path, TODAY, now=NOW, **kwargs)


def test_a_query_never_sees_half_an_import(database):
    """Readers querying throughout an import that changes every member see version 1 or 2 whole, never a mix."""
    import_text(database, roster_text(1500, "Dr One"))
    reader = RosterReader(database)
    seen: list[tuple[int, int, tuple[str, ...]]] = []
    problems: list[str] = []
    stop = threading.Event()

    def read() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (stop.is_set() and seen and seen[-1][0] == 2):
            snapshot = reader.current()
            lookups = StoredRoster(snapshot)
            # Several statements on one version, as a batch of matching queries makes.
            names = {r["pcp_name"] for mrn in ("MRN0", "MRN700", "MRN1499") for r in lookups.by_mrn(mrn, "TESTFAC")}
            names |= {r[0] for r in snapshot.conn.execute("SELECT DISTINCT pcp_name FROM roster_members")}
            state = (snapshot.version, roster_count(snapshot), tuple(sorted(names)))
            if state not in ((1, 1500, ("Dr One",)), (2, 2000, ("Dr Two",))):
                problems.append(repr(state))
                return
            if not seen or seen[-1] != state:
                seen.append(state)
            reading.set()

    reading = threading.Event()
    thread = threading.Thread(target=read)
    thread.start()
    assert reading.wait(60)  # the reader has seen version 1 before the import starts
    try:
        report = import_text(database, roster_text(2000, "Dr Two"), name="v2.csv")
    finally:
        stop.set()
        thread.join(timeout=150)
    reader.close()
    assert (report.added, report.changed) == (500, 1500)
    assert not problems, problems
    assert [s[0] for s in seen] == [1, 2], seen


def test_an_import_holds_no_lock_intake_waits_on(tmp_path, monkeypatch):
    """With the new version fully applied but not yet published, the main database is free to write and
    readers still get the old version; once published they get the new one, and the import is audited."""
    import_text(tmp_path, roster_text(300, "Dr One"))
    reader = RosterReader(tmp_path / "herald.db")
    old = reader.current()
    kept = open_roster_snapshot(tmp_path / "herald.db")
    checked: list[str] = []
    real_publish = gateway.store.roster_import._publish

    def publish_after_checks(conn, work, published):
        main = sqlite3.connect(tmp_path / "herald.db", timeout=0, isolation_level=None)
        main.execute("BEGIN IMMEDIATE")  # raises "database is locked" if the import held the write lock
        main.execute("ROLLBACK")
        main.close()
        assert work.exists() and work != published
        assert reader.current() is old and old.version == 1
        checked.append("before publish")
        return real_publish(conn, work, published)

    monkeypatch.setattr(gateway.store.roster_import, "_publish", publish_after_checks)
    report = import_text(tmp_path, roster_text(400, "Dr Two"), name="v2.csv")
    assert checked == ["before publish"]
    assert report.lock_seconds < 5
    new = reader.current()
    assert new is not old and (new.version, roster_count(new)) == (2, 400)
    assert roster_count(kept) == 300  # a reader of the replaced file still reads it whole
    kept.close()
    events = open_database(tmp_path / "herald.db", readonly=True).execute(
        "SELECT detail FROM events WHERE kind = 'roster-imported' ORDER BY id"
    )
    assert ['"import": 2' in e[0] for e in events] == [False, True]
    reader.close()


def test_published_roster_leaves_no_journal_and_a_rejected_file_publishes_nothing(database, tmp_path):
    """After an import only roster.db (and its lock file) is there; a rejected file leaves the version as it was."""
    import_text(database, roster_text(20, "Dr One"))
    before = roster_path(database).stat()
    assert sorted(p.name for p in tmp_path.glob("roster.*")) == ["roster.db", "roster.lock"]
    with pytest.raises(RosterError):
        import_text(database, roster_text(5, "Dr Two").replace(",M,", ",Z,"), name="bad.csv")
    after = roster_path(database).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.glob("roster.*")) == ["roster.db", "roster.lock"]
    assert open_roster_snapshot(database).version == 1


def test_imports_one_at_a_time(database, tmp_path):
    """Two imports started together both land, one after the other (the roster lock), as versions 2 and 3."""
    import_text(database, roster_text(50, "Dr One"))
    (tmp_path / "a.csv").write_text(roster_text(50, "Dr A"), encoding="utf-8")
    (tmp_path / "b.csv").write_text(roster_text(50, "Dr B", start=1000), encoding="utf-8")
    reports: list = []

    def run(name: str) -> None:
        reports.append(import_roster_file(database, tmp_path / name, TODAY, now=NOW, replace=False))

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a.csv", "b.csv")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(r.import_id for r in reports) == [2, 3]
    snapshot = open_roster_snapshot(database)
    assert roster_count(snapshot) == 100
    names = {r[0] for r in snapshot.conn.execute("SELECT pcp_name FROM roster_members WHERE member_id = 'M-0'")}
    assert names == {"Dr A"}


# -- a running server while an import runs --------------------------------------------------------


def admit(control_id: str) -> bytes:
    """The sample A01 (patient on the MBI 2HX7RA1PK83) with its own control id, MLLP-framed."""
    text = ADMIT.read_bytes().replace(b"\n", b"\r").strip(b"\r")
    header, rest = text.split(b"\r", 1)
    fields = header.split(b"|")
    fields[9] = control_id.encode()
    return b"\x0b" + b"|".join(fields) + b"\r" + rest + b"\r\x1c\r"


class PacedClient(threading.Thread):
    """One MLLP connection sending a message every 20 ms until stopped (at most 3000), timing each ACK."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.codes: Counter = Counter()
        self.slowest = 0.0
        self.error = ""

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                for n in range(3000):
                    if self.stop.is_set():
                        return
                    started = time.monotonic()
                    sock.sendall(admit(f"PACED{n:05d}"))
                    reply = b""
                    while not reply.endswith(b"\x1c\r"):
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("connection closed")
                        reply += chunk
                    self.slowest = max(self.slowest, time.monotonic() - started)
                    self.codes[re.search(rb"MSA\|(\w+)\|", reply).group(1).decode()] += 1
                    self.stop.wait(0.02)
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"


def test_server_keeps_acknowledging_while_a_roster_import_runs(herald_server, tmp_path):
    """A real server ACKs every message (CA, promptly) during a 10,000-member import, and its pipeline
    matches against the new version as soon as it is published, without a restart."""
    port, data, _proc = herald_server
    patient = "SHR-000102,2HX7RA1PK83,,,Brightwater,Oswald,1952-07-04,M,ACO-TEST,Dr. Priya Halvorsen,,"
    roster = tmp_path / "big.csv"
    roster.write_text(roster_text(10000, "Dr Big", extra=(patient,)), encoding="utf-8")
    client = PacedClient(port)
    client.start()
    started = time.monotonic()
    done = subprocess.run(
        [*HERALD, "roster", "import", str(roster), "--data", str(data), "--by", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    import_seconds = time.monotonic() - started
    client.stop.set()
    client.join(timeout=60)
    assert done.returncode == 0, done.stderr
    assert "added 10001" in done.stdout, done.stdout
    assert not client.error, client.error
    sent = sum(client.codes.values())
    assert sent >= min(20, int(import_seconds / 0.1)), (sent, import_seconds)  # it kept sending throughout
    assert set(client.codes) == {"CA"}, client.codes
    assert client.slowest < 3.0, client.slowest
    # The workers reopen the new roster file between batches: the next message is matched on it.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(admit("AFTERIMPORT"))
        assert b"MSA|CA|AFTERIMPORT" in sock.recv(65536)
    conn = open_database(data / "herald.db", readonly=True)
    deadline = time.monotonic() + 60
    row = None
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT t.member_id, t.grade FROM matches t JOIN messages m ON m.id = t.message_id "
            "WHERE m.control_id = 'AFTERIMPORT'"
        ).fetchone()
        if row is not None:
            break
        time.sleep(0.1)
    conn.close()
    assert row is not None and tuple(row) == ("SHR-000102", "certain"), row
