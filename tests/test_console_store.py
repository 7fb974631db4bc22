"""The console's store (gateway.store.console): the blind index the message browser searches, keyset pages,
the index's background work (back-fill, intake refusals, purges), users and sessions; and the CLI over them.

Messages are stored by intake's SQL and processed by the production batch
function on a real database (a SQLite file, then a PostgreSQL database: the
``database`` fixture), sealed with a key ring, as in test_matching_flow.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_intake import accepted_record
from test_matching_flow import CORNELIUS, DESMOND, HEADER, ROSALIND, ROSALIND_FULL, adt

from gateway.app.cli import main
from gateway.app.roster import import_roster_file
from gateway.config import load_config
from gateway.conversion.vocabulary import load_vocabulary
from gateway.errors import ConfigError, StoreError
from gateway.pipeline.workers import process_batch_here
from gateway.records import REJECTED, IntakeRecord
from gateway.store import RosterReader, migrate, open_database
from gateway.store import console as store
from gateway.store.keys import KeyRing
from gateway.store.messages import apply_outcomes, pending_messages, record_frame
from gateway.store.postgres import PostgresDatabase
from gateway.store.retention import purge_next

ROOT = Path(__file__).resolve().parent.parent
START = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


class Log:
    """A Herald database with a roster; messages stored at chosen times and run through the pipeline."""

    def __init__(self, root: Path, database: Path | PostgresDatabase, keys: KeyRing | None = None) -> None:
        self.root = root
        self.config_file = root / "herald.toml"
        # The store: herald.db in the data folder, or the PostgreSQL database.
        storage = f'[storage]\nstore = "{database.url}"\n' if isinstance(database, PostgresDatabase) else ""
        self.config_file.write_text(
            f'[server]\ndata_dir = "{root / "data"}"\n[matching]\ncertain = 35.0\nprobable = 24.0\npossible = 14.0\n'
            + storage
        )
        self.config = load_config(self.config_file)
        self.keys = keys if keys is not None else KeyRing.load(None)
        roster = root / "roster.csv"
        roster.write_text("\n".join([HEADER, ROSALIND, DESMOND, CORNELIUS]) + "\n", encoding="utf-8")
        (root / "data").mkdir(parents=True, exist_ok=True)
        import_roster_file(self.config.database, roster, by="tests", now=START, keys=self.keys)
        self.conn = open_database(self.config.database, keys=self.keys)
        migrate(self.conn)

    def store(self, raw: bytes, at: datetime, record: IntakeRecord | None = None) -> int:
        stamp = at.isoformat(timespec="milliseconds")
        self.conn.execute("BEGIN")
        result = record_frame(self.conn, record or accepted_record(raw), stamp)
        self.conn.execute("COMMIT")
        return result.message_id

    def process(self, at: datetime | None = None) -> None:
        stamp = (at or START).isoformat(timespec="milliseconds")
        pending = pending_messages(self.conn, 0, 1000)
        reader = open_database(self.config.database, readonly=True, keys=self.keys)
        roster = RosterReader(self.config.database, self.keys)
        recipients = {role: self.config.recipient(role) for role in ("pcp", "care_team", "hie")}
        outcomes = process_batch_here(pending, reader, roster, self.config, load_vocabulary(), recipients, UTC)
        roster.close()
        reader.close()
        self.conn.execute("BEGIN")
        apply_outcomes(self.conn, outcomes, stamp, 0.0)
        self.conn.execute("COMMIT")

    def search(self, **criteria) -> list[str]:
        """The control ids a search finds, newest first."""
        page = store.search_messages(self.conn, store.MessageSearch(**criteria))
        return [r["control_id"] for r in page.rows]

    def job(self, fn, *args):
        self.conn.execute("BEGIN")
        try:
            return fn(self.conn, *args)
        finally:
            self.conn.execute("COMMIT")


def terms(**typed) -> tuple:
    return tuple((kind, store.normalise_term(kind, value)) for kind, value in typed.items())


@pytest.fixture
def log(tmp_path, database):
    """A Herald database with a roster (SQLite, then PostgreSQL)."""
    return Log(tmp_path, database)


# -- the terms ---------------------------------------------------------------------------------


def test_a_bundle_s_patient_gives_identifier_name_and_birth_terms():
    """Every identifier (the MBI apart), each family and given name (and their words), the birth date."""
    bundle = {
        "entry": [
            {"resource": {"resourceType": "Encounter"}},
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [
                        {"system": "urn:herald:id:LSR", "value": "e22-49017"},
                        {"system": "http://hl7.org/fhir/sid/us-mbi", "value": "2HX7RA1PK83"},
                    ],
                    "name": [{"family": "O'Brien-Smith", "given": ["Zoë", "Mary Ann"]}],
                    "birthDate": "1952-07-04",
                }
            },
        ]
    }
    assert store.bundle_terms(bundle) == {
        ("mrn", "E2249017"),
        ("mbi", "2HX7RA1PK83"),
        ("family", "OBRIENSMITH"),
        ("family", "OBRIEN"),
        ("family", "SMITH"),
        ("given", "ZOE"),
        ("given", "MARYANN"),
        ("given", "MARY"),
        ("given", "ANN"),
        ("birth", "1952-07-04"),
    }


def test_the_stored_v2_gives_the_same_terms_as_the_bundle_would():
    """A message with no Bundle is indexed from PID-3, PID-5 and PID-7 of its v2; a malformed one gives none."""
    raw = adt("C1", "E100^^^FLOWHOSP^MR~1EG4TE5MK73^^^CMS^MB", "Pemberton", "Rosalind", "19500411", "F")
    assert store.raw_terms(raw) == {
        ("mrn", "E100"),
        ("mbi", "1EG4TE5MK73"),
        ("family", "PEMBERTON"),
        ("given", "ROSALIND"),
        ("birth", "1950-04-11"),
    }
    assert store.raw_terms(b"not HL7 at all") == set()
    assert store.raw_terms(b"MSH|^~\\&|A|B\rPID") == set()


@pytest.mark.parametrize(
    ("kind", "typed", "stored"),
    [
        ("family", "  o'brien-SMITH ", "OBRIENSMITH"),
        ("given", "Zoë", "ZOE"),
        ("mrn", "e22-49 017", "E2249017"),
        ("birth", "19500411", "1950-04-11"),
        ("birth", "1950-04-11", "1950-04-11"),
        ("birth", "April 11", ""),
    ],
)
def test_what_is_typed_is_normalised_as_the_index_stores_it(kind, typed, stored):
    """Case, accents, punctuation, dashes and the date's form do not matter to a search."""
    assert store.normalise_term(kind, typed) == stored


