"""Trigger events, segments beyond PID/PV1, ids and the Da Vinci notification shape."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from synthetic_adt import MBI, NPI, PCP_NPI, adt, only, resolve, resources, segment

from gateway.conversion.convert import MBI_SYSTEM, NOTIFICATION_EVENT_SYSTEM, NPI_SYSTEM, convert, validate_bundle

RECEIVED = datetime(2026, 3, 1, 17, 0, 0, tzinfo=UTC)
V2_0003 = "http://terminology.hl7.org/CodeSystem/v2-0003"
DISCHARGE_DISPOSITION = "http://terminology.hl7.org/CodeSystem/discharge-disposition"


def assert_notification_shape(bundle: dict) -> None:
    """Da Vinci Notifications: MessageHeader first, eventCoding system, focus the Encounter,
    the Encounter's subject and locations inside the Bundle, every reference resolving."""
    assert bundle["type"] == "message"
    header = bundle["entry"][0]["resource"]
    assert header["resourceType"] == "MessageHeader"
    assert header["eventCoding"]["system"] == NOTIFICATION_EVENT_SYSTEM
    assert len(header["focus"]) == 1
    encounter = resolve(bundle, header["focus"][0]["reference"])
    assert encounter["resourceType"] == "Encounter"
    assert resolve(bundle, encounter["subject"]["reference"])["resourceType"] == "Patient"
    for loc in encounter.get("location", []):
        assert resolve(bundle, loc["location"]["reference"])["resourceType"] == "Location"
    for e in bundle["entry"]:
        assert e["fullUrl"] == f"urn:uuid:{e['resource']['id']}"
    ids = [e["resource"]["id"] for e in bundle["entry"]]
    assert len(ids) == len(set(ids)), "two entries share an id"


# -- events ------------------------------------------------------------------

EVENTS = [
    ("A01", "I", "notification-admit", "in-progress"),
    ("A02", "I", "notification-transfer", "in-progress"),
    ("A03", "I", "notification-discharge", "finished"),
    ("A04", "E", "notification-admit", "in-progress"),
    ("A04", "O", "notification-outpatient-visit", "planned"),
    ("A06", "I", "notification-transfer", "in-progress"),
    ("A07", "O", "notification-transfer", "in-progress"),
    ("A08", "I", "notification-progress-update", "in-progress"),
    ("A11", "I", "notification-admit", "cancelled"),
    ("A11", "O", "notification-outpatient-visit", "cancelled"),
    ("A12", "I", "notification-transfer", "in-progress"),
    ("A13", "I", "notification-discharge", "in-progress"),
]


@pytest.mark.parametrize(("trigger", "patient_class", "event", "status"), EVENTS)
def test_event_gives_its_notification_code_and_encounter_status(trigger, patient_class, event, status, vocab):
    """Each converted event has the notification code and Encounter.status of mappings/tables.toml."""
    conversion = convert(adt(trigger, pv1={2: patient_class}), vocab, UTC, RECEIVED)
    validate_bundle(conversion.bundle)
    assert_notification_shape(conversion.bundle)
    header = conversion.bundle["entry"][0]["resource"]
    assert header["eventCoding"]["code"] == event == conversion.event_code
    assert header["reason"]["coding"][0]["system"] == V2_0003
    assert header["reason"]["coding"][0]["code"] == trigger
    assert only(conversion.bundle, "Encounter")["status"] == status


def test_every_event_in_the_table_uses_a_code_of_the_da_vinci_code_system(vocab):
    """Herald's event table names only codes that the notification-event code system defines."""
    defined = {
        "notification-admit",
        "notification-discharge",
        "notification-transfer",
        "notification-outpatient-visit",
        "notification-progress-update",
    }
    for rule in vocab.events.values():
        assert rule.notification in defined
        assert all(event in defined for event, _ in rule.by_class.values())


def test_a02_transfer_has_the_new_location_active_and_the_prior_completed(vocab):
    """A02: PV1-3 is the active location, PV1-6 the completed one."""
    bundle = convert(adt("A02", pv1={3: "4W^401^A^TESTFAC", 6: "3W^312^B^TESTFAC"}), vocab, UTC, RECEIVED).bundle
    locations = only(bundle, "Encounter")["location"]
    names = [(resolve(bundle, loc["location"]["reference"])["name"], loc["status"]) for loc in locations]
    assert names == [("4W 401 A", "active"), ("3W 312 B", "completed")]


