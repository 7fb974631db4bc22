"""Sender profiles (issue 14): a vendor's dialect is data in mappings/senders/, applied before the standard maps."""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from twisted.internet.task import Clock

from gateway.app.replay import split_messages
from gateway.config import default_recipients, load_config
from gateway.conversion.convert import convert, validate_bundle
from gateway.conversion.profiles import (
    ProfileRegistry,
    apply_profile,
    load_profiles,
    parse_path,
    read_message,
)
from gateway.conversion.v2 import V2Message
from gateway.errors import ConfigError, ProfileError
from gateway.pipeline.process import process_message
from gateway.pipeline.runner import PipelineWorker, reload_request_path
from gateway.pipeline.workers import BatchContext
from gateway.records import FAILED, PendingMessage

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_messages"
SHIPPED = ROOT / "mappings" / "senders"
MBI_SYSTEM = "http://hl7.org/fhir/sid/us-mbi"
MEDITECH_ADMIT = SAMPLES / "meditech" / "meditech-a01-inpatient-admit.hl7"

#: sample -> (profile chosen, notification event, Encounter.class, MRN system, MRN, MBI, discharge disposition)
DIALECTS = {
    "athena/athena-a01-inpatient-admit.hl7": (
        "athena-sierra", "notification-admit", "IMP", "urn:oid:2.16.840.1.113883.19.5.4", "104533", "7WC3DX9KP82", None
    ),
    "athena/athena-a03-discharge-to-snf.hl7": (
        "athena-sierra", "notification-discharge", "IMP", "urn:oid:2.16.840.1.113883.19.5.4", "109270", "9HT6MJ2RX35",
        "snf",
    ),
    "athena/athena-a04-ed-registration.hl7": (
        "athena-sierra", "notification-admit", "EMER", "urn:oid:2.16.840.1.113883.19.5.4", "104533", "7WC3DX9KP82", None
    ),
    "athena/athena-a04-office-visit.hl7": (
        "athena-sierra", "notification-outpatient-visit", "AMB", "urn:oid:2.16.840.1.113883.19.5.4", "104533",
        "7WC3DX9KP82", None,
    ),
    "epic/epic-a01-inpatient-admit.hl7": (
        "epic-riverview", "notification-admit", "IMP", "urn:oid:2.16.840.1.113883.19.5.1", "RV0048213", "8RT2FJ6MP41",
        None,
    ),
    "epic/epic-a03-discharge-to-snf.hl7": (
        "epic-riverview", "notification-discharge", "IMP", "urn:oid:2.16.840.1.113883.19.5.1", "RV0051977",
        "3VX9CD4HN27", "snf",
    ),
    "epic/epic-a04-ed-registration.hl7": (
        "epic-riverview", "notification-admit", "EMER", "urn:oid:2.16.840.1.113883.19.5.1", "RV0048213", "8RT2FJ6MP41",
        None,
    ),
    "meditech/meditech-a01-inpatient-admit.hl7": (
        "meditech-bayside", "notification-admit", "IMP", "urn:oid:2.16.840.1.113883.19.5.3", "M000412877",
        "4QW7HN2TK58", None,
    ),
    "meditech/meditech-a03-discharge-to-snf.hl7": (
        "meditech-bayside", "notification-discharge", "IMP", "urn:oid:2.16.840.1.113883.19.5.3", "M000398102",
        "5AK8TR3WD76", "snf",
    ),
    "meditech/meditech-a04-ed-registration.hl7": (
        "meditech-bayside", "notification-admit", "EMER", "urn:oid:2.16.840.1.113883.19.5.3", "M000412877",
        "4QW7HN2TK58", None,
    ),
    "oracle-health/oracle-health-a01-inpatient-admit.hl7": (
        "oracle-health-prairie", "notification-admit", "IMP", "urn:oid:2.16.840.1.113883.19.5.2", "PR778812",
        "6JM5WK8QT19", None,
    ),
    "oracle-health/oracle-health-a03-discharge-to-snf.hl7": (
        "oracle-health-prairie", "notification-discharge", "IMP", "urn:oid:2.16.840.1.113883.19.5.2", "PR781440",
        "2NP4RA7GE62", "snf",
    ),
    "oracle-health/oracle-health-a04-ed-registration.hl7": (
        "oracle-health-prairie", "notification-admit", "EMER", "urn:oid:2.16.840.1.113883.19.5.2", "PR778812",
        "6JM5WK8QT19", None,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def shipped(vocab):
    """The profiles Herald ships (mappings/senders), loaded and checked as the pipeline loads them."""
    return load_profiles(SHIPPED, vocab)


def raw(path: Path) -> bytes:
    return split_messages(path.read_bytes())[0]


def resource(bundle: dict, kind: str) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind)


def converted(path: Path, profiles, vocab):
    read = read_message(raw(path), profiles)
    return read, convert(read.msg, vocab, read.tz or UTC, datetime(2026, 12, 1, tzinfo=UTC))


# -- the reproduction (issue 14) ---------------------------------------------


def test_meditech_admit_without_a_profile_loses_the_class_and_the_mbi(vocab):
    """The issue as found: the standard maps alone keep class IN without a system (a warning) and drop the MBI."""
    conversion = convert(V2Message(raw(MEDITECH_ADMIT)), vocab, UTC)
    encounter = resource(conversion.bundle, "Encounter")
    assert encounter["class"] == {"code": "IN"}
    assert "PV1-2: not a table 0004 value; Encounter.class keeps the code without a system" in conversion.warnings
    assert MBI_SYSTEM not in [i["system"] for i in conversion.patient_resource["identifier"]]


def test_meditech_admit_with_its_profile_is_an_inpatient_with_the_mbi(shipped, vocab):
    """With the shipped MEDITECH profile (chosen by MSH-3/MSH-4) the class is IMP and ZPD-2 gives the MBI."""
    read, conversion = converted(MEDITECH_ADMIT, shipped, vocab)
    assert read.selection.profile.name == "meditech-bayside"
    encounter = resource(conversion.bundle, "Encounter")
    assert encounter["class"]["code"] == "IMP"
    assert encounter["class"]["system"] == "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    assert {"system": MBI_SYSTEM, "value": "4QW7HN2TK58"}.items() <= next(
        i for i in conversion.patient_resource["identifier"] if i["system"] == MBI_SYSTEM
    ).items()
    assert conversion.warnings == []
    assert conversion.patient.mbi == "4QW7HN2TK58"  # what matching is given