def test_the_index_holds_keyed_hashes_never_the_values(log):
    """message_terms holds 64-bit keyed hashes: no MRN or name in the table, and another key finds nothing."""
    log.store(adt("C-1", "E100^^^FLOWHOSP^MR", **ROSALIND_FULL), START)
    log.process()
    rows = log.conn.execute("SELECT term, message_id FROM message_terms").fetchall()
    assert len(rows) == 4 and all(isinstance(r[0], int) for r in rows)  # mrn, family, given, birth
    other = open_database(log.config.database, keys=KeyRing([("x", b"\x01" * 32)], "other"))  # unchecked: rw
    assert store.search_messages(other, store.MessageSearch(terms=terms(mrn="E100"))).rows == []
    assert log.search(terms=terms(mrn="E100")) == ["C-1"]


def test_the_sqlite_file_holds_no_indexed_value(tmp_path):
    """The database file's bytes (its write-ahead log checkpointed) hold no MRN or name of an indexed message."""
    log = Log(tmp_path, tmp_path / "data" / "herald.db")
    log.store(adt("C-1", "E100^^^FLOWHOSP^MR", **ROSALIND_FULL), START)
    log.process()
    assert log.search(terms=terms(mrn="E100")) == ["C-1"]
    log.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    on_disk = log.config.database.read_bytes()
    assert b"PEMBERTON" not in on_disk and b"E100^" not in on_disk and b"ROSALIND" not in on_disk


