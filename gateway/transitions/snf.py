"""The SNF report: per skilled nursing facility over a period, the figures ACOs rank SNFs by.

A SNF stay is an episode at a facility known as a SNF (its own ADT feed), or,
when a SNF sends nothing, a hospital discharge to a SNF (disposition 03, 61,
64) stands for the stay's start, named by the discharge's destination. For
the stays that *began* in the period, per SNF:

- stays, and how many are still open;
- median length of stay in days (closed stays only);
- re-hospitalisation within 30 days of SNF admission: an inpatient or ED stay
  of the same patient beginning within 30 days after the SNF admission;
- discharges home (disposition 01 or 06 from the SNF), of the closed stays.

SNFs with fewer than ``min_stays`` stays are listed apart, not ranked: a rate
over three stays says nothing.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.transitions.episodes import Episode

__all__ = ["SnfFigures", "snf_report", "snf_report_csv", "snf_stays"]

_HOME = {"01", "06"}
_READMIT_WINDOW = timedelta(days=30)


@dataclass(frozen=True)
class SnfStay:
    snf: str
    patient: str
    start: datetime
    end: datetime | None
    disposition: str
    from_feed: bool  # the SNF's own ADT (else inferred from a hospital discharge)


@dataclass(frozen=True)
class SnfFigures:
    snf: str
    stays: int
    open: int
    median_los_days: float | None
    rehospitalised_30d: int
    discharged_home: int
    closed: int

    @property
    def rehospitalisation_rate(self) -> float:
        return self.rehospitalised_30d / self.stays if self.stays else 0.0

    @property
    def home_rate(self) -> float:
        return self.discharged_home / self.closed if self.closed else 0.0


def snf_stays(episodes: Iterable[Episode]) -> list[SnfStay]:
    """SNF stays from SNF feeds, and from hospital discharges to a SNF that no SNF feed covers."""
    episodes = list(episodes)
    stays = [
        SnfStay(e.facility, e.patient, e.start, e.end if e.status == "closed" else None, e.disposition, True)
        for e in episodes
        if e.facility_kind == "snf" and e.status != "cancelled" and e.start
    ]
    fed = {(s.patient, s.start.date()) for s in stays} | {
        (s.patient, (s.start - timedelta(days=1)).date()) for s in stays
    }
    for e in episodes:
        if e.facility_kind != "snf" and e.to_snf and e.end and (e.patient, e.end.date()) not in fed:
            stays.append(SnfStay(e.destination or "(SNF not named)", e.patient, e.end, None, "", False))
    return stays


def snf_report(
    episodes: Iterable[Episode], start: datetime, end: datetime, min_stays: int = 5
) -> tuple[list[SnfFigures], list[SnfFigures]]:
    """``(ranked, too_few)``: figures per SNF for stays beginning in ``[start, end)``.

    Ranked by re-hospitalisation rate (lower first), then median length of stay.
    """
    episodes = list(episodes)
    hospital = [e for e in episodes if e.facility_kind != "snf" and e.status != "cancelled" and e.start]
    by_snf: dict[str, list[SnfStay]] = {}
    for stay in snf_stays(episodes):
        if start <= stay.start < end:
            by_snf.setdefault(stay.snf, []).append(stay)
    figures = []
    for snf, stays in sorted(by_snf.items()):
        closed = [s for s in stays if s.end is not None]
        los = [(s.end - s.start).total_seconds() / 86400 for s in closed]
        readmitted = sum(
            1
            for s in stays
            if any(
                h.patient == s.patient
                and h.setting in ("inpatient", "ed")
                and s.start < h.start <= s.start + _READMIT_WINDOW
                for h in hospital
            )
        )
        figures.append(
            SnfFigures(
                snf=snf,
                stays=len(stays),
                open=len(stays) - len(closed),
                median_los_days=round(statistics.median(los), 1) if los else None,
                rehospitalised_30d=readmitted,
                discharged_home=sum(1 for s in closed if s.disposition in _HOME),
                closed=len(closed),
            )
        )
    ranked = sorted(
        (f for f in figures if f.stays >= min_stays),
        key=lambda f: (f.rehospitalisation_rate, f.median_los_days if f.median_los_days is not None else 1e9),
    )
    too_few = [f for f in figures if f.stays < min_stays]
    return ranked, too_few


def snf_report_csv(ranked: list[SnfFigures], too_few: list[SnfFigures]) -> str:
    """The report as CSV: one row per SNF, ranked ones first with their rank."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        [
            "rank",
            "snf",
            "stays",
            "open",
            "median_los_days",
            "rehospitalised_30d",
            "rehospitalisation_rate",
            "discharged_home",
            "home_rate",
        ]
    )
    for rank, f in [*enumerate(ranked, 1), *(("too few stays", f) for f in too_few)]:
        w.writerow(
            [
                rank,
                f.snf,
                f.stays,
                f.open,
                "" if f.median_los_days is None else f.median_los_days,
                f.rehospitalised_30d,
                f"{f.rehospitalisation_rate:.3f}",
                f.discharged_home,
                f"{f.home_rate:.3f}",
            ]
        )
    return out.getvalue()
