"""The SNF report on a synthetic month, every figure worked out by hand below."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.transitions.episodes import Episode
from gateway.transitions.snf import snf_report, snf_report_csv


def d(day, month=3):
    return datetime(2026, month, day, 12, 0, tzinfo=UTC)


def snf(name, patient, start, end=None, disposition=""):
    status = "closed" if end else "open"
    return Episode(
        name,
        f"{patient}-{start}",
        patient,
        status,
        "I",
        d(start),
        d(end) if end else None,
        "discharged" if end else "",
        (),
        disposition,
        "",
        "snf",
    )


def hospital(patient, start, end=None, klass="I", disposition="", destination="", month=3):
    status = "closed" if end else "open"
    return Episode(
        "LSR",
        f"H-{patient}-{start}",
        patient,
        status,
        klass,
        d(start, month),
        d(end, month) if end else None,
        "discharged" if end else "",
        (),
        disposition,
        destination,
    )


EPISODES = [
    # MAPLE, its own feed: 5 stays begun in March.
    hospital("P1", 1, 2, disposition="03", destination="MAPLE"),  # the hospital stay before: not a second SNF stay
    snf("MAPLE", "P1", 2, 12, "01"),  # 10 days, home; back in hospital on the 20th (within 30 days of the 2nd)
    hospital("P1", 20, 24),
    snf("MAPLE", "P2", 3, 23, "06"),  # 20 days, home with home health
    snf("MAPLE", "P3", 5, 11, "02"),  # 6 days, sent to hospital the same day
    hospital("P3", 11, 15),
    snf("MAPLE", "P4", 10),  # still there
    snf("MAPLE", "P5", 15, 29, "20"),  # 14 days, died
    Episode("MAPLE", "P6-old", "P6", "closed", "I", d(25, 2), d(5), "discharged", (), "01", "", "snf"),  # February
    # OAK, its own feed: 5 stays of 7 days, all home, nobody back in hospital.
    *(snf("OAK", f"Q{i}", day, day + 7, "01") for i, day in enumerate((1, 4, 8, 12, 20), 1)),
    # An ED visit 40 days after an OAK admission is not a 30-day re-hospitalisation.
    hospital("Q1", 10, 10, klass="E", month=4),
    # PINE sends no feed: a hospital discharge to it stands for the stay.
    hospital("R1", 4, 6, disposition="03", destination="PINE"),
]


def test_the_months_figures_per_snf():
    ranked, too_few = snf_report(EPISODES, d(1), d(1, 4))
    maple = next(f for f in ranked if f.snf == "MAPLE")
    # Stays 5 (P1-P5; P6 began in February), 1 open (P4); closed LOS 10, 20, 6, 14 -> median 12;
    # re-hospitalised within 30 days: P1 (the 20th) and P3 (the 11th) = 2 of 5; home: P1 (01), P2 (06) = 2 of 4.
    assert (maple.stays, maple.open, maple.median_los_days) == (5, 1, 12.0)
    assert (maple.rehospitalised_30d, maple.rehospitalisation_rate) == (2, 0.4)
    assert (maple.discharged_home, maple.closed, maple.home_rate) == (2, 4, 0.5)
    oak = next(f for f in ranked if f.snf == "OAK")
    assert (oak.stays, oak.median_los_days, oak.rehospitalised_30d, oak.discharged_home) == (5, 7.0, 0, 5)
    assert [f.snf for f in ranked] == ["OAK", "MAPLE"], "fewer re-hospitalisations rank first"
    assert [(f.snf, f.stays, f.open) for f in too_few] == [("PINE", 1, 1)], "listed apart, not ranked"


def test_the_report_as_csv():
    ranked, too_few = snf_report(EPISODES, d(1), d(1, 4))
    rows = snf_report_csv(ranked, too_few).splitlines()
    assert rows[0].startswith("rank,snf,stays,open,median_los_days")
    assert rows[1] == "1,OAK,5,0,7.0,0,0.000,5,1.000"
    assert rows[2] == "2,MAPLE,5,1,12.0,2,0.400,2,0.500"
    assert rows[3] == "too few stays,PINE,1,1,,0,0.000,0,0.000"