# -- searching -------------------------------------------------------------------------------------


@pytest.fixture
def busy(log):
    """Six messages an hour apart: two patients, two senders, one review."""
    messages = [
        adt("C-1", "E100^^^FLOWHOSP^MR", **ROSALIND_FULL),
        adt("C-2", "E200^^^FLOWHOSP^MR", "OKONKWO-HALE", "DESMOND", "19440923", "M"),
        adt("C-3", "E100^^^FLOWHOSP^MR", **ROSALIND_FULL),
        adt("C-4", "E300^^^FLOWHOSP^MR", "PEMBERTIN", "ROS", "19500411", "F"),
        adt("C-5", "E200^^^FLOWHOSP^MR", "OKONKWO-HALE", "DESMOND", "19440923", "M").replace(
            b"FLOWEHR|FLOWHOSP", b"OTHEREHR|OTHERHOSP"
        ),
        adt("C-6", "E100^^^FLOWHOSP^MR", **ROSALIND_FULL).replace(b"ADT^A01^ADT_A01", b"ADT^A03^ADT_A03"),
    ]
    for n, raw in enumerate(messages):
        log.store(raw, START + timedelta(hours=n))
    log.process()
    return log


def test_each_criterion_finds_its_messages_newest_first(busy):
    """MRN, names, birth date, control id, sender, event, state and time range each narrow the search."""
    assert busy.search(terms=terms(mrn="e100")) == ["C-6", "C-3", "C-1"]
    assert busy.search(terms=terms(family="Okonkwo")) == ["C-5", "C-2"]  # one word of a double name
    assert busy.search(terms=terms(family="pemberton", given="rosalind")) == ["C-6", "C-3", "C-1"]
    assert busy.search(terms=terms(birth="19500411")) == ["C-6", "C-4", "C-3", "C-1"]
    assert busy.search(control_id="C-4") == ["C-4"]
    assert busy.search(sender="OTHEREHR|OTHERHOSP") == ["C-5"]
    assert busy.search(sender="|FLOWHOSP", terms=terms(mrn="E200")) == ["C-2"]
    assert busy.search(sender="FLOWEHR", trigger_event="A03") == ["C-6"]
    assert busy.search(state="review") == ["C-4"]
    since = (START + timedelta(hours=1)).isoformat(timespec="milliseconds")
    until = (START + timedelta(hours=3)).isoformat(timespec="milliseconds")
    assert busy.search(since=since, until=until) == ["C-3", "C-2"]
    assert busy.search(terms=terms(mrn="E999")) == []


def test_pages_follow_each_other_with_no_overlap_and_no_gap(busy):
    """Keyset pages on (received_at, id): older pages go back to the first message, newer ones return."""
    first = store.search_messages(busy.conn, store.MessageSearch(), limit=4)
    assert [r["control_id"] for r in first.rows] == ["C-6", "C-5", "C-4", "C-3"]
    assert first.newer is None and first.older == first.rows[-1]["id"]
    second = store.search_messages(busy.conn, store.MessageSearch(), before=first.older, limit=4)
    assert [r["control_id"] for r in second.rows] == ["C-2", "C-1"]
    assert second.older is None and second.newer == second.rows[0]["id"]
    back = store.search_messages(busy.conn, store.MessageSearch(), after=second.newer, limit=4)
    assert [r["control_id"] for r in back.rows] == ["C-6", "C-5", "C-4", "C-3"]
    assert back.newer is None and back.older == back.rows[-1]["id"]


def test_a_search_by_patient_pages_by_arrival(busy):
    """Pages of a patient's messages (driven by the index) follow each other, back and forth."""
    query = store.MessageSearch(terms=terms(mrn="E100"))
    first = store.search_messages(busy.conn, query, limit=2)
    assert [r["control_id"] for r in first.rows] == ["C-6", "C-3"] and first.newer is None
    second = store.search_messages(busy.conn, query, before=first.older, limit=2)
    assert [r["control_id"] for r in second.rows] == ["C-1"] and second.older is None
    back = store.search_messages(busy.conn, query, after=second.newer, limit=2)
    assert [r["control_id"] for r in back.rows] == ["C-6", "C-3"] and back.newer is None