# -- every shipped dialect ---------------------------------------------------


def test_every_dialect_sample_is_listed_here():
    """The table covers every sample_messages/<dialect>/ file, so a new one cannot go untested."""
    assert sorted(DIALECTS) == sorted(str(p.relative_to(SAMPLES)) for p in SAMPLES.glob("*/*.hl7"))


@pytest.mark.parametrize("dialect", ["athena", "epic", "meditech", "oracle-health"])
def test_each_dialect_has_an_ed_registration_an_admit_and_a_discharge_to_a_snf(dialect):
    """Four vendor dialects, each with an ED registration (A04 EMER), an inpatient admit and a discharge to a SNF."""
    rows = [v for k, v in DIALECTS.items() if k.startswith(f"{dialect}/")]
    assert any(r[1] == "notification-admit" and r[2] == "EMER" for r in rows)
    assert any(r[1] == "notification-admit" and r[2] == "IMP" for r in rows)
    assert any(r[1] == "notification-discharge" and r[6] == "snf" for r in rows)


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_dialect_sample_converts_to_valid_r4_as_its_profile_says(name, shipped, vocab):
    """Each sample gets its site's profile and comes out valid, with the MRN system, MBI, class and event it says."""
    profile, event, encounter_class, mrn_system, mrn, mbi, disposition = DIALECTS[name]
    read, conversion = converted(SAMPLES / name, shipped, vocab)
    validate_bundle(conversion.bundle)
    assert read.selection.profile.name == profile and read.selection.known
    assert conversion.warnings == [] and read.applied.missing == ()
    assert conversion.event_code == event
    encounter = resource(conversion.bundle, "Encounter")
    assert encounter["class"]["code"] == encounter_class
    identifiers = {i["system"]: i for i in conversion.patient_resource["identifier"]}
    assert identifiers[mrn_system]["value"] == mrn
    assert identifiers[mrn_system]["type"]["coding"][0]["code"] == "MR"
    assert identifiers[MBI_SYSTEM]["value"] == mbi
    hospitalization = encounter.get("hospitalization", {})
    if disposition:
        assert hospitalization["dischargeDisposition"]["coding"][0]["code"] == disposition
    # Local codes were translated before the maps ran: no code that is not in its table is left.
    admit_source = hospitalization.get("admitSource", {}).get("coding", [{}])[0].get("code")
    assert admit_source in (None, "1", "2", "3", "4", "5", "6", "7", "8", "9")


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_dialect_sample_times_carry_the_offset_of_the_profiles_zone(name, shipped, vocab):
    """Times sent without an offset are read in the profile's zone: the same wall clock, that zone's offset."""
    read, conversion = converted(SAMPLES / name, shipped, vocab)
    zone = ZoneInfo(read.selection.profile.timezone)
    encounter = resource(conversion.bundle, "Encounter")
    stamps = [conversion.bundle["timestamp"], *encounter["period"].values()]
    for text in stamps:
        moment = datetime.fromisoformat(text)
        assert moment.utcoffset() == zone.utcoffset(moment.replace(tzinfo=None)), text
    pv1_44 = read.msg.segment("PV1").get(44)
    assert encounter["period"]["start"].startswith(
        f"{pv1_44[:4]}-{pv1_44[4:6]}-{pv1_44[6:8]}T{pv1_44[8:10]}:{pv1_44[10:12]}"
    )


