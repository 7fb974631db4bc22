"""The disk: the write-ahead log stays bounded, and when free space runs short intake comes first.

Unit tests drive the free-space reserve with task.Clock and an injected
statvfs; one test fills a real (small) tmpfs under a running `herald serve`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_audit import MESSAGES, sample
from test_intake import accepted_record, drain, success
from test_pipeline_runner import HeldStore, runner
from twisted.internet import defer
from twisted.internet.task import Clock

from gateway.app.disk import DiskReserve
from gateway.app.service import make_service
from gateway.config import load_config
from gateway.delivery.worker import DeliveryWorker
from gateway.records import PendingMessage
from gateway.store.keys import KeyRing

ROOT = Path(__file__).resolve().parent.parent
HERALD = [sys.executable, "-m", "gateway.app.cli"]
MB = 1024 * 1024


# -- the write-ahead log --------------------------------------------------------------------


def wal_size(db: Path) -> int:
    try:
        return os.stat(db.with_name(db.name + "-wal")).st_size
    except FileNotFoundError:
        return 0


@pytest.fixture
def store(tmp_path, reactor):
    """A running Store on a SQLite file: these tests are about SQLite's write-ahead log (PostgreSQL keeps its own)."""
    from test_intake import STORED_AT

    from gateway.store import Store

    s = Store(tmp_path / "herald.db", reactor=reactor, clock=lambda: STORED_AT)
    s.start()
    yield s
    success(drain(reactor, s.stop()))


def test_the_wal_is_truncated_once_it_outgrows_its_limit(tmp_path, reactor, store):
    """A reader holding a snapshot lets the log grow past the limit; once it lets go, the next check truncates it."""
    store.wal_limit = 128 * 1024
    store.WAL_CHECK_SECONDS = 0  # look after every commit (the default is once a second)
    store.WAL_CHECKPOINT_MAX_WAIT_MS = 20  # the held reader never lets go: do not wait long for it
    db = tmp_path / "herald.db"
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM messages").fetchone()  # a snapshot: no checkpoint can pass it
    raw = sample(MESSAGES[0])
    for i in range(150):
        success(drain(reactor, store.record_frame(accepted_record(raw.replace(b"LSR8841200377", b"C%05d" % i)))))
    held = wal_size(db)
    assert held > store.wal_limit
    reader.execute("COMMIT")
    reader.close()
    success(drain(reactor, store.record_frame(accepted_record(raw.replace(b"LSR8841200377", b"LAST")))))
    # The check runs on the writer thread just after the commit it follows has been answered.
    wait_for(lambda: store.checkpoints >= 1, seconds=5, what="a checkpoint after the commit")
    assert wal_size(db) <= store.wal_limit, (held, wal_size(db))
    assert store.wal_peak >= held


def test_a_checkpoint_kept_from_the_log_waits_longer_each_time_then_not(tmp_path, reactor, store):
    """Readers that keep overlapping starve a short wait: each failed try doubles it (to a maximum); a success
    brings it back to the short one."""
    store.wal_limit = 1024
    store.WAL_CHECK_SECONDS = 0
    store.WAL_CHECKPOINT_MAX_WAIT_MS = 200
    reader = sqlite3.connect(tmp_path / "herald.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM messages").fetchone()
    raw = sample(MESSAGES[0])
    seen = set()
    for i in range(5):
        success(drain(reactor, store.record_frame(accepted_record(raw.replace(b"LSR8841200377", b"W%d" % i)))))
        seen.add(store._checkpoint_wait_ms)
    wait_for(lambda: store._checkpoint_wait_ms == 200, what="the wait to reach its maximum")
    assert seen <= {50, 100, 200} and store.checkpoints == 0
    reader.execute("COMMIT")
    reader.close()
    success(drain(reactor, store.record_frame(accepted_record(raw))))
    wait_for(lambda: store.checkpoints == 1, what="the checkpoint once the reader left")
    assert store._checkpoint_wait_ms == store.WAL_CHECKPOINT_WAIT_MS