def test_a08_with_a_discharge_time_is_finished_as_the_ig_pv1_map_says(vocab):
    """A08's status comes from PV1: PV1-45 valued means finished, with the end."""
    encounter = only(convert(adt("A08", pv1={45: "20260302100000"}), vocab, UTC, RECEIVED).bundle, "Encounter")
    assert encounter["status"] == "finished"
    assert encounter["period"]["end"] == "2026-03-02T10:00:00+00:00"


def test_a13_cancel_discharge_has_no_end_even_when_pv1_45_is_sent(vocab):
    """A13 puts the encounter back in progress: no period.end."""
    encounter = only(convert(adt("A13", pv1={45: "20260302100000"}), vocab, UTC, RECEIVED).bundle, "Encounter")
    assert encounter["status"] == "in-progress"
    assert "end" not in encounter.get("period", {})


@pytest.mark.parametrize(("cancel", "original"), [("A11", "A01"), ("A13", "A03"), ("A12", "A02")])
def test_cancel_names_the_encounter_of_the_notification_it_retracts(cancel, original, vocab):
    """A cancel converts to the same Encounter (id and visit number) as the event it cancels, marked a retraction."""
    first = convert(adt(original, control="C1"), vocab, UTC, RECEIVED)
    retraction = convert(adt(cancel, control="C2"), vocab, UTC, RECEIVED)
    assert retraction.retraction and not first.retraction
    first_encounter, cancel_encounter = only(first.bundle, "Encounter"), only(retraction.bundle, "Encounter")
    assert cancel_encounter["id"] == first_encounter["id"]
    assert cancel_encounter["identifier"] == first_encounter["identifier"]
    assert retraction.event_code == first.event_code
    header = retraction.bundle["entry"][0]["resource"]
    assert header["focus"][0]["reference"] == f"urn:uuid:{first_encounter['id']}"
    assert "retracts" in header["reason"]["text"]
    assert retraction.bundle["id"] != first.bundle["id"]


def test_a11_cancel_admit_is_a_cancelled_encounter_with_completed_location(vocab):
    """A11: Encounter.status cancelled (IG event map) and its location no longer active."""
    encounter = only(convert(adt("A11"), vocab, UTC, RECEIVED).bundle, "Encounter")
    assert encounter["status"] == "cancelled"
    assert encounter["location"][0]["status"] == "completed"


def test_encounter_without_visit_number_is_keyed_by_admit_time(vocab):
    """No PV1-19: the Encounter id is from the patient and PV1-44, the same for the A01 and its A03."""
    admit = convert(adt("A01", control="C1", pv1={19: ""}), vocab, UTC, RECEIVED)
    discharge = convert(adt("A03", control="C2", pv1={19: ""}), vocab, UTC, RECEIVED)
    assert only(admit.bundle, "Encounter")["id"] == only(discharge.bundle, "Encounter")["id"]
    assert not any("PV1-19" in w for w in admit.warnings)


def test_encounter_without_visit_number_or_admit_time_warns_its_id_is_the_messages(vocab):
    """No PV1-19 and no PV1-44: a warning says the Encounter cannot be named by later messages."""
    conversion = convert(adt("A08", pv1={19: "", 44: ""}), vocab, UTC, RECEIVED)
    assert any(w.startswith("PV1-19") for w in conversion.warnings)


def test_visits_of_different_senders_do_not_share_an_encounter(vocab):
    """The same visit number from two senders is two Encounters."""
    a = convert(adt(), vocab, UTC, RECEIVED)
    b_msg = adt()
    b_msg.msh.fields[3] = "OTHERAPP"
    b = convert(b_msg, vocab, UTC, RECEIVED)
    assert only(a.bundle, "Encounter")["id"] != only(b.bundle, "Encounter")["id"]
    assert only(a.bundle, "Patient")["id"] != only(b.bundle, "Patient")["id"]
    assert a.bundle["identifier"] != b.bundle["identifier"]


# -- table 0112 and other PV1 vocabulary -------------------------------------


