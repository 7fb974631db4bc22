"""PHI at rest: sealed in the database, its write-ahead log, the roster file and the file drops; Herald's
files private whatever the umask; a gateway without its key refuses to start; rotation seals everything again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_audit import store_of

from gateway.app.cli import main
from gateway.app.keys import key_status, rotate_keys
from gateway.app.roster import import_roster_file
from gateway.config import default_recipients, load_config
from gateway.conversion.vocabulary import load_vocabulary
from gateway.delivery.worker import open_file_drop, write_notification_files
from gateway.errors import StoreError
from gateway.pipeline.process import process_message
from gateway.records import RECEIVED, IntakeRecord, Notification
from gateway.store import Store, StoredRoster, message_detail, open_database, open_roster_snapshot, roster_path
from gateway.store import keys as keys_module
from gateway.store.keys import KEYS_ENV, KeyRing, KeyRingError, new_key_file
from gateway.store.messages import apply_outcomes, pending_messages, record_frame
from gateway.store.postgres import PostgresDatabase
from gateway.store.roster_import import roster_key_counts
from gateway.store.schema import MIGRATIONS, run_sql
from gateway.store.sealing import OUTBOX_SUFFIX, message_context

ROOT = Path(__file__).resolve().parent.parent
HERALD = [sys.executable, "-m", "gateway.app.cli"]

# A synthetic patient whose every identifying value is distinctive enough to find in a file's bytes.
FAMILY, GIVEN = "ZYXQUORTH", "BELISANDRA"
MRN, AUTHORITY = "ZQ90417731", "ZQHOSP"
BIRTH = "19310829"
MBI = "9EQ4XR7MK21"
STREET = "4417 VELLUMWICK LN"
#: What must never be found in a file Herald writes, compared in lower case (names in any case).
SECRETS = (FAMILY, GIVEN, MRN, BIRTH, "1931-08-29", MBI, "VELLUMWICK")

ROSTER_HEADER = (
    "member_id,mbi,mrn,mrn_authority,last_name,first_name,birth_date,sex,address_line,city,state,zip,phone,"
    "aco_id,pcp_npi,pcp_name,care_manager,effective_start,effective_end"
)
ROSTER_ROW = (
    f"M-ATREST-1,{MBI},{MRN},{AUTHORITY},Zyxquorth,Belisandra,1931-08-29,F,{STREET},New Haven,CT,06511,2035550143,"
    "ACO-ATREST,1234567893,Dr. Lena Marsh,care-team@atrest-aco.example,2026-01-01,"
)


def adt(event: str, control_id: str) -> bytes:
    """An ADT message (A04 ED registration, A01 admit, A03 discharge) for the synthetic patient."""
    structure = "ADT_A03" if event == "A03" else "ADT_A01"
    patient_class = "E" if event == "A04" else "I"
    discharge = "20261120180000-0500" if event == "A03" else ""
    return (
        "\r".join(
            [
                f"MSH|^~\\&|EPIC|LSR|HERALD|ACO|20261120031522-0500||ADT^{event}^{structure}|{control_id}|P|2.5.1"
                "|||AL|NE||UNICODE UTF-8",
                f"EVN|{event}|20261120031500-0500",
                f"PID|1||{MRN}^^^{AUTHORITY}^MR~{MBI}^^^CMS^MB||{FAMILY}^{GIVEN}^Q^^^^L||{BIRTH}|F|||"
                f"{STREET}^^NEW HAVEN^CT^06511^USA^H||^PRN^PH^^1^203^5550143",
                f"PV1|1|{patient_class}|CARD^4104^A^LSR||||1678901236^OKAFOR^TOMAS^^^DR^^^NPI|||CAR||||7|||"
                "1678901236^OKAFOR^TOMAS^^^DR^^^NPI|IN|LSV5531901^^^LSR^VN|MCR|||||||||||||||||||||||||"
                f"20261120031000-0500|{discharge}",
                "DG1|1||I21.4^Non-ST elevation (NSTEMI) myocardial infarction^I10|||A",
            ]
        )
        + "\r"
    ).encode("utf-8")


def phi_found(data: bytes) -> list[str]:
    """The secrets ``data`` holds (any case)."""
    low = data.lower()
    return [s for s in SECRETS if s.lower().encode() in low]


def phi_in_files(folder: Path) -> dict[str, list[str]]:
    """Every file under ``folder`` that holds a secret, with what it holds."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        hits = phi_found(path.read_bytes())
        if hits:
            found[str(path.relative_to(folder))] = hits
    return found


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def env_without_keys() -> dict[str, str]:
    """This environment without $HERALD_KEYS (conftest sets it): the key file decides."""
    return {k: v for k, v in os.environ.items() if k != KEYS_ENV}


