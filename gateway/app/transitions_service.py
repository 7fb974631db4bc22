"""The transitions service: stored episode events become episodes, worklist tasks and ED e-alerts.

The pipeline leaves one episode event per message routed for a member
(:func:`gateway.store.transitions.record_episode_event`, in the outcome's
transaction). This service, woken when the pipeline has recorded outcomes
and polling otherwise, takes the events not yet folded, and per member
decides what they mean (:func:`gateway.transitions.care.plan_member`): the
folded episodes with their flags, the tasks a discharge makes, the tasks a
cancel or a readmission closes, and the ED e-alert an ED registration asks
for. It writes all of it, and marks the events folded, in one transaction
(:meth:`~gateway.store.Store.apply_transitions`); the e-alert is an outbox
row (``channel = "mllp"``, the alert message its sealed payload), so the
delivery worker sends it with retries, dead letters and an audit trail.

Every ``sweep_seconds`` it also looks at the open ED visits and closes those
past ``[transitions] ed_close_hours`` (the visit's ED-visit tasks follow, when
the ACO wants them).

The deciding runs on a thread of its own (one): it owns a read-only
connection and the roster reader, and also answers the CDS Hooks service's
lookups (:meth:`TransitionsService.card_for`), so no database read happens on
the reactor. The clock (``clock``, datetimes) and the timers (``scheduler``,
a ``twisted.internet.task.Clock`` in tests) are injected.
"""

from __future__ import annotations

import csv
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gateway.config import Config
from gateway.conversion.facts import facts_of_patient
from gateway.conversion.v2 import V2Message
from gateway.errors import ConfigError, HeraldError
from gateway.matching import match_patient, query_from_facts
from gateway.pipeline.process import MatchPolicy, decide
from gateway.records import Notification
from gateway.store import Store, StoredRoster, open_database, read_transaction
from gateway.store import transitions as stored
from gateway.store.roster_file import RosterReader, roster_member
from gateway.transitions.alerts import AlertContent, alert_message, encounter_flags
from gateway.transitions.care import CareSettings, MemberPlan, alert_facts, alert_id, event_flags, plan_member
from gateway.transitions.episodes import Episode, episode_as_dict, episode_from_dict, event_from_dict
from gateway.transitions.worklist import load_worklist

__all__ = ["TransitionsService", "alert_targets", "care_transitions", "episode_flags_function", "load_pcp_phones"]

#: The outbox's recipient role of an ED e-alert, and its event code.
ALERT_ROLE = "ed-alert"


def alert_target(mllp: Mapping) -> str:
    """The outbox target of a facility's e-alert interface: ``mllp://host:port``."""
    return f"mllp://{mllp['host']}:{mllp['port']}"


def alert_targets(config: Config) -> dict[str, dict]:
    """The delivery worker's ``channel_settings`` for the e-alerts: settings by target, from ``[alerts]``."""
    return {alert_target(a["mllp"]): dict(a["mllp"]) for a in config.alerts.values() if "mllp" in a}


def load_pcp_phones(path: Path | None) -> dict[str, str]:
    """``[transitions] pcp_phones``: a CSV file with columns npi and phone; {} without one."""
    if path is None:
        return {}
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ConfigError("transitions.pcp_phones", f"{path} does not exist") from None
    if rows and not {"npi", "phone"} <= set(rows[0]):
        raise ConfigError("transitions.pcp_phones", f"{path} needs the columns npi and phone")
    return {r["npi"].strip(): r["phone"].strip() for r in rows if r.get("npi")}


def episode_flags_function(snf_facilities: frozenset[str]) -> Callable[[list[dict], dict], list[str]]:
    """The flags of a new episode event given the member's events (for ``Store.use_episode_flags``)."""

    def flags_of(history: list[dict], new: dict) -> list[str]:
        return event_flags([event_from_dict(d) for d in history], event_from_dict(new), snf_facilities)

    return flags_of


@dataclass(frozen=True)
class _Member:
    """What the roster says of a member, for tasks and alerts (None fields when not on the roster now)."""

    aco_id: str
    member_id: str
    row: Mapping | None

    @property
    def opted_out(self) -> bool:
        return self.row is not None and self.row.get("opted_out") in (1, "1", True)


