"""Per-recipient Bundles built from the message's stored Bundle."""

from __future__ import annotations

import json
from datetime import UTC
from pathlib import Path

import pytest

from gateway.conversion.convert import convert
from gateway.conversion.v2 import V2Message
from gateway.conversion.vocabulary import load_vocabulary
from gateway.delivery.routing import bundle_json, destination_endpoint, payload_builder
from gateway.records import Notification

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "sample_messages").glob("*.hl7"))


def _note(nid: str, channel: str = "fhir", target: str = "https://hie.example.org/fhir") -> Notification:
    return Notification(nid, 1, "hie", "HIE", channel, target, "notification-admit", "{}", None)


def _expected(bundle: dict, note: Notification) -> str:
    whole = json.loads(json.dumps(bundle))
    whole["id"] = note.id
    header = whole["entry"][0]["resource"]
    header["destination"] = [{"name": note.recipient, "endpoint": destination_endpoint(note.channel, note.target)}]
    return json.dumps(whole, separators=(",", ":"))


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_spliced_payload_is_the_same_bytes_as_encoding_the_whole_bundle(path):
    """From the stored text, each recipient's Bundle equals json.dumps of the edited Bundle, byte for byte."""
    bundle = convert(V2Message(path.read_bytes()), load_vocabulary(), UTC).bundle
    stored = bundle_json(bundle)
    for note in (_note("n-1"), _note("n-2", "file", "/var/lib/herald/outbox/pcp")):
        assert payload_builder(stored)(note) == _expected(bundle, note)
        assert payload_builder(bundle)(note) == _expected(bundle, note)


def test_text_not_in_the_stored_form_is_decoded_whole():
    """A Bundle stored some other way (indented, keys reordered) still gives the compact, exact payload."""
    bundle = convert(V2Message(SAMPLES[0].read_bytes()), load_vocabulary(), UTC).bundle
    reordered = {"id": bundle["id"], **{k: v for k, v in bundle.items() if k != "id"}}
    note = _note("n-3")
    assert payload_builder(json.dumps(reordered, indent=2))(note) == _expected(reordered, note)
