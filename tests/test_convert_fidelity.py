"""Conversion fixes found by the oracles (tests/oracles): each pins one IG rule the converter follows.

The defect ids (D1 ...) are those of the oracle findings; docs/mapping-decisions.md
lists where Herald departs from the IG on purpose.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from synthetic_adt import adt, adt_text, resolve, segment

from gateway.conversion.convert import convert, validate_bundle
from gateway.conversion.datatypes import MessageContext
from gateway.conversion.v2 import V2Message

RECEIVED = datetime(2026, 3, 1, 17, 0, 0, tzinfo=UTC)
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


@pytest.fixture(scope="module")
def ctx(vocab):
    msh = "MSH|^~\\&|APP|FAC|HERALD|ACO|20260301120000||ADT^A01|C1|P|2.5.1\r"
    return MessageContext(V2Message(msh.encode()), vocab, UTC, "APP|FAC")


def bundle_of(msg: V2Message, vocab) -> dict:
    conversion = convert(msg, vocab, UTC, RECEIVED)
    validate_bundle(conversion.bundle)
    return conversion.bundle


def first(bundle: dict, resource_type: str) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type)


def with_msh(text: str, msh: str) -> V2Message:
    """``text`` (a synthetic ADT) with its MSH line replaced by ``msh``."""
    return V2Message((msh + text[text.index("\r") :]).encode())


# -- MSH -> MessageHeader (D1, D3) ---------------------------------------------


def test_empty_msh3_and_msh4_convert_to_a_valid_bundle_without_source_name(vocab):
    """D1: MSH-3 and MSH-4 empty (HL7 allows it): no source.name, a Herald endpoint, and a valid Bundle."""
    msg = with_msh(adt_text(), "MSH|^~\\&|||||20151008111200||ADT^A01^ADT_A01|MSGID000001|T|2.6")
    header = first(bundle_of(msg, vocab), "MessageHeader")
    assert "name" not in header["source"]
    assert header["source"]["endpoint"].startswith("urn:herald:source:")


@pytest.mark.parametrize(
    ("msh3", "msh24", "endpoint"),
    [
        ("APP", "NET^2.16.840.1.114884.10.20^ISO", "urn:oid:2.16.840.1.114884.10.20"),
        ("APP^2.1.3.1^ISO", "", "urn:oid:2.1.3.1"),
        ("APP^2.1.3.1^ISO", "NET^not a uuid^UUID", "urn:oid:2.1.3.1"),
        ("APP", "NET^feeds.example.org^DNS", "urn:dns:feeds.example.org"),
        ("APP^Sending App Universal^ISO", "", "urn:herald:source:APP.FAC"),
    ],
    ids=["msh24-oid", "msh3-oid", "msh24-invalid-falls-back-to-msh3", "dns", "not-an-oid"],
)
def test_source_endpoint_is_the_first_valid_universal_id_of_msh24_then_msh3(vocab, msh3, msh24, endpoint):
    """D3: endpoint from MSH-24, else MSH-3 (IG), only when the universal id is valid for its type."""
    fields = ["MSH", "^~\\&", msh3, "FAC", "HERALD", "ACO", "20260301120000", "", "ADT^A01", "C1", "P", "2.5.1"]
    fields += [""] * 11 + [msh24]
    header = first(bundle_of(with_msh(adt_text(), "|".join(fields)), vocab), "MessageHeader")
    assert header["source"]["endpoint"] == endpoint
    assert header["source"]["name"] == "APP"


def test_sender_organization_carries_the_msh4_universal_id(vocab):
    """IG HD[Organization]: MSH-4 HD-2 (ISO) is an identifier of the sender (system urn:ietf:rfc:3986)."""
    msh = "MSH|^~\\&|APP|FAC^2.16.840.1.122848.1.30^ISO|HERALD|ACO|20260301120000||ADT^A01|C1|P|2.5.1"
    bundle = bundle_of(with_msh(adt_text(), msh), vocab)
    sender = resolve(bundle, first(bundle, "MessageHeader")["sender"]["reference"])
    assert {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.16.840.1.122848.1.30"}.items() <= sender["identifier"][
        -1
    ].items()


# -- XAD, XTN, XCN (D4, D7, D14) -------------------------------------------------


def test_sad_street_name_and_dwelling_number_are_lines_unless_already_in_the_street(ctx):
    """D4: SAD-2/SAD-3 are address lines (IG SAD[Address]), never a raw '&'; a repeat of SAD-1 is not."""
    assert ctx.xad("1000&Hospital Lane^Ste. 123^Ann Arbor^MI")["line"] == ["1000", "Hospital Lane", "Ste. 123"]
    assert ctx.xad("12 MAIN ST&MAIN ST&12^^TOWN")["line"] == ["12 MAIN ST"]


@pytest.mark.parametrize(("xad9", "district"), [("&W", "W"), ("05&Wake County&FIPS", "Wake County"), ("1234", "1234")])
def test_county_is_the_cwe_text_or_the_bare_code(ctx, xad9, district):
    """D4: XAD-9 (CWE from v2.7, subcomponents) gives its text; a pre-v2.7 IS code is kept as it is."""
    assert ctx.xad(f"1 MAIN ST^^TOWN^NC^27000^USA^H^^{xad9}")["district"] == district


@pytest.mark.parametrize(
    ("xtn", "value"),
    [
        ("78788788^^CP^5555^^^1111^^^^^2222", "2222"),
        ("^PRN^PH^^1^555^7259890^4", "+1 555 7259890 X4"),
        ("^PRN^PH^^^^7259890", "7259890"),
        ("(555)555-0123^PRN^PH", "(555)555-0123"),
    ],
    ids=["xtn12-first", "components", "local-only", "xtn1"],
)
def test_xtn_value_prefers_the_unformatted_number(ctx, xtn, value):
    """D7: XTN-12 when sent (IG XTN[ContactPoint]), else the components, else XTN-1."""
    assert ctx.xtn(xtn)["value"] == value


def test_xcn_name_period_from_xcn19_and_xcn20(ctx):
    """D14: XCN-19/20 are the name's period; FN sub-components stay out of the family name."""
    _, practitioner = ctx.xcn(
        "1^BEETHOVEN&VAN&Attending&VAL&ROGER^LUDWIG^B^2ND^DR^MD^^^L^^^^^^^^^20220501102531-0400^20230501102531-0400^MD"
    )
    name = practitioner["name"][0]
    assert name["family"] == "BEETHOVEN"
    assert name["suffix"] == ["2ND", "MD"]
    assert name["use"] == "official"
    assert name["period"] == {"start": "2022-05-01T10:25:31-04:00", "end": "2023-05-01T10:25:31-04:00"}


