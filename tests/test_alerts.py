"""Encounter flags, and the ED e-alert as a v2 message an EHR files into the chart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hl7apy.parser import parse_message

from gateway.app.replay import split_messages
from gateway.resources import samples_dir
from gateway.transitions.alerts import AlertContent, alert_lines, alert_message, encounter_flags, snf_named
from gateway.transitions.episodes import Episode

T = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)


def ep(setting, start_days, end_days=None, facility="LSR", patient="A|M1", **kw):
    klass = {"ed": "E", "inpatient": "I"}.get(setting, "I")
    kind = "snf" if setting == "snf" else "hospital"
    start = T + timedelta(days=start_days)
    end = T + timedelta(days=end_days) if end_days is not None else None
    status = "closed" if end else "open"
    return Episode(
        facility,
        f"{setting}{start_days}",
        patient,
        status,
        klass,
        start,
        end,
        "",
        (),
        kw.get("disposition", ""),
        kw.get("destination", ""),
        kind,
    )


def test_an_admission_within_30_days_of_a_discharge_is_a_readmission():
    now = ep("inpatient", 0)
    assert "readmission-30d" in encounter_flags(now, [ep("inpatient", -40, -29), now])
    assert "readmission-30d" not in encounter_flags(now, [ep("inpatient", -45, -31), now])
    assert encounter_flags(now, [ep("inpatient", -20, -10, patient="A|M2")]) == [], "another patient's stay"


def test_the_third_ed_visit_in_60_days_is_flagged():
    now = ep("ed", 0)
    assert encounter_flags(now, [ep("ed", -59, -59), now]) == []
    assert encounter_flags(now, [ep("ed", -59, -59), ep("ed", -10, -10), now]) == ["ed-3-in-60d"]
    assert encounter_flags(now, [ep("ed", -61, -61), ep("ed", -10, -10), now]) == []


def test_admitted_from_a_snf_and_discharged_to_one():
    admit = ep("inpatient", 0, 5, disposition="03", destination="MAPLE SNF")
    history = [ep("snf", -12, 0, facility="OAK"), admit]
    assert encounter_flags(admit, history) == ["admitted-from-snf", "discharged-to-snf"]
    assert snf_named(admit, history) == "MAPLE SNF"
    # No PV1-37: the SNF whose admit followed the discharge names it.
    quiet = ep("inpatient", 0, 5)
    after = ep("snf", 5.2, facility="PINE")
    assert encounter_flags(quiet, [quiet, after]) == ["discharged-to-snf"]
    assert snf_named(quiet, [after]) == "PINE"


CONTENT = AlertContent(
    aco="Lakeshore ACO (A1234)",
    pcp_name="Dr. Rina Lee",
    pcp_phone="203-555-0100",
    care_manager="Sam Ortiz RN",
    care_manager_phone="203-555-0188",
    ed_visits_60d=3,
    last_discharge="2026-02-14 from NRG (inpatient)",
    flags=("ed-3-in-60d",),
)


def test_the_alert_says_who_to_call_and_reminds_to_call_before_discharge():
    text = "\n".join(alert_lines(CONTENT))
    for said in (
        "attributed to Lakeshore ACO (A1234)",
        "Dr. Rina Lee, phone 203-555-0100",
        "Sam Ortiz RN, phone 203-555-0188",
        "ED visits in the last 60 days, this one included: 3",
        "2026-02-14 from NRG (inpatient)",
        "3 or more ED visits in 60 days",
        "contact the PCP before the patient is discharged",
    ):
        assert said in text


@pytest.mark.parametrize("kind", ["MDM^T02", "ORU^R01"])
def test_the_alert_is_a_v2_message_bound_to_the_eds_patient_and_visit(kind):
    raw = split_messages((samples_dir() / "epic-v251-a04-ed-registration.hl7").read_bytes())[0].decode()
    segments = raw.replace("\n", "\r").split("\r")
    pid = next(s for s in segments if s.startswith("PID|"))
    pv1 = next(s for s in segments if s.startswith("PV1|")).split("|")
    message = alert_message(
        CONTENT,
        pid=pid,
        visit=pv1[19],
        patient_class=pv1[2],
        sending=("HERALD", "ACO"),
        receiving=("EPIC", "LSR"),
        control_id="HRLD-1",
        now=T,
        kind=kind,
    )
    text = message.decode()
    assert pid in text, "the ED's own PID, as it came"
    parsed = parse_message(text, find_groups=False)
    assert parsed.msh.msh_9.to_er7().startswith(kind)
    assert f"|{pv1[19]}" in next(s for s in text.split("\r") if s.startswith("PV1|"))
    obx = [s for s in text.split("\r") if s.startswith("OBX|")]
    assert len(obx) == len(alert_lines(CONTENT))
    assert "Dr. Rina Lee" in obx[1]


def test_separators_in_the_text_are_escaped():
    content = AlertContent(aco="A|B^C&D~E\\F")
    message = alert_message(
        content,
        pid="PID|1||X^^^F^MR",
        visit="V1",
        patient_class="E",
        sending=("H", "A"),
        receiving=("E", "L"),
        control_id="1",
        now=T,
    ).decode()
    first = next(s for s in message.split("\r") if s.startswith("OBX|1|"))
    assert "A\\F\\B\\S\\C\\T\\D\\R\\E\\E\\F" in first
    assert first.count("|") == 11


def test_a_name_with_an_accent_is_sent_as_declared_utf8():
    """A PID with non-ASCII text makes the alert declare MSH-18 UNICODE UTF-8 (and encode it so)."""
    message = alert_message(
        CONTENT,
        pid="PID|1||X^^^F^MR||VANTERPOOL^ZOË",
        visit="V1",
        patient_class="E",
        sending=("H", "A"),
        receiving=("E", "L"),
        control_id="1",
        now=T,
    )
    msh = message.split(b"\r")[0].decode().split("|")
    assert msh[17] == "UNICODE UTF-8"
    assert "ZOË".encode() in message
    plain = alert_message(
        CONTENT,
        pid="PID|1||X",
        visit="V1",
        patient_class="E",
        sending=("H", "A"),
        receiving=("E", "L"),
        control_id="1",
        now=T,
    )
    assert len(plain.split(b"\r")[0].split(b"|")) == 16, "ASCII: no MSH-18"
