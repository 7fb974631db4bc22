"""HL7 v2 datatypes -> FHIR datatypes: CX, XPN, XAD, XTN, XCN, CWE, HD, PL, DTM."""

from __future__ import annotations

from datetime import UTC
from zoneinfo import ZoneInfo

import pytest

from gateway.conversion.datatypes import MBI_SYSTEM, NPI_SYSTEM, MessageContext, authority_system
from gateway.conversion.v2 import V2Message
from gateway.conversion.vocabulary import load_vocabulary

MSH = "MSH|^~\\&|APP|FAC|HERALD|ACO|20260301120000||ADT^A01|C1|P|2.5.1\r"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


@pytest.fixture(scope="module")
def ctx():
    return MessageContext(V2Message(MSH.encode()), load_vocabulary(), UTC, "APP|FAC")


# -- CX -> Identifier --------------------------------------------------------


def test_cx_mrn_has_authority_system_type_use_and_assigner(ctx):
    """An MR-typed CX: usual use, v2-0203 type with its display, system and assigner from CX-4."""
    assert ctx.cx("M123^^^HOSP^MR") == {
        "use": "usual",
        "type": {"coding": [{"system": V2_0203, "code": "MR", "display": "Medical record number"}]},
        "system": "urn:herald:id:HOSP",
        "value": "M123",
        "assigner": {"display": "HOSP"},
    }


@pytest.mark.parametrize(
    ("authority", "system"),
    [
        ("&2.16.840.1.113883.3.72&ISO", "urn:oid:2.16.840.1.113883.3.72"),
        ("HOSP&2.16.840.1.113883.3.72&ISO", "urn:oid:2.16.840.1.113883.3.72"),
        ("&http://hosp.example.org/mrn&URI", "http://hosp.example.org/mrn"),
        ("&6f1b7c1e-1e0b-4a53-9f51-6c1d7b0e4a11&UUID", "urn:uuid:6f1b7c1e-1e0b-4a53-9f51-6c1d7b0e4a11"),
        ("SAINT JUDE'S", "urn:herald:id:SAINT-JUDE-S"),
        ("", "urn:herald:id:APP-FAC"),
    ],
)
def test_cx_system_comes_from_the_hd_assigning_authority(ctx, authority, system):
    """CX-4's universal id (ISO OID, URI, UUID) is the system; a bare name or none gives a Herald URN."""
    assert ctx.cx(f"M123^^^{authority}^MR")["system"] == system


@pytest.mark.parametrize(
    "cx",
    [
        "1EG4TE5MK73^^^CMS^MB",
        "1EG4-TE5-MK73^^^MEDICARE^MC",
        "1eg4te5mk73^^^2.16.840.1.113883.4.927",
        "1EG4TE5MK73^^^MCR",
    ],
)
def test_cx_mbi_by_type_or_medicare_authority_gets_the_mbi_system_in_canonical_form(ctx, cx):
    """An MBI (by MB/MC type or a Medicare authority, in the MBI format) gets us-mbi, upper case without dashes."""
    ident = ctx.cx(cx)
    assert (ident["system"], ident["value"]) == (MBI_SYSTEM, "1EG4TE5MK73")


def test_cx_member_number_that_is_not_an_mbi_keeps_its_authority_system(ctx):
    """MB means member number: one not in the MBI format is not claimed to be an MBI."""
    ident = ctx.cx("W123456789^^^AETNA^MB")
    assert ident["system"] == "urn:herald:id:AETNA"


def test_cx_ssn_is_dropped_and_effective_dates_become_the_period(ctx):
    """SS-typed identifiers are not forwarded; CX-7/CX-8 are Identifier.period."""
    assert ctx.cx("123-45-6789^^^SSA^SS") is None
    assert ctx.cx("M1^^^H^MR^^20200101^20301231")["period"] == {"start": "2020-01-01", "end": "2030-12-31"}


def test_cx_escapes_are_resolved_before_subcomponents_are_split(ctx):
    """An escaped & (\\T\\) in an authority name is text, not a subcomponent break."""
    ident = ctx.cx("M1^^^A\\T\\B HOSPITAL^MR")
    assert ident["assigner"] == {"display": "A&B HOSPITAL"}


# -- XPN -> HumanName --------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "use"),
    [("L", "official"), ("D", "usual"), ("M", "maiden"), ("N", "nickname"), ("TEMP", "temp"), ("BAD", "old")],
)
def test_xpn_name_type_becomes_use_by_table_0200(ctx, code, use):
    """XPN-7 maps to HumanName.use per the IG's NameType ConceptMap."""
    assert ctx.xpn(f"DOE^JANE^^^^^{code}")["use"] == use


def test_xpn_all_parts(ctx):
    """Family (FN-1), given and middle, suffix, prefix, degree and professional suffix, validity period."""
    name = ctx.xpn("DOE&VAN^JANE^Q^JR^DR^PHD^L^^^^^20200101^^RN")
    assert name == {
        "use": "official",
        "family": "DOE",
        "given": ["JANE", "Q"],
        "prefix": ["DR"],
        "suffix": ["JR", "PHD", "RN"],
        "period": {"start": "2020-01-01"},
    }


