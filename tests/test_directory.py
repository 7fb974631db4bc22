"""The recipient directory: entries checked with clear errors, events classified, who is told."""

from __future__ import annotations

import pytest
from synthetic_adt import adt

from gateway.conversion.convert import convert
from gateway.delivery.directory import (
    DirectoryError,
    entry_from_dict,
    entry_id,
    event_kind,
    missing_pcps,
    recipients_for,
)

FHIR = {"channel": "fhir", "url": "https://pcp.example/fhir"}
DIRECT = {"channel": "direct", "to": "dr.lee@direct.pcp.example", "certificate": "certs/lee.pem"}


def entries(*raw):
    made = [entry_from_dict(r) for r in raw]
    return {e.id: e for e in made}


def pcp(npi="1234567893", **kw):
    return {"kind": "pcp", "npi": npi, "name": "Dr. Lee", "channels": [FHIR], **kw}


MEMBER = {"aco_id": "A1234", "member_id": "M1", "pcp_npi": "1234567893"}


# -- checking entries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ({"kind": "doctor", "name": "x"}, "kind", "not one of"),
        ({"kind": "pcp", "name": "Dr. Lee", "channels": [FHIR]}, "npi", "10-digit NPI"),
        ({"kind": "care_team", "name": "Team", "channels": [FHIR]}, "aco_id", "ACO id"),
        ({"kind": "hie", "channels": [FHIR]}, "name", "needs a name"),
        ({"kind": "hie", "name": "HIE"}, "channels", "at least one channel"),
        ({"kind": "hie", "name": "HIE", "channels": [{"channel": "fax"}]}, "channels[0].channel", "not one of"),
        ({"kind": "hie", "name": "HIE", "channels": [{"channel": "fhir"}]}, "channels[0].url", "needs url"),
        (
            {"kind": "hie", "name": "HIE", "channels": [{"channel": "fhir", "url": "ftp://x"}]},
            "channels[0].url",
            "https",
        ),
        (
            {"kind": "hie", "name": "HIE", "channels": [{"channel": "mllp", "host": "h", "port": 99999}]},
            "channels[0].port",
            "TCP port",
        ),
        ({"kind": "hie", "name": "HIE", "channels": [{**FHIR, "colour": "red"}]}, "channels[0].colour", "unknown"),
        (
            {"kind": "hie", "name": "HIE", "channels": [{**FHIR, "auth": {"token_url": "https://t"}}]},
            "channels[0].auth.client_id",
            "SMART",
        ),
        ({"kind": "hie", "name": "HIE", "channels": [{**DIRECT, "to": "nobody"}]}, "channels[0].to", "Direct address"),
        (pcp(events=["ed-visit", "lunch"]), "events", "'lunch' is not one of"),
        (pcp(mode="digest"), "digest_at", "HH:MM"),
        (pcp(mode="digest", digest_at="25:00"), "digest_at", "HH:MM"),
        (pcp(timezone="Mars/Olympus"), "timezone", "IANA"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_field(raw, field, reason):
    with pytest.raises(DirectoryError) as caught:
        entry_from_dict(raw)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_entries_are_known_by_npi_aco_or_name():
    assert entry_from_dict(pcp()).id == "pcp:1234567893"
    assert entry_from_dict({"kind": "care_team", "aco_id": "A1234", "name": "T", "channels": [FHIR]}).id == (
        "care_team:A1234"
    )
    assert entry_id("hie", name="Connecticut HIE (CONNIE)") == "hie:connecticut-hie-connie"


def test_a_digest_recipient_keeps_its_time_and_zone():
    e = entry_from_dict(pcp(mode="digest", digest_at="07:30", timezone="America/New_York"))
    assert (e.mode, e.digest_at, e.timezone) == ("digest", "07:30", "America/New_York")
    assert entry_from_dict(e.as_dict()) == e


# -- what kind of event ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "pv1", "kind"),
    [
        ("A04", {2: "E"}, "ed-visit"),
        ("A03", {2: "E", 45: "20260301120000"}, "ed-visit"),
        ("A01", {2: "I"}, "admit"),
        ("A03", {2: "I", 36: "01", 45: "20260301120000"}, "discharge"),
        ("A03", {2: "I", 36: "03", 45: "20260301120000"}, "discharge-snf"),
        ("A03", {2: "I", 36: "61", 45: "20260301120000"}, "discharge-snf"),
        ("A02", {2: "I"}, "transfer"),
    ],
)
def test_each_event_is_one_kind_a_recipient_can_ask_for(vocab, trigger, pv1, kind):
    from datetime import UTC, datetime

    bundle = convert(adt(trigger, pv1=pv1), vocab, UTC, datetime(2026, 3, 1, tzinfo=UTC)).bundle
    assert event_kind(bundle) == kind


# -- who is told -------------------------------------------------------------------------------


def test_the_members_pcp_care_team_and_the_hie_are_told():
    directory = entries(
        pcp(channels=[FHIR, DIRECT]),
        {"kind": "care_team", "aco_id": "A1234", "name": "A1234 care team", "channels": [FHIR]},
        {"kind": "hie", "name": "State HIE", "channels": [{"channel": "mllp", "host": "hie.example", "port": 2575}]},
    )
    chosen = recipients_for("ed-visit", MEMBER, directory)
    assert [(e.id, i, c["channel"]) for e, i, c in chosen.deliveries] == [
        ("pcp:1234567893", 0, "fhir"),
        ("pcp:1234567893", 1, "direct"),
        ("care_team:A1234", 0, "fhir"),
        ("hie:state-hie", 0, "mllp"),
    ]
    assert chosen.missing_pcps == ()


def test_an_unmatched_patient_goes_to_the_hie_only():
    directory = entries(pcp(), {"kind": "hie", "name": "HIE", "channels": [FHIR]})
    chosen = recipients_for("admit", None, directory)
    assert [e.id for e, _, _ in chosen.deliveries] == ["hie:hie"]


def test_a_recipient_is_told_only_of_the_events_it_asked_for():
    directory = entries(pcp(events=["discharge", "discharge-snf"]))
    assert recipients_for("ed-visit", MEMBER, directory).deliveries == ()
    assert len(recipients_for("discharge-snf", MEMBER, directory).deliveries) == 1


def test_a_disabled_recipient_is_told_nothing():
    assert recipients_for("admit", MEMBER, entries(pcp(enabled=False))).deliveries == ()


def test_a_pcp_with_no_entry_is_reported_not_skipped_silently():
    chosen = recipients_for("admit", MEMBER, entries({"kind": "hie", "name": "HIE", "channels": [FHIR]}))
    assert chosen.missing_pcps == ("1234567893",)
    assert [e.id for e, _, _ in chosen.deliveries] == ["hie:hie"]


def test_a_pcp_without_channels_uses_its_practices():
    directory = entries(
        {"kind": "practice", "name": "Shoreline Family Medicine", "channels": [DIRECT]},
        pcp(channels=[], practice="practice:shoreline-family-medicine"),
    )
    chosen = recipients_for("admit", MEMBER, directory)
    assert [(e.id, c["channel"]) for e, _, c in chosen.deliveries] == [("pcp:1234567893", "direct")]


def test_missing_lists_roster_pcps_with_no_usable_entry():
    directory = entries(pcp(), pcp(npi="1987654328", channels=[], practice="practice:gone"))
    assert missing_pcps(["1234567893", "1987654328", "1245319599", ""], directory) == ["1245319599", "1987654328"]