def herald(*args, env=None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HERALD, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or env_without_keys(),
        umask=0o022,
    )


def write_config(root: Path, data: Path, key_file: Path, extra: str = "") -> Path:
    config = root / "herald.toml"
    config.write_text(
        f'[server]\ndata_dir = "{data}"\nlisten = ["tcp:0:interface=127.0.0.1"]\nallow_plain = true\n\n'
        f'[security]\nkey_file = "{key_file}"\n{extra}'
    )
    return config


class Server:
    """``herald serve --config`` as a process, its log (stderr) in a file outside the data folder."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with open(log, "w") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*HERALD, "serve", "--config", str(config)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env_without_keys(),
                umask=0o022,
            )
        deadline = time.monotonic() + 30
        self.port = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = re.search(r"\(ports \[(\d+)\]\)", log.read_text())
            if found:
                self.port = int(found.group(1))
                return
            time.sleep(0.1)
        self.stop()
        pytest.fail("herald serve did not start:\n" + log.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until_done(database: Path | PostgresDatabase, messages: int, seconds: float = 60.0) -> None:
    """Poll (read-only, no key needed for counts) until every message is routed and every notification sent."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn = open_database(database, readonly=True)
        except StoreError:  # not made yet
            stored, open_work = 0, 1
        else:
            try:
                stored = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
                open_work = conn.execute(
                    "SELECT (SELECT COUNT(*) FROM messages WHERE state = 'received') + "
                    "(SELECT COUNT(*) FROM notifications WHERE state != 'sent')"
                ).fetchone()[0]
            except sqlite3.Error:
                stored, open_work = 0, 1
            finally:
                conn.close()
        if stored >= messages and open_work == 0:
            return
        time.sleep(0.2)
    pytest.fail("the gateway did not route and deliver every message in time")


# -- the attacker's search ------------------------------------------------------------------


def test_no_phi_in_any_file_the_gateway_writes_nor_in_its_log(tmp_path):
    """End to end over a real socket: ADT messages for a distinctive patient are stored, matched on an imported
    roster, routed and dropped as files; no file of the data folder (the database, its write-ahead log and
    shared-memory file while the gateway runs, the roster file, the file drops) nor the process log holds
    the patient's name, MRN, birth date (either form), MBI or street. The key opens it all again, and every
    file and folder is private though the umask is 022."""
    data, keys_dir = tmp_path / "data", tmp_path / "keys"
    key_file = keys_dir / "herald.key"
    config = write_config(tmp_path, data, key_file)
    made = herald("keys", "init", "--config", config)
    assert made.returncode == 0, made.stderr
    roster_csv = tmp_path / "roster.csv"
    roster_csv.write_text(f"{ROSTER_HEADER}\n{ROSTER_ROW}\n")
    imported = herald("roster", "import", roster_csv, "--config", config)
    assert imported.returncode == 0, imported.stderr
    files = []
    for n, event in enumerate(("A04", "A01", "A03")):
        path = tmp_path / f"msg-{n}.hl7"
        path.write_bytes(adt(event, f"ATREST{n:04d}"))
        files.append(path)

    server = Server(config, tmp_path / "serve.log")
    try:
        sent = herald("send", f"127.0.0.1:{server.port}", *files, "--quiet")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until_done(data / "herald.db", len(files))
        # While it runs: the write-ahead log holds the commits (no checkpoint has folded them in yet).
        wal = data / "herald.db-wal"
        assert wal.exists() and wal.stat().st_size > 0
        assert phi_in_files(data) == {}
        assert phi_found(server.log.read_bytes()) == []
        for name in ("herald.db", "herald.db-wal", "herald.db-shm", "roster.db"):
            assert mode(data / name) == 0o600, name
        drops = sorted((data / "outbox").rglob(f"*{OUTBOX_SUFFIX}"))
        assert {p.parent.name for p in drops} == {"pcp", "care-team", "hie"}
        assert len(drops) == 9 and not list((data / "outbox").rglob("*.json"))
        assert {mode(p) for p in drops} == {0o600}
        assert {mode(p.parent) for p in drops} == {0o700} and mode(data / "outbox") == 0o700

        # The key opens what the files hide: the log shows the patient, a file drop opens (audited).
        shown = herald("log", "show", "2", "--config", config)
        assert shown.returncode == 0, shown.stderr
        assert FAMILY in shown.stdout and BIRTH in shown.stdout
        opened = herald("outbox", "open", drops[0], "--config", config, "--by", "alice")
        assert opened.returncode == 0, opened.stderr
        bundle = json.loads(opened.stdout)
        assert bundle["id"] == drops[0].name.removesuffix(OUTBOX_SUFFIX)
        assert FAMILY.title() in opened.stdout or FAMILY in opened.stdout
        conn = sqlite3.connect(f"file:{data / 'herald.db'}?mode=ro", uri=True)
        reads = conn.execute("SELECT actor, detail FROM events WHERE kind = 'phi-read'").fetchall()
        conn.close()
        assert any(actor == "cli:alice" and "outbox open" in detail for actor, detail in reads), reads
        assert phi_in_files(data) == {}  # the audit events name the reader and the file, not the patient
    finally:
        server.stop()

    assert server.proc.returncode == 0, server.log.read_text()
    assert phi_in_files(data) == {}  # after the last checkpoint too
    assert phi_found(server.log.read_bytes()) == []
    assert mode(data) == 0o700 and mode(data / "herald.db") == 0o600 and mode(data / "roster.db") == 0o600
    assert mode(keys_dir) == 0o700 and mode(key_file) == 0o600
    # Matched by the MBI on the roster: routed to the member's PCP and care team, and the HIE.
    conn = open_database(data / "herald.db", readonly=True, keys=KeyRing.load(key_file, environ={}))
    assert {r[0] for r in conn.execute("SELECT DISTINCT state FROM messages")} == {"routed"}
    assert [r[0] for r in conn.execute("SELECT DISTINCT member_id FROM matches")] == ["M-ATREST-1"]
    conn.close()