def test_pages_within_a_time_range_stay_in_it(busy):
    """A cursor and a time range together: the page starts at the cursor and ends at the range."""
    since = (START + timedelta(hours=1)).isoformat(timespec="milliseconds")
    query = store.MessageSearch(since=since)
    first = store.search_messages(busy.conn, query, limit=2)
    assert [r["control_id"] for r in first.rows] == ["C-6", "C-5"]
    rest = store.search_messages(busy.conn, query, before=first.older, limit=10)
    assert [r["control_id"] for r in rest.rows] == ["C-4", "C-3", "C-2"] and rest.older is None


def test_a_cursor_that_names_no_message_is_a_clean_error(busy):
    """Paging from an id that is not in the log says so."""
    with pytest.raises(StoreError, match="no message 999"):
        store.search_messages(busy.conn, store.MessageSearch(), before=999)


def test_sender_figures_and_hours(busy):
    """Per sender: counts, refusals, the last message; per hour: messages."""
    stats = store.sender_stats(busy.conn, START.isoformat())
    assert [(s["sending_application"], s["messages"], s["last_id"]) for s in stats] == [
        ("FLOWEHR", 5, 6),
        ("OTHEREHR", 1, 5),
    ]
    assert store.senders(busy.conn) == [("FLOWEHR", "FLOWHOSP"), ("OTHEREHR", "OTHERHOSP")]
    later = (START + timedelta(hours=4)).isoformat()
    assert [s["messages"] for s in store.sender_stats(busy.conn, later)] == [1, 1]
    hours = store.messages_per_hour(busy.conn, START.isoformat())
    assert [n for _, n, _ in hours] == [1, 1, 1, 1, 1, 1] and hours[0][0] == "2026-11-20T08"


def test_who_matched_a_member(busy):
    """A roster member's matched messages, newest first."""
    found = store.member_messages(busy.conn, "ACO-FLOW", "F-1")
    assert [(m["control_id"], m["grade"]) for m in found] == [
        ("C-6", "certain"),
        ("C-4", "possible"),  # held for review, its candidate shown
        ("C-3", "certain"),
        ("C-1", "certain"),
    ]


# -- the background work and the rebuild -----------------------------------------------------------


def test_a_message_refused_at_intake_is_indexed_by_the_background_work(log):
    """Intake's refusals get no outcome: index_work finds them and indexes their stored v2."""
    raw = adt("C-R", "E777^^^FLOWHOSP^MR", "PEMBERTON", "ROSALIND", "19500411", "F")
    record = IntakeRecord(raw, "tcp:127.0.0.1:1", REJECTED, "AR", "FLOWEHR", "FLOWHOSP", "ADT", "A01", "C-R")
    log.store(raw, START, record)
    assert log.search(terms=terms(mrn="E777")) == []
    done = log.job(store.index_work, 500)
    assert done["refusals"] == 1
    assert log.search(terms=terms(mrn="E777")) == ["C-R"]
    assert log.job(store.index_work, 500)["refusals"] == 0, "done once"


def test_messages_from_before_the_index_are_back_filled(log):
    """Messages stored before migration 9 are indexed in the background, batch by batch."""
    for n in range(5):
        log.store(adt(f"C-{n}", f"E{n}^^^FLOWHOSP^MR", **ROSALIND_FULL), START + timedelta(minutes=n))
    log.process()
    log.conn.execute("DELETE FROM message_terms")  # as if stored before the index existed
    log.conn.execute("UPDATE console_meta SET value = '5' WHERE name = 'backfill_to'")
    assert log.search(terms=terms(mrn="E3")) == []
    assert log.job(store.index_work, 2)["backfilled"] == 2
    assert store.index_status(log.conn)["backfill_through"] == 2
    log.job(store.index_work, 2)
    log.job(store.index_work, 2)
    assert store.index_status(log.conn)["backfill_through"] == 5
    assert log.search(terms=terms(mrn="E3")) == ["C-3"]
    assert log.job(store.index_work, 2)["backfilled"] == 0