def test_vendor_profiles_leave_the_standard_top_level_samples_as_they_were(shipped, vocab):
    """The Epic, Cerner and MEDITECH samples at the top of sample_messages/ get their vendor's profile and no change."""
    for path in sorted(SAMPLES.glob("*.hl7")):
        read = read_message(raw(path), shipped)
        assert read.selection.known, path.name
        assert read.applied.changes == (), path.name
        base = convert(V2Message(raw(path)), vocab, UTC, datetime(2026, 12, 1, tzinfo=UTC))
        again = convert(read.msg, vocab, read.tz or UTC, datetime(2026, 12, 1, tzinfo=UTC))
        assert again.bundle == base.bundle, path.name


# -- applying a profile ------------------------------------------------------


def folder_with(tmp_path: Path, **files: str) -> Path:
    """A profiles folder: a default profile plus ``files`` (name -> TOML text)."""
    folder = tmp_path / "senders"
    folder.mkdir(exist_ok=True)
    (folder / "default.toml").write_text('description = "test default"\n', encoding="utf-8")
    for name, text in files.items():
        (folder / f"{name.replace('_', '-')}.toml").write_text(text, encoding="utf-8")
    return folder


def message(*segments: str) -> V2Message:
    return V2Message("\r".join(segments).encode("utf-8"))


MSH = "MSH|^~\\&|LOCALAPP|LOCALFAC|HERALD|ACO|20261201120000||ADT^A04|T1|P|2.5.1"