# -- a gateway without its key ---------------------------------------------------------------


def test_serve_refuses_to_start_without_a_key_and_says_how_to_make_one(tmp_path):
    """No HERALD_KEYS and no key file: herald serve exits 1 naming `herald keys init` and the opt-out; no traceback."""
    result = herald("serve", "--data", tmp_path / "data", "--listen", "tcp:0:interface=127.0.0.1", "--allow-plain")
    assert result.returncode == 1, result.stderr
    assert "herald keys init" in result.stderr and "encrypt_at_rest = false" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "herald.db").exists()


def test_a_wrong_key_is_refused_by_name_not_with_a_traceback(data_dir, tmp_path, monkeypatch):
    """A database and roster written with one key ring: another ring is refused, naming both key checks, by
    serve, log show and the roster commands; with encryption turned off the database says it is encrypted."""
    data = data_dir
    first = KeyRing.load(None)  # conftest's $HERALD_KEYS
    stored_messages(data, first)
    other = KeyRing.from_text(f"k1 {_b64()}", "other")
    monkeypatch.setenv(KEYS_ENV, f"k1 {_b64()}")
    for command in (["log", "show", "1"], ["review", "list"], ["match", str(tmp_path / "none.hl7")]):
        (tmp_path / "none.hl7").write_bytes(adt("A01", "X1"))
        result = CliRunner().invoke(main, [*command, "--data", str(data)])
        assert result.exit_code == 1, (command, result.output)
        assert "another key ring" in result.output and "key check" in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    env = {**env_without_keys(), KEYS_ENV: f"k1 {_b64()}"}
    served = herald("serve", "--data", data, "--listen", "tcp:0:interface=127.0.0.1", "--allow-plain", env=env)
    assert served.returncode == 1 and "another key ring" in served.stderr and "Traceback" not in served.stderr
    # The wrong ring never opens a value; the store refuses it before any write.
    with pytest.raises(KeyRingError, match="another key ring"):
        Store(store_of(data), reactor=object(), keys=other)
    # Encryption off on an encrypted database: refused, saying so.
    config = tmp_path / "off.toml"
    config.write_text(f'[server]\ndata_dir = "{data}"\n\n[security]\nencrypt_at_rest = false\n')
    with pytest.raises(KeyRingError, match="is encrypted"):
        Store(store_of(data), reactor=object(), keys=KeyRing.disabled())
    monkeypatch.delenv(KEYS_ENV)
    result = CliRunner().invoke(main, ["log", "show", "1", "--config", str(config)])
    assert result.exit_code == 1 and "is encrypted" in result.output, result.output
    assert "Traceback" not in result.output


def _b64() -> str:
    import base64

    return base64.b64encode(os.urandom(32)).decode("ascii")