@pytest.mark.parametrize(
    ("code", "fhir"),
    [("01", "home"), ("03", "snf"), ("06", "home"), ("07", "aadvice"), ("20", "exp"), ("62", "rehab"), ("65", "psy")],
)
def test_discharge_disposition_maps_ub04_codes_and_keeps_the_v2_code(code, fhir, vocab):
    """PV1-36 (UB-04 patient status) -> discharge-disposition, with the v2-0112 code kept beside it."""
    bundle = convert(adt("A03", pv1={36: code, 45: "20260302100000"}), vocab, UTC, RECEIVED).bundle
    codings = only(bundle, "Encounter")["hospitalization"]["dischargeDisposition"]["coding"]
    assert codings[0]["system"] == DISCHARGE_DISPOSITION and codings[0]["code"] == fhir
    assert codings[1] == {"system": "http://terminology.hl7.org/CodeSystem/v2-0112", "code": code}


def test_unmapped_discharge_disposition_keeps_only_its_v2_code(vocab):
    """A PV1-36 outside the table is kept in v2-0112, not guessed."""
    bundle = convert(adt("A03", pv1={36: "ZZ"}), vocab, UTC, RECEIVED).bundle
    codings = only(bundle, "Encounter")["hospitalization"]["dischargeDisposition"]["coding"]
    assert codings == [{"system": "http://terminology.hl7.org/CodeSystem/v2-0112", "code": "ZZ"}]


def test_pv1_admission_type_service_participants_and_readmission(vocab):
    """PV1-4 -> type (v2-0007), PV1-10 -> serviceType, PV1-8/9/17 -> REF/CON/ADM participants."""
    msg = adt(
        pv1={4: "E", 8: "2222222222^REFER^RITA", 9: "^CONSULT^CARL", 10: "MED", 13: "R", 17: f"{NPI}^DOCTOR^DANA"}
    )
    bundle = convert(msg, vocab, UTC, RECEIVED).bundle
    encounter = only(bundle, "Encounter")
    assert encounter["type"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0007",
        "code": "E",
        "display": "Emergency",
    }
    assert encounter["serviceType"]["coding"][0]["code"] == "MED"
    codes = [p["type"][0]["coding"][0]["code"] for p in encounter["participant"]]
    assert codes == ["ATND", "REF", "CON", "ADM"]
    # The attending and the admitting doctor are one Practitioner.
    assert len(resources(bundle, "Practitioner")) == 3
    assert encounter["hospitalization"]["reAdmission"]["coding"][0]["code"] == "R"


def test_facility_npi_from_evn7(vocab):
    """EVN-7 with type NPI gives the facility Organization its NPI (Da Vinci's treating facility)."""
    bundle = convert(adt(evn={7: "TESTFAC^1234567893^NPI"}), vocab, UTC, RECEIVED).bundle
    header = bundle["entry"][0]["resource"]
    org = resolve(bundle, header["responsible"]["reference"])
    assert org["identifier"] == [{"system": NPI_SYSTEM, "value": "1234567893"}]


# -- patient-level segments --------------------------------------------------


def test_pd1_primary_care_provider_is_the_general_practitioner(vocab):
    """PD1-4 becomes Patient.generalPractitioner -> Practitioner with its NPI."""
    msg = adt(after_pid=(segment("PD1", {4: f"{PCP_NPI}^PRIMARY^PAT^^^DR^^^^^^^NPI"}),))
    bundle = convert(msg, vocab, UTC, RECEIVED).bundle
    gp = resolve(bundle, only(bundle, "Patient")["generalPractitioner"][0]["reference"])
    assert gp["identifier"][0] == {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NPI"}]},
        "system": NPI_SYSTEM,
        "value": PCP_NPI,
    }