def test_an_idle_writer_empties_the_wal(tmp_path, reactor, store):
    """When no job comes for a moment, a log larger than a sixteenth of the limit is truncated to nothing."""
    store.wal_limit = 16 * 1024
    db = tmp_path / "herald.db"
    raw = sample(MESSAGES[0])
    for i in range(20):
        success(drain(reactor, store.record_frame(accepted_record(raw.replace(b"LSR8841200377", b"C%05d" % i)))))
    deadline = time.monotonic() + 10
    while wal_size(db) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert wal_size(db) == 0


# -- the free-space reserve, with a clock -----------------------------------------------------


class Writer:
    """What the reserve pauses: records the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


class Disk:
    """An injected statvfs: ``free`` bytes available."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.fail = False

    def __call__(self, path: str) -> os.statvfs_result:
        if self.fail:
            raise OSError(errno.EIO, "I/O error")
        blocks = self.free // 4096
        return os.statvfs_result((4096, 4096, 1 << 20, blocks, blocks, 1000, 1000, 1000, 0, 255))


def test_the_reserve_pauses_below_it_and_resumes_only_above_its_margin():
    """Below 64 MB the writers pause; at 80 MB they stay paused; at 96 MB (reserve + half) they resume."""
    clock, disk, writer = Clock(), Disk(200 * MB), Writer()
    reserve = DiskReserve("/data", 64 * MB, clock, [writer], statvfs=disk)
    reserve.startService()
    assert writer.calls == [] and reserve.free == 200 * MB
    disk.free = 63 * MB
    clock.advance(1)
    assert writer.calls == ["pause"] and reserve.paused
    disk.free = 80 * MB
    clock.advance(5)
    assert writer.calls == ["pause"]
    disk.free = 96 * MB
    clock.advance(1)
    assert writer.calls == ["pause", "resume"] and not reserve.paused
    reserve.stopService()
    assert clock.getDelayedCalls() == []


def test_the_reserve_starts_paused_when_the_disk_is_already_short():
    """At start below the reserve: paused at once, before the pipeline takes its first batch."""
    clock, writer = Clock(), Writer()
    DiskReserve("/data", 64 * MB, clock, [writer], statvfs=Disk(10 * MB)).startService()
    assert writer.calls == ["pause"]


def test_an_unreadable_filesystem_changes_nothing_and_is_looked_at_again():
    """statvfs failing (an I/O error) neither pauses nor resumes; the next look is still scheduled."""
    clock, disk, writer = Clock(), Disk(200 * MB), Writer()
    reserve = DiskReserve("/data", 64 * MB, clock, [writer], statvfs=disk)
    reserve.startService()
    disk.fail = True
    clock.advance(1)
    assert writer.calls == [] and len(clock.getDelayedCalls()) == 1
    disk.fail, disk.free = False, 1 * MB
    clock.advance(1)
    assert writer.calls == ["pause"]


def test_a_paused_pipeline_takes_no_batch_until_resumed():
    """Paused, the pipeline leaves stored messages alone; resumed, it takes them at once."""
    store = HeldStore([[PendingMessage(1, b"", "", "")]])
    service = runner(store, Clock())
    service.pause()
    service.startService()
    service.wake()
    assert store.outcomes == [] and store.batches
    service.resume()
    assert [o.message_id for o in store.outcomes] == [1]


class OutboxStore:
    """An outbox that counts its polls (it has nothing due)."""

    def __init__(self) -> None:
        self.polls = 0

    def due_notifications(self, now, limit, exclude) -> defer.Deferred:
        self.polls += 1
        return defer.succeed([])

    def submit_read(self, fn, *args) -> defer.Deferred:
        return defer.succeed({})  # the recipient directory: empty


def test_a_paused_delivery_takes_no_notification_until_resumed():
    """Paused, delivery does not poll the outbox, even when woken or its timer fires; resumed, it polls."""
    store, clock = OutboxStore(), Clock()
    delivery = DeliveryWorker(store, clock, agent=object())
    delivery.startService()
    assert store.polls == 1
    delivery.pause()
    delivery.wake()
    clock.advance(10)
    assert store.polls == 1
    delivery.resume()
    assert store.polls == 2
    delivery.stopService()


