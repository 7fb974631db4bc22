"""ADT -> FHIR notification Bundle: shape, mappings, ids and bad input."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from synthetic_adt import MBI, NPI, adt, only, resolve

from gateway.app.replay import split_messages
from gateway.conversion.convert import (
    MBI_SYSTEM,
    NOTIFICATION_EVENT_SYSTEM,
    NPI_SYSTEM,
    convert,
    validate_bundle,
)
from gateway.conversion.v2 import V2Message
from gateway.errors import MessageError
from gateway.matching import query_from_facts

SAMPLES = Path(__file__).resolve().parent.parent / "sample_messages"
SAMPLE_FILES = sorted(p.name for p in SAMPLES.glob("*.hl7"))
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
EVENT_CODES = {
    "A01": "notification-admit",
    "A02": "notification-transfer",
    "A03": "notification-discharge",
    "A04": "notification-admit",
    "A08": "notification-progress-update",
    "A11": "notification-admit",
}
#: An A04 for an outpatient (PV1-2 O) is an outpatient visit (mappings/tables.toml, events.A04).
OUTPATIENT_A04 = "notification-outpatient-visit"
RECEIVED = datetime(2026, 3, 1, 17, 0, 0, tzinfo=UTC)


def sample(name: str) -> V2Message:
    return V2Message(split_messages((SAMPLES / name).read_bytes())[0])


def references(value) -> list[str]:
    """Every Reference.reference anywhere in ``value``."""
    if isinstance(value, dict):
        found = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return found + [r for v in value.values() for r in references(v)]
    if isinstance(value, list):
        return [r for v in value for r in references(v)]
    return []


# -- every sample ------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_sample_converts_to_a_valid_r4_bundle(name, vocab):
    """Each sample message converts to a Bundle that fhir.resources (R4B) accepts."""
    conversion = convert(sample(name), vocab, UTC, RECEIVED)
    validate_bundle(conversion.bundle)
    assert conversion.warnings == []


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_sample_bundle_has_the_da_vinci_notification_shape(name, vocab):
    """MessageHeader first with the notification-event code for the trigger, focus on the Encounter."""
    msg = sample(name)
    trigger = msg.msh.get(9, 2)
    bundle = convert(msg, vocab, UTC, RECEIVED).bundle
    assert bundle["type"] == "message"
    header = bundle["entry"][0]["resource"]
    assert header["resourceType"] == "MessageHeader"
    outpatient = trigger in ("A04", "A11") and msg.segment("PV1").get(2) == "O"
    expected = OUTPATIENT_A04 if outpatient else EVENT_CODES[trigger]
    assert header["eventCoding"] == {"system": NOTIFICATION_EVENT_SYSTEM, "code": expected}
    assert [f["reference"] for f in header["focus"]] == [bundle["entry"][1]["fullUrl"]]
    encounter = resolve(bundle, header["focus"][0]["reference"])
    assert encounter["resourceType"] == "Encounter"
    assert resolve(bundle, encounter["subject"]["reference"])["resourceType"] == "Patient"
    assert encounter["location"], "every sample has a PV1-3 location"
    for loc in encounter["location"]:
        assert resolve(bundle, loc["location"]["reference"])["resourceType"] == "Location"
    assert resolve(bundle, header["sender"]["reference"])["resourceType"] == "Organization"


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_sample_bundle_references_all_resolve_and_full_urls_match_ids(name, vocab):
    """Every reference in the Bundle points at an entry, and each fullUrl is urn:uuid:<id>."""
    bundle = convert(sample(name), vocab, UTC, RECEIVED).bundle
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(full_urls) == len(set(full_urls))
    for e in bundle["entry"]:
        assert e["fullUrl"] == f"urn:uuid:{e['resource']['id']}"
    for ref in references(bundle):
        assert ref in full_urls


# -- identifiers and people --------------------------------------------------


def test_mbi_in_pid3_gets_the_us_mbi_system(vocab):
    """A PID-3 repetition typed MB becomes an Identifier with the US MBI system and is the match key."""
    conversion = convert(sample("epic-v251-a01-admit-from-ed.hl7"), vocab, UTC, RECEIVED)
    patient = only(conversion.bundle, "Patient")
    mbis = [i["value"] for i in patient["identifier"] if i["system"] == MBI_SYSTEM]
    assert mbis == ["2HX7RA1PK83"]
    assert conversion.patient.mbi == "2HX7RA1PK83"


@pytest.mark.parametrize(
    "cx",
    [
        f"{MBI}^^^CMS",  # no type code, a Medicare authority and the MBI format
        f"{MBI}^^^2.16.840.1.113883.4.927",
        f"{MBI}^^^FAC^MC",
    ],
)
def test_mbi_is_recognised_by_authority_or_type(cx, vocab):
    """An MBI is recognised from a Medicare assigning authority or the MC type code."""
    conversion = convert(adt(pid={3: f"MRN123^^^TESTFAC^MR~{cx}"}), vocab, UTC, RECEIVED)
    assert conversion.patient.mbi == MBI
    assert MBI_SYSTEM in [i["system"] for i in only(conversion.bundle, "Patient")["identifier"]]


def test_mbi_match_key_drops_dashes_and_case(vocab):
    """An MBI written with dashes or in lower case gives the roster's canonical key."""
    conversion = convert(adt(pid={3: "1eg4-te5-mk73^^^CMS^MB"}), vocab, UTC, RECEIVED)
    assert query_from_facts(conversion.patient).mbi == MBI