# -- PID (D6) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pid11", "districts"),
    [
        ("1 MAIN ST^^TOWN^NC^27000^USA^H", ["Green"]),
        ("1 MAIN ST^^TOWN^NC^27000^USA^H^^Wake", ["Wake", "Green"]),
        ("1 MAIN ST^^TOWN^NC^27000^USA^H^^Green", ["Green"]),
        ("", ["Green"]),
        ("1 MAIN ST^^TOWN~2 OAK ST^^CITY", [None, None, "Green"]),
    ],
    ids=["one-address", "another-county", "same-county", "no-address", "two-addresses"],
)
def test_pid12_county_goes_where_the_ig_puts_it(vocab, pid11, districts):
    """D6: PID-12 is the district of the only address without one, else an address of its own (IG PID[Patient])."""
    patient = first(bundle_of(adt(pid={11: pid11, 12: "Green"}), vocab), "Patient")
    assert [a.get("district") for a in patient["address"]] == districts


def test_pid40_telecom_is_read(vocab):
    """D6: PID-40 (v2.7+, where PID-13/14 are withdrawn) gives the patient's phone and e-mail."""
    patient = first(
        bundle_of(adt(version="2.8", pid={40: "^PRN^CP^^1^919^5550101~^NET^Internet^alex@example.org"}), vocab),
        "Patient",
    )
    assert [(t["system"], t["value"]) for t in patient["telecom"]] == [
        ("phone", "+1 919 5550101"),
        ("email", "alex@example.org"),
    ]


@pytest.mark.parametrize(("pid30", "deceased"), [("N", False), ("Y", True)])
def test_pid30_death_indicator_without_a_date(vocab, pid30, deceased):
    """D6: PID-30 N or Y with PID-29 empty is deceasedBoolean (IG PID[Patient])."""
    assert first(bundle_of(adt(pid={30: pid30}), vocab), "Patient")["deceasedBoolean"] is deceased


# -- PV1 / PV2 (D8, D15) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "patient_class", "status"),
    [("A04", "O", "active"), ("A01", "P", "planned"), ("A01", "I", "active"), ("A03", "I", "completed")],
)
def test_current_location_status(vocab, trigger, patient_class, status):
    """IG PV1[Encounter]: planned only for a pre-admit (PV1-2 P), else active; Herald: completed once finished."""
    encounter = first(bundle_of(adt(trigger, pv1={2: patient_class, 45: "20260302100000"}), vocab), "Encounter")
    assert encounter["location"][0]["status"] == status


