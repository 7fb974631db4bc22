"""Work waiting on a person: the outbox and its dead letters (retry, cancel), and the review queue (accept, reject).

The actions are the CLI's: :meth:`Store.requeue_notifications` and
:meth:`Store.cancel_notifications` (``herald outbox retry/cancel``),
:func:`gateway.app.operations.accept_review` and ``reject_review``
(``herald review accept/reject``), each naming the console user as who did it.
The outbox names recipients and destinations, no patient; the review queue
shows patients and candidates, and is audited.
"""

from __future__ import annotations

import json

from gateway.app.console.exchange import ConsoleResponse, PageError, Visit
from gateway.app.console.html import badge, choice, esc, href, page, post_button, section, table, url
from gateway.app.operations import OperationError, accept_review, reject_review
from gateway.errors import HeraldError
from gateway.records import DEAD, NOTIFICATION_STATES, PENDING, RETRYING
from gateway.store import list_outbox, list_reviews, outbox_counts, roster_member

__all__ = ["cancel_action", "outbox_page", "retry_action", "review_action", "reviews_page"]


def notification_actions(visit: Visit, n: dict, back: str, resend: str = "Retry") -> list[str]:
    """The buttons a notification in state ``n["state"]`` offers: send again (dead or retrying), cancel (unsent)."""
    actions = []
    if n["state"] in (DEAD, RETRYING):
        actions.append(post_button(visit, "/notifications/retry", resend, {"ids": n["id"], "back": back}))
    if n["state"] in (PENDING, RETRYING, DEAD):
        actions.append(
            post_button(
                visit,
                "/notifications/cancel",
                "Cancel",
                {"ids": n["id"], "back": back},
                confirm="Cancel this notification? It will never be sent.",
                cls="danger",
            )
        )
    return actions


