"""Flags on an encounter, and the ED e-alert: a note back into the ED's own EHR.

Flags (:func:`encounter_flags`), from the patient's episodes across every
connected facility:

- ``readmission-30d``: an inpatient admission within 30 days of an inpatient discharge;
- ``ed-3-in-60d``: an ED visit that is the third (or more) in 60 days;
- ``admitted-from-snf``: an admission while, or within a day after, the patient was in a SNF;
- ``discharged-to-snf``: a discharge to a SNF, named (PV1-37, or the SNF whose admit followed).

The e-alert (:func:`alert_message`) tells the ED clinician, inside their own
chart, that the patient is attributed to an ACO, who the PCP is and how to
reach them, who the care manager is, the patient's recent use of the ED and
hospital, and to contact the PCP before discharge. It is an HL7 v2
``MDM^T02`` by default: a document (TXA) with its text (OBX, TX) bound to the
patient (the inbound message's own PID, copied) and to the visit (PV1-19),
which EHRs' inbound document interfaces file into the chart as a note on that
encounter, with an author and a status. ``ORU^R01`` is the alternative for
EHRs that only take results: it files under results, and some EHRs want an
order to match it to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.transitions.episodes import Episode

__all__ = ["AlertContent", "alert_lines", "alert_message", "encounter_flags", "snf_named"]

_DAY = timedelta(days=1)


def encounter_flags(episode: Episode, history: Iterable[Episode]) -> list[str]:
    """The flags (module docstring) of ``episode``, given the patient's other episodes."""
    others = [e for e in history if e != episode and e.patient == episode.patient and e.status != "cancelled"]
    flags = []
    start = episode.start
    if start is not None and episode.setting == "inpatient":
        if any(
            e.setting == "inpatient" and e.end is not None and e.end <= start and start - e.end <= timedelta(days=30)
            for e in others
        ):
            flags.append("readmission-30d")
    if start is not None and episode.setting == "ed":
        earlier = [e for e in others if e.setting == "ed" and e.start and start - timedelta(days=60) <= e.start < start]
        if len(earlier) >= 2:
            flags.append("ed-3-in-60d")
    if start is not None and episode.setting in ("inpatient", "ed", "observation"):
        if any(
            e.setting == "snf" and e.start and e.start <= start and (e.end is None or start - e.end <= _DAY)
            for e in others
        ):
            flags.append("admitted-from-snf")
    if episode.status == "closed" and episode.setting != "snf":
        following_snf = [
            e
            for e in others
            if e.setting == "snf" and e.start and episode.end and episode.end <= e.start <= episode.end + _DAY
        ]
        if episode.to_snf or following_snf:
            flags.append("discharged-to-snf")
    return flags


def snf_named(episode: Episode, history: Iterable[Episode]) -> str:
    """The SNF a discharge went to: PV1-37's destination, else the SNF whose admit followed within a day."""
    if episode.destination:
        return episode.destination
    for e in history:
        if e.setting == "snf" and e.start and episode.end and episode.end <= e.start <= episode.end + _DAY:
            return e.facility
    return ""


@dataclass(frozen=True)
class AlertContent:
    """What the e-alert says. No clinical detail beyond utilisation counts."""

    aco: str
    pcp_name: str = ""
    pcp_phone: str = ""
    care_manager: str = ""
    care_manager_phone: str = ""
    ed_visits_60d: int = 0
    last_discharge: str = ""  # "2026-02-14 from LSR (inpatient)"
    flags: tuple[str, ...] = ()


_FLAG_TEXT = {
    "readmission-30d": "readmitted within 30 days of a discharge",
    "ed-3-in-60d": "3 or more ED visits in 60 days",
    "admitted-from-snf": "admitted from a skilled nursing facility",
    "discharged-to-snf": "discharged to a skilled nursing facility",
}


