"""The audit trail and retention, as library functions: verify, export, audited reads, purge.

The CLI (``herald audit verify``, ``herald audit export``, ``herald purge``)
calls these and formats what they return. Verifying and exporting only read:
they run as well on a copy of the database taken for an investigation.
Reading patient data through the CLI is itself audited (:func:`record_read`),
before anything is shown.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import threads
from twisted.logger import Logger

from gateway.config import Config
from gateway.store import Store
from gateway.store.integrity import AuditReport, verify
from gateway.store.keys import KeyRing
from gateway.store.retention import id_ranges, purgeable
from gateway.store.schema import iso
from gateway.store.sealing import OUTBOX_SUFFIX

__all__ = [
    "PeriodicPurge",
    "PurgeReport",
    "audit_event",
    "audit_store",
    "export_audit_events",
    "parse_age",
    "purge_bodies",
    "record_read",
    "report_lines",
    "verify_trail",
]


@contextlib.contextmanager
def audit_store(config: Config, keys: KeyRing, clock: Callable[[], datetime] | None = None) -> Iterator[Store]:
    """A running store with the key ring (the chain's key), for one CLI command's writes; closed on leaving."""
    store = Store(config.database, keys=keys, **({"clock": clock} if clock else {}))
    store.start()
    try:
        yield store
    finally:
        store.close()


# -- verify ------------------------------------------------------------------------------


def verify_trail(conn) -> AuditReport:
    """Walk the event chain and every message digest of the database open on ``conn`` (read-only)."""
    return verify(conn)


def report_lines(report: AuditReport) -> list[str]:
    """What ``herald audit verify`` prints: the counts, then each broken row, first one first."""
    legacy = f" ({report.legacy_events} chained when the chain was introduced)" if report.legacy_events else ""
    rekeyed = f"; the configured key chains from event {report.rekeyed_at}" if report.rekeyed_at else ""
    lines = [
        f"events: {report.events} checked, up to event {report.last_event}{legacy}{rekeyed}",
        f"messages: {report.messages} checked ({report.purged} with their body purged)",
    ]
    if report.intact:
        lines.append("the audit trail is intact")
    for f in report.findings:
        lines.append(f"BROKEN at {f.where}: {f.what}: {f.why}")
    return lines


# -- export --------------------------------------------------------------------------------

DCM = "http://dicom.nema.org/resources/ontology/DCM"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
#: Herald's own codes: the event's kind, as the trail names it (a subtype beside the DICOM type).
KIND_SYSTEM = "urn:herald:audit-event-kind"
_TYPES = {
    "110100": "Application Activity",
    "110106": "Export",
    "110107": "Import",
    "110110": "Patient Record",
}
#: kind -> (DICOM event type, action C/R/U/D/E, outcome 0/4/8/12). Kinds not listed: 110110, U, 0.
_KINDS = {
    "received": ("110107", "C", "0"),
    "retransmission": ("110107", "E", "0"),
    "ack-sent": ("110106", "E", "0"),
    "rejected": ("110107", "C", "4"),
    "rejected-frames": ("110107", "E", "4"),
    "failed": ("110110", "U", "8"),
    "routed": ("110110", "C", "0"),
    "delivered": ("110106", "R", "0"),
    "delivery-failed": ("110106", "R", "4"),
    "dead-letter": ("110106", "R", "8"),
    "roster-imported": ("110107", "C", "0"),
    "phi-read": ("110110", "R", "0"),
    "purged": ("110110", "D", "0"),
    "chain-started": ("110100", "E", "0"),
    "chain-rekeyed": ("110100", "E", "0"),
}
#: Detail keys exported: ids, codes and counts. Free text (reasons, errors, warnings) and a
#: member's id stay in the database: a SIEM gets no patient data beyond message ids.
_EXPORTED_DETAIL = frozenset(
    {
        "peer",
        "bytes",
        "flag",
        "code",
        "segments",
        "charset",
        "event",
        "resources",
        "stage",
        "location",
        "grade",
        "method",
        "score",
        "candidates",
        "aco",
        "role",
        "channel",
        "target",
        "attempt",
        "review",
        "by",
        "command",
        "count",
        "ranges",
        "received_before",
        "chained",
        "first",
        "last",
        "previous",
        "withheld",
        "rule",
        "tls",
        "certificate",
        "notification",
    }
)


def audit_event(row) -> dict:
    """One trail row (id, at, message id, notification id, actor, kind, detail, mac) as a FHIR R4 AuditEvent."""
    detail = json.loads(row["detail"] or "{}")
    if not isinstance(detail, dict):
        detail = {}
    type_code, action, outcome = _KINDS.get(row["kind"], ("110110", "U", "0"))
    actor = row["actor"]
    person = actor.removeprefix("cli:") if actor.startswith("cli:") else detail.get("by") if actor == "review" else None
    if person:
        agents = [
            {
                "type": _concept("http://terminology.hl7.org/CodeSystem/extra-security-role-type", "humanuser"),
                "altId": str(person),
                "name": str(person),
                "requestor": True,
            }
        ]
    else:
        agents = [
            {
                "type": _concept(DCM, "110150", "Application"),
                "who": {"display": f"Herald {actor}"},
                "name": f"herald {actor}",
                "requestor": False,
            }
        ]
    if "peer" in detail and actor == "intake":
        agents.append(
            {
                "type": _concept(DCM, "110153", "Source Role ID"),
                "requestor": False,
                "network": {"address": _peer_host(str(detail["peer"])), "type": "2"},
            }
        )
    entities = []
    if row["message_id"] is not None:
        entities.append(_entity("urn:herald:message", str(row["message_id"]), "3"))
    if row["notification_id"] is not None:
        entities.append(_entity("urn:herald:notification", row["notification_id"], "4"))
    trail = {
        "what": {"identifier": {"system": "urn:herald:audit-event", "value": str(row["id"])}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
        "role": {
            "system": "http://terminology.hl7.org/CodeSystem/object-role",
            "code": "13",
            "display": "Security Resource",
        },
        "detail": [{"type": "chain-mac", "valueBase64Binary": _b64(row["mac"])}]
        + [
            {"type": k, "valueString": v if isinstance(v, str) else json.dumps(v)}
            for k, v in sorted(detail.items())
            if k in _EXPORTED_DETAIL
        ],
    }
    entities.append(trail)
    event = {
        "resourceType": "AuditEvent",
        "id": f"herald-{row['id']}",
        "type": {"system": DCM, "code": type_code, "display": _TYPES[type_code]},
        "subtype": [{"system": KIND_SYSTEM, "code": row["kind"]}],
        "action": action,
        "recorded": row["at"],
        "outcome": outcome,
        "agent": agents,
        "source": {
            "observer": {"display": "Herald HL7 v2 to FHIR gateway"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4"}],
        },
        "entity": entities,
    }
    return event


def _peer_host(peer: str) -> str:
    """The address of a peer as intake names it (``tcp:10.0.0.5:51234`` -> ``10.0.0.5``)."""
    parts = peer.split(":")
    if parts and parts[0] in ("tcp", "tls", "ssl"):
        parts = parts[1:]
    if len(parts) > 1 and parts[-1].isdigit():
        parts = parts[:-1]
    return ":".join(parts) or peer


def _concept(system: str, code: str, display: str | None = None) -> dict:
    coding = {"system": system, "code": code, **({"display": display} if display else {})}
    return {"coding": [coding]}


def _entity(system: str, value: str, role: str) -> dict:
    return {
        "what": {"identifier": {"system": system, "value": value}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
        "role": {"system": OBJECT_ROLE, "code": role},
    }


def _b64(value) -> str:
    import base64

    return base64.b64encode(bytes(value or b"")).decode("ascii")


def export_audit_events(conn, out: Callable[[str], None], since: str | None = None) -> int:
    """Write the trail's events (from ``since``, ISO) as NDJSON AuditEvents, each validated; return how many."""
    from fhir.resources.R4B.auditevent import AuditEvent

    sql = "SELECT id, at, message_id, notification_id, actor, kind, detail, mac FROM events"
    args: list = []
    if since:
        sql += " WHERE at >= ?"
        args.append(since)
    count = 0
    for row in conn.execute(sql + " ORDER BY id", args):
        event = audit_event(row)
        AuditEvent.model_validate(event)  # raises if Herald ever wrote an invalid one
        out(json.dumps(event, separators=(",", ":"), ensure_ascii=False))
        count += 1
    return count


_AGE = re.compile(r"\s*(\d+)\s*([dhw])\s*\Z")


def parse_age(text: str) -> timedelta:
    """``90d``, ``12h``, ``2w`` as a timedelta (:class:`ValueError` otherwise)."""
    found = _AGE.match(text)
    if not found:
        raise ValueError(f"{text!r} is not an age such as 90d, 12h or 2w")
    n, unit = int(found.group(1)), found.group(2)
    return {"d": timedelta(days=n), "h": timedelta(hours=n), "w": timedelta(weeks=n)}[unit]


def parse_since(text: str, now: datetime) -> str:
    """``--since``: an age (``7d``) or an ISO date or time (UTC when it names no zone), as the trail's ISO stamp."""
    try:
        return iso(now - parse_age(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither an age (7d) nor an ISO date or time") from None
    return iso(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


# -- audited reads -----------------------------------------------------------------------------


def record_read(
    config: Config, keys: KeyRing, who: str, command: str, message_ids: Iterable[int] = (), **detail
) -> None:
    """Audit a CLI read of patient data (``phi-read`` by ``cli:<who>``), before anything is shown.

    Raises :class:`~gateway.errors.HeraldError` when the read cannot be
    recorded; the caller then shows nothing.
    """
    with audit_store(config, keys) as store:
        store.record_reads(f"cli:{who}", command, list(message_ids), detail or None)


# -- retention ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What a purge did (or, with ``dry_run``, would do)."""

    received_before: str
    message_ids: tuple[int, ...]
    notification_payloads: int = 0
    files_removed: int = 0
    dry_run: bool = False

    @property
    def ranges(self) -> list[list[int]]:
        return id_ranges(self.message_ids)


#: Messages whose bodies go in one transaction (and one ``purged`` event).
PURGE_BATCH = 500


def purge_bodies(
    config: Config,
    keys: KeyRing,
    older_than: timedelta,
    *,
    by: str,
    dry_run: bool = False,
    now: datetime | None = None,
) -> PurgeReport:
    """Remove the bodies of messages received more than ``older_than`` ago whose work is finished.

    Rows, header fields and digests stay; one ``purged`` event per batch
    names the messages. The notification files of those messages still in
    the data folder (``<id>.json``, sealed or not) are removed too; files the
    configuration sends elsewhere belong to their recipient.
    """
    now = now or datetime.now(UTC)
    before = iso(now - older_than)
    if dry_run:
        from gateway.store import open_database

        conn = open_database(config.database, readonly=True, keys=keys)
        try:
            return PurgeReport(before, tuple(purgeable(conn, before)), dry_run=True)
        finally:
            conn.close()
    ids: list[int] = []
    payloads = files = 0
    with audit_store(config, keys) as store:
        while True:
            batch = store.purge_bodies(before, by=by, limit=PURGE_BATCH)
            if not batch.message_ids:
                break
            ids += batch.message_ids
            payloads += batch.notifications
            files += remove_file_drops(config.data_dir, batch.file_drops)
    return PurgeReport(before, tuple(ids), payloads, files)


def remove_file_drops(data_dir: Path, drops: Iterable[tuple[str, str]]) -> int:
    """Remove notification files (plain or sealed) that lie under ``data_dir``; return how many."""
    root = data_dir.resolve()
    removed = 0
    for folder, notification_id in drops:
        where = Path(folder).resolve()
        if not where.is_relative_to(root):
            continue
        for name in (f"{notification_id}.json", f"{notification_id}{OUTBOX_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                (where / name).unlink()
                removed += 1
    return removed


class PeriodicPurge(Service):
    """The server's retention (``[retention] days``): purges a batch at a time, off the ACK path, every hour."""

    _log = Logger()

    #: Seconds between purges (a purge continues batch after batch until nothing is left).
    INTERVAL = 3600.0

    def __init__(self, store: Store, data_dir: Path, days: int, reactor) -> None:
        self.store = store
        self.data_dir = data_dir
        self.days = days
        self.reactor = reactor
        self._call = None
        self.purged = 0

    def startService(self) -> None:
        super().startService()
        self._call = self.reactor.callLater(60, self.run)  # not in the rush of a restart

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _next(self, delay: float) -> None:
        if self.running:
            self._call = self.reactor.callLater(delay, self.run)

    def run(self):
        """One purge batch; the next is scheduled when it ends."""
        before = iso(self.store.clock() - timedelta(days=self.days))
        d = self.store.purge_bodies_later(before, by="retention")

        def done(batch):
            if batch.message_ids:
                self.purged += len(batch.message_ids)
                self._log.info("retention: purged the bodies of {n} message(s)", n=len(batch.message_ids))
                removal = threads.deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), remove_file_drops, self.data_dir, batch.file_drops
                )
                removal.addBoth(lambda _: self._next(0))  # the next batch now
                return removal
            self._next(self.INTERVAL)
            return None

        def failed(f):
            self._log.error("retention: purge failed: {error}", error=f.getErrorMessage())
            self._next(self.INTERVAL)

        d.addCallbacks(done, failed)
        return d