def test_a_purged_message_is_no_longer_found_by_its_patient(busy):
    """Retention removes a body; the background work then deletes its terms (the header stays searchable)."""
    assert busy.search(terms=terms(mrn="E200")) == ["C-5", "C-2"]
    busy.job(store.index_work, 500)  # up to date
    busy.conn.execute("UPDATE notifications SET state = 'sent'")  # their work done: purgeable
    batch = busy.job(purge_next, (START + timedelta(hours=2)).isoformat(), START.isoformat(), "tests", 10)
    assert len(batch.message_ids) == 2  # C-1 and C-2
    assert busy.job(store.index_work, 500)["purged"] > 0
    assert busy.search(terms=terms(mrn="E200")) == ["C-5"]
    assert busy.search(control_id="C-2") == ["C-2"]


def test_terms_written_with_encryption_off_are_found_after_it_is_on_and_rebuilt(tmp_path, database):
    """Terms hashed under the disabled ring are searched too, until a rebuild hashes them under the key."""
    plain = Log(tmp_path, database, keys=KeyRing.disabled())
    plain.store(adt("C-1", "E100^^^FLOWHOSP^MR", **ROSALIND_FULL), START)
    plain.process()
    assert store.plain_terms(plain.conn)
    keyed = KeyRing([("k1", b"\x07" * 32)], "test")
    conn = open_database(plain.config.database, keys=keyed)
    query = store.MessageSearch(terms=terms(mrn="E100"))
    assert [r["control_id"] for r in store.search_messages(conn, query).rows] == ["C-1"]
    conn.execute("BEGIN")
    assert store.rebuild_batch(conn, 0, 100) == (1, 1)
    store.finish_rebuild(conn, 1, START.isoformat(), "tests")
    conn.execute("COMMIT")
    assert not store.plain_terms(conn)
    assert store.term_keys(conn, "mrn", "E100") == (keyed.lookup_int(b"msg.mrn:E100"),)
    assert [r["control_id"] for r in store.search_messages(conn, query).rows] == ["C-1"]


# -- users and sessions ----------------------------------------------------------------------------


def test_users_and_sessions_live_and_end_as_they_should(log):
    """A session opens for its lifetime; a password change or removal ends it; each change is audited."""
    now = START.isoformat()
    log.job(store.add_user, "ann", "analyst", "$argon2id$fake", now, "root")
    with pytest.raises(StoreError, match="already a console user 'ann'"):
        log.job(store.add_user, "ann", "admin", "$argon2id$fake", now, "root")
    with pytest.raises(StoreError, match="role: 'boss'"):
        log.job(store.add_user, "bea", "boss", "$argon2id$fake", now, "root")
    log.job(store.create_session, "token-1", "ann", "csrf-1", 1000.0, 60.0, now, "127.0.0.1")
    assert log.job(store.session_of, "token-1", 1059.0) == {
        "name": "ann",
        "role": "analyst",
        "csrf": "csrf-1",
        "expires_at": 1060.0,
    }
    assert log.job(store.session_of, "token-1", 1060.0) is None, "expired"
    assert log.conn.execute("SELECT token_hash FROM console_sessions").fetchone()[0] != "token-1"
    log.job(store.create_session, "token-2", "ann", "csrf-2", 2000.0, 60.0, now, "127.0.0.1")
    log.job(store.set_password, "ann", "$argon2id$other", now, "root")
    assert log.job(store.session_of, "token-2", 2001.0) is None
    log.job(store.create_session, "token-3", "ann", "csrf-3", 3000.0, 60.0, now, "127.0.0.1")
    log.job(store.remove_user, "ann", now, "root")
    assert log.job(store.session_of, "token-3", 3001.0) is None
    kinds = [r[0] for r in log.conn.execute("SELECT kind FROM events WHERE actor = 'console' ORDER BY id")]
    assert kinds == [
        "console-user-added",
        "console-login",
        "console-login",
        "console-password-changed",
        "console-login",
        "console-user-removed",
    ]