def test_mrn_in_pid2_is_read_for_v23_senders(vocab):
    """A v2.3 sender's MRN in PID-2 (PID-3 null) becomes the Patient identifier and an MRN key."""
    conversion = convert(sample("cerner-v23-a01-admit.hl7"), vocab, UTC, RECEIVED)
    patient = only(conversion.bundle, "Patient")
    assert [(i["value"], i["assigner"]["display"]) for i in patient["identifier"]] == [("NR448812", "NRG")]
    assert patient["identifier"][0]["type"]["coding"][0]["code"] == "MR"
    assert conversion.patient.mrns == (("NR448812", "NRG"),)
    assert conversion.patient.mbi == ""


def test_ssn_is_never_forwarded(vocab):
    """A PID-3 repetition typed SS is left out of the Patient."""
    conversion = convert(adt(pid={3: "MRN123^^^TESTFAC^MR~123-45-6789^^^SSA^SS"}), vocab, UTC, RECEIVED)
    values = [i["value"] for i in only(conversion.bundle, "Patient")["identifier"]]
    assert values == ["MRN123"]


def test_patient_demographics_map_to_the_patient(vocab):
    """Name, birth date, gender and address are mapped, and the match keys are filled."""
    conversion = convert(adt(), vocab, UTC, RECEIVED)
    patient = only(conversion.bundle, "Patient")
    assert patient["name"] == [{"family": "TESTPATIENT", "given": ["ALEX", "Q"], "use": "official"}]
    assert patient["birthDate"] == "1960-01-02"
    assert patient["gender"] == "female"
    assert patient["address"][0]["city"] == "TESTVILLE"
    facts = conversion.patient
    assert (facts.family, facts.given, facts.middle, facts.birth_date, facts.gender) == (
        "TESTPATIENT",
        "ALEX",
        "Q",
        "1960-01-02",
        "female",
    )
    assert facts.city == "TESTVILLE"


@pytest.mark.parametrize(
    ("xcn", "system"),
    [
        (f"{NPI}^DOCTOR^DANA^^^DR^^^NPI^L^^^NPI", NPI_SYSTEM),  # typed NPI
        (f"{NPI}^DOCTOR^DANA^^^^^^^^^^NPI", NPI_SYSTEM),  # type only (Meditech style)
        (f"{NPI}^DOCTOR^DANA", NPI_SYSTEM),  # 10 digits passing the NPI check digit
        ("1234567890^DOCTOR^DANA", "urn:herald:id:TESTAPP-TESTFAC"),  # fails the check digit
        ("D4471^DOCTOR^DANA^^^^^^TESTFAC", "urn:herald:id:TESTFAC"),  # a local id
    ],
)
def test_attending_npi_is_detected(xcn, system, vocab):
    """PV1-7 becomes a Practitioner; an NPI (by type, authority or check digit) gets the US NPI system."""
    bundle = convert(adt(pv1={7: xcn}), vocab, UTC, RECEIVED).bundle
    practitioner = only(bundle, "Practitioner")
    assert practitioner["identifier"][0]["system"] == system
    assert practitioner["name"][0]["family"] == "DOCTOR"
    encounter = only(bundle, "Encounter")
    individual = encounter["participant"][0]["individual"]["reference"]
    assert resolve(bundle, individual) is practitioner