# -- rotation ----------------------------------------------------------------------------------


def stored_messages(data: Path, keys: KeyRing, raws: list[bytes] | None = None) -> None:
    """A data folder with the roster imported and ``raws`` stored and run through the pipeline, sealed with ``keys``
    (its store where the CLI finds it: ``herald.db``, or the database ``HERALD_STORE`` names)."""
    db = store_of(data)
    roster_csv = data.parent / "roster.csv"
    roster_csv.write_text(f"{ROSTER_HEADER}\n{ROSTER_ROW}\n")
    data.mkdir(parents=True, exist_ok=True)
    import_roster_file(db, roster_csv, by="tests", keys=keys)
    store = Store(db, reactor=object(), keys=keys)  # never started: its SQL only
    conn = store._conn
    now = "2026-11-20T12:00:00.000+00:00"
    for n, raw in enumerate(raws or [adt("A04", "ROT0001"), adt("A01", "ROT0002")]):
        record = IntakeRecord(raw, "127.0.0.1:5000", RECEIVED, "CA", "EPIC", "LSR", "ADT", "A01", f"ROT{n}")
        record_frame(conn, record, now)
    snapshot = open_roster_snapshot(db, keys)
    lookups = StoredRoster(snapshot, conn)
    recipients = default_recipients(data)
    outcomes = [process_message(p, load_vocabulary(), UTC, lookups, recipients) for p in pending_messages(conn, 0, 100)]
    apply_outcomes(conn, outcomes, now, 0.0)
    snapshot.close()
    conn.close()