# -- the CLI ----------------------------------------------------------------------------------------------


def cli(log: Log, *args, input: str | None = None):
    return CliRunner().invoke(main, [*map(str, args), "--config", str(log.config_file)], input=input)


def test_herald_users_add_list_passwd_remove(log):
    """The users commands: add with a prompt's or stdin's password, list, passwd, remove; bad input exits 2."""
    added = cli(log, "users", "add", "ann", "--role", "admin", input="a-long-enough-password\na-long-enough-password\n")
    assert added.exit_code == 0, added.output
    assert "added ann (admin)" in added.output
    hashed = log.conn.execute("SELECT password_hash FROM console_users WHERE name = 'ann'").fetchone()[0]
    assert hashed.startswith("$argon2id$") and "a-long-enough-password" not in hashed
    short = cli(log, "users", "add", "bea", "--role", "analyst", "--password-stdin", input="short\n")
    assert short.exit_code == 2 and "password: at least 12 characters" in short.output
    bad = cli(log, "users", "add", "bad name", "--role", "analyst", "--password-stdin", input="x" * 12 + "\n")
    assert bad.exit_code == 2 and "name: 1-64 letters" in bad.output
    again = cli(log, "users", "add", "ann", "--role", "analyst", "--password-stdin", input="x" * 12 + "\n")
    assert again.exit_code == 2 and "already a console user 'ann'" in again.output
    listed = cli(log, "users", "list")
    assert listed.exit_code == 0 and re.search(r"^ann\s+admin\s", listed.output, re.M)
    changed = cli(log, "users", "passwd", "ann", "--password-stdin", input="another-good-password\n")
    assert changed.exit_code == 0 and "their sessions have ended" in changed.output
    assert log.conn.execute("SELECT password_hash FROM console_users WHERE name = 'ann'").fetchone()[0] != hashed
    assert cli(log, "users", "remove", "ann").exit_code == 0
    missing = cli(log, "users", "remove", "ann")
    assert missing.exit_code == 2 and "no console user 'ann'" in missing.output
    events = [json.loads(r[0]) for r in log.conn.execute("SELECT detail FROM events WHERE kind LIKE 'console-%'")]
    assert [e["name"] for e in events] == ["ann", "ann", "ann"] and all(e["by"] for e in events)


def test_herald_index_status_and_rebuild(busy):
    """`index rebuild` indexes every message again and says how many; `index status` says where it is."""
    busy.conn.execute("DELETE FROM message_terms")
    rebuilt = cli(busy, "index", "rebuild", "--batch", "4")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "indexed 6 message(s) up to id 6" in rebuilt.output
    assert busy.search(terms=terms(mrn="E100")) == ["C-6", "C-3", "C-1"]
    status = cli(busy, "index", "status")
    assert status.exit_code == 0 and "back-fill of earlier messages: done" in status.output
    assert re.search(r"terms: \d+ for messages up to id 6", status.output)


def test_every_console_command_and_setting_is_in_the_readme():
    """The README's "Web console" section documents each users/index command and each [console] setting."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Web console") : readme.index("## Configuration")]
    for command in ("users add", "users list", "users passwd", "users remove", "index rebuild", "index status"):
        assert f"herald {command}" in section, command
    for setting in ("enabled", "listen", "session_hours", "login_attempts"):
        assert re.search(rf"^{setting} = ", section, re.M), setting


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[console]\nlisten = "tcp:8080"\n', "console.listen"),
        ('[console]\nlisten = "http:8080"\n', "console.listen"),
        ("[console]\nsession_hours = 0\n", "console.session_hours"),
        ("[console]\nlogin_attempts = 0\n", "console.login_attempts"),
        ("[console]\nenabled = 1\n", "console.enabled"),
    ],
)
def test_a_bad_console_setting_is_refused_naming_it(tmp_path, toml, key):
    """Each [console] setting is checked at load, and the error names it."""
    path = tmp_path / "herald.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == key