def test_sample_attending_has_an_npi(vocab):
    """The Cerner sample's attending is identified by NPI."""
    practitioner = only(convert(sample("cerner-v23-a01-admit.hl7"), vocab, UTC, RECEIVED).bundle, "Practitioner")
    assert practitioner["identifier"][0] == {
        "system": NPI_SYSTEM,
        "value": "1456789019",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NPI"}]},
    }


# -- the encounter -----------------------------------------------------------


def test_a01_is_an_in_progress_admission(vocab):
    """A01: Encounter in-progress, inpatient class, period.start from PV1-44, location active."""
    conversion = convert(adt(), vocab, UTC, RECEIVED)
    encounter = only(conversion.bundle, "Encounter")
    assert encounter["status"] == "in-progress"
    assert encounter["class"]["code"] == "IMP"
    assert encounter["period"] == {"start": "2026-03-01T10:00:00+00:00"}
    assert encounter["location"][0]["status"] == "active"
    assert encounter["identifier"][0]["value"] == "VISIT001"
    assert conversion.encounter_date == "2026-03-01"


def test_a03_finishes_the_encounter_with_pv1_45_as_the_end(vocab):
    """A03: Encounter finished, period.end from PV1-45, the location completed."""
    conversion = convert(sample("cerner-v23-a03-discharge.hl7"), vocab, UTC, RECEIVED)
    encounter = only(conversion.bundle, "Encounter")
    assert encounter["status"] == "finished"
    assert encounter["period"] == {"start": "2026-11-18T09:02:00+00:00", "end": "2026-11-21T14:15:00+00:00"}
    assert encounter["location"][0]["status"] == "completed"
    assert conversion.encounter_date == "2026-11-21"


def test_a03_without_pv1_45_ends_at_evn2(vocab):
    """An A03 with PV1-45 empty takes period.end from EVN-2 (the recorded time)."""
    conversion = convert(adt("A03", evn={2: "20260305081500"}), vocab, UTC, RECEIVED)
    encounter = only(conversion.bundle, "Encounter")
    assert encounter["status"] == "finished"
    assert encounter["period"]["end"] == "2026-03-05T08:15:00+00:00"
    assert encounter["period"]["start"] == "2026-03-01T10:00:00+00:00"
    assert conversion.encounter_date == "2026-03-05"


def test_a03_prefers_evn6_over_evn2_for_the_end(vocab):
    """EVN-6 (when the event happened) is a better discharge time than EVN-2 (when it was recorded)."""
    bundle = convert(adt("A03", evn={2: "20260305090000", 6: "20260305081500"}), vocab, UTC, RECEIVED).bundle
    assert only(bundle, "Encounter")["period"]["end"] == "2026-03-05T08:15:00+00:00"


def test_a04_emergency_registration_is_in_progress_emer(vocab):
    """A04 with PV1-2 = E: an ED visit under way, Encounter in-progress with class EMER."""
    conversion = convert(sample("epic-v251-a04-ed-registration.hl7"), vocab, UTC, RECEIVED)
    encounter = only(conversion.bundle, "Encounter")
    assert encounter["status"] == "in-progress"
    assert encounter["class"] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "code": "EMER",
        "display": "emergency",
    }
    assert conversion.event_code == "notification-admit"


def test_a04_outpatient_registration_is_a_planned_outpatient_visit(vocab):
    """A04 for an outpatient keeps the IG's 'planned' status and is a notification-outpatient-visit."""
    conversion = convert(adt("A04", pv1={2: "O"}), vocab, UTC, RECEIVED)
    encounter = only(conversion.bundle, "Encounter")
    assert encounter["status"] == "planned"
    assert encounter["class"]["code"] == "AMB"
    assert conversion.event_code == OUTPATIENT_A04