def test_xpn_unmapped_type_has_no_use_and_empty_name_is_none(ctx):
    """A name type the IG leaves unmapped (B, birth name) gives no use; a name of nothing is None."""
    assert "use" not in ctx.xpn("DOE^JANE^^^^^B")
    assert ctx.xpn('""^^^^^^L') is None


# -- XAD -> Address ----------------------------------------------------------


def test_xad_all_parts_and_home_use(ctx):
    """Street (SAD-1), other designation, city, state, zip, country, county; H -> home."""
    addr = ctx.xad("12 MAIN ST&MAIN ST&12^APT 4^TOWN^CT^06000^USA^H^^NEW HAVEN")
    assert addr == {
        "use": "home",
        "line": ["12 MAIN ST", "APT 4"],
        "city": "TOWN",
        "district": "NEW HAVEN",
        "state": "CT",
        "postalCode": "06000",
        "country": "USA",
    }


@pytest.mark.parametrize(
    ("code", "key", "value"), [("M", "type", "postal"), ("B", "use", "work"), ("BA", "use", "old")]
)
def test_xad_type_goes_to_use_or_type_by_table_0190(ctx, code, key, value):
    """XAD-7 maps to Address.use or Address.type as the IG's two AddressType maps say."""
    assert ctx.xad(f"1 A ST^^T^CT^^^{code}")[key] == value


def test_xad_type_alone_is_no_address(ctx):
    """An address of only a type code is left out."""
    assert ctx.xad("^^^^^^H") is None


# -- XTN -> ContactPoint -----------------------------------------------------


@pytest.mark.parametrize(
    ("xtn", "default_use", "expected"),
    [
        ("(203)555-0147", "home", {"system": "phone", "value": "(203)555-0147", "use": "home"}),
        ("^PRN^PH^^1^203^5550188", "home", {"system": "phone", "value": "+1 203 5550188", "use": "home"}),
        ("^WPN^PH^^^203^5550188^12", "", {"system": "phone", "value": "203 5550188 X12", "use": "work"}),
        ("^PRN^CP^^1^203^5550312", "home", {"system": "phone", "value": "+1 203 5550312", "use": "mobile"}),
        ("^NET^Internet^a.b@example.org", "home", {"system": "email", "value": "a.b@example.org"}),
        ("^^^a.b@example.org", "", {"system": "email", "value": "a.b@example.org"}),
        ("^^FX^^^203^5550100", "work", {"system": "fax", "value": "203 5550100", "use": "work"}),
        ("^^BP^^^^5550101", "", {"system": "pager", "value": "5550101"}),
        ("^^ZZ^^^^5550102", "", {"system": "other", "value": "5550102"}),
        ("^ORN^PH^^^^5550103", "home", {"system": "phone", "value": "5550103"}),
        ("^^PH^^^^^^^^^2035550104", "", {"system": "phone", "value": "2035550104"}),
        ("^PRN^PH^^^^5550105^^^^^^^^^^^2", "", {"system": "phone", "value": "5550105", "use": "home", "rank": 2}),
    ],
    ids=[
        "v2.2-string",
        "components",
        "extension",
        "cell-is-mobile",
        "email",
        "email-no-type",
        "fax",
        "pager",
        "unknown-type",
        "unmapped-use",
        "unformatted",
        "rank",
    ],
)
def test_xtn_both_forms(ctx, xtn, default_use, expected):
    """XTN in the old string form and the components form, per the IG's XTN and 0201/0202 maps."""
    assert ctx.xtn(xtn, default_use) == expected


def test_xtn_with_nothing_to_call_is_none(ctx):
    """A use code alone, or an e-mail type without an address, makes no ContactPoint."""
    assert ctx.xtn("^PRN") is None
    assert ctx.xtn("^NET^Internet") is None


# -- XCN -> Practitioner -----------------------------------------------------

NPI = "1234567893"


@pytest.mark.parametrize(
    ("xcn", "system"),
    [
        (f"{NPI}^DOC^DANA^^^^^^^^^^NPI", NPI_SYSTEM),
        (f"{NPI}^DOC^DANA^^^^^^NPI", NPI_SYSTEM),
        (f"{NPI}^DOC^DANA^^^^^^&2.16.840.1.113883.4.6&ISO", NPI_SYSTEM),
        (f"{NPI}^DOC^DANA", NPI_SYSTEM),
        ("1234567890^DOC^DANA", "urn:herald:id:APP-FAC"),
        (f"{NPI}^DOC^DANA^^^^^^HOSP", "urn:herald:id:HOSP"),
    ],
    ids=["type-npi", "authority-npi", "authority-oid", "check-digit", "bad-check-digit", "local-authority"],
)
def test_xcn_npi_detection(ctx, xcn, system):
    """NPI by type, authority (name or OID) or, with neither, a valid NPI check digit."""
    _, practitioner = ctx.xcn(xcn)
    assert practitioner["identifier"][0]["system"] == system


