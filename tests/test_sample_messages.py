"""The sample corpus: every synthetic message reads, converts and matches as its name says."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import pytest

from gateway.app.replay import collect_messages, split_messages
from gateway.config import default_recipients
from gateway.conversion.convert import convert, validate_bundle
from gateway.conversion.v2 import V2Message
from gateway.header import read_header
from gateway.matching.roster import open_roster
from gateway.pipeline.process import process_message
from gateway.records import ROUTED, PendingMessage

SAMPLES = Path(__file__).resolve().parent.parent / "sample_messages"

#: file -> (trigger, codec the reader picks, how the sample roster finds the patient, member id)
EXPECTED = {
    "cerner-v23-a01-admit.hl7": ("A01", "utf-8", "mrn", "SHR-000101"),
    "cerner-v23-a03-discharge.hl7": ("A03", "utf-8", "mrn", "SHR-000101"),
    "epic-v251-a01-admit-from-ed.hl7": ("A01", "utf-8", "mbi", "SHR-000102"),
    "epic-v251-a02-transfer-to-ccu.hl7": ("A02", "utf-8", "mbi", "SHR-000102"),
    "epic-v251-a03-ed-discharge-utf8.hl7": ("A03", "utf-8", "mbi", "SHR-000103"),
    "epic-v251-a04-ed-registration.hl7": ("A04", "utf-8", "mbi", "SHR-000102"),
    "epic-v251-a04-ed-visit-utf8.hl7": ("A04", "utf-8", "mbi", "SHR-000103"),
    "epic-v251-a08-update-utf8.hl7": ("A08", "utf-8", "mbi", "SHR-000103"),
    "meditech-v24-a01-admit-cp1252.hl7": ("A01", "cp1252", "probabilistic", "SHR-000104"),
    "meditech-v24-a03-discharge-cp1252.hl7": ("A03", "cp1252", "probabilistic", "SHR-000104"),
    "meditech-v24-a04-outpatient-unmatched.hl7": ("A04", "utf-8", "none", None),
    "meditech-v24-a11-cancel-outpatient-visit.hl7": ("A11", "utf-8", "none", None),
}


@pytest.fixture
def lookups(sample_roster):
    return sample_roster


def raw(name: str) -> bytes:
    return split_messages((SAMPLES / name).read_bytes())[0]


def test_every_sample_is_listed_here():
    """The table above covers the whole corpus, so a new sample cannot go untested."""
    assert sorted(EXPECTED) == sorted(p.name for p in SAMPLES.glob("*.hl7"))


def test_collect_messages_finds_one_message_per_sample_file():
    """Reading the folder gives exactly one message per .hl7 file, each ending in CR."""
    found = collect_messages([SAMPLES])
    assert [Path(where).name for where, _ in found if Path(where).parent == SAMPLES] == sorted(EXPECTED)
    # The vendor dialects' folders (sample_messages/<dialect>/, tests/test_profiles.py) are read too.
    assert len(found) == len(list(SAMPLES.rglob("*.hl7")))
    assert all(m.startswith(b"MSH") and m.endswith(b"\r") for _, m in found)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_header_reads_and_declares_its_trigger(name):
    """Intake can read each sample's MSH, and the trigger is the one its name says."""
    header = read_header(raw(name))
    assert header.message_type == "ADT"
    assert header.trigger_event == EXPECTED[name][0]
    assert header.control_id


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_decodes_with_the_expected_charset(name):
    """Each dialect's bytes are decoded with the right codec (no replacement characters)."""
    msg = V2Message(raw(name), read_header(raw(name)).charset)
    assert msg.codec == EXPECTED[name][1]
    assert all("\ufffd" not in "|".join(s.fields) for s in msg.segments)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_converts_and_validates_without_warnings(name, vocab):
    """Each sample converts to a valid R4 Bundle with no warnings."""
    conversion = convert(V2Message(raw(name)), vocab, UTC)
    validate_bundle(conversion.bundle)
    assert conversion.warnings == []
    assert conversion.trigger_event == EXPECTED[name][0]


def test_sample_roster_is_clean():
    """The sample roster loads with no problems."""
    source, _ = open_roster(SAMPLES / "roster.csv")
    rows = list(source.rows())
    assert [p for r in rows for p in r.problems] == []
    assert len(rows) == 5 and all(r.member is not None for r in rows)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_matches_the_sample_roster_as_named(name, vocab, lookups, sample_policy, tmp_path):
    """Each sample is routed and matched to the member (and by the rule) the corpus intends."""
    _, _, method, member = EXPECTED[name]
    pending = PendingMessage(1, raw(name), "2026-11-22T12:00:00+00:00", read_header(raw(name)).charset)
    outcome = process_message(pending, vocab, UTC, lookups, default_recipients(tmp_path), policy=sample_policy)
    assert outcome.state == ROUTED, outcome.reason
    assert (outcome.match.method, outcome.match.member_id) == (method, member)
    expected_roles = ["pcp", "care_team", "hie"] if member else ["hie"]
    assert [n.recipient_role for n in outcome.notifications] == expected_roles