@pytest.mark.parametrize(
    "seg",
    [
        segment("ROL", {1: "1", 2: "AD", 3: "PP", 4: f"{PCP_NPI}^PRIMARY^PAT"}),
        segment("PRT", {2: "AD", 4: "PP", 5: f"{PCP_NPI}^PRIMARY^PAT"}),
    ],
    ids=["ROL", "PRT"],
)
def test_rol_and_prt_primary_care_role_is_the_general_practitioner(seg, vocab):
    """ROL-3 / PRT-4 = PP: the person is the Patient's generalPractitioner, not an encounter participant."""
    bundle = convert(adt(after_pid=(seg,)), vocab, UTC, RECEIVED).bundle
    gp = resolve(bundle, only(bundle, "Patient")["generalPractitioner"][0]["reference"])
    assert gp["name"][0]["family"] == "PRIMARY"
    assert len(only(bundle, "Encounter")["participant"]) == 1  # only PV1-7


def test_rol_other_role_is_an_encounter_participant(vocab):
    """ROL-3 = CP (consulting) after PV1 is Encounter.participant with type CON."""
    seg = segment("ROL", {1: "1", 2: "AD", 3: "CP", 4: "^CONSULT^CARL", 5: "20260301110000"})
    encounter = only(convert(adt(after_pv1=(seg,)), vocab, UTC, RECEIVED).bundle, "Encounter")
    last = encounter["participant"][-1]
    assert last["type"][0]["coding"][0]["code"] == "CON"
    assert last["period"] == {"start": "2026-03-01T11:00:00+00:00"}


def test_nk1_is_a_patient_contact(vocab):
    """NK1 name, relationship (0063 -> v3 RoleCode), phone and address become Patient.contact."""
    nk1 = segment(
        "NK1",
        {1: "1", 2: "TESTKIN^ROBIN", 3: "SPO^Spouse^HL70063", 4: "1 TEST ST^^TOWN^CT", 5: "^PRN^PH^^^203^5550100"},
    )
    patient = only(convert(adt(after_pid=(nk1,)), vocab, UTC, RECEIVED).bundle, "Patient")
    contact = patient["contact"][0]
    assert contact["name"] == {"family": "TESTKIN", "given": ["ROBIN"]}
    assert contact["relationship"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
        "code": "SPS",
        "display": "spouse",
    }
    assert contact["telecom"] == [{"system": "phone", "value": "203 5550100", "use": "home"}]
    assert contact["address"]["city"] == "TOWN"


def test_pid_marital_status_language_death_and_names_of_every_repetition(vocab):
    """PID-16 (0002), PID-15 (BCP 47), PID-29, PID-6 and all PID-5 repetitions with their use."""
    msg = adt(
        pid={
            5: "TESTPATIENT^ALEX^^^^^L~TP^AL^^^^^N",
            6: "MAIDEN^MARY",
            15: "EN",
            16: "M",
            29: "20260301090000",
            13: "(203)555-0147",
        }
    )
    patient = only(convert(msg, vocab, UTC, RECEIVED).bundle, "Patient")
    assert [n.get("use") for n in patient["name"]] == ["official", "nickname"]
    assert patient["maritalStatus"]["coding"][0]["code"] == "M"
    assert patient["communication"][0]["language"]["coding"][0] == {"system": "urn:ietf:bcp:47", "code": "en"}
    assert patient["deceasedDateTime"] == "2026-03-01T09:00:00+00:00"
    assert patient["extension"][0]["valueString"] == "MAIDEN"
    assert patient["telecom"] == [{"system": "phone", "value": "(203)555-0147", "use": "home"}]


def test_birth_time_is_kept_as_the_birth_time_extension(vocab):
    """A PID-7 with a time gives birthDate plus the patient-birthTime extension."""
    patient = only(convert(adt(pid={7: "196001020830"}), vocab, UTC, RECEIVED).bundle, "Patient")
    assert patient["birthDate"] == "1960-01-02"
    assert patient["_birthDate"]["extension"][0]["valueDateTime"] == "1960-01-02T08:30:00+00:00"


# -- clinical segments -------------------------------------------------------


def test_dg1_type_priority_and_deletion(vocab):
    """DG1-6 -> diagnosis.use, DG1-15 -> rank, DG1-21 = D -> entered-in-error without clinical status."""
    dg1a = segment("DG1", {1: "1", 3: "J18.9^Pneumonia^I10", 6: "A", 15: "2"})
    dg1b = segment("DG1", {1: "2", 3: "I10^Hypertension^I10", 6: "W", 15: "1", 21: "D"})
    bundle = convert(adt(after_pv1=(dg1a, dg1b)), vocab, UTC, RECEIVED).bundle
    diagnosis = only(bundle, "Encounter")["diagnosis"]
    assert [d["rank"] for d in diagnosis] == [2, 1]
    assert diagnosis[0]["use"]["coding"][0]["code"] == "AD"
    deleted = resolve(bundle, diagnosis[1]["condition"]["reference"])
    assert deleted["verificationStatus"]["coding"][0]["code"] == "entered-in-error"
    assert "clinicalStatus" not in deleted