def test_a_class_rule_reads_several_fields_after_the_local_codes(tmp_path, vocab):
    """Class O in an ED* location becomes E; the rule sees PV1-2 after the local table translated OP to O."""
    folder = folder_with(
        tmp_path,
        local="""
[match]
application = "LOCALAPP"

[codes."PV1.2"]
OP = "O"

[[class_rules]]
when = { "PV1.2" = "O", "PV1.3.1" = "ED*" }
set = "E"
why = "an outpatient in the ED"
""",
    )
    profiles = load_profiles(folder, vocab)
    msg = message(MSH, "PID|1||M1^^^LOCALFAC^MR", "PV1|1|OP|EDFAST^3^^LOCALFAC")
    assert msg.segment("PV1").get(2) == "OP"  # read (and cached) before the profile rewrites it
    applied = apply_profile(msg, profiles.select("LOCALAPP", "LOCALFAC").profile)
    assert msg.segment("PV1").get(2) == "E"  # the cache of the rewritten field was dropped
    assert [(c.path, c.before, c.after) for c in applied.changes] == [("PV1-2", "OP", "O"), ("PV1-2", "O", "E")]
    assert convert(msg, vocab, UTC).event_code == "notification-admit"


def test_an_identifier_from_pid2_is_moved_not_copied(tmp_path, vocab):
    """An MRN the sender puts in PID-2 becomes a typed PID-3 repetition and leaves PID-2 (no second copy)."""
    folder = folder_with(
        tmp_path,
        local="""
[match]
application = "LOCALAPP"

[[identifiers]]
field = "PID.2"
type = "MR"
authority = "https://example.org/mrn"
""",
    )
    profiles = load_profiles(folder, vocab)
    msg = message(MSH, "PID|1|A77|X1^^^LOCALFAC^PI", "PV1|1|O")
    apply_profile(msg, profiles.select("LOCALAPP", "X").profile)
    identifiers = convert(msg, vocab, UTC).patient_resource["identifier"]
    assert [(i["system"], i["value"]) for i in identifiers] == [
        ("urn:herald:id:LOCALFAC", "X1"),
        ("https://example.org/mrn", "A77"),
    ]


def test_ignored_fields_are_blanked_and_expected_ones_reported(tmp_path, vocab):
    """An ignored field is not mapped; an expected field the message lacks is reported (no value quoted)."""
    folder = folder_with(
        tmp_path,
        local="""
ignore = ["PID.13"]
expected = ["PV1.19"]

[match]
application = "LOCALAPP"
""",
    )
    profile = load_profiles(folder, vocab).get("local")
    msg = message(MSH, "PID|1||M1^^^LOCALFAC^MR||DOE^ALEX|||||||555-0100", "PV1|1|O")
    applied = apply_profile(msg, profile)
    assert "telecom" not in convert(msg, vocab, UTC).patient_resource
    assert applied.missing == ("PV1-19: expected by the profile but empty or absent",)