def alert_lines(content: AlertContent) -> list[str]:
    """The alert's text, a line each (also the CDS Hooks card's detail)."""
    lines = [f"This patient is attributed to {content.aco} (an accountable care organization)."]
    if content.pcp_name:
        phone = f", phone {content.pcp_phone}" if content.pcp_phone else ""
        lines.append(f"Primary care provider: {content.pcp_name}{phone}.")
    if content.care_manager:
        phone = f", phone {content.care_manager_phone}" if content.care_manager_phone else ""
        lines.append(f"ACO care manager: {content.care_manager}{phone}.")
    visits = content.ed_visits_60d
    lines.append(f"ED visits in the last 60 days, this one included: {visits}.")
    if content.last_discharge:
        lines.append(f"Last hospital discharge: {content.last_discharge}.")
    for flag in content.flags:
        lines.append(f"Flag: {_FLAG_TEXT.get(flag, flag)}.")
    lines.append("Please contact the PCP before the patient is discharged from the ED, and share the ED summary.")
    return lines


def _escape(text: str, fs: str = "|", enc: str = "^~\\&") -> str:
    """Text made safe for an HL7 v2 field: the separators written as escape sequences."""
    esc = enc[2]
    out = text.replace(esc, f"{esc}E{esc}")
    for char, code in ((fs, "F"), (enc[0], "S"), (enc[1], "R"), (enc[3], "T")):
        out = out.replace(char, f"{esc}{code}{esc}")
    return out


def alert_message(
    content: AlertContent,
    *,
    pid: str,
    visit: str,
    patient_class: str,
    sending: tuple[str, str],
    receiving: tuple[str, str],
    control_id: str,
    now: datetime,
    kind: str = "MDM^T02",
    version: str = "2.5.1",
) -> bytes:
    """The e-alert as an HL7 v2 message (segments separated by CR), bound to ``pid`` and ``visit``.

    ``pid`` is the PID segment of the ED's own message, copied as it came (its
    MRN and assigning authority are what the ED's EHR files by); ``visit`` is
    PV1-19 (as the ED sent it, components and all).
    """
    if kind not in ("MDM^T02", "ORU^R01"):
        raise ValueError(f"{kind!r}: the e-alert is an MDM^T02 or an ORU^R01")
    stamp = now.strftime("%Y%m%d%H%M%S%z")
    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            sending[0],
            sending[1],
            receiving[0],
            receiving[1],
            stamp,
            "",
            kind + ("^MDM_T02" if kind == "MDM^T02" else "^ORU_R01"),
            control_id,
            "P",
            version,
            "",
            "",
            "AL",
            "NE",
        ]
    )
    evn = f"EVN|T02|{stamp}" if kind == "MDM^T02" else None
    pv1 = f"PV1|1|{patient_class}" + "|" * 17 + visit
    text: Sequence[str] = alert_lines(content)
    obx = [
        f"OBX|{i}|TX|ACO-ALERT^ACO care coordination alert^L||{_escape(line)}||||||F" for i, line in enumerate(text, 1)
    ]
    if kind == "MDM^T02":
        txa = "|".join(
            [
                "TXA",
                "1",
                "ACO-ALERT",  # TXA-2 document type (local: an ACO alert note)
                "TX",  # TXA-3 content presentation: text
                stamp,  # TXA-4 activity date/time
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                control_id,  # TXA-12 unique document number
                "",
                "",
                "",
                "",
                "AU",  # TXA-17 completion status: authenticated
                "",
                "AV",  # TXA-19 availability: available for patient care
            ]
        )
        segments = [msh, evn, pid, pv1, txa, *obx]
    else:
        obr = f"OBR|1||{control_id}|ACO-ALERT^ACO care coordination alert^L|||{stamp}|||||||||||||||{stamp}||OTH|F"
        segments = [msh, pid, pv1, obr, *obx]
    text_out = "\r".join(s for s in segments if s) + "\r"
    if not text_out.isascii():
        # A name with an accent (copied from the ED's PID): say the encoding, MSH-18, as UTF-8.
        text_out = text_out.replace(msh, msh + "||UNICODE UTF-8", 1)
    return text_out.encode("utf-8")