def test_make_service_wires_the_reserve_to_the_pipeline_and_delivery(tmp_path):
    """[storage] reserve_mb gives the gateway a reserve over its data folder that pauses pipeline and delivery."""
    plain = load_config(None, data_dir=tmp_path / "data", listen=["tcp:0:interface=127.0.0.1"], allow_plain=True)
    config = dataclasses.replace(plain, storage_reserve_mb=32)
    gw = make_service(config, Clock(), keys=KeyRing.disabled())
    try:
        assert gw.disk is not None and gw.disk.reserve_bytes == 32 * MB
        assert gw.disk.writers == [gw.pipeline, gw.delivery]
        assert gw.store.wal_limit == 64 * MB
        none = make_service(dataclasses.replace(config, storage_reserve_mb=0), Clock(), keys=KeyRing.disabled())
        assert none.disk is None
        none.store._conn.close()
    finally:
        gw.store._conn.close()


# -- a real full disk ----------------------------------------------------------------------------


def mllp_send(port: int, raw: bytes, timeout: float = 30.0) -> str:
    """Send one framed message and return the ACK's MSA-1 (AA, AE, ...)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"\x0b" + raw + b"\x1c\x0d")
        answer = b""
        while not answer.endswith(b"\x1c\x0d"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    found = re.search(rb"MSA\|([A-Z]{2})\|", answer)
    return found.group(1).decode() if found else f"no ACK ({answer[:40]!r})"


#: Accepted (original or enhanced mode: the sample asks for CA/CE) and refused.
ACCEPTED, REFUSED = ("AA", "CA"), ("AE", "CE")


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs mounted for the test (root only); unmounted afterwards."""
    where = tmp_path / "disk"
    where.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(where)], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs to fill ({e}); this test needs root (CI runs it as root)")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({done.stderr.strip()}); this test needs root (CI runs it as root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(path: Path, leave: int) -> None:
    """Write ``path`` until ``leave`` bytes (or none, when 0) are free on its filesystem."""
    with open(path, "ab") as f:
        while True:
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                return
            try:
                f.write(b"\0" * min(256 * 1024, max(4096, free - leave)))
                f.flush()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return