def test_patient_class_is_read_despite_padding(vocab):
    """A space-padded PV1-2 ('E ') is still the emergency class."""
    encounter = only(convert(adt("A04", pv1={2: "e "}), vocab, UTC, RECEIVED).bundle, "Encounter")
    assert encounter["class"]["code"] == "EMER"
    assert encounter["status"] == "in-progress"


def test_table_0004_class_without_a_v3_code_keeps_its_v2_code(vocab):
    """A table 0004 class the IG keeps in v2 (R, recurring) stays in the v2-0004 code system."""
    encounter = only(convert(adt(pv1={2: "R"}), vocab, UTC, RECEIVED).bundle, "Encounter")
    assert encounter["class"] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0004",
        "code": "R",
        "display": "Recurring patient",
    }


def test_class_outside_table_0004_keeps_the_code_without_a_system(vocab):
    """A PV1-2 that is no table 0004 value is not attributed to v2-0004: code only, and a warning."""
    conversion = convert(adt(pv1={2: "L"}), vocab, UTC, RECEIVED)
    assert only(conversion.bundle, "Encounter")["class"] == {"code": "L"}
    assert any(w.startswith("PV1-2") for w in conversion.warnings)


def test_empty_patient_class_is_unknown_with_a_warning(vocab):
    """No PV1-2: Encounter.class is the v3 null flavor UNK and a warning says so."""
    conversion = convert(adt(pv1={2: ""}), vocab, UTC, RECEIVED)
    assert only(conversion.bundle, "Encounter")["class"]["code"] == "UNK"
    assert any(w.startswith("PV1-2") for w in conversion.warnings)


def test_times_without_offset_take_the_default_timezone(vocab):
    """PV1-44 with no offset is read in the configured zone."""
    bundle = convert(adt(), vocab, ZoneInfo("America/New_York"), RECEIVED).bundle
    assert only(bundle, "Encounter")["period"]["start"] == "2026-03-01T10:00:00-05:00"
    assert bundle["timestamp"] == "2026-03-01T12:00:00-05:00"


def test_bundle_timestamp_falls_back_to_the_receipt_time(vocab):
    """With MSH-7 a date only, the Bundle timestamp is when the message was received."""
    msg = V2Message(
        b"MSH|^~\\&|TESTAPP|TESTFAC|HERALD|ACO|20260301||ADT^A01|C9|P|2.5\rPID|1||MRN123^^^TESTFAC^MR\rPV1|1|I\r"
    )
    assert convert(msg, vocab, UTC, RECEIVED).bundle["timestamp"] == "2026-03-01T17:00:00+00:00"
    naive = convert(msg, vocab, UTC, datetime(2026, 3, 1, 17, 0, 0)).bundle
    validate_bundle(naive)
    assert naive["timestamp"] == "2026-03-01T17:00:00+00:00"


def test_dg1_becomes_an_icd10cm_condition_of_the_encounter(vocab):
    """Each DG1 becomes a Condition coded in ICD-10-CM, listed in Encounter.diagnosis."""
    bundle = convert(sample("epic-v251-a01-admit-from-ed.hl7"), vocab, UTC, RECEIVED).bundle
    condition = only(bundle, "Condition")
    assert condition["code"]["coding"][0] == {
        "code": "I21.4",
        "system": ICD10CM,
        "display": "Non-ST elevation (NSTEMI) myocardial infarction",
    }
    encounter = only(bundle, "Encounter")
    assert resolve(bundle, encounter["diagnosis"][0]["condition"]["reference"]) is condition
    assert resolve(bundle, condition["subject"]["reference"])["resourceType"] == "Patient"
    assert resolve(bundle, condition["encounter"]["reference"]) is encounter