def test_xcn_name_degree_and_stable_id(ctx):
    """Name parts, XCN-7 degree as qualification; the same NPI is the same Practitioner id."""
    rid, practitioner = ctx.xcn(f"{NPI}^DOC^DANA^Q^III^DR^MD^^^L^^^NPI")
    assert practitioner["name"] == [
        {"use": "official", "family": "DOC", "given": ["DANA", "Q"], "prefix": ["DR"], "suffix": ["III"]}
    ]
    assert practitioner["qualification"][0]["code"]["coding"][0]["code"] == "MD"
    assert ctx.xcn(f"{NPI}^OTHERNAME")[0] == rid


def test_xcn_without_id_is_named_and_empty_is_none(ctx):
    """An XCN with a name only is a Practitioner without identifier; an empty one is None."""
    _, practitioner = ctx.xcn("^DOC^DANA")
    assert "identifier" not in practitioner
    assert ctx.xcn("^^") is None


# -- CWE -> CodeableConcept --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("I10", "http://hl7.org/fhir/sid/icd-10-cm"),
        ("I9CDX", "http://hl7.org/fhir/sid/icd-9-cm"),
        ("SCT", "http://snomed.info/sct"),
        ("LN", "http://loinc.org"),
        ("HL70063", "http://terminology.hl7.org/CodeSystem/v2-0063"),
        ("2.16.840.1.113883.6.96", "urn:oid:2.16.840.1.113883.6.96"),
        ("99ZZZ", "urn:herald:codesystem:99ZZZ"),
    ],
)
def test_cwe_coding_system_names_become_fhir_system_urls(ctx, name, url):
    """CWE-3 names (table 0396) map to FHIR system URLs; local ones to a Herald URN, never example.com."""
    assert ctx.cwe(f"X1^Text^{name}")["coding"][0]["system"] == url


def test_cwe_all_three_triplets_versions_and_original_text(ctx):
    """Codings from CWE 1-3, 4-6 and 10-12, versions from CWE-7/8, text from CWE-9."""
    concept = ctx.cwe("J44.1^COPD^I10^49727002^Cough^SCT^2024^^Original^L1^Local^99LOC")
    assert concept == {
        "coding": [
            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "J44.1", "version": "2024", "display": "COPD"},
            {"system": "http://snomed.info/sct", "code": "49727002", "display": "Cough"},
            {"system": "urn:herald:codesystem:99LOC", "code": "L1", "display": "Local"},
        ],
        "text": "Original",
    }


def test_cwe_text_only_and_table_mapping(ctx):
    """A CWE with text only is a concept with text; a table-mapped code gets its FHIR coding first."""
    assert ctx.cwe("^Shortness of breath") == {"text": "Shortness of breath"}
    concept = ctx.cwe("M^Married", "0002-marital-status", "http://terminology.hl7.org/CodeSystem/v2-0002")
    assert [c["system"] for c in concept["coding"]] == [
        "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
        "http://terminology.hl7.org/CodeSystem/v2-0002",
    ]


# -- HD, PL, DTM -------------------------------------------------------------


def test_authority_system_forms():
    """OIDs become urn:oid, URIs stay, names become a Herald URN with unsafe characters replaced."""
    assert authority_system("1.2.3") == "urn:oid:1.2.3"
    assert authority_system("urn:example:x") == "urn:example:x"
    assert authority_system("A B/C") == "urn:herald:id:A-B-C"


def test_pl_is_one_location_typed_by_its_most_specific_part(ctx):
    """PV1-3 'WARD^101^B^FAC' is one Location named 'WARD 101 B', a bed, with PL-9 as description."""
    loc = ctx.pl("WARD^101^B^FAC^^^^^North wing", "FAC", "urn:uuid:x")
    assert loc["name"] == "WARD 101 B"
    assert loc["physicalType"]["coding"][0]["code"] == "bd"
    assert loc["description"] == "North wing"
    assert ctx.pl("ED^^^FAC", "FAC", "urn:uuid:x")["name"] == "ED"
    assert ctx.pl("^^^FAC", "FAC", "urn:uuid:x") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20260301101500", "2026-03-01T10:15:00-05:00"),
        ("20260301101500+0100", "2026-03-01T10:15:00+01:00"),
        ("202603011015", "2026-03-01T10:15:00-05:00"),
        ("20260301", "2026-03-01"),
        ("20260701101500", "2026-07-01T10:15:00-04:00"),
    ],
)
def test_dtm_takes_the_senders_zone_only_without_an_offset(value, expected):
    """A DTM with no offset is in the configured zone (daylight time included); an offset is kept."""
    ctx = MessageContext(V2Message(MSH.encode()), load_vocabulary(), ZoneInfo("America/New_York"), "APP|FAC")
    assert ctx.dtm(value, "PV1-44")[0] == expected


def test_invalid_dtm_is_a_warning_naming_the_field(ctx):
    """A DTM that is no date leaves the value out with a warning that names the field, not the value."""
    local = MessageContext(ctx.msg, ctx.vocab, UTC, "APP|FAC")
    assert local.dtm("20261340", "PV1-44") == ("", None)
    assert local.warnings == ["PV1-44: not a valid HL7 date/time; the field was left out"]