def test_every_pv1_doctor_and_the_pv2_referral_source_is_a_participant(vocab):
    """D8: PV1-7/8/9/17/52 and PV2-13 are participants ATND, REF, CON, ADM, PART, REF; a repeat is one."""
    pv1 = {
        7: "A1^ATTEND^ANN~A1^ATTEND^ANN",
        8: "R1^REFER^RAY",
        9: "C1^CONSULT^CAL",
        17: "D1^ADMIT^ADA",
        52: "P1^OTHER^OLA",
    }
    pv2 = segment("PV2", {13: "R2^SOURCE^SAM"})
    bundle = bundle_of(adt(pv1=pv1, after_pv1=(pv2,)), vocab)
    found = [
        (p["type"][0]["coding"][0]["code"], resolve(bundle, p["individual"]["reference"])["name"][0]["family"])
        for p in first(bundle, "Encounter")["participant"]
    ]
    assert found == [
        ("ATND", "ATTEND"),
        ("REF", "REFER"),
        ("CON", "CONSULT"),
        ("ADM", "ADMIT"),
        ("PART", "OTHER"),
        ("REF", "SOURCE"),
    ]


def test_pv1_37_discharged_to_location_is_the_hospitalization_destination(vocab):
    """D15: PV1-37 (DLD) is hospitalization.destination, a Location typed by DLD-1 (IG DLD[Location-Discharge])."""
    bundle = bundle_of(adt("A03", pv1={37: "SNF&Skilled nursing facility&L^20260302100000"}), vocab)
    destination = resolve(bundle, first(bundle, "Encounter")["hospitalization"]["destination"]["reference"])
    assert destination["name"] == "Skilled nursing facility"
    assert destination["type"][0]["coding"][0]["code"] == "SNF"


def test_pv1_4_13_and_50_are_read(vocab):
    """D15: PV1-4 admission type -> type, PV1-13 -> reAdmission, every PV1-50 repetition -> identifier."""
    encounter = first(bundle_of(adt(pv1={4: "E", 13: "R", 50: "ALT1^^^TESTFAC~ALT2^^^TESTFAC"}), vocab), "Encounter")
    assert encounter["type"][0]["coding"][0]["code"] == "E"
    assert encounter["hospitalization"]["reAdmission"]["coding"][0]["code"] == "R"
    assert [i["value"] for i in encounter["identifier"]] == ["VISIT001", "ALT1", "ALT2"]


# -- DG1 (D9) and NK1 ----------------------------------------------------------------


def test_dg1_6_admitting_is_diagnosis_use_ad(vocab):
    """D9: DG1-6 A is diagnosis.use AD (IG DiagnosisType), the v2-0052 code kept as a second coding."""
    dg1 = segment("DG1", {1: "1", 3: "I63.9^Cerebral infarction^I10", 6: "A"})
    use = first(bundle_of(adt(after_pv1=(dg1,)), vocab), "Encounter")["diagnosis"][0]["use"]
    assert [c["code"] for c in use["coding"]] == ["AD", "A"]


def test_nk1_41_contact_person_telecom_is_a_contact_telecom(vocab):
    """IG NK1[Patient]: NK1-41 is contact.telecom[4], after NK1-5/6/40."""
    nk1 = segment("NK1", {1: "1", 2: "KIN^KIM", 5: "^PRN^PH^^1^919^5550102", 41: "^PRN^CP^^1^919^5550103"})
    contact = first(bundle_of(adt(after_pid=(nk1,)), vocab), "Patient")["contact"][0]
    assert [t["value"] for t in contact["telecom"]] == ["+1 919 5550102", "+1 919 5550103"]


def test_nk1_organization_carries_its_contact_person(vocab):
    """IG NK1[Patient]: NK1-13 is contact.organization; NK1-30/31/32 are that Organization's contact person."""
    nk1 = segment(
        "NK1",
        {1: "1", 3: "EMP^Employer^HL70063", 13: "ACME WIDGETS", 30: "BOSS^BETTY", 31: "^WPN^PH^^1^919^5550104"},
    )
    bundle = bundle_of(adt(after_pid=(nk1,)), vocab)
    contact = first(bundle, "Patient")["contact"][0]
    org = resolve(bundle, contact["organization"]["reference"])
    assert org["name"] == "ACME WIDGETS"
    work_phone = {"system": "phone", "value": "+1 919 5550104", "use": "work"}
    assert org["contact"] == [{"name": {"family": "BOSS", "given": ["BETTY"]}, "telecom": [work_phone]}]


# -- IN1 -> Coverage ------------------------------------------------------------------