def test_a_z_segment_field_can_fill_an_empty_standard_field(tmp_path, vocab):
    """A copy rule puts ZPV-4 into an empty PV1-36, which the standard table then maps."""
    folder = folder_with(
        tmp_path,
        local="""
[match]
application = "LOCALAPP"

[z_segments]
ZPV = "visit extension: ZPV-4 discharge disposition"

[[copy]]
from = "ZPV.4"
to = "PV1.36"
""",
    )
    msg = message(MSH.replace("A04", "A03"), "PID|1||M1^^^LOCALFAC^MR", "PV1|1|I", "ZPV|1|||03")
    apply_profile(msg, load_profiles(folder, vocab).get("local"))
    encounter = resource(convert(msg, vocab, UTC).bundle, "Encounter")
    assert encounter["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "snf"


def test_field_paths_read_as_analysts_write_them():
    """PID.3[type=MR], PID-3, PV1.3.1, IN1[4=MEDICARE*].36 and PID.3[2] are paths; others say what is wrong."""
    assert parse_path("PID.3[type=MR]").rep == ("type", "MR")
    assert parse_path("PID-3").field_key == "PID.3"
    assert parse_path("PV1.3.1").label == "PV1-3.1"
    assert parse_path("IN1[4=MEDICARE*].36").segment_if == (4, "MEDICARE*")
    assert parse_path("PID.3[2]").rep == ("index", "2")
    for bad in ("PID", "pid.3", "PID.0", "PID.3[kind=MR]", "MSH.2"):
        with pytest.raises(ValueError):
            parse_path(bad)


# -- choosing a profile ------------------------------------------------------


def test_the_most_specific_profile_wins_and_unknown_senders_get_the_default(shipped):
    """Application and facility beat application alone; no match gives the default profile, marked unknown."""
    assert shipped.select("EPIC", "RVH").profile.name == "epic-riverview"
    assert shipped.select("EPIC", "OTHER").profile.name == "epic"
    assert shipped.select("epicprod", "rvh").profile.name == "epic-riverview"  # globs ignore case
    unknown = shipped.select("SOMEAPP", "SOMEWHERE")
    assert (unknown.profile.name, unknown.known) == ("default", False)
    assert "SOMEAPP" in unknown.reason


def test_an_exact_name_beats_a_glob_of_the_same_criteria(tmp_path, vocab):
    """With as many criteria given, the profile without wildcards is chosen."""
    folder = folder_with(
        tmp_path,
        exact='[match]\napplication = "EPIC"\n',
        glob='[match]\napplication = "EP*"\n',
    )
    profiles = load_profiles(folder, vocab)
    assert profiles.select("EPIC", "X").profile.name == "exact"
    assert profiles.select("EPICCARE", "X").profile.name == "glob"


# -- bad profiles ------------------------------------------------------------

BAD = [
    ("syntax", 'timezone = "America/New_York\n', "(syntax)", "not valid TOML"),
    ("unknown key", 'timezon = "UTC"\n[match]\napplication = "A"\n', "timezon", "unknown setting"),
    ("wrong type", 'timezone = 5\n[match]\napplication = "A"\n', "timezone", "expected a string"),
    ("zone", 'timezone = "Mars/Olympus"\n[match]\napplication = "A"\n', "timezone", "IANA"),
    ("charset", 'charset = "EBCDIC"\n[match]\napplication = "A"\n', "charset", "character set"),
    ("no match", 'timezone = "UTC"\n', "match", "which senders"),
    ("match key", '[match]\napp = "A"\n', "match.app", "unknown criterion"),
    ("key after a table", '[match]\napplication = "A"\ntimezone = "UTC"\n', "match.timezone", "before the first"),
    (
        "path",
        '[match]\napplication = "A"\n[[identifiers]]\nfield = "PID3"\ntype = "MR"\n',
        "identifiers[1].field",
        "not a field path",
    ),
    (
        "id type",
        '[match]\napplication = "A"\n[[identifiers]]\nfield = "PID.2"\ntype = "MRN"\n',
        "identifiers[1].type",
        "table 0203",
    ),
    ("code", '[match]\napplication = "A"\n[codes."PV1.2"]\nIN = "X"\n', 'codes."PV1.2".IN', "table 0004"),
    ("coded field", '[match]\napplication = "A"\n[codes."PID.5"]\nX = "Y"\n', 'codes."PID.5"', "local codes can be"),
    (
        "class",
        '[match]\napplication = "A"\n[[class_rules]]\nwhen = { "PV1.2" = "O" }\nset = "INPATIENT"\n',
        "class_rules[1].set",
        "table 0004",
    ),
    (
        "z-segment",
        '[match]\napplication = "A"\n[[identifiers]]\nfield = "ZPD.2"\ntype = "MB"\n',
        "identifiers[1].field",
        "Z-segment the profile does not declare",
    ),
    ("extends", 'extends = "nowhere"\n[match]\napplication = "A"\n', "extends", "no profile 'nowhere'"),
    ("extends itself", 'extends = "bad"\n[match]\napplication = "A"\n', "extends", "a cycle"),
]


@pytest.mark.parametrize(("case", "text", "key", "reason"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_profile_is_refused_naming_file_key_and_reason(tmp_path, vocab, case, text, key, reason):
    """Each kind of mistake is a ProfileError with the file, the key as written and a reason in words."""
    folder = folder_with(tmp_path, bad=text)
    with pytest.raises(ProfileError) as caught:
        load_profiles(folder, vocab)
    assert (Path(caught.value.file).name, caught.value.key) == ("bad.toml", key), str(caught.value)
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{folder / 'bad.toml'}: {key}: ")
    assert isinstance(caught.value, ConfigError)  # a start-up error like any other setting


def test_two_profiles_that_tie_are_refused(tmp_path, vocab):
    """Two profiles that could both match one sender with the same specificity are refused at load."""
    folder = folder_with(
        tmp_path,
        first='[match]\napplication = "EPIC*"\nfacility = "RVH"\n',
        second='[match]\napplication = "EP*"\nfacility = "R*"\n',
        third='[match]\napplication = "EPIC*"\nfacility = "*VH"\n',
    )
    with pytest.raises(ProfileError) as caught:
        load_profiles(folder, vocab)
    assert (Path(caught.value.file).name, caught.value.key) == ("third.toml", "match")
    assert "ties with second.toml" in caught.value.reason


def test_the_default_profile_takes_no_match(tmp_path, vocab):
    """default.toml is for senders no profile matches: a [match] in it is refused."""
    folder = folder_with(tmp_path)
    (folder / "default.toml").write_text('[match]\napplication = "X"\n', encoding="utf-8")
    with pytest.raises(ProfileError, match="default.toml: match: the default profile"):
        load_profiles(folder, vocab)


def test_config_says_where_profiles_are_and_what_happens_to_unknown_senders(tmp_path):
    """[profiles] folder (relative to the config file) and unknown_senders (default or reject) are read and checked."""
    path = tmp_path / "herald.toml"
    path.write_text('[profiles]\nfolder = "my-senders"\nunknown_senders = "reject"\n', encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.profiles_folder, cfg.profiles_unknown_senders) == (tmp_path / "my-senders", "reject")
    path.write_text('[profiles]\nunknown_senders = "drop"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "profiles.unknown_senders"


# -- the pipeline ------------------------------------------------------------


def pending(path: Path, message_id: int = 1) -> PendingMessage:
    return PendingMessage(message_id, raw(path), "2026-12-02T12:00:00.000+00:00", "")


def test_the_pipeline_applies_the_senders_profile_and_says_which(shipped, vocab, sample_roster, tmp_path):
    """process_message converts with the sender's profile; the parsed event names it (no field values)."""
    outcome = process_message(
        pending(MEDITECH_ADMIT), vocab, UTC, sample_roster, default_recipients(tmp_path), profiles=shipped
    )
    assert outcome.state != FAILED, outcome.reason
    (parsed,) = [detail for kind, detail in outcome.events if kind == "parsed"]
    assert parsed["profile"] == "meditech-bayside" and parsed["profile_changes"] == 6
    assert "unknown_sender" not in parsed
    bundle = json.loads(outcome.fhir_json)
    assert resource(bundle, "Encounter")["class"]["code"] == "IMP"
    assert MBI_SYSTEM in [i["system"] for i in resource(bundle, "Patient")["identifier"]]


def test_an_unknown_sender_is_converted_with_the_default_and_flagged(shipped, vocab, sample_roster, tmp_path):
    """unknown_senders = "default": the message converts; the parsed event says the sender had no profile."""
    message = raw(MEDITECH_ADMIT).replace(b"|MEDITECH|BCH|", b"|NEWEHR|NEWHOSP|")
    outcome = process_message(
        PendingMessage(1, message, "2026-12-02T12:00:00.000+00:00", ""),
        vocab,
        UTC,
        sample_roster,
        default_recipients(tmp_path),
        profiles=shipped,
    )
    (parsed,) = [detail for kind, detail in outcome.events if kind == "parsed"]
    assert parsed["profile"] == "default" and "NEWEHR" in parsed["unknown_sender"]
    assert outcome.state != FAILED


def test_an_unknown_sender_fails_when_the_config_says_reject(vocab, sample_roster, tmp_path):
    """unknown_senders = "reject": a sender with no profile is a failed outcome with the reason."""
    profiles = load_profiles(SHIPPED, vocab, "reject")
    message = raw(MEDITECH_ADMIT).replace(b"|MEDITECH|BCH|", b"|NEWEHR|NEWHOSP|")
    outcome = process_message(
        PendingMessage(1, message, "2026-12-02T12:00:00.000+00:00", ""),
        vocab,
        UTC,
        sample_roster,
        default_recipients(tmp_path),
        profiles=profiles,
    )
    assert outcome.state == FAILED
    assert "no profile matches MSH-3 'NEWEHR'" in outcome.reason and "reject" in outcome.reason
    assert outcome.events[-1] == ("failed", {"stage": "profile", "reason": outcome.reason})


# -- reloading ---------------------------------------------------------------


def test_a_good_reload_takes_the_new_profiles(tmp_path, vocab):
    """A reload of a folder that loads replaces the set and counts a generation."""
    folder = folder_with(tmp_path, local='[match]\napplication = "A"\n')
    registry = ProfileRegistry(folder, vocab=vocab)
    (folder / "local.toml").write_text('timezone = "America/Chicago"\n[match]\napplication = "A"\n', encoding="utf-8")
    ok, said = registry.reload()
    assert ok and registry.generation == 2 and "generation 2" in said
    assert registry.current.get("local").timezone == "America/Chicago"


def test_a_bad_reload_keeps_the_running_profiles(tmp_path, vocab):
    """A reload of a folder that no longer loads is refused with file, key and reason; the old set stays."""
    folder = folder_with(tmp_path, local='timezone = "America/Denver"\n[match]\napplication = "A"\n')
    registry = ProfileRegistry(folder, vocab=vocab)
    running = registry.current
    (folder / "local.toml").write_text('timezone = "Mars/Olympus"\n[match]\napplication = "A"\n', encoding="utf-8")
    ok, said = registry.reload()
    assert not ok and "local.toml: timezone:" in said and "IANA" in said
    assert registry.current is running and registry.generation == 1
    assert registry.current.get("local").timezone == "America/Denver"


class ReloadClock(Clock):
    """A Clock that also runs what a signal handler hands to the reactor."""

    def callFromThread(self, f, *args, **kw):  # noqa: N802 - Twisted's name
        f(*args, **kw)


@pytest.fixture
def pipeline_service(tmp_path, vocab):
    """A PipelineWorker over a profiles folder, not started: its reload watch is driven by a Clock."""
    folder = folder_with(tmp_path, local='timezone = "America/Denver"\n[match]\napplication = "A"\n')
    cfg = load_config(None, data_dir=tmp_path / "data")
    cfg.data_dir.mkdir()
    clock = ReloadClock()
    worker = PipelineWorker(object(), cfg, vocab, clock, lambda: None, ProfileRegistry(folder, vocab=vocab))
    yield worker, folder, clock, cfg
    worker._unwatch_reload_requests()


def test_herald_reload_asks_the_server_through_a_file_it_watches(pipeline_service):
    """The server reloads when the data folder's reload-profiles file changes (what `herald reload` writes)."""
    worker, folder, clock, cfg = pipeline_service
    worker._watch_reload_requests()
    (folder / "local.toml").write_text('timezone = "America/Chicago"\n[match]\napplication = "A"\n', encoding="utf-8")
    clock.advance(5)
    assert worker.profiles.generation == 1  # nobody asked
    reload_request_path(cfg.data_dir).write_text("now\n", encoding="utf-8")
    clock.advance(5)
    assert worker.profiles.generation == 2
    assert worker.profiles.current.get("local").timezone == "America/Chicago"


def test_sighup_reloads_and_a_bad_folder_keeps_the_running_profiles(pipeline_service):
    """SIGHUP reloads; when the folder no longer loads the running profiles stay in use and the log says why."""
    from twisted.logger import globalLogPublisher

    worker, folder, clock, cfg = pipeline_service
    before = signal.getsignal(signal.SIGHUP)
    said = []
    globalLogPublisher.addObserver(said.append)
    try:
        worker._watch_reload_requests()
        (folder / "local.toml").write_text('timezone = "UTC"\n[match]\napplication = "A"\n', encoding="utf-8")
        os.kill(os.getpid(), signal.SIGHUP)
        assert worker.profiles.generation == 2 and worker.profiles.current.get("local").timezone == "UTC"
        (folder / "local.toml").write_text('extends = "gone"\n[match]\napplication = "A"\n', encoding="utf-8")
        os.kill(os.getpid(), signal.SIGHUP)
        assert worker.profiles.generation == 2
        assert worker.profiles.current.get("local").timezone == "UTC"
        warning = [e for e in said if "not reloaded" in e.get("log_format", "")]
        assert warning and "local.toml: extends:" in warning[0]["error"]
    finally:
        globalLogPublisher.removeObserver(said.append)
    worker._unwatch_reload_requests()
    assert signal.getsignal(signal.SIGHUP) == (before if before is not None else signal.SIG_DFL)  # given back


def test_a_worker_process_context_takes_the_servers_profiles_by_generation(tmp_path, vocab):
    """A worker's context converts with the set handed over with the batches, changed only by a new generation."""
    folder = folder_with(tmp_path, local='[match]\napplication = "A"\n')
    first, second = load_profiles(folder, vocab), load_profiles(SHIPPED, vocab)
    cfg = load_config(None, data_dir=tmp_path / "data")
    context = BatchContext(tmp_path / "herald.db", cfg, vocab)
    context.adopt_profiles(1, first)
    assert context.profiles is first
    context.adopt_profiles(1, second)  # the same generation: nothing to do
    assert context.profiles is first
    context.adopt_profiles(2, second)
    assert context.profiles is second


def test_a_worker_process_converts_with_the_profiles_it_is_handed(tmp_path, vocab):
    """A spawned worker applies the set handed over with the batch (not one it loaded itself)."""
    from gateway.pipeline.workers import WorkerPool
    from gateway.store import Store

    cfg = load_config(None, data_dir=tmp_path / "data")
    Store(cfg.database, reactor=object())._conn.close()  # creates and migrates the file
    renamed = folder_with(
        tmp_path, **{"bayside_by_another_name": 'extends = "default"\n[match]\napplication = "MEDITECH*"\n'}
    )
    pool = WorkerPool(cfg.database, cfg, 1)
    try:
        (first,) = pool.submit([pending(MEDITECH_ADMIT)], (5, load_profiles(SHIPPED, vocab))).result(timeout=60)
        # As the server hands them: pickled once per generation by its registry.
        state = ProfileRegistry(renamed, vocab=vocab).state
        assert isinstance(state[1], bytes)
        (second,) = pool.submit([pending(MEDITECH_ADMIT, 2)], state).result(timeout=60)
    finally:
        pool.shutdown()
    profile_of = lambda outcome: next(d for k, d in outcome.events if k == "parsed")["profile"]  # noqa: E731
    assert (profile_of(first), profile_of(second)) == ("meditech-bayside", "bayside-by-another-name")


def test_a_sender_with_no_profile_is_logged_once_naming_only_msh3_and_msh4():
    from twisted.logger import capturedLogs, formatEvent

    from gateway.pipeline.runner import PipelineWorker
    from gateway.records import MessageOutcome

    worker = PipelineWorker.__new__(PipelineWorker)  # only its logging of outcomes is exercised
    worker._unknown_said = set()
    why = "no profile matches MSH-3 'NEWEHR', MSH-4 'NEWHOSP'"
    outcomes = [
        MessageOutcome(n, "routed", events=[("parsed", {"profile": "default", "unknown_sender": why})])
        for n in (1, 2, 3)
    ]
    with capturedLogs() as logged:
        worker._say_unknown_senders(outcomes)
        worker._say_unknown_senders(outcomes)
    lines = [formatEvent(e) for e in logged]
    assert lines == [f"message 1: {why}; converted with the default profile (add one in mappings/senders/)"]