def states(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
    finally:
        conn.close()


def stored_control_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT control_id FROM messages")}
    finally:
        conn.close()


def wait_for(condition, seconds: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_full_disk_refuses_with_ae_and_freed_space_goes_to_intake_first(small_disk, tmp_path):
    """On a real 24 MB filesystem: below the reserve the pipeline pauses and intake still ACKs AA; full, every
    message gets AE (none AA); a little space freed (still below the reserve) goes to new messages, ACKed AA and
    stored while the backlog waits; above the reserve's margin the pipeline resumes and works the backlog off."""
    data = small_disk / "data"
    config = tmp_path / "herald.toml"
    config.write_text(
        "[server]\nallow_plain = true\n[storage]\nreserve_mb = 6\nwal_limit_mb = 1\n[pipeline]\nworkers = 0\n"
        "[security]\nencrypt_at_rest = false\n"
    )
    proc = subprocess.Popen(
        [*HERALD, "serve", "--listen", "tcp:0:interface=127.0.0.1", "--data", str(data), "--config", str(config)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    port_seen = threading.Event()

    def read_log():
        for line in proc.stderr:
            log.append(line)
            if "(ports [" in line:
                port_seen.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    timeline: list[str] = []
    start = time.monotonic()

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - start:6.2f} s  {what}")

    try:
        assert port_seen.wait(30), "herald serve did not start:\n" + "".join(log)
        port = int(re.search(r"\(ports \[(\d+)\]\)", "".join(log)).group(1))
        db = data / "herald.db"
        raw = sample(MESSAGES[0])

        def message(tag: str) -> bytes:
            return raw.replace(b"LSR8841200377", tag.encode())

        # 1. Room enough: ACKed and processed.
        assert all(mllp_send(port, message(f"OK{i}")) in ACCEPTED for i in range(3))
        wait_for(lambda: states(db).get("received", 0) == 0, what="the first messages to be processed")
        note("3 messages accepted (CA: the sample asks for enhanced mode) and processed")
        # 2. Below the reserve (3 MB free of a 6 MB reserve): the pipeline pauses, intake goes on.
        fill(small_disk / "filler-1", 3 * MB)
        wait_for(lambda: any("below the reserve" in line for line in log), what="the reserve to pause the pipeline")
        note("free space 3 MB < reserve 6 MB: pipeline and delivery paused")
        backlog = [mllp_send(port, message(f"BACKLOG{i}")) for i in range(10)]
        assert all(code in ACCEPTED for code in backlog), backlog
        time.sleep(2)
        assert states(db).get("received") == 10  # stored, not processed: the backlog
        note("10 messages accepted below the reserve, stored, left unprocessed (the backlog)")
        # 3. Full: every message is refused with AE, none acknowledged AA.
        fill(small_disk / "filler-2", 0)
        full = [mllp_send(port, message(f"FULL{i}")) for i in range(10)]
        stored = stored_control_ids(db)
        lies = [i for i, code in enumerate(full) if code in ACCEPTED and f"FULL{i}" not in stored]
        assert lies == [], full
        refused = sum(code in REFUSED for code in full)
        assert refused >= 8, full
        note(f"disk full: {refused} of 10 refused (CE), {10 - refused} accepted (each of those stored)")
        # 4. 2 MB freed (still below the reserve): new messages are ACKed AA and stored; the backlog waits.
        os.truncate(small_disk / "filler-2", max(0, os.path.getsize(small_disk / "filler-2") - 2 * MB))
        after = [mllp_send(port, message(f"AFTER{i}")) for i in range(10)]
        assert all(code in ACCEPTED for code in after), after
        assert {f"AFTER{i}" for i in range(10)} <= stored_control_ids(db)
        time.sleep(2)
        waiting = states(db).get("received", 0)
        assert waiting >= 20, states(db)  # backlog and new messages alike wait: the space went to intake
        note(f"2 MB freed (below the reserve): 10 new messages accepted and stored; {waiting} wait unprocessed")
        # 5. Space back above the reserve and its margin: the pipeline resumes and works everything off.
        os.unlink(small_disk / "filler-1")
        os.unlink(small_disk / "filler-2")
        wait_for(lambda: any("back above" in line for line in log), what="the reserve to resume the pipeline")
        wait_for(lambda: states(db).get("received", 0) == 0, seconds=60, what="the backlog to be processed")
        note(f"space freed: pipeline resumed, backlog processed: {states(db)}")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=5)
        print("\n".join(["disk-full recovery:", *timeline]))


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[storage]\nreserve_mb = -1\n", "storage.reserve_mb"),
        ("[storage]\nwal_limit_mb = 0.5\n", "storage.wal_limit_mb"),
        ("[storage]\nreserve_mb = 'lots'\n", "storage.reserve_mb"),
        ("[retention]\ndays = -3\n", "retention.days"),
    ],
)
def test_bad_storage_and_retention_settings_are_refused_by_name(tmp_path, toml, key):
    """A wrong [storage] or [retention] value fails at start naming its key."""
    from gateway.errors import ConfigError

    path = tmp_path / "herald.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == key


def test_storage_and_retention_settings_are_read(tmp_path):
    """[storage] reserve_mb, wal_limit_mb and [retention] days reach the Config."""
    path = tmp_path / "herald.toml"
    path.write_text("[storage]\nreserve_mb = 0\nwal_limit_mb = 8\n[retention]\ndays = 90\n")
    config = load_config(path)
    assert (config.storage_reserve_mb, config.storage_wal_limit_mb, config.retention_days) == (0, 8, 90)
