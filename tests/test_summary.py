"""The human-readable summary that goes with a notification: read from its Bundle, what a care team acts on."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from synthetic_adt import adt

from gateway.conversion.convert import convert
from gateway.delivery.summary import event_title, notification_summary

RECEIVED = datetime(2026, 3, 1, 17, 0, 0, tzinfo=UTC)


def bundle_of(trigger="A01", vocab=None, tz=UTC, **kwargs) -> dict:
    return convert(adt(trigger, **kwargs), vocab, tz, RECEIVED).bundle


def test_an_admission_says_what_where_when_who_and_why(vocab):
    bundle = bundle_of(
        "A01",
        vocab,
        tz=ZoneInfo("America/New_York"),
        pv1={2: "I", 3: "4N^401^A^TESTFAC", 44: "20260301093000"},
        after_pv1=("DG1|1||J44.1^COPD with exacerbation^I10||20260301|A",),
    )
    lines = notification_summary(bundle).splitlines()
    assert lines[0].startswith("Admission (inpatient) at TESTFAC, 4N 401 A, 2026-03-01 09:30 (UTC-05:00)"), lines
    assert lines[1] == "Patient: ALEX Q TESTPATIENT, born 1960-01-02, MRN MRN123 (TESTFAC)"
    assert "Reason / diagnoses: COPD with exacerbation" in lines
    assert "Attending: DR DANA DOCTOR" in lines


def test_an_ed_registration_is_called_an_ed_visit(vocab):
    bundle = bundle_of("A04", vocab, pv1={2: "E", 3: "ED^BAY7^1^TESTFAC"})
    assert event_title(bundle) == "ED visit (registration)"
    assert notification_summary(bundle).startswith("ED visit (registration) at TESTFAC, ED BAY7 1")


def test_a_discharge_to_a_snf_names_it_and_gives_the_discharge_time(vocab):
    bundle = bundle_of(
        "A03",
        vocab,
        pv1={
            2: "I",
            36: "03",
            37: "SNF01^^^^^^^^MAPLE GROVE SKILLED NURSING",
            44: "20260225080000",
            45: "20260301113000",
        },
    )
    text = notification_summary(bundle)
    assert "Discharge (inpatient) at TESTFAC" in text
    assert "2026-03-01 11:30" in text  # the end of the stay, not its start
    assert "Discharged to a skilled nursing facility (SNF)" in text, text


def test_a_discharge_home_with_home_health_keeps_the_v2_detail(vocab):
    text = notification_summary(bundle_of("A03", vocab, pv1={2: "I", 36: "06", 45: "20260301113000"}))
    assert "Discharged to home with home health care" in text


def test_attribution_names_the_aco_pcp_and_care_manager(vocab):
    text = notification_summary(
        bundle_of("A04", vocab, pv1={2: "E"}),
        {"aco": "A1234 Lakeshore ACO", "pcp": "Dr. Lee (NPI 1234567893)", "care_manager": "rn-jones@aco.example"},
    )
    assert text.splitlines()[-1] == (
        "Attributed: ACO A1234 Lakeshore ACO; PCP Dr. Lee (NPI 1234567893); care manager rn-jones@aco.example"
    )


def test_care_transition_flags_are_said_in_words(vocab):
    """The flags the transitions service puts on a notification's attribution end the summary, in words."""
    text = notification_summary(
        bundle_of("A01", vocab, pv1={2: "I"}), {"aco": "A1234", "flags": ["readmission-30d", "admitted-from-snf"]}
    )
    assert text.splitlines()[-1] == (
        "Flags: readmitted within 30 days of a discharge; admitted from a skilled nursing facility"
    )


def test_a_message_with_no_time_zone_says_so_rather_than_guess():
    bundle = {
        "resourceType": "Bundle",
        "entry": [
            {"resource": {"resourceType": "MessageHeader", "eventCoding": {"code": "notification-admit"}}},
            {
                "resource": {
                    "resourceType": "Encounter",
                    "class": {"code": "IMP"},
                    "period": {"start": "2026-03-01T09:30:00"},
                }
            },
        ],
    }
    text = notification_summary(bundle)
    assert "2026-03-01 09:30 (no time zone given)" in text
    assert "Patient: name not given, born not given, MRN not given" in text


@pytest.mark.parametrize("missing", ["entry", "Encounter"])
def test_a_thin_bundle_still_gives_a_summary(missing):
    bundle = {
        "resourceType": "Bundle",
        "entry": [] if missing == "entry" else [{"resource": {"resourceType": "Patient"}}],
    }
    assert notification_summary(bundle).startswith("Encounter at an unnamed facility, time not given")