def local_path(target: str, default: str) -> str:
    """``target`` if it is a path on this console (never another site: no scheme, no ``//``); else ``default``."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


# -- the outbox ---------------------------------------------------------------------------------


def outbox_page(visit: Visit):
    """``GET /outbox``: counts per destination and state, and the notifications of one state (dead by default)."""
    state = visit.request.arg("state", DEAD)
    if state != "all" and state not in NOTIFICATION_STATES:
        raise PageError(400, f"state: {state!r} is not one of {', '.join(NOTIFICATION_STATES)} or all")
    destination = visit.request.arg("destination")
    counts: dict[str, dict[str, int]] = {}
    for target, st, count in outbox_counts(visit.conn):
        counts.setdefault(target, {})[st] = count
    count_rows = [
        [f'<a href="{href("/outbox", destination=target, state="all")}">{esc(target)}</a>']
        + [
            f'<a href="{href("/outbox", destination=target, state=st)}">{states.get(st, 0)}</a>'
            if states.get(st)
            else "0"
            for st in NOTIFICATION_STATES
        ]
        for target, states in sorted(counts.items())
    ]
    rows = []
    back = url("/outbox", state=state, destination=destination)
    for n in list_outbox(visit.conn, None if state == "all" else state, destination or None, limit=200):
        actions = notification_actions(visit, n, back)
        rows.append(
            [
                f"<code>{esc(n['id'][:8])}</code>",
                f'<a href="/messages/{n["message_id"]}">{n["message_id"]}</a>',
                esc(n["recipient_role"]),
                esc(n["recipient"]),
                esc(f"{n['channel']} {n['target']}"),
                badge(n["state"]),
                esc(n["attempts"]),
                esc(n["last_error"] or ""),
                esc(n["updated_at"][:19].replace("T", " ")),
                " ".join(actions),
            ]
        )
    filters = " ".join(
        choice(href("/outbox", state=st, destination=destination), st, st == state)
        for st in (*NOTIFICATION_STATES, "all")
    )
    dead_total = sum(states.get(DEAD, 0) for states in counts.values())
    retry_all = (
        post_button(
            visit,
            "/notifications/retry",
            f"Retry all {dead_total} dead letters",
            {"all_dead": "1", "back": back},
            confirm=f"Send all {dead_total} dead notifications again?",
        )
        if dead_total
        else ""
    )
    title = f"{state} notifications" + (f" to {destination}" if destination else "")
    body = (
        section(
            "By destination", table(["Destination", *NOTIFICATION_STATES], count_rows, "the outbox is empty"), "counts"
        )
        + f'<p class="filters">Show: {filters}</p>'
        + section(
            title,
            retry_all
            + table(
                ["Id", "Message", "Role", "Recipient", "Channel", "State", "Attempts", "Last error", "Updated", ""],
                rows,
                f"no {state} notifications",
            ),
            "list",
        )
    )
    return page("Outbox", body, visit, "/outbox")


def retry_action(visit: Visit) -> ConsoleResponse:
    """``POST /notifications/retry``: make the given dead (or retrying) notifications, or every dead one, due now."""
    ids = visit.request.fields("ids")
    every = visit.request.field("all_dead") == "1"
    if not ids and not every:
        raise PageError(400, "ids: name the notifications to retry (or all_dead)")
    done = visit.store.requeue_notifications(None if every else ids, by=visit.who)
    missing = sorted(set(ids) - set(done))
    visit.say(
        f"Requeued {len(done)} notification(s): the server sends them at its next poll."
        + (f" Not dead or retrying: {', '.join(i[:8] for i in missing)}." if missing else "")
    )
    return ConsoleResponse.redirect(local_path(visit.request.field("back"), "/outbox"))


def cancel_action(visit: Visit) -> ConsoleResponse:
    """``POST /notifications/cancel``: cancel notifications not yet sent (never sent afterwards)."""
    ids = visit.request.fields("ids")
    if not ids:
        raise PageError(400, "ids: name the notifications to cancel")
    done = visit.store.cancel_notifications(ids, by=visit.who)
    missing = sorted(set(ids) - set(done))
    visit.say(
        f"Cancelled {len(done)} notification(s)."
        + (f" Already sent or unknown: {', '.join(i[:8] for i in missing)}." if missing else "")
    )
    return ConsoleResponse.redirect(local_path(visit.request.field("back"), "/outbox"))


# -- the review queue ------------------------------------------------------------------------------


def _patient(bundle_json: str | None) -> list[tuple[str, str]]:
    """What the message says about its patient, from its Bundle: name, birth date, sex, identifiers."""
    if not bundle_json:
        return [("Patient", "(no Bundle)")]
    try:
        bundle = json.loads(bundle_json)
    except ValueError:
        return [("Patient", "(the stored Bundle is unreadable)")]
    for entry in bundle.get("entry", ()):
        p = entry.get("resource") or {}
        if p.get("resourceType") != "Patient":
            continue
        name = (p.get("name") or [{}])[0]
        full = " ".join([*(name.get("given") or []), name.get("family", "")]).strip() or "(no name)"
        ids = ", ".join(
            f"{i.get('value')} ({(i.get('assigner') or {}).get('display') or i.get('system', '')})"
            for i in p.get("identifier") or ()
        )
        return [("Name", full), ("Born", p.get("birthDate", "")), ("Sex", p.get("gender", "")), ("Identifiers", ids)]
    return [("Patient", "(none in the Bundle)")]


def _member_cells(member: dict | None) -> tuple[str, str]:
    if member is None:
        return "(no longer on the roster)", ""
    name = " ".join(x for x in (member.get("first_name"), member.get("middle_name"), member.get("last_name")) if x)
    return name, member.get("birth_date", "")


def reviews_page(visit: Visit):
    """``GET /reviews``: the review queue (open by default): each message's patient and its candidates; audited."""
    state = visit.request.arg("state", "open")
    if state not in ("open", "accepted", "rejected", "all"):
        raise PageError(400, f"state: {state!r} is not one of open, accepted, rejected, all")
    items = list_reviews(visit.conn, None if state == "all" else state, 100)
    if items:
        visit.audit("review list", [item["message_id"] for item in items])
    roster = visit.roster()
    parts = []
    for item in items:
        patient = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _patient(item.get("fhir")))
        rows = []
        for c in item["candidates"]:
            name, born = _member_cells(roster_member(roster, c["aco_id"], c["member_id"]))
            accept = ""
            if item["state"] == "open":
                accept = post_button(
                    visit,
                    f"/reviews/{item['id']}/accept",
                    "Accept this member",
                    {"member_id": c["member_id"], "aco_id": c["aco_id"]},
                    confirm=f"Accept {c['member_id']}: notify the member's PCP and care team now?",
                )
            rows.append(
                [
                    f'<a href="{href("/roster/member", aco=c["aco_id"], id=c["member_id"])}">{esc(c["member_id"])}</a>',
                    esc(c["aco_id"]),
                    esc(name),
                    esc(born),
                    f'<span class="num">{c["score"]:.2f}</span>',
                    esc(c["grade"]),
                    accept,
                ]
            )
        decided = ""
        if item["state"] != "open":
            chosen = f" → member {item['member_id']} of ACO {item['aco_id']}" if item["member_id"] else ""
            why = f": {item['note']}" if item.get("note") else ""
            decided = f"<p>{esc(item['state'])} by {esc(item['decided_by'])} at {esc(item['decided_at'])}"
            decided += f"{esc(chosen)}{esc(why)}</p>"
        else:
            decided = (
                f'<form method="post" action="/reviews/{item["id"]}/reject" class="inline" '
                'data-confirm="Reject: none of these is the patient?">'
                f'<input type="hidden" name="csrf" value="{esc(visit.csrf)}">'
                '<input type="text" name="reason" placeholder="why (kept in the audit trail)">'
                '<button type="submit" class="danger">Reject: none of these</button></form>'
            )
        score = "" if item["score"] is None else f", score {item['score']:.2f}"
        parts.append(
            f'<article class="review" id="review-{item["id"]}"><h3>Review {item["id"]} {badge(item["state"])} · '
            f'message <a href="/messages/{item["message_id"]}">{item["message_id"]}</a> '
            f"({esc(item['trigger_event'])}, control id {esc(item['control_id'])}, received "
            f"{esc(item['received_at'][:19].replace('T', ' '))}) · {esc(item['grade'])}{esc(score)}</h3>"
            f'<dl class="facts">{patient}</dl>'
            + table(["Candidate", "ACO", "Name", "Born", "Score", "Grade", ""], rows, "no candidates")
            + decided
            + "</article>"
        )
    filters = " ".join(
        choice(href("/reviews", state=st), st, st == state) for st in ("open", "accepted", "rejected", "all")
    )
    body = f'<p class="filters">Show: {filters}</p>' + ("".join(parts) or f'<p class="empty">no {state} reviews</p>')
    return page("Review queue", body, visit, "/reviews")


def review_action(visit: Visit, review_id: int, decision: str) -> ConsoleResponse:
    """``POST /reviews/<id>/accept`` or ``/reject``: decide a review as ``herald review`` does."""
    try:
        if decision == "accept":
            member_id = visit.request.field("member_id") or None
            aco_id = visit.request.field("aco_id") or None
            done = accept_review(
                visit.store, visit.roster(), visit.config, review_id, by=visit.who, member_id=member_id, aco_id=aco_id
            )
            roles = ", ".join(done.roles) or "none"
            visit.say(
                f"Review {review_id} accepted: message {done.message_id} is member {done.member_id} of ACO "
                f"{done.aco_id}; notifications queued: {roles}; message now {done.state}."
                + (" The member opted out of data sharing: no PCP or care-team notification." if done.opted_out else "")
            )
        else:
            done = reject_review(visit.store, review_id, by=visit.who, reason=visit.request.field("reason").strip())
            visit.say(f"Review {review_id} rejected: message {done.message_id} now {done.state}.")
    except OperationError as e:
        raise PageError(400 if e.bad_input else 409, str(e)) from None
    except HeraldError as e:
        raise PageError(409, str(e)) from None
    return ConsoleResponse.redirect(f"/reviews?state=all#review-{review_id}")