def test_several_dg1_are_ranked_in_order(vocab):
    """Two DG1 segments give two Conditions ranked 1 and 2."""
    extra = ("DG1|1||J18.9^Pneumonia^I10", "DG1|2||I10^Hypertension^I10")
    bundle = convert(adt(after_pv1=extra), vocab, UTC, RECEIVED).bundle
    encounter = only(bundle, "Encounter")
    codes = [resolve(bundle, d["condition"]["reference"])["code"]["coding"][0]["code"] for d in encounter["diagnosis"]]
    assert codes == ["J18.9", "I10"]
    assert [d["rank"] for d in encounter["diagnosis"]] == [1, 2]


def test_pv2_3_becomes_the_reason_code(vocab):
    """PV2-3 (admit reason) becomes Encounter.reasonCode."""
    encounter = only(convert(sample("cerner-v23-a01-admit.hl7"), vocab, UTC, RECEIVED).bundle, "Encounter")
    assert encounter["reasonCode"][0]["coding"][0]["code"] == "R06.02"
    assert encounter["reasonCode"][0]["coding"][0]["system"] == ICD10CM


# -- ids ---------------------------------------------------------------------


def test_same_message_converts_to_the_same_ids(vocab):
    """Converting the same message twice gives byte-identical Bundles (deterministic ids)."""
    first = convert(sample("epic-v251-a01-admit-from-ed.hl7"), vocab, UTC, RECEIVED).bundle
    second = convert(sample("epic-v251-a01-admit-from-ed.hl7"), vocab, UTC, RECEIVED).bundle
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def test_two_patients_get_different_ids(vocab):
    """Different patients (and visits) never share a Patient or Encounter id."""
    a = convert(adt(), vocab, UTC, RECEIVED).bundle
    b = convert(
        adt(pid={3: "MRN456^^^TESTFAC^MR"}, pv1={19: "VISIT002^^^TESTFAC^VN"}, control="CTRL0002"),
        vocab,
        UTC,
        RECEIVED,
    ).bundle
    assert only(a, "Patient")["id"] != only(b, "Patient")["id"]
    assert only(a, "Encounter")["id"] != only(b, "Encounter")["id"]
    assert a["id"] != b["id"]
    # The facility is the same: one Organization id for both.
    assert only(a, "Organization")["id"] == only(b, "Organization")["id"]


def test_admit_and_discharge_of_one_visit_share_patient_and_encounter_ids(vocab):
    """A01 and A03 for the same visit number name the same Patient and Encounter."""
    admit = convert(adt("A01"), vocab, UTC, RECEIVED).bundle
    discharge = convert(adt("A03", control="CTRL0002"), vocab, UTC, RECEIVED).bundle
    assert only(admit, "Patient")["id"] == only(discharge, "Patient")["id"]
    assert only(admit, "Encounter")["id"] == only(discharge, "Encounter")["id"]
    assert admit["id"] != discharge["id"]


# -- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "code", "location", "words"),
    [
        (lambda: adt(drop=("PID",)), "100", "PID", "PID"),
        (lambda: adt(drop=("PV1",)), "100", "PV1", "PV1"),
        (lambda: adt(msh9="ORU^R01"), "200", "MSH-9", "ORU"),
        (lambda: adt("A28"), "201", "MSH-9", "A28"),
        (lambda: adt(msh9="ADT", evn={1: ""}), "201", "MSH-9", "(empty)"),
        (lambda: adt(pid={3: "", 2: "", 4: ""}), "101", "PID-3", "identifier"),
        (lambda: adt(pid={3: '""'}), "101", "PID-3", "identifier"),
        (lambda: adt(pid={3: "123-45-6789^^^SSA^SS"}), "101", "PID-3", "identifier"),
        (lambda: adt(control=""), "101", "MSH-10", "control id"),
    ],
    ids=["no-pid", "no-pv1", "oru", "a28", "no-trigger", "empty-pid3", "null-pid3", "ssn-only", "no-msh10"],
)
def test_unconvertible_message_raises_message_error(msg, code, location, words, vocab):
    """Messages that cannot become a notification raise MessageError with a 0357 code and location."""
    with pytest.raises(MessageError) as caught:
        convert(msg(), vocab, UTC, RECEIVED)
    assert (caught.value.code, caught.value.location) == (code, location)
    assert words in caught.value.reason