def test_in1_insured_self_is_the_patient_and_the_employer_the_policy_holder(vocab):
    """IG IN1[Coverage]: IN1-17 SEL makes the patient the subscriber; IN1-11 (+IN1-10 ids) is the policyHolder."""
    fields = {1: "1", 3: "80", 4: "AETNA US HEALTHCARE", 10: "19^^^^SN", 11: "ACME WIDGETS", 17: "SEL"}
    in1 = segment("IN1", {**fields, 16: "TESTPATIENT^ALEX"})
    bundle = bundle_of(adt(after_pv1=(in1,)), vocab)
    coverage = first(bundle, "Coverage")
    assert coverage["subscriber"] == coverage["beneficiary"]
    holder = resolve(bundle, coverage["policyHolder"]["reference"])
    assert holder["name"] == "ACME WIDGETS"
    assert holder["identifier"][0]["value"] == "19"
    assert holder["identifier"][0]["type"]["coding"][0]["code"] == "SN"


def test_in1_insured_spouse_is_a_related_person(vocab):
    """IG IN1[Coverage]: an insured other than the patient (IN1-16/17/18/19) is a RelatedPerson subscriber."""
    insured_fields = {16: "SPOUSE^SAM", 17: "SPO^Spouse^HL70063", 18: "19700722", 19: "1 MAIN ST^^TOWN"}
    in1 = segment("IN1", {1: "1", 4: "AETNA US HEALTHCARE", **insured_fields})
    bundle = bundle_of(adt(after_pv1=(in1,)), vocab)
    insured = resolve(bundle, first(bundle, "Coverage")["subscriber"]["reference"])
    assert insured["resourceType"] == "RelatedPerson"
    assert insured["name"] == [{"family": "SPOUSE", "given": ["SAM"]}]
    assert insured["relationship"][0]["coding"][0]["code"] == "SPO"
    assert insured["birthDate"] == "1970-07-22"
    assert insured["patient"]["reference"] == first(bundle, "Coverage")["beneficiary"]["reference"]


def test_xpn15_called_by_is_a_nickname(vocab):
    """IG XPN[HumanName]: XPN-15 'called by' is a second HumanName with use nickname, not an extra given name."""
    patient = first(bundle_of(adt(pid={5: "EVERYMAN^ADAM^A^III^^^L^^^^^^^^Addy"}), vocab), "Patient")
    assert patient["name"][0]["given"] == ["ADAM", "A"]
    assert patient["name"][1] == {"use": "nickname", "given": ["Addy"]}


def test_the_mbi_is_read_from_in2_6_not_the_medicaid_number_in_in2_8(vocab):
    """IN2-6 is the Medicare card number (an MBI there is the patient's); IN2-8, the Medicaid case number, is not."""
    in1 = segment("IN1", {1: "1", 4: "MEDICARE"})
    medicaid = adt(pid={3: "MRN123^^^TESTFAC^MR"}, after_pv1=(in1, segment("IN2", {1: "1", 8: "9AA0A00AA00"})))
    assert convert(medicaid, vocab, UTC, RECEIVED).patient.mbi == ""
    medicare = adt(pid={3: "MRN123^^^TESTFAC^MR"}, after_pv1=(in1, segment("IN2", {1: "1", 6: "9AA0A00AA00"})))
    assert convert(medicare, vocab, UTC, RECEIVED).patient.mbi == "9AA0A00AA00"


def test_msh_17_19_22_country_language_and_responsible_organization(vocab):
    """IG MSH[MessageHeader]: MSH-17 sender country, MSH-19 language (BCP 47 case), MSH-22 responsible organization."""
    fields = ["MSH", "^~\\&", "APP", "FAC", "HERALD", "ACO", "20260301120000", "", "ADT^A01", "C1", "P", "2.5.1"]
    fields += ["", "", "", "", "USA", "", "^^^EN-US", "", "", "GOOD HEALTH NETWORK"]
    bundle = bundle_of(with_msh(adt_text(), "|".join(fields)), vocab)
    header = first(bundle, "MessageHeader")
    assert header["language"] == "en-US"
    assert resolve(bundle, header["sender"]["reference"])["address"] == [{"country": "USA"}]
    assert resolve(bundle, header["responsible"]["reference"])["name"] == "GOOD HEALTH NETWORK"


def test_responsible_is_the_facility_without_msh22(vocab):
    """With MSH-22 empty, MessageHeader.responsible is the facility (PV1-3.4) Organization."""
    bundle = bundle_of(adt(), vocab)
    header = first(bundle, "MessageHeader")
    assert resolve(bundle, header["responsible"]["reference"])["name"] == "TESTFAC"


@pytest.mark.parametrize(("pv2_25", "code"), [("1", "EM"), ("3", "EL"), ("VIP", "VIP")])
def test_pv2_25_visit_priority(vocab, pv2_25, code):
    """IG PV2[Encounter]: PV2-25 is Encounter.priority (EncounterPriority: 1 EM, 2 UR, 3 EL; others kept)."""
    bundle = bundle_of(adt(after_pv1=(segment("PV2", {25: pv2_25}),)), vocab)
    assert first(bundle, "Encounter")["priority"]["coding"][0]["code"] == code
