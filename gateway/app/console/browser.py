"""The message browser: search the log, and one message's page (raw v2 with field names, FHIR, match, deliveries).

Both read through the store's functions (:mod:`gateway.store.console` for the
search, :func:`gateway.app.operations.message_view` for a message, as ``herald
log show`` does). A search by patient and every message page are audited
(``phi-read`` by the console, naming the user) before anything is shown.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from gateway.app.console.exchange import PageError, Visit
from gateway.app.console.html import badge, esc, href, page, section, table
from gateway.app.console.queues import notification_actions
from gateway.app.operations import OperationError, ack_said, message_view
from gateway.conversion.fieldnames import field_info
from gateway.errors import StoreError
from gateway.records import MESSAGE_STATES
from gateway.store.console import (
    MessageSearch,
    index_status,
    normalise_term,
    review_of_message,
    search_messages,
)
from gateway.store.reviews import stored_match

__all__ = ["message_page", "messages_page", "search_from"]

#: The search form: (query field, label, the blind index's kind or None for a plain column).
PATIENT_FIELDS = (
    ("mrn", "MRN", "mrn"),
    ("mbi", "MBI", "mbi"),
    ("family", "Family name", "family"),
    ("given", "Given name", "given"),
    ("birth", "Birth date", "birth"),
)
_WHEN = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?")
_TRIGGER = re.compile(r"[A-Z]\d{2}")


def _moment(name: str, text: str) -> str:
    """A date or date and time typed in the form (UTC) as the log stores times; PageError naming the field."""
    if not text:
        return ""
    if not _WHEN.fullmatch(text):
        raise PageError(400, f"{name}: not a date or a date and time (YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC)")
    moment = datetime.fromisoformat(text.replace(" ", "T")).replace(tzinfo=UTC)
    return moment.isoformat(timespec="milliseconds")


def search_from(visit: Visit) -> MessageSearch:
    """The search the query string asks for; :class:`PageError` (400) naming the field that is wrong."""
    r = visit.request
    terms = []
    for name, label, kind in PATIENT_FIELDS:
        typed = r.arg(name)
        if not typed:
            continue
        value = normalise_term(kind, typed)
        if not value:
            raise PageError(400, f"{label}: {typed!r} holds nothing to search by")
        terms.append((kind, value))
    event = r.arg("event").upper()
    message_type, trigger = "", ""
    if "^" in event:
        message_type, _, trigger = event.partition("^")
    elif _TRIGGER.fullmatch(event):
        trigger = event
    else:
        message_type = event
    state = r.arg("state")
    if state and state not in MESSAGE_STATES:
        raise PageError(400, f"state: {state!r} is not one of {', '.join(MESSAGE_STATES)}")
    return MessageSearch(
        terms=tuple(terms),
        control_id=r.arg("control"),
        sender=r.arg("sender"),
        message_type=message_type,
        trigger_event=trigger.split("^")[0],
        state=state,
        since=_moment("since", r.arg("since")),
        until=_moment("until", r.arg("until")),
    )


def _page_id(visit: Visit, name: str) -> int | None:
    text = visit.request.arg(name)
    if not text:
        return None
    if not text.isdigit():
        raise PageError(400, f"{name}: a message id (digits)")
    return int(text)


def _search_form(visit: Visit) -> str:
    r = visit.request

    def box(name: str, label: str, kind: str = "text", hint: str = "") -> str:
        return (
            f'<label>{esc(label)}<input type="{kind}" name="{name}" value="{esc(r.arg(name))}"'
            f"{f' placeholder={chr(34)}{esc(hint)}{chr(34)}' if hint else ''}></label>"
        )

    states = "".join(
        f'<option value="{esc(s)}"{" selected" if r.arg("state") == s else ""}>{esc(s or "any")}</option>'
        for s in ("", *MESSAGE_STATES)
    )
    patient = "".join(box(name, label) for name, label, _ in PATIENT_FIELDS[:4]) + box(
        "birth", "Birth date", hint="YYYY-MM-DD"
    )
    message = (
        box("control", "Control id (MSH-10)")
        + box("sender", "Sender", hint="APP|FACILITY")
        + box("event", "Event", hint="A01 or ADT^A01")
        + f'<label>State<select name="state">{states}</select></label>'
        + box("since", "Received from (UTC)", hint="YYYY-MM-DD HH:MM")
        + box("until", "until (UTC)", hint="YYYY-MM-DD HH:MM")
    )
    return (
        '<form method="get" action="/messages" class="search">'
        f"<fieldset><legend>Patient</legend>{patient}</fieldset>"
        f"<fieldset><legend>Message</legend>{message}</fieldset>"
        '<button type="submit">Search</button> <a href="/messages">Clear</a></form>'
    )


def messages_page(visit: Visit):
    """``GET /messages``: the search form and a page of results, newest first."""
    try:
        query = search_from(visit)
        before, after = _page_id(visit, "before"), _page_id(visit, "after")
    except PageError as e:
        body = _search_form(visit) + f'<p class="error">{esc(e.message)}</p>'
        return page("Messages", body, visit, "/messages", status=e.status)
    try:
        found = search_messages(visit.conn, query, before=before, after=after)
    except StoreError as e:
        raise PageError(400, str(e)) from None
    if query.reads_phi:
        # Which messages are this patient's is itself about the patient: audited like a read.
        visit.audit("message search", [r["id"] for r in found.rows], kinds=[k for k, _ in query.terms])
    rows = []
    for r in found.rows:
        mtype = f"{r['message_type']}^{r['trigger_event']}" if r["message_type"] else "-"
        notes = (f"[{r['flag']}] " if r["flag"] else "") + (r["reason"] or "")
        rows.append(
            [
                f'<a href="/messages/{r["id"]}">{r["id"]}</a>',
                esc(r["received_at"][:19].replace("T", " ")),
                esc(f"{r['sending_application']}|{r['sending_facility']}"),
                esc(mtype),
                esc(r["control_id"] or "-"),
                badge(r["state"]),
                esc(notes),
            ]
        )
    params = {k: v[0] for k, v in visit.request.query.items() if k not in ("before", "after") and v and v[0]}
    links = []
    if found.newer is not None:
        links.append(f'<a href="{href("/messages", **params, after=found.newer)}" rel="prev">Newer</a>')
    if found.older is not None:
        links.append(f'<a href="{href("/messages", **params, before=found.older)}" rel="next">Older</a>')
    note = ""
    status = index_status(visit.conn)
    if query.reads_phi and status["backfill_through"] < status["backfill_to"]:
        note = (
            f'<p class="notice">The patient index is still being built for messages stored before it existed: '
            f"{status['backfill_through']:,} of {status['backfill_to']:,} done; older messages may be missing "
            "from these results.</p>"
        )
    body = (
        _search_form(visit)
        + note
        + table(["Id", "Received (UTC)", "Sender", "Type", "Control id", "State", "Notes"], rows, "no messages found")
        + f'<p class="pages">{" · ".join(links)}</p>'
    )
    return page("Messages", body, visit, "/messages")


# -- one message -------------------------------------------------------------------------


def _fields(segments: list[str], version: str) -> tuple[str, list[list[str]]]:
    """The raw message with each field named on hover, and a table row per non-empty field (from hl7apy)."""
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 4:
        return "".join(f"<div>{esc(s)}</div>" for s in segments), []
    fs = segments[0][3]
    lines, rows = [], []
    for segment in segments:
        parts = segment.split(fs)
        name = parts[0]
        cells = [f'<span class="seg">{esc(name)}</span>']
        for index, value in enumerate(parts[1:], 1):
            number = index + 1 if name == "MSH" else index  # MSH-1 is the separator itself
            info = field_info(name, number, version or "2.5.1") if len(name) == 3 else None
            label = f"{name}-{number}" + (f" {info[0]} ({info[1]})" if info else "")
            cells.append(f'<span class="f" title="{esc(label)}" data-field="{esc(name)}-{number}">{esc(value)}</span>')
            if value:
                rows.append(
                    [
                        esc(f"{name}-{number}"),
                        esc(f"{info[0]} ({info[1]})" if info else "(not defined in this version)"),
                        f"<code>{esc(value)}</code>",
                    ]
                )
        lines.append(f'<div class="segment">{esc(fs).join(cells)}</div>')
    return "".join(lines), rows


def _match_section(visit: Visit, message_id: int, match: dict | None) -> str:
    if match is None:
        return "<p>No match yet.</p>"
    score = "" if match["score"] is None else f", score {match['score']:.2f}"
    member = ""
    if match["member_id"]:
        link = href("/roster/member", aco=match["aco_id"], id=match["member_id"])
        member = f': member <a href="{link}">{esc(match["member_id"])}</a> of ACO {esc(match["aco_id"])}'
    out = f"<p><strong>{esc(match['grade'])}</strong> by {esc(match['method'])}{esc(score)}{member}</p>"
    detail = match["detail"] or {}
    weights = sorted((detail.get("fields") or {}).items(), key=lambda kv: -kv[1][1])
    if weights:
        rows = [[esc(f), esc(level), f'<span class="num">{weight:+.2f}</span>'] for f, (level, weight) in weights]
        out += "<h3>Field weights (the best candidate)</h3>" + table(["Field", "Agreement", "Weight"], rows)
    facts = [(k, v) for k, v in detail.items() if k != "fields"]
    if facts:
        out += '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(json.dumps(v))}</dd>" for k, v in facts)
        out += "</dl>"
    review = review_of_message(visit.conn, message_id)
    if review is not None:
        out += (
            f'<p>Review <a href="{href("/reviews", state="all")}#review-{review["id"]}">{review["id"]}</a>: '
            f"{badge(review['state'])}</p>"
        )
    return out


def _notifications_section(visit: Visit, message_id: int, notifications: list[dict], attempts: list[dict]) -> str:
    back = f"/messages/{message_id}"
    rows = []
    for n in notifications:
        actions = notification_actions(visit, n, back, resend="Resend")
        rows.append(
            [
                f"<code>{esc(n['id'][:8])}</code>",
                esc(n["recipient_role"]),
                esc(n["recipient"]),
                esc(f"{n['channel']} {n['target']}"),
                badge(n["state"]),
                esc(n["attempts"]),
                esc(n["last_error"] or ""),
                " ".join(actions),
            ]
        )
    out = table(
        ["Id", "Role", "Recipient", "Channel", "State", "Attempts", "Last error", ""],
        rows,
        "no notifications",
    )
    attempt_rows = [
        [
            esc(a["at"][:23].replace("T", " ")),
            f"<code>{esc(a['notification_id'][:8])}</code>",
            esc(a["attempt"]),
            badge(a["outcome"]),
            esc(a.get("status") or ""),
            esc("" if a.get("elapsed_ms") is None else f"{a['elapsed_ms']} ms"),
            esc(a["detail"] or ""),
        ]
        for a in attempts
    ]
    out += "<h3>Delivery attempts</h3>" + table(
        ["At (UTC)", "Notification", "#", "Outcome", "Status", "Took", "Detail"], attempt_rows, "no attempts yet"
    )
    return out


def message_page(visit: Visit, message_id: int):
    """``GET /messages/<id>``: everything about one message; audited before it is shown."""
    try:
        view = message_view(visit.conn, message_id)
    except OperationError as e:
        raise PageError(404, str(e)) from None
    visit.audit("message page", [message_id])
    detail, m = view.detail, view.detail["message"]
    warning = ""
    if detail.get("integrity"):
        warning = (
            f'<p class="error">Message {m["id"]}: {esc(detail["integrity"])}. Run <code>herald audit verify</code>.</p>'
        )
    facts = [
        ("State", badge(m["state"]) + (f" {esc(view.reason)}" if view.reason else "")),
        ("Received (UTC)", esc(m["received_at"])),
        ("From", esc(m["peer"])),
        ("Sender", esc(f"{m['sending_application']}|{m['sending_facility']}")),
        ("Type", esc(f"{m['message_type']}^{m['trigger_event']} v{m['version']}")),
        ("Control id", esc(m["control_id"])),
        ("Answer", esc(ack_said(m, detail["events"]))),
    ]
    if m["flag"]:
        facts.append(("Flag", esc(m["flag"])))
    summary = '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
    if m.get("purged_at"):
        raw = f"<p>The body was purged (retention) at {esc(m['purged_at'])}.</p>"
        field_rows: list[list[str]] = []
    else:
        lines, field_rows = _fields(view.segments, m["version"] or "")
        raw = (
            '<p class="hint">Point at a field for its name; click it to find it in the table below.</p>'
            f'<div class="raw" id="raw-v2">{lines}</div>'
        )
    fields = "<details open><summary>Fields by name</summary>" + table(
        ["Field", "Name", "Value"], field_rows, "no fields", cls="fields"
    )
    fields += "</details>"
    if m["fhir"]:
        pretty = json.dumps(json.loads(m["fhir"]), indent=2, ensure_ascii=False)
        fhir = f'<pre class="json" id="fhir">{esc(pretty)}</pre>'
    else:
        fhir = "<p>(purged)</p>" if m.get("purged_at") else "<p>(not converted)</p>"
    events = sorted(detail["events"], key=lambda e: (e["at"], e["id"]))
    event_rows = [
        [esc(e["at"][:23].replace("T", " ")), esc(e["actor"]), esc(e["kind"]), f"<code>{esc(e['detail'] or '')}</code>"]
        for e in events
    ]
    body = (
        warning
        + summary
        + section("Raw HL7 v2", raw + fields, "raw")
        + section("FHIR Bundle", fhir, "fhir-bundle")
        + section("Match", _match_section(visit, m["id"], stored_match(visit.conn, m["id"])), "match")
        + section(
            "Notifications",
            _notifications_section(visit, m["id"], detail["notifications"], detail["attempts"]),
            "notifications",
        )
        + section("Audit events", table(["At (UTC)", "Actor", "Event", "Detail"], event_rows), "events")
        + warning
    )
    return page(f"Message {m['id']}", body, visit, "/messages")