def test_al1_is_an_allergy_intolerance(vocab):
    """AL1 type (0127), code, severity (0128), reaction and date -> AllergyIntolerance."""
    al1 = segment("AL1", {1: "1", 2: "DA", 3: "70618^Penicillin^RXNORM", 4: "SV", 5: "Hives~Wheezing", 6: "20200101"})
    bundle = convert(adt(after_pv1=(al1,)), vocab, UTC, RECEIVED).bundle
    allergy = only(bundle, "AllergyIntolerance")
    assert allergy["category"] == ["medication"]
    assert allergy["criticality"] == "high"
    assert allergy["code"]["coding"][0]["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"
    assert [m["text"] for m in allergy["reaction"][0]["manifestation"]] == ["Hives", "Wheezing"]
    assert allergy["onsetDateTime"] == "2020-01-01"
    assert resolve(bundle, allergy["patient"]["reference"])["resourceType"] == "Patient"


def test_in1_in2_is_a_coverage_and_in2_medicare_number_is_the_mbi(vocab):
    """IN1 -> Coverage with its payor; IN2-6 (Medicare card number) in the MBI format becomes the patient's MBI."""
    in1 = segment("IN1", {1: "1", 2: "MCRA^Medicare Part A", 3: "CMS01", 4: "MEDICARE", 12: "20200101", 36: "POL1"})
    in2 = segment("IN2", {1: "1", 6: "9AA0-A00-AA00", 8: "4111-222-333"})
    conversion = convert(adt(pid={3: "MRN123^^^TESTFAC^MR"}, after_pv1=(in1, in2)), vocab, UTC, RECEIVED)
    coverage = only(conversion.bundle, "Coverage")
    assert resolve(conversion.bundle, coverage["payor"][0]["reference"])["name"] == "MEDICARE"
    assert coverage["subscriberId"] == "POL1"
    assert coverage["period"] == {"start": "2020-01-01"}
    patient = only(conversion.bundle, "Patient")
    assert {"system": MBI_SYSTEM, "value": "9AA0A00AA00"} in patient["identifier"]
    assert conversion.patient.mbi == "9AA0A00AA00"


def test_in1_without_insurer_is_left_out_with_a_warning(vocab):
    """An IN1 naming no company makes no Coverage (payor is required) and says so."""
    conversion = convert(adt(after_pv1=(segment("IN1", {1: "1", 2: "PLAN"}),)), vocab, UTC, RECEIVED)
    assert resources(conversion.bundle, "Coverage") == []
    assert any(w.startswith("IN1-4") for w in conversion.warnings)


@pytest.mark.parametrize(
    ("obx", "key", "value"),
    [
        ({2: "NM", 3: "29463-7^Body weight^LN", 5: "72.5", 6: "kg^kilogram^UCUM", 11: "F"}, "valueQuantity", 72.5),
        ({2: "ST", 3: "8661-1^Chief complaint^LN", 5: "Chest pain", 11: "F"}, "valueString", "Chest pain"),
        ({2: "TX", 3: "X^Note^L", 5: "line one~line two", 11: "P"}, "valueString", "line one\nline two"),
        ({2: "CWE", 3: "X^Smoker^L", 5: "Y^Yes^HL70136", 11: "F"}, "valueCodeableConcept", "Y"),
        ({2: "DT", 3: "X^Onset^L", 5: "20260228", 11: "F"}, "valueDateTime", "2026-02-28"),
        ({2: "SN", 3: "X^Ratio^L", 5: ">^100", 11: "F"}, "valueQuantity", 100),
    ],
    ids=["NM", "ST", "TX", "CWE", "DT", "SN"],
)
def test_obx_value_by_its_type(obx, key, value, vocab):
    """OBX-5 becomes the value[x] OBX-2 names; the Observation refers to the Patient and Encounter."""
    bundle = convert(adt(after_pv1=(segment("OBX", {1: "1", **obx}),)), vocab, UTC, RECEIVED).bundle
    validate_bundle(bundle)
    observation = only(bundle, "Observation")
    got = observation[key]
    if key == "valueQuantity":
        assert got["value"] == value
    elif key == "valueCodeableConcept":
        assert got["coding"][0]["code"] == value
    else:
        assert got == value
    assert observation["encounter"]["reference"] == bundle["entry"][1]["fullUrl"]


def test_obx_quantity_units_and_status(vocab):
    """OBX-6 in UCUM gives unit, system and code; OBX-11 maps through table 0085."""
    obx = segment("OBX", {1: "1", 2: "NM", 3: "29463-7^Body weight^LN", 5: "72.5", 6: "kg^kilogram^UCUM", 11: "C"})
    observation = only(convert(adt(after_pv1=(obx,)), vocab, UTC, RECEIVED).bundle, "Observation")
    assert observation["valueQuantity"] == {
        "value": 72.5,
        "unit": "kilogram",
        "system": "http://unitsofmeasure.org",
        "code": "kg",
    }
    assert observation["status"] == "corrected"


def test_obx_number_that_is_no_number_is_a_warning(vocab):
    """An NM OBX-5 that is not a number is left out with a warning."""
    obx = segment("OBX", {1: "1", 2: "NM", 3: "X^Weight^L", 5: "heavy"})
    conversion = convert(adt(after_pv1=(obx,)), vocab, UTC, RECEIVED)
    assert "valueQuantity" not in only(conversion.bundle, "Observation")
    assert any(w.startswith("OBX-5") for w in conversion.warnings)


def test_full_message_validates_and_has_the_notification_shape(vocab):
    """A message with every supported segment validates and keeps the Da Vinci shape."""
    msg = adt(
        "A03",
        pv1={45: "20260302100000", 36: "01", 6: "ER^1^A^TESTFAC"},
        after_pid=(
            segment("PD1", {3: "PRIMARY CARE^^^^^^^^^PC01", 4: f"{PCP_NPI}^PRIMARY^PAT"}),
            segment("NK1", {1: "1", 2: "TESTKIN^ROBIN", 3: "SPO"}),
        ),
        after_pv1=(
            segment("PV2", {3: "R07.9^Chest pain^I10"}),
            segment("ROL", {1: "1", 2: "AD", 3: "AT", 4: f"{NPI}^DOCTOR^DANA"}),
            segment("OBX", {1: "1", 2: "NM", 3: "8867-4^Heart rate^LN", 5: "88", 6: "/min^^UCUM", 11: "F"}),
            segment("AL1", {1: "1", 2: "FA", 3: "^Peanut"}),
            segment("DG1", {1: "1", 3: "R07.9^Chest pain^I10", 6: "F"}),
            segment("IN1", {1: "1", 3: "INS1", 4: "TEST INSURANCE"}),
            segment("IN2", {1: "1"}),
        ),
    )
    conversion = convert(msg, vocab, UTC, RECEIVED)
    validate_bundle(conversion.bundle)
    assert_notification_shape(conversion.bundle)
    assert conversion.warnings == []
    kinds = sorted({e["resource"]["resourceType"] for e in conversion.bundle["entry"]})
    assert kinds == [
        "AllergyIntolerance",
        "Condition",
        "Coverage",
        "Encounter",
        "Location",
        "MessageHeader",
        "Observation",
        "Organization",
        "Patient",
        "Practitioner",
    ]
    assert MBI in [i["value"] for i in only(conversion.bundle, "Patient")["identifier"]]


def test_resource_ids_are_uuid5_of_herald_namespace():
    """resource_id is uuid5(HERALD_NAMESPACE, parts joined by |): ids stay those of earlier releases."""
    import uuid

    from gateway.conversion.convert import HERALD_NAMESPACE, resource_id

    for parts in [("Patient", "APP|FAC", "urn:herald:id:H", "M1"), ("Encounter", "é", ""), ("",)]:
        assert resource_id(*parts) == str(uuid.uuid5(HERALD_NAMESPACE, "|".join(parts)))
