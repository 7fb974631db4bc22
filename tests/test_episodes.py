"""Episodes: a visit's messages folded into one stay, in the order events happened, not arrived."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from synthetic_adt import adt

from gateway.conversion.convert import convert
from gateway.transitions.episodes import EpisodeEvent, close_stale, episode_event, fold, timeline

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def ev(n, trigger, hours, **kw):
    base = {"facility": "LSR", "visit": "V1", "patient": "A1|M1", "klass": "I"}
    return EpisodeEvent(message_id=n, trigger=trigger, event_time=T0 + timedelta(hours=hours), **{**base, **kw})


def test_admit_transfer_discharge_is_one_closed_stay():
    (ep,) = fold(
        [
            ev(1, "A01", 0, unit="4N", admit_time=T0),
            ev(2, "A02", 20, unit="CCU"),
            ev(3, "A03", 70, discharge_time=T0 + timedelta(hours=70), disposition="03", destination="MAPLE SNF"),
        ]
    )
    assert (ep.status, ep.ended, ep.setting) == ("closed", "discharged", "inpatient")
    assert (ep.start, ep.end) == (T0, T0 + timedelta(hours=70))
    assert ep.units == ("4N", "CCU")
    assert ep.to_snf and ep.destination == "MAPLE SNF"
    assert ep.messages == (1, 2, 3)


def test_messages_arriving_out_of_order_give_the_same_stay():
    events = [
        ev(1, "A01", 0, unit="4N", admit_time=T0),
        ev(2, "A02", 20, unit="CCU"),
        ev(3, "A08", 30),
        ev(4, "A03", 70, discharge_time=T0 + timedelta(hours=70)),
    ]
    expected = fold(events)
    rng = random.Random(3)
    for _ in range(10):
        shuffled = events[:]
        rng.shuffle(shuffled)
        assert fold(shuffled) == expected


def test_a_discharge_that_overtakes_its_admit_still_closes_the_stay():
    (ep,) = fold([ev(9, "A03", 70, discharge_time=T0 + timedelta(hours=70)), ev(10, "A01", 0, admit_time=T0)])
    assert (ep.status, ep.start, ep.end) == ("closed", T0, T0 + timedelta(hours=70))


def test_a_cancelled_admit_is_no_stay():
    (ep,) = fold([ev(1, "A01", 0, admit_time=T0), ev(2, "A11", 1)])
    assert ep.status == "cancelled"
    assert timeline([ep]) == []


def test_a_cancelled_discharge_reopens_the_stay():
    (ep,) = fold([ev(1, "A01", 0, admit_time=T0), ev(2, "A03", 48), ev(3, "A13", 49)])
    assert (ep.status, ep.end) == ("open", None)


def test_an_ed_visit_never_discharged_is_closed_after_the_set_time():
    (ep,) = fold([ev(1, "A04", 0, klass="E", admit_time=T0)])
    assert close_stale(ep, T0 + timedelta(hours=23), {"ed": timedelta(hours=24)}) == ep
    closed = close_stale(ep, T0 + timedelta(hours=30), {"ed": timedelta(hours=24)})
    assert (closed.status, closed.ended, closed.end) == ("closed", "assumed", T0 + timedelta(hours=24))
    inpatient = fold([ev(1, "A01", 0, admit_time=T0)])[0]
    assert close_stale(inpatient, T0 + timedelta(days=60), {"ed": timedelta(hours=24)}).status == "open"


def test_visits_at_two_facilities_are_two_episodes():
    eps = fold([ev(1, "A01", 0), ev(2, "A01", 1, facility="NRG")])
    assert sorted(e.facility for e in eps) == ["LSR", "NRG"]


def test_the_timeline_says_ed_then_inpatient_then_snf_then_home():
    eps = fold(
        [
            ev(1, "A04", 0, visit="E1", klass="E", admit_time=T0),
            ev(2, "A03", 5, visit="E1", klass="E", discharge_time=T0 + timedelta(hours=5)),
            ev(3, "A01", 5, visit="I1", admit_time=T0 + timedelta(hours=5)),
            ev(4, "A03", 100, visit="I1", discharge_time=T0 + timedelta(hours=100), disposition="03"),
            ev(5, "A01", 101, facility="MAPLE", visit="S1", facility_kind="snf", admit_time=T0 + timedelta(hours=101)),
            ev(6, "A03", 400, facility="MAPLE", visit="S1", facility_kind="snf", disposition="01"),
        ]
    )
    steps = [(t["setting"], t["then"]) for t in timeline(eps)]
    assert steps == [("ed", "inpatient"), ("inpatient", "snf"), ("snf", "home")]


def test_an_event_is_read_from_a_converted_bundle(vocab):
    msg = adt("A03", pv1={2: "I", 19: "VISIT9^^^TESTFAC^VN", 36: "03", 44: "20260301080000", 45: "20260304113000"})
    bundle = convert(msg, vocab, UTC, T0).bundle
    e = episode_event(bundle, "A03", 7, "A1|M1")
    assert (e.visit, e.facility, e.klass, e.disposition) == ("VISIT9", "TESTFAC", "IMP", "03")
    assert e.discharge_time == datetime(2026, 3, 4, 11, 30, tzinfo=UTC)
