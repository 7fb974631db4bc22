"""The roster on PostgreSQL: an import on one node is published to every node, whole or not at all.

Each node matches against its own roster file (``roster.db`` in its folder).
These tests run two nodes (two folders) on one real PostgreSQL database and
pin what the shared roster is for: an import on node A is installed on node B
when B follows; a rejected import, or one whose publishing transaction fails,
publishes nothing and both nodes keep their version; a download that does not
match what was published is refused and the node keeps its file; old versions
are dropped; imports on two nodes build on each other; a node started with no
roster file downloads it at start; the CLI works on PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from twisted.internet import defer
from twisted.internet.task import Clock

import gateway.store.roster_versions as roster_versions
from gateway.app.cli import main
from gateway.app.roster import import_roster_file
from gateway.app.roster_follow import RosterFollowing, roster_following
from gateway.errors import RosterError, StoreError
from gateway.matching.roster import RosterOptions
from gateway.store import RosterReader, StoredRoster, open_database, roster_count, roster_path
from gateway.store.keys import load_ring
from gateway.store.postgres import PostgresDatabase
from gateway.store.roster_import import reseal_roster
from gateway.store.roster_versions import (
    RosterFollower,
    local_version,
    newest_version,
    published_versions,
)

NOW = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
TODAY = RosterOptions(today=date(2026, 11, 20))
HEADER = "member_id,mbi,mrn,mrn_authority,last_name,first_name,birth_date,sex,aco_id,pcp_name"
GIVEN = ["Ada", "Bram", "Calla", "Dorian", "Esme", "Felix", "Greta", "Hugo"]
FAMILY = ["Ashford", "Belmere", "Carrow", "Dunley", "Ellery", "Fenwick"]


def roster_text(count: int, pcp_name: str, start: int = 0, extra: tuple[str, ...] = ()) -> str:
    """``count`` synthetic members M-<n> (invented names), each with an MRN and the given PCP name."""
    rows = [HEADER]
    for n in range(start, start + count):
        given, family = GIVEN[n % len(GIVEN)], FAMILY[(n // len(GIVEN)) % len(FAMILY)] + str(n // 48)
        birth = f"19{40 + n % 50:02d}-{1 + n % 12:02d}-{1 + n % 28:02d}"
        rows.append(f"M-{n},,MRN{n},TESTFAC,{family},{given},{birth},{'MF'[n % 2]},ACO-TEST,{pcp_name}")
    rows.extend(extra)
    return "\n".join(rows) + "\n"


@pytest.fixture
def keys():
    """The tests' key ring (HERALD_KEYS, set by conftest): the roster file's PHI is sealed, as deployed."""
    return load_ring(None)


@pytest.fixture
def nodes(pg_database, tmp_path):
    """Two nodes sharing one PostgreSQL database, each with its own folder (a/ and b/)."""
    found = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        found.append(PostgresDatabase(pg_database.url, folder))
    return found


def import_text(node: PostgresDatabase, text: str, keys, name: str = "members.csv", **kwargs):
    """Import ``text`` as a roster file on ``node`` (the file is written beside the node's folder)."""
    path = node.folder.parent / f"{node.folder.name}-{name}"
    path.write_text(text, encoding="utf-8")
    return import_roster_file(node, path, TODAY, now=NOW, by="tests", keys=keys, **kwargs)


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def pcp_names(reader: RosterReader) -> set[str]:
    """The PCP names of the members a lookup by MRN finds (their sealed values opened)."""
    lookups = StoredRoster(reader.current())
    return {r["pcp_name"] for mrn in ("MRN0", "MRN7", "MRN19") for r in lookups.by_mrn(mrn, "TESTFAC")}


def versions_kept(node: PostgresDatabase) -> tuple[list[int], list[int]]:
    """The versions in roster_versions, and those roster_chunks holds bytes of."""
    conn = open_database(node, readonly=True)
    try:
        rows = [v.version for v in published_versions(conn)]
        chunks = [r[0] for r in conn.execute("SELECT DISTINCT version FROM roster_chunks ORDER BY version DESC")]
    finally:
        conn.close()
    return rows, chunks


def test_an_import_on_one_node_is_followed_by_another(nodes, keys):
    """Node B installs what node A imported (the same bytes) when it follows, and its reader moves to it."""
    a, b = nodes
    report = import_text(a, roster_text(20, "Dr One"), keys)
    assert (report.import_id, report.added, report.published_version) == (1, 20, 1)
    assert local_version(roster_path(a)) == 1
    reader = RosterReader(b, keys)
    assert roster_count(reader.current()) == 0  # no file yet: an empty roster
    clock = [0.0]
    follower = RosterFollower(b, interval=5.0, clock=lambda: clock[0])
    try:
        assert follower.follow() == 1
        assert roster_path(b).read_bytes() == roster_path(a).read_bytes()
        assert (reader.current().published_version, roster_count(reader.current())) == (1, 20)
        assert pcp_names(reader) == {"Dr One"}
        old = reader.current()

        import_text(a, roster_text(20, "Dr Two"), keys, name="v2.csv")
        clock[0] = 1.0
        assert follower.follow() is None  # not looked again before the interval
        assert reader.current() is old
        clock[0] = 5.0
        assert follower.follow() == 2
        assert follower.follow_now() is None  # already the newest
        new = reader.current()
        assert new is not old and (new.published_version, new.version) == (2, 2)
        assert pcp_names(reader) == {"Dr Two"}
    finally:
        follower.close()
        reader.close()
    conn = open_database(a, readonly=True)
    newest = published_versions(conn)[0]
    conn.close()
    assert newest.sha256 == hashlib.sha256(roster_path(b).read_bytes()).hexdigest()
    assert (newest.kind, newest.imported_by, newest.import_id) == ("import", "tests", 2)
    assert sorted(p.name for p in b.folder.glob("roster.*")) == ["roster.db", "roster.lock"]


def test_a_rejected_import_publishes_nothing(nodes, keys):
    """A file with a bad line is rejected whole: no version is published, and both nodes keep version 1."""
    a, b = nodes
    import_text(a, roster_text(20, "Dr One"), keys)
    follower = RosterFollower(b)
    assert follower.follow_now() == 1
    before = identity(roster_path(a)), identity(roster_path(b))
    with pytest.raises(RosterError):
        import_text(a, roster_text(20, "Dr Two").replace(",M,", ",Z,"), keys, name="bad.csv")
    assert follower.follow_now() is None
    follower.close()
    assert (identity(roster_path(a)), identity(roster_path(b))) == before
    assert versions_kept(a) == ([1], [1])
    assert not list(a.folder.glob("*.importing"))


def test_a_failed_publishing_transaction_publishes_nothing(nodes, keys, monkeypatch):
    """When the publishing transaction fails after writing the version's row and bytes, all of it is rolled
    back: nothing is published, node A keeps its file (the copy goes) and node B has nothing to follow."""
    a, b = nodes
    import_text(a, roster_text(20, "Dr One"), keys)
    follower = RosterFollower(b)
    assert follower.follow_now() == 1
    before = identity(roster_path(a)), identity(roster_path(b))
    seen = []

    def fail_after_writing(conn):
        seen.append(conn.execute("SELECT COUNT(*) FROM roster_versions").fetchone()[0])
        conn.execute("INSERT INTO roster_versions (version) VALUES (NULL)")  # the server refuses it

    monkeypatch.setattr(roster_versions, "_prune", fail_after_writing)
    with pytest.raises(StoreError, match="(?s)publishing roster version 2 failed.*nothing was published"):
        import_text(a, roster_text(20, "Dr Two"), keys, name="v2.csv")
    assert seen == [2]  # the new version's row was written in the transaction, then rolled back
    monkeypatch.undo()
    assert follower.follow_now() is None
    follower.close()
    assert (identity(roster_path(a)), identity(roster_path(b))) == before
    assert versions_kept(a) == ([1], [1])
    assert local_version(roster_path(a)) == local_version(roster_path(b)) == 1
    assert not list(a.folder.glob("roster.db.*"))
    # The next import is published as version 2, on both nodes.
    assert import_text(a, roster_text(20, "Dr Three"), keys, name="v3.csv").published_version == 2


def test_a_corrupted_download_is_refused_and_the_file_kept(nodes, keys, monkeypatch):
    """A download whose bytes do not match the published SHA-256 is refused: node B keeps version 1 whole,
    no temporary file is left, and the next good look installs version 2."""
    a, b = nodes
    import_text(a, roster_text(20, "Dr One"), keys)
    follower = RosterFollower(b)
    assert follower.follow_now() == 1
    import_text(a, roster_text(20, "Dr Two"), keys, name="v2.csv")
    before = identity(roster_path(b))
    real_chunk = roster_versions._chunk

    def flipped(conn, version, seq):
        data = bytearray(real_chunk(conn, version, seq))
        data[len(data) // 2] ^= 0x01
        return bytes(data)

    monkeypatch.setattr(roster_versions, "_chunk", flipped)
    with pytest.raises(StoreError, match="does not match what was published"):
        follower.follow_now()
    assert identity(roster_path(b)) == before and local_version(roster_path(b)) == 1
    assert not list(b.folder.glob("roster.db.*"))
    monkeypatch.undo()
    assert follower.follow_now() == 2
    follower.close()
    assert roster_path(b).read_bytes() == roster_path(a).read_bytes()


def test_versions_beyond_the_newest_two_are_dropped(nodes, keys):
    """Each publication drops all but the newest two versions (their rows and bytes); a node on an old one
    still follows to the newest."""
    a, b = nodes
    import_text(a, roster_text(10, "Dr One"), keys)
    assert RosterFollower(b).follow_now() == 1
    for n in (2, 3, 4):
        assert import_text(a, roster_text(10, f"Dr {n}"), keys, name=f"v{n}.csv").published_version == n
    assert versions_kept(a) == ([4, 3], [4, 3])
    follower = RosterFollower(b)
    assert follower.follow_now() == 4
    follower.close()
    assert roster_path(b).read_bytes() == roster_path(a).read_bytes()


def test_imports_on_two_nodes_run_one_at_a_time_each_on_the_last(nodes, keys):
    """Imports started together on two nodes both land, one after the other, the second built on the first:
    every node ends with both files' members."""
    a, b = nodes
    import_text(a, roster_text(10, "Dr One"), keys)
    reports: dict[str, object] = {}
    errors: list[BaseException] = []

    def run(node: PostgresDatabase, start: int) -> None:
        try:
            reports[node.folder.name] = import_text(
                node, roster_text(30, f"Dr {node.folder.name}", start=start), keys, name="more.csv", replace=False
            )
        except BaseException as e:  # noqa: BLE001 - said by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(a, 1000)), threading.Thread(target=run, args=(b, 2000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(r.published_version for r in reports.values()) == [2, 3]
    assert sorted(r.import_id for r in reports.values()) == [2, 3]
    for node in (a, b):
        follower = RosterFollower(node)
        follower.follow_now()
        follower.close()
        reader = RosterReader(node, keys)
        assert (reader.current().published_version, roster_count(reader.current())) == (3, 70)
        reader.close()
    assert roster_path(a).read_bytes() == roster_path(b).read_bytes()


def test_a_node_started_with_no_roster_file_downloads_it_at_start(nodes, keys):
    """The server's RosterFollowing installs the published roster when it starts (before the workers read it)
    and then every few seconds; on SQLite there is none."""
    a, b = nodes
    import_text(a, roster_text(20, "Dr One"), keys)
    clock = Clock()
    following = RosterFollowing(b, clock, interval=5.0, run_in_thread=lambda fn: defer.maybeDeferred(fn))
    assert not roster_path(b).exists()
    following.startService()
    try:
        assert local_version(roster_path(b)) == 1
        import_text(a, roster_text(20, "Dr Two"), keys, name="v2.csv")
        clock.advance(4.9)
        assert local_version(roster_path(b)) == 1
        clock.advance(0.2)
        assert local_version(roster_path(b)) == 2
        assert following.installed == 2
    finally:
        following.stopService()
    assert roster_following(a.folder / "herald.db", clock) is None


def test_a_failing_look_keeps_the_file_and_the_service_running(nodes, keys, monkeypatch):
    """A look that fails (here a refused download) is logged, the node keeps its version, the next look works."""
    a, b = nodes
    import_text(a, roster_text(20, "Dr One"), keys)
    clock = Clock()
    following = RosterFollowing(b, clock, interval=5.0, run_in_thread=lambda fn: defer.maybeDeferred(fn))
    following.startService()
    try:
        import_text(a, roster_text(20, "Dr Two"), keys, name="v2.csv")
        monkeypatch.setattr(roster_versions, "_chunk", lambda conn, version, seq: b"not the roster")
        clock.advance(5)
        assert local_version(roster_path(b)) == 1 and following._failing
        monkeypatch.undo()
        clock.advance(5)
        assert local_version(roster_path(b)) == 2 and not following._failing
    finally:
        following.stopService()


def test_a_key_rotation_publishes_the_resealed_roster(nodes, keys):
    """Resealing the roster on PostgreSQL publishes it as a new version (kind rotation) that other nodes follow."""
    from gateway.matching.roster import DERIVATION
    from gateway.store.keys import KEYS_ENV, KeyRing

    a, b = nodes
    import_text(a, roster_text(10, "Dr One"), keys)
    rotated = KeyRing.from_text(f"{os.environ[KEYS_ENV]}\nnext {base64.b64encode(b'7' * 32).decode()}", "tests")
    assert reseal_roster(roster_path(a), rotated, DERIVATION, database=a) == 10
    conn = open_database(a, readonly=True)
    assert (newest_version(conn), published_versions(conn)[0].kind) == (2, "rotation")
    conn.close()
    follower = RosterFollower(b)
    assert follower.follow_now() == 2
    follower.close()
    reader = RosterReader(b, rotated)
    assert pcp_names(reader) == {"Dr One"}
    reader.close()


# -- the CLI -------------------------------------------------------------------------------------


def herald(node: PostgresDatabase, *args: str):
    """``herald`` with the node's folder as --data and its store on the shared database (HERALD_STORE)."""
    runner = CliRunner()
    return runner.invoke(main, [*args, "--data", str(node.folder)], env={"HERALD_STORE": node.url})


def test_cli_roster_import_and_versions_on_postgresql(nodes, keys):
    """`herald roster import` publishes on node A; `herald roster versions` on node B follows and lists it;
    a rejected file exits 2, publishing nothing."""
    a, b = nodes
    good = a.folder.parent / "good.csv"
    good.write_text(roster_text(20, "Dr One"), encoding="utf-8")
    done = herald(a, "roster", "import", str(good), "--by", "tests", "--effective", "2026-11-20")
    assert done.exit_code == 0, done.output
    assert "added 20" in done.output and "published version 1" in done.output, done.output
    listed = herald(b, "roster", "versions")
    assert listed.exit_code == 0, listed.output
    assert "good.csv" in listed.output and "by tests" in listed.output, listed.output
    assert local_version(roster_path(b)) == 1
    bad = a.folder.parent / "bad.csv"
    bad.write_text(roster_text(20, "Dr Two").replace(",M,", ",Z,"), encoding="utf-8")
    refused = herald(b, "roster", "import", str(bad), "--by", "tests")
    assert refused.exit_code == 2, refused.output
    assert "rejected, nothing was loaded" in refused.output
    assert versions_kept(a) == ([1], [1])