def test_trigger_is_read_from_evn1_when_msh9_has_none(vocab):
    """A sender that leaves MSH-9.2 empty has its event read from EVN-1."""
    conversion = convert(adt("A03", msh9="ADT"), vocab, UTC, RECEIVED)
    assert conversion.trigger_event == "A03"
    assert conversion.event_code == "notification-discharge"


@pytest.mark.parametrize("value", ["19601302", "19600230", "UNKNOWN"])
def test_invalid_birth_date_is_a_warning_and_left_out(value, vocab):
    """An invalid PID-7 does not fail the message: a warning names PID-7 and birthDate is absent."""
    conversion = convert(adt(pid={7: value}), vocab, UTC, RECEIVED)
    patient = only(conversion.bundle, "Patient")
    assert "birthDate" not in patient
    assert conversion.patient.birth_date == ""
    assert [w for w in conversion.warnings if w.startswith("PID-7:")], conversion.warnings
    validate_bundle(conversion.bundle)


def test_invalid_encounter_dates_are_warnings_and_left_out(vocab):
    """An invalid PV1-44 or PV1-45 is left out with a warning naming it; the Bundle stays valid."""
    conversion = convert(adt("A03", pv1={44: "20261399", 45: "NOT A DATE"}, evn={2: ""}), vocab, UTC, RECEIVED)
    encounter = only(conversion.bundle, "Encounter")
    assert "period" not in encounter
    assert {w.split(":")[0] for w in conversion.warnings} >= {"PV1-44", "PV1-45"}
    validate_bundle(conversion.bundle)


def test_unknown_sex_is_a_warning(vocab):
    """A PID-8 outside table 0001 is left out with a warning."""
    conversion = convert(adt(pid={8: "X"}), vocab, UTC, RECEIVED)
    assert "gender" not in only(conversion.bundle, "Patient")
    assert conversion.patient.gender == ""
    assert any(w.startswith("PID-8") for w in conversion.warnings)


def test_warnings_carry_no_patient_data(vocab):
    """Warnings name the field, never its value (they are logged)."""
    conversion = convert(adt(pid={7: "SECRET1960"}), vocab, UTC, RECEIVED)
    assert conversion.warnings
    assert not any("SECRET" in w for w in conversion.warnings)


@pytest.mark.parametrize(
    ("bundle", "element"),
    [
        ({"resourceType": "Bundle"}, "type"),
        ({"resourceType": "Bundle", "type": "message", "timestamp": "yesterday"}, "timestamp"),
        (
            {
                "resourceType": "Bundle",
                "type": "message",
                "entry": [{"fullUrl": "urn:uuid:x", "resource": {"resourceType": "Patient", "birthDate": "1960-13"}}],
            },
            "entry.0.resource.birthDate",
        ),
    ],
)
def test_validate_bundle_rejects_an_invalid_bundle(bundle, element):
    """validate_bundle raises MessageError (location FHIR) naming the bad element."""
    with pytest.raises(MessageError) as caught:
        validate_bundle(bundle)
    assert caught.value.location == "FHIR"
    assert element in caught.value.reason


def test_validate_bundle_names_the_invalid_entry():
    """A resource that breaks its FHIR model is reported with its entry path, not accepted."""
    bundle = {
        "resourceType": "Bundle",
        "type": "message",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "id": "1"}},
            {"fullUrl": "urn:uuid:2", "resource": {"resourceType": "Encounter", "id": "2", "status": "in-progress"}},
        ],
    }
    with pytest.raises(MessageError) as caught:
        validate_bundle(bundle)
    assert "entry.1.resource.class" in caught.value.reason


def test_validate_bundle_checks_the_bundle_itself():
    """A Bundle without its required type, or with an unknown resource type, is refused."""
    with pytest.raises(MessageError) as caught:
        validate_bundle({"resourceType": "Bundle", "entry": []})
    assert "type" in caught.value.reason
    with pytest.raises(MessageError) as caught:
        validate_bundle(
            {"resourceType": "Bundle", "type": "message", "entry": [{"resource": {"resourceType": "Nope"}}]}
        )
    assert "Nope" in caught.value.reason
