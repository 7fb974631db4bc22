"""File-drop writing and retry timing (the HTTP channel is covered end to end)."""

from __future__ import annotations

import json

import pytest

from gateway.delivery import worker as delivery
from gateway.delivery.worker import write_files_atomically


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


def _note(nid: str, payload=None, bundle=None, channel="file", target="/drop/pcp", message_id=1):
    from gateway.records import Notification

    return Notification(nid, message_id, "pcp", "Dr. A", channel, target, "notification-admit", payload, bundle=bundle)


BUNDLE = json.dumps(
    {
        "resourceType": "Bundle",
        "id": "base",
        "type": "message",
        "entry": [{"resource": {"resourceType": "MessageHeader", "id": "h"}}, {"resource": {"resourceType": "X"}}],
    },
    separators=(",", ":"),
)


def test_payloads_are_built_from_the_stored_bundle_the_same_bytes_every_time():
    """A notification without a stored payload gets the message's Bundle with its own id and destination, stably."""
    notes = [
        _note("n-1", bundle=BUNDLE),
        _note("n-2", bundle=BUNDLE, channel="fhir", target="https://h/$process-message"),
    ]
    first = delivery.notification_payloads(notes)
    assert first == delivery.notification_payloads(notes)
    one, two = (json.loads(p) for p in first)
    assert one["id"] == "n-1" and two["id"] == "n-2"
    assert one["entry"][0]["resource"]["destination"] == [{"name": "Dr. A", "endpoint": "file:///drop/pcp"}]
    assert two["entry"][0]["resource"]["destination"] == [{"name": "Dr. A", "endpoint": "https://h/$process-message"}]
    assert one["entry"][1:] == json.loads(BUNDLE)["entry"][1:]
    assert "destination" not in json.loads(BUNDLE)["entry"][0]["resource"]


def test_a_stored_payload_is_sent_as_stored():
    """Rows written before schema version 2 carry their payload; it is sent byte for byte."""
    assert delivery.notification_payloads([_note("n-1", payload='{"as":"stored"}')]) == [b'{"as":"stored"}']


def test_a_notification_without_a_bundle_fails_alone(tmp_path):
    """No stored payload and no Bundle: that file fails with a clear reason, the others are written."""
    notes = [_note("a", bundle=BUNDLE, target=str(tmp_path)), _note("b", target=str(tmp_path))]
    results = delivery.write_notification_files(notes)
    assert results[0] is None
    assert isinstance(results[1], delivery.DeliveryFailed)
    assert "no stored Bundle" in str(results[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