class TransitionsService(Service):
    """Folds episode events, makes and closes tasks, queues ED e-alerts (module docstring)."""

    _log = Logger()
    #: Episode events taken per batch.
    BATCH = 200

    def __init__(
        self,
        store: Store,
        config: Config,
        reactor,
        *,
        clock: Callable[[], datetime] | None = None,
        scheduler=None,
        on_queued: Callable[[], None] = lambda: None,
        sweep_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.config = config
        self.reactor = reactor
        self.scheduler = scheduler or reactor
        self.clock = clock or store.clock
        self.on_queued = on_queued
        self.sweep_seconds = sweep_seconds
        rules = load_worklist(config.transitions_worklist)
        self.settings = CareSettings(
            rules,
            frozenset(config.transitions_snf_facilities),
            {"ed": timedelta(hours=config.transitions_ed_close_hours)},
            config.tzinfo,
        )
        self.pcp_phones = load_pcp_phones(config.transitions_pcp_phones)
        self._pool: ThreadPool | None = None
        self._conn = None  # the deciding thread's read-only connection
        self._roster: RosterReader | None = None
        self._loop: task.LoopingCall | None = None
        #: One run at a time: a wake during a run asks for another after it.
        self._lock = defer.DeferredLock()
        self._again = False
        self._last_sweep: float | None = None
        #: Totals since start: episodes written, tasks made and closed, e-alerts queued.
        self.totals = {"episodes": 0, "tasks": 0, "closed_tasks": 0, "notifications": 0}

    # -- the service ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._pool = ThreadPool(1, 1, name="herald-transitions")
        self._pool.start()
        self._loop = task.LoopingCall(self.wake)
        self._loop.clock = self.scheduler
        self._loop.start(self.config.transitions_poll_seconds, now=True)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        yield self._lock.acquire()  # the run in progress finishes its write
        self._lock.release()
        if self._pool is not None:
            pool = self._pool
            yield threads.deferToThreadPool(self.reactor, pool, self._close)
            self._pool = None
            pool.stop()

    def _close(self) -> None:
        """On the deciding thread: close its connection and roster reader."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._roster is not None:
            self._roster.close()
            self._roster = None

    def wake(self) -> None:
        """Run soon (after the pipeline recorded outcomes); during a run, once more after it."""
        if not self.running:
            return
        if self._lock.locked:
            self._again = True
            return
        d = self.run_once()
        d.addErrback(
            lambda f: self._log.error(
                "care transitions: a run failed ({error}); the next poll tries again", error=f.type.__name__
            )
        )

    def run_once(self) -> defer.Deferred:
        """Fold every unfolded episode event, then (every ``sweep_seconds``) close stale ED visits.

        Fires with the counts written. Runs one at a time (a call during a run waits for it).
        """
        d = self._lock.run(self._run)
        d.addBoth(self._ran)
        return d

    def _ran(self, result):
        if self._again and self.running:
            self._again = False
            self.reactor.callLater(0, self.wake)
        return result

    # -- one run ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def _run(self):
        written = {k: 0 for k in self.totals}
        if not (yield self.store.lead("transitions")):
            return written  # several nodes: another one folds the episodes (its e-alerts and tasks once)
        while True:
            change, taken = yield self._in_thread(self.decide_pending, self.BATCH)
            if not taken:
                break
            counts = yield self.store.apply_transitions(change)
            self._add(written, counts)
            if taken < self.BATCH:
                break
        moment = self.scheduler.seconds()
        if self._last_sweep is None or moment - self._last_sweep >= self.sweep_seconds:
            self._last_sweep = moment
            change, _ = yield self._in_thread(self.decide_stale)
            if any(change.get(k) for k in ("episodes", "tasks", "closed_tasks", "notifications", "events")):
                counts = yield self.store.apply_transitions(change)
                self._add(written, counts)
        if written["notifications"]:
            self.on_queued()
        if any(written.values()):
            self._log.info(
                "care transitions: {episodes} episodes, {tasks} tasks made, {closed_tasks} closed, "
                "{notifications} e-alerts queued",
                **written,
            )
        return written

    def _add(self, written: dict, counts: Mapping[str, int]) -> None:
        for k, v in counts.items():
            written[k] = written.get(k, 0) + v
            self.totals[k] = self.totals.get(k, 0) + v

    def _in_thread(self, fn, *args) -> defer.Deferred:
        if self._pool is None:
            return defer.fail(HeraldError("the transitions service is not running"))
        return threads.deferToThreadPool(self.reactor, self._pool, fn, *args)

    # -- on the deciding thread ---------------------------------------------------------

    def _reader(self):
        if self._conn is None:
            self._conn = open_database(self.config.database, readonly=True, keys=self.store.keys)
            self._roster = RosterReader(self.config.database, self.store.keys)
        return self._conn

    def decide_pending(self, limit: int) -> tuple[dict, int]:
        """(what to write for up to ``limit`` unfolded episode events, how many were taken). Blocking: it runs on
        the deciding thread (or in a script that drives the service itself, as ``bench/care_day.py`` does)."""
        conn = self._reader()
        with read_transaction(conn):
            pending = stored.unfolded_events(conn, limit)
            if not pending:
                return {}, 0
            members = list(dict.fromkeys((p["aco_id"], p["member_id"]) for p in pending))
            state = stored.member_state(conn, members)
            new = {p["message_id"] for p in pending}
            change = self._decide(conn, state, new)
        change["folded"] = sorted(new)
        return change, len(pending)

    def decide_stale(self) -> tuple[dict, int]:
        """(what to write for the members with an ED visit open past ``ed_close_hours``, 0). Blocking."""
        conn = self._reader()
        now = self.clock()
        limit = self.settings.stale_after["ed"]
        with read_transaction(conn):
            candidates = []
            for ep in stored.open_episodes(conn, "ed"):
                start = episode_from_dict(ep["state"]).start
                if start is not None and _utc(now) - _utc(start) >= limit:
                    candidates.append((ep["aco_id"], ep["member_id"]))
            if not candidates:
                return {}, 0
            state = stored.member_state(conn, candidates)
            return self._decide(conn, state, set()), 0

    def _decide(self, conn, state: Mapping[tuple[str, str], Mapping], new: set[int]) -> dict:
        now = self.clock()
        change: dict[str, list] = {"episodes": [], "tasks": [], "closed_tasks": [], "notifications": [], "events": []}
        snapshot = self._roster.current()
        for (aco_id, member_id), held in state.items():
            member = _Member(aco_id, member_id, roster_member(snapshot, aco_id, member_id))
            events = [event_from_dict(e) for e in held["events"]]
            previous = {(e["state"]["facility"], e["state"]["visit"]): e["state"] for e in held["episodes"]}
            plan = plan_member(
                aco_id,
                member_id,
                events,
                previous,
                held["tasks"],
                new,
                self.settings,
                now,
                owner=(member.row or {}).get("care_manager", ""),
            )
            for ep in plan.episodes:
                flags = plan.flags.get((ep.facility, ep.visit), [])
                change["episodes"].append(
                    {
                        "aco_id": aco_id,
                        "member_id": member_id,
                        "setting": ep.setting,
                        "status": ep.status,
                        "snf": ep.setting == "snf" or ep.to_snf,
                        "state": {**episode_as_dict(ep), "flags": flags},
                    }
                )
            change["tasks"] += [{**t, "aco_id": aco_id, "member_id": member_id} for t in plan.tasks]
            change["closed_tasks"] += plan.closed_tasks
            change["events"] += plan.events
            for ep, message_id in plan.alerts:
                self._alert(conn, change, member, plan, ep, message_id, now)
        return change

    def _alert(self, conn, change: dict, member: _Member, plan: MemberPlan, ep: Episode, mid: int, now) -> None:
        """The e-alert of an ED registration, as an outbox row, when the facility has an MLLP interface for it."""
        where = self.config.alerts.get(ep.facility) or {}
        if "mllp" not in where:
            return
        if member.row is None:
            change["events"].append((mid, "ed-alert-skipped", {"reason": "the member is no longer on the roster"}))
            return
        if member.opted_out:
            change["events"].append(
                (mid, "opt-out-honoured", {"aco": member.aco_id, "member": member.member_id, "withheld": ["ed-alert"]})
            )
            return
        source = stored.alert_source(conn, mid)
        if source is None:
            change["events"].append((mid, "ed-alert-skipped", {"reason": "the message's body is no longer stored"}))
            return
        try:
            inbound = V2Message(source["raw"], source["charset"], limits=None)
        except HeraldError as e:
            change["events"].append((mid, "ed-alert-skipped", {"reason": f"the message cannot be read ({e.code})"}))
            return
        if inbound.fs != "|" or (inbound.comp, inbound.rep, inbound.esc, inbound.sub) != ("^", "~", "\\", "&"):
            change["events"].append((mid, "ed-alert-skipped", {"reason": "the message uses other separators"}))
            return
        pid, pv1 = inbound.segment("PID"), inbound.segment("PV1")
        if pid is None or pv1 is None:
            change["events"].append((mid, "ed-alert-skipped", {"reason": "the message has no PID or PV1"}))
            return
        content = self.content_for(member, plan.all_episodes, plan.flags.get((ep.facility, ep.visit), []), ep, now)
        nid = alert_id(ep.facility, ep.visit)
        text = alert_message(
            content,
            pid="|".join(pid.fields),
            visit=pv1.fields[19] if len(pv1.fields) > 19 else "",
            patient_class=pv1.fields[2] if len(pv1.fields) > 2 else "E",
            sending=(self.config.application, self.config.facility),
            receiving=(source["sending_application"], source["sending_facility"]),
            control_id="HA" + uuid.UUID(nid).hex[:18].upper(),
            now=now,
            kind=where.get("message", "MDM^T02"),
        )
        change["notifications"].append(
            Notification(
                id=nid,
                message_id=mid,
                recipient_role=ALERT_ROLE,
                recipient=f"ED at {ep.facility}",
                channel="mllp",
                target=alert_target(where["mllp"]),
                event_code=ALERT_ROLE,
                payload=text.decode("utf-8"),
                recipient_id=f"alert:{ep.facility}",
                attribution={"aco": member.aco_id, "flags": list(content.flags)},
            )
        )
        change["events"].append((mid, "ed-alert-queued", {"aco": member.aco_id, "member": member.member_id}))

    def content_for(
        self, member: _Member, episodes: list[Episode], flags: list[str], current: Episode | None, now: datetime
    ) -> AlertContent:
        """What the e-alert (or the card) says of a member."""
        row = member.row or {}
        aco = self.config.transitions_acos.get(member.aco_id, {})
        at = current.start if current is not None and current.start is not None else now
        visits, last = alert_facts(episodes, at, current)
        return AlertContent(
            aco=f"{aco['name']} ({member.aco_id})" if aco.get("name") else member.aco_id,
            pcp_name=row.get("pcp_name", ""),
            pcp_phone=self.pcp_phones.get(row.get("pcp_npi", ""), ""),
            care_manager=row.get("care_manager", ""),
            care_manager_phone=aco.get("care_manager_phone", ""),
            ed_visits_60d=visits,
            last_discharge=last,
            flags=tuple(flags),
        )

    # -- CDS Hooks ----------------------------------------------------------------------

    def card_for(self, patient: Mapping, context: Mapping) -> defer.Deferred:
        """The card content for a CDS Hooks call's prefetched Patient (a Deferred ``CardAnswer``)."""
        from gateway.app.cds_hooks import CardAnswer  # the protocol's value, not a dependency of the service

        def lookup() -> CardAnswer:
            conn = self._reader()
            snapshot = self._roster.current()
            now = self.clock()
            facts = facts_of_patient(dict(patient))
            query = query_from_facts(facts)
            policy = MatchPolicy.from_config(self.config, snapshot.size())
            with read_transaction(conn):
                match = match_patient(query, now.date().isoformat(), StoredRoster(snapshot, conn), policy.model)
                decision = decide(match, policy)
                if decision.withheld:
                    detail = {"aco": match.aco_id, "member": match.member_id, "withheld": ["cds-hooks-card"]}
                    return CardAnswer(None, {"grade": match.grade, "opt_out": True, **detail})
                if decision.member is None:
                    return CardAnswer(None, {"grade": match.grade})
                row = decision.member
                member = _Member(row["aco_id"], row["member_id"], row)
                episodes = [episode_from_dict(e["state"]) for e in stored.episodes_of(conn, *_ids(member))]
            latest_first = sorted(episodes, key=lambda e: _utc(e.start) if e.start else _EPOCH, reverse=True)
            current = next((e for e in latest_first if e.status == "open"), None)
            flags = encounter_flags(current, episodes) if current is not None else []
            content = self.content_for(member, episodes, flags, current, now)
            return CardAnswer(content, {"grade": match.grade, "aco": member.aco_id, "member": member.member_id})

        return self._in_thread(lookup)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ids(member: _Member) -> tuple[str, str]:
    return member.aco_id, member.member_id


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def care_transitions(config: Config, store: Store, reactor, on_queued: Callable[[], None]) -> TransitionsService | None:
    """The transitions service ``make_service`` starts (None with ``[transitions] enabled = false``).

    It also has the store flag each routed member's notifications as the pipeline's outcomes are written.
    """
    if not config.transitions_enabled:
        return None
    service = TransitionsService(store, config, reactor, on_queued=on_queued)
    store.use_episode_flags(episode_flags_function(frozenset(config.transitions_snf_facilities)))
    return service
