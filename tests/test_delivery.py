"""File-drop writing and retry timing (the HTTP channel is covered end to end)."""

from __future__ import annotations

import json

import pytest

from gateway import delivery
from gateway.delivery import backoff_delay, write_files_atomically


@pytest.fixture(params=["syncfs", "fsync"])
def flush_mode(request, monkeypatch):
    """Run each test with Linux's one-syncfs-per-batch path and with the per-file fsync fallback."""
    if request.param == "fsync":
        monkeypatch.setattr(delivery, "_syncfs", None)
    elif delivery._syncfs is None:
        pytest.skip("no syncfs on this platform")
    return request.param


def test_batch_of_files_is_written_whole(tmp_path, flush_mode):
    """Every file of a batch appears under its final name with its content, and no temporary file is left."""
    items = [(tmp_path / ("pcp" if i % 2 else "hie"), f"n{i}.json", json.dumps({"i": i}).encode()) for i in range(6)]
    results = write_files_atomically(items)
    assert results == [None] * 6
    for directory, name, data in items:
        assert (directory / name).read_bytes() == data
    assert list(tmp_path.rglob(".*.tmp")) == []


def test_a_failing_file_fails_alone(tmp_path, flush_mode):
    """A file that cannot be written reports its error; the others in the batch are still written."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    items = [
        (tmp_path / "ok", "a.json", b"{}"),
        (blocker, "b.json", b"{}"),
        (tmp_path / "ok", "c.json", b"{}"),
    ]
    results = write_files_atomically(items)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], OSError)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["a.json", "c.json"]


def test_rewriting_a_file_replaces_it(tmp_path, flush_mode):
    """Delivering the same notification again (at-least-once) replaces the file, never half-writes it."""
    write_files_atomically([(tmp_path, "n.json", b'{"v":1}')])
    write_files_atomically([(tmp_path, "n.json", b'{"v":2}')])
    assert (tmp_path / "n.json").read_bytes() == b'{"v":2}'


@pytest.mark.parametrize(
    "attempt, expected",
    [(1, 2.0), (2, 4.0), (3, 8.0), (6, 64.0), (10, 600.0), (30, 600.0)],
)
def test_backoff_doubles_up_to_the_cap(attempt, expected):
    """The wait after each failed attempt doubles from backoff_initial and stops at backoff_max."""
    assert backoff_delay(attempt, 2.0, 600.0) == expected