def test_rotation_seals_every_value_under_the_new_key_and_old_data_still_reads(data_dir, tmp_path, monkeypatch):
    """`herald keys rotate` appends k2 and seals every value (database and roster) under it; status says so; the
    messages still read, a value sealed under k1 before (a backup) still opens, and a ring loaded before the
    rotation (a running gateway's) picks k2 up from the file."""
    monkeypatch.delenv(KEYS_ENV)
    monkeypatch.setattr(keys_module, "REFRESH_SECONDS", 0.0)
    data = data_dir
    key_file = new_key_file(tmp_path / "keys" / "herald.key")
    config = write_config(tmp_path, data, key_file)
    cfg = load_config(config)
    running = KeyRing.load(key_file, environ={})
    stored_messages(data, running)
    conn = open_database(cfg.database, readonly=True, keys=running)
    backup = conn.execute("SELECT raw FROM messages WHERE id = 1").fetchone()[0]
    before = message_detail(conn, 1)["message"]
    conn.close()

    status = key_status(cfg)
    assert set(status.totals()) == {"k1"} and status.roster == {"k1": 1}
    result = CliRunner().invoke(main, ["keys", "rotate", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "added key k2" in result.output and "sealed under k2" in result.output

    status = key_status(cfg)
    assert set(status.totals()) == {"k2"}, status.columns
    assert status.columns["messages.raw"]["k2"] == 2 and status.columns["messages.fhir"]["k2"] == 2
    assert status.roster == {"k2": 1}
    shown = CliRunner().invoke(main, ["keys", "status", "--config", str(config)])
    assert shown.exit_code == 0 and re.search(r"^k1\s+0$", shown.output, re.M), shown.output
    assert re.search(r"^k2\s+\d+$", shown.output, re.M) and re.search(r"^plaintext\s+0$", shown.output, re.M)

    ring = KeyRing.load(key_file, environ={})
    assert ring.ids == ("k1", "k2")
    conn = open_database(cfg.database, readonly=True, keys=ring)
    after = message_detail(conn, 1)["message"]
    assert (after["raw"], after["fhir"]) == (before["raw"], before["fhir"])
    conn.close()
    assert ring.open(backup, message_context("raw", 1)) == before["raw"]  # k1 still opens old copies
    log = CliRunner().invoke(main, ["log", "show", "1", "--config", str(config)])
    assert log.exit_code == 0 and FAMILY in log.output, log.output
    # The ring a gateway loaded before the rotation: it opens k2 values (reading the file again) and seals with k2.
    assert running.open(ring.seal(b"x", b"c"), b"c") == b"x"
    assert running.key_of(running.seal(b"y", b"c")) == "k2"
    # Lookups are unchanged by a rotation: the roster still finds the patient by MBI and blocking keys.
    snapshot = open_roster_snapshot(cfg.database, ring)
    assert [m["member_id"] for m in StoredRoster(snapshot).by_mbi(MBI)] == ["M-ATREST-1"]
    snapshot.close()


def test_rotation_runs_while_the_gateway_takes_messages(data_dir, tmp_path):
    """`herald keys rotate` on a running gateway's data, while a sender keeps sending: every message is ACKed and
    routed, the gateway seals with the new key (read from the file) and nothing is left under the old one."""
    data = data_dir
    key_file = tmp_path / "keys" / "herald.key"
    config = write_config(tmp_path, data, key_file)
    assert herald("keys", "init", "--config", config).returncode == 0
    folders = []
    for batch, count in enumerate((40, 600)):
        folder = tmp_path / f"batch-{batch}"
        folder.mkdir()
        for n in range(count):
            (folder / f"{n:03d}.hl7").write_bytes(adt(("A04", "A01", "A03")[n % 3], f"RUN{batch}{n:04d}"))
        folders.append(folder)
    server = Server(config, tmp_path / "serve.log")
    try:
        first = herald("send", f"127.0.0.1:{server.port}", folders[0], "--quiet")
        assert first.returncode == 0, first.stdout + first.stderr
        sender = subprocess.Popen(
            [*HERALD, "send", f"127.0.0.1:{server.port}", str(folders[1]), "--quiet"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env_without_keys(),
        )
        rotated = herald("keys", "rotate", "--batch", "10", "--config", config)
        # Measured here: the 600 are still being sent when the rotation ends (it adds k2, waits 2 s, seals).
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "added key k2" in rotated.stdout
        wait_until_done(store_of(data), 640, seconds=120)
        status = key_status(load_config(config), environ={})
        assert status.totals().get("k1", 0) == 0 and None not in status.totals(), status.columns
        assert status.columns["messages.raw"]["k2"] == 640
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log.read_text()
    assert phi_found(server.log.read_bytes()) == []


def test_rotate_refuses_to_append_to_keys_from_the_environment(data_dir):
    """Keys from $HERALD_KEYS cannot be appended to: rotate says what to do; --no-new-key seals with the newest."""
    data = data_dir
    stored_messages(data, KeyRing.load(None))
    result = CliRunner().invoke(main, ["keys", "rotate", "--data", str(data)])
    assert result.exit_code == 1 and "--no-new-key" in result.output, result.output
    result = CliRunner().invoke(main, ["keys", "rotate", "--no-new-key", "--data", str(data)])
    assert result.exit_code == 0, result.output


def test_rotate_hashes_again_and_seals_the_links_confirmed_with_encryption_off(database):
    """MRN links confirmed while encryption was off are hashed under the ring and sealed, batch after batch; a
    link confirmed since under the ring's hash gives way to the one from before (the row is not there twice)."""
    from gateway.store.rotation import key_counts, reseal_batch
    from gateway.store.sealing import link_context, mrn_hash

    links = [("MRN-1", "FAC", "M-1"), ("MRN-2", "FAC", "M-2"), ("MRN-3", "fac", "M-3")]

    def confirm(conn, mrn, authority, member_id):
        keys = conn.keys
        hashed = mrn_hash(keys, mrn)
        conn.execute(
            "INSERT INTO confirmed_links (mrn_hash, mrn_authority, aco_id, member_id, review_id, confirmed_by, "
            "confirmed_at, mrn) VALUES (?, ?, 'ACO', ?, NULL, 'alice', 't', ?)",
            (hashed, authority, member_id, keys.seal_text(mrn, link_context(hashed, authority, "ACO"))),
        )

    plain = Store(database, reactor=object(), keys=KeyRing.disabled())
    for link in links:
        confirm(plain._conn, *link)
    plain._conn.close()
    ring = KeyRing.from_text(f"k1 {_b64()}", "test")
    conn = Store(database, reactor=object(), keys=ring)._conn  # the database takes the key
    confirm(conn, "MRN-1", "fac", "M-NEW")  # the same link, confirmed since under the ring's hash
    sealed, after = 0, None
    for _ in range(10):
        n, after = reseal_batch(conn, "confirmed_links.mrn", after, 1)
        sealed += n
        if after is None:
            break
    assert (sealed, after) == (3, None)
    rows = conn.execute("SELECT mrn_hash, mrn_authority, member_id, mrn FROM confirmed_links").fetchall()
    opened = {
        (ring.open_text(r[3], link_context(r[0], r[1], "ACO")), r[1].upper(), r[2])
        for r in rows
        if r[0] == mrn_hash(ring, ring.open_text(r[3], link_context(r[0], r[1], "ACO")))
    }
    assert len(rows) == 3 and opened == {("MRN-1", "FAC", "M-1"), ("MRN-2", "FAC", "M-2"), ("MRN-3", "FAC", "M-3")}
    assert key_counts(conn)["confirmed_links.mrn"] == {"k1": 3}
    conn.close()


# -- a database from before ------------------------------------------------------------------


def plaintext_database(data: Path, raw: bytes) -> None:
    """A herald.db as schema version 4 wrote it (no sealing, plain SHA-256 digests, plain MRN links) holding
    one routed message of the patient, and a roster.db of schema version 1 (test_roster's)."""
    import hashlib

    from test_roster import write_version_1_roster

    data.mkdir(parents=True)
    conn = sqlite3.connect(data / "herald.db", isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for version, step in MIGRATIONS:
        if version > 4:
            break
        step(conn) if callable(step) else run_sql(conn, step)
        conn.execute("INSERT INTO migrations VALUES (?, '2026-01-01')", (version,))
    bundle = json.dumps({"resourceType": "Bundle", "entry": [{"resource": {"name": [{"family": FAMILY}]}}]})
    conn.execute(
        "INSERT INTO messages (id, received_at, peer, sending_application, sending_facility, message_type, "
        "trigger_event, control_id, version, charset, sha256, raw, state, ack_code, fhir, updated_at) "
        "VALUES (1, '2026-11-20T08:00:00.000+00:00', '127.0.0.1:5000', 'EPIC', 'LSR', 'ADT', 'A01', 'OLD0001', "
        "'2.5.1', 'UNICODE UTF-8', ?, ?, 'routed', 'CA', ?, '2026-11-20T08:00:01.000+00:00')",
        (hashlib.sha256(raw).hexdigest(), raw, bundle),
    )
    conn.execute(
        "INSERT INTO confirmed_links VALUES (?, ?, 'ACO-TEST', 'M-001', NULL, 'alice', '2026-11-20')",
        (MRN, AUTHORITY),
    )
    conn.close()
    write_version_1_roster(data / "herald.db")


def test_a_plaintext_database_from_before_is_read_and_then_sealed_by_rotate(tmp_path, monkeypatch):
    """A schema-4 database and a version-1 roster (plaintext, PHI readable by `strings`) opened with a key:
    the message reads, its retransmission is still recognised, the MRN link and the roster still match; after
    `herald keys rotate` every value is sealed, digests are keyed, and no file holds the patient's values."""
    monkeypatch.delenv(KEYS_ENV)
    data = tmp_path / "data"
    raw = adt("A01", "OLD0001")
    plaintext_database(data, raw)
    assert phi_in_files(data)  # readable before: the finding
    key_file = new_key_file(tmp_path / "keys" / "herald.key")
    config = write_config(tmp_path, data, key_file)
    cfg = load_config(config)
    keys = KeyRing.load(key_file, environ={})

    store = Store(cfg.database, reactor=object(), keys=keys)  # migrates to schema 5: links hashed, the key noted
    conn = store._conn
    assert message_detail(conn, 1)["message"]["raw"] == raw
    again = record_frame(conn, IntakeRecord(raw, "p", RECEIVED, "CA", "EPIC", "LSR", "ADT", "A01", "OLD0001"), "t")
    assert again.duplicate_of == 1  # the plain SHA-256 from before still recognises a retransmission
    snapshot = open_roster_snapshot(cfg.database, keys)
    lookups = StoredRoster(snapshot, conn)
    assert [m["member_id"] for m in lookups.by_mrn(MRN, AUTHORITY)] == ["M-001"]  # the link, by its hash now
    assert [m["member_id"] for m in lookups.by_mbi("1EG4TE5MK73")] == ["M-001"]  # the v1 roster, plaintext
    snapshot.close()
    conn.close()
    assert key_status(cfg).totals()[None] > 0 and not key_status(cfg).digests_keyed

    report = rotate_keys(cfg, new_key=False)
    assert report.sealed["messages.raw"] == 1 and report.sealed["messages.fhir"] == 1
    assert report.sealed["confirmed_links.mrn"] == 0  # sealed (and hashed) by the migration already
    assert report.digests == 1 and report.roster_members == 1
    assert report.checkpointed
    status = key_status(cfg)
    assert None not in status.totals() and status.digests_keyed and status.roster == {"k1": 1}
    assert phi_in_files(data) == {}
    assert not any(b"testpatient" in p.read_bytes().lower() for p in data.rglob("*") if p.is_file())

    conn = open_database(cfg.database, readonly=True, keys=keys)
    assert message_detail(conn, 1)["message"]["raw"] == raw
    snapshot = open_roster_snapshot(cfg.database, keys)
    lookups = StoredRoster(snapshot, conn)
    assert [m["member_id"] for m in lookups.by_mrn(MRN, AUTHORITY)] == ["M-001"]
    assert [m["last_name"].upper() for m in lookups.by_mbi("1EG4TE5MK73")] == ["TESTPATIENT"]
    snapshot.close()
    conn.close()
    store = Store(cfg.database, reactor=object(), keys=keys)
    record = IntakeRecord(raw, "p", RECEIVED, "CA", "EPIC", "LSR", "ADT", "A01", "OLD0001")
    assert record_frame(store._conn, record, "t").duplicate_of == 1  # by the keyed digest now
    store._conn.close()


# -- file drops ----------------------------------------------------------------------------------


def test_file_drops_are_sealed_under_the_data_folder_and_plain_where_a_recipient_says_so(tmp_path):
    """Under the data folder a drop is <id>.json.sealed (0600 in a 0700 folder, umask 022); a recipient with
    encrypt = false (its own secure share) gets plain <id>.json; a sealed drop renamed does not open."""
    data, share = tmp_path / "data", tmp_path / "share"
    config = tmp_path / "herald.toml"
    config.write_text(
        f'[server]\ndata_dir = "{data}"\n\n[recipients.pcp]\ndirectory = "{share}"\nencrypt = false\n\n'
        "[recipients.care_team]\nencrypt = true\n"
    )
    cfg = load_config(config)
    keys = KeyRing.load(None)
    bundle = json.dumps({"resourceType": "Bundle", "entry": [{"resource": {"name": FAMILY}}]})
    notes = [
        Notification(f"n-{role}", 1, role, role, "file", str(cfg.recipient(role).directory), "e", payload=bundle)
        for role in ("pcp", "care_team", "hie")
    ]
    old = os.umask(0o022)
    try:
        results = write_notification_files(notes, keys, cfg.file_drop_sealed, cfg.data_dir)
    finally:
        os.umask(old)
    assert results == [None, None, None]
    assert json.loads((share / "n-pcp.json").read_text())["entry"][0]["resource"]["name"] == FAMILY
    assert not list(share.glob(f"*{OUTBOX_SUFFIX}"))
    for note in notes[1:]:
        path = Path(note.target) / f"{note.id}{OUTBOX_SUFFIX}"
        assert phi_found(path.read_bytes()) == [] and mode(path) == 0o600 and mode(path.parent) == 0o700
        assert open_file_drop(path, keys) == (note.id, bundle.encode())
    (Path(notes[2].target) / f"n-hie{OUTBOX_SUFFIX}").rename(Path(notes[2].target) / f"n-other{OUTBOX_SUFFIX}")
    with pytest.raises(KeyRingError, match="does not open"):
        open_file_drop(Path(notes[2].target) / f"n-other{OUTBOX_SUFFIX}", keys)
    # With encryption at rest off nothing is sealed.
    config.write_text(f'[server]\ndata_dir = "{data}"\n\n[security]\nencrypt_at_rest = false\n')
    assert not load_config(config).file_drop_sealed(data / "outbox" / "hie")


# -- files private whatever the umask ------------------------------------------------------------


def test_database_roster_and_key_files_are_private_under_umask_022(tmp_path):
    """With umask 022 a new key file, database (and its -wal and -shm), roster file and data folder are 0600/0700;
    a database an older Herald left 0644 is tightened when opened."""
    old = os.umask(0o022)
    try:
        data = tmp_path / "data"
        key_file = new_key_file(tmp_path / "keys" / "herald.key")
        keys = KeyRing.load(key_file, environ={})
        stored_messages(data, keys)
        conn = open_database(data / "herald.db", keys=keys)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE messages SET updated_at = updated_at")
        conn.execute("COMMIT")
        for name in ("herald.db", "herald.db-wal", "herald.db-shm", "roster.db", "roster.lock"):
            assert mode(data / name) == 0o600, name
        conn.close()
        assert mode(key_file) == 0o600 and mode(key_file.parent) == 0o700
        assert not list(data.glob("*.importing"))
        (data / "herald.db").chmod(0o644)
        open_database(data / "herald.db", keys=keys).close()
        assert mode(data / "herald.db") == 0o600
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o755)
        from gateway.store.files import private_data_dir

        private_data_dir(loose)
        assert mode(loose) == 0o700
    finally:
        os.umask(old)


# -- what stays readable holds no PHI --------------------------------------------------------------


def test_reasons_and_details_left_readable_hold_no_patient_values(data_dir):
    """The columns left unsealed (messages.reason, events.detail, matches.detail, delivery details) hold no
    patient value, even for messages that fail (a bad birth date, an unknown sex code, an unconvertible event)."""
    data = data_dir
    keys = KeyRing.load(None)
    bad = [
        adt("A01", "BAD0001").replace(BIRTH.encode(), b"19319999"),
        adt("A01", "BAD0002").replace(b"|F|||", b"|ZYXQ|||"),
        adt("A01", "BAD0003").replace(b"ADT^A01^ADT_A01", b"ADT^A31^ADT_A05"),
        adt("A04", "OK0001"),
    ]
    stored_messages(data, keys, bad)
    conn = open_database(store_of(data))
    readable = [
        *conn.execute("SELECT reason FROM messages WHERE reason IS NOT NULL"),
        *conn.execute("SELECT detail FROM events"),
        *conn.execute("SELECT detail FROM matches"),
        *conn.execute("SELECT last_error FROM notifications WHERE last_error IS NOT NULL"),
    ]
    conn.close()
    text = "\n".join(str(r[0]) for r in readable)
    assert "not a notification event" in text and "PID-" in text  # the reasons are there, the values not
    for value in (*SECRETS, "19319999", "ZYXQ"):
        assert value.lower() not in text.lower(), value
    assert phi_in_files(data) == {}


# -- the key ring follows its file ------------------------------------------------------------


def test_a_running_ring_takes_only_appended_keys(tmp_path, monkeypatch):
    """A ring loaded from a file takes appended keys only; a file whose existing keys changed is refused by
    refresh, and sealing goes on with the keys in hand."""
    monkeypatch.setattr(keys_module, "REFRESH_SECONDS", 0.0)
    path = new_key_file(tmp_path / "k" / "herald.key")
    ring = KeyRing.load(path, environ={})
    text = path.read_text()
    path.write_text(text.replace(text.split()[-1], _b64()))  # k1 replaced: not a rotation
    with pytest.raises(KeyRingError, match="keys changed"):
        ring.refresh()
    assert ring.key_of(ring.seal(b"x", b"c")) == "k1"


def test_config_security_block(tmp_path):
    """[security] key_file is read relative to the config file; encrypt_at_rest = false needs no key."""
    config = tmp_path / "herald.toml"
    config.write_text('[security]\nkey_file = "secrets/herald.key"\nencrypt_at_rest = true\n')
    cfg = load_config(config)
    assert cfg.key_path == tmp_path / "secrets" / "herald.key"
    assert load_config(None, data_dir=tmp_path / "d").key_path == tmp_path / "d" / "keys" / "herald.key"
    config.write_text("[security]\nencrypt_at_rest = false\n")
    from gateway.app.keys import key_ring

    assert not key_ring(load_config(config), environ={}).enabled
    config.write_text('[recipients.hie]\nchannel = "fhir"\nurl = "https://hie.example/fhir"\nencrypt = true\n')
    with pytest.raises(Exception, match="file channel"):
        load_config(config)


def test_roster_counts_per_key_and_a_roster_without_its_key_still_counts(tmp_path):
    """roster.db says which key seals each member; opened without a key it still counts, and a lookup says why not."""
    data = tmp_path / "data"
    keys = KeyRing.load(None)
    stored_messages(data, keys)
    assert roster_key_counts(roster_path(data / "herald.db"), keys) == {keys.current_id: 1}
    snapshot = open_roster_snapshot(data / "herald.db")  # no key
    assert snapshot.size("2026-11-20") == 1
    with pytest.raises(KeyRingError, match="is encrypted"):
        StoredRoster(snapshot).by_mbi(MBI)
    snapshot.close()


def test_a_ring_from_the_environment_reads_no_file():
    """A ring from $HERALD_KEYS never reads a file again (refresh is a no-op)."""
    assert KeyRing.load(None).refresh() is False


def test_sqlite_keeps_its_temporary_pages_in_memory(tmp_path):
    """A savepoint's statement journal holds page images (sealed values, header fields): none go to a temporary file."""
    from gateway.store.schema import migrate

    conn = open_database(tmp_path / "herald.db")
    migrate(conn)
    assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    reader = open_database(tmp_path / "herald.db", readonly=True)
    assert reader.execute("PRAGMA temp_store").fetchone()[0] == 2
    conn.close()
    reader.close()
