"""The roster: find a member (by id, MBI, MRN, or by name as matching finds people), a member's page with the
messages matched to them (who matched), and the roster's versions.

A name search runs the matcher itself (:func:`gateway.matching.match_patient`
over the published roster, as of today), so a member is found the way a
message would find them, misspellings and nicknames included. Members'
demographics are PHI: every search and member page is audited.
"""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.app.console.exchange import PageError, Visit
from gateway.app.console.html import badge, esc, href, page, section, table
from gateway.matching import PatientQuery, make_person, match_patient
from gateway.pipeline.process import MatchPolicy
from gateway.store import StoredRoster, roster_imports, roster_member
from gateway.store.console import member_messages, members_by_identifier

__all__ = ["member_page", "roster_page"]

_KINDS = (("member", "Member id"), ("mbi", "MBI"), ("mrn", "MRN"))


def _name(member: dict) -> str:
    return " ".join(x for x in (member.get("first_name"), member.get("middle_name"), member.get("last_name")) if x)


def _member_rows(members: list[dict], scores: dict | None = None) -> list[list[str]]:
    rows = []
    for m in members:
        link = href("/roster/member", aco=m["aco_id"], id=m["member_id"])
        row = [
            f'<a href="{link}">{esc(m["member_id"])}</a>',
            esc(m["aco_id"]),
            esc(_name(m)),
            esc(m.get("birth_date", "")),
            esc(m.get("pcp_name", "")),
            esc(f"{m.get('effective_start') or '…'} to {m.get('effective_end') or '…'}"),
        ]
        if scores is not None:
            score, grade = scores[(m["aco_id"], m["member_id"])]
            row.append(f'<span class="num">{score:.2f}</span> {esc(grade)}')
        rows.append(row)
    return rows


def _search(visit: Visit, roster) -> tuple[str, list[dict], dict | None]:
    """(what was searched, members found, their scores for a name search); PageError naming a bad field."""
    r = visit.request
    kind, value = r.arg("kind", "member"), r.arg("value")
    family, given, birth = r.arg("family"), r.arg("given"), r.arg("birth")
    if value:
        if kind not in dict(_KINDS):
            raise PageError(400, f"kind: {kind!r} is not one of {', '.join(k for k, _ in _KINDS)}")
        return dict(_KINDS)[kind], members_by_identifier(roster, kind, value), None
    if family or given or birth:
        if not family or not (given or birth):
            raise PageError(400, "family: a name search needs the family name and the given name or the birth date")
        person = make_person(family=family, given=given, birth_date=birth)
        if not person.family:
            raise PageError(400, f"family: {family!r} holds no letters")
        policy = MatchPolicy.from_config(visit.config, roster.size())
        today = datetime.fromtimestamp(visit.now(), UTC).date().isoformat()
        match = match_patient(PatientQuery("", (), person), today, StoredRoster(roster), policy.model)
        members = [c.member for c in match.candidates]
        scores = {(c.member["aco_id"], c.member["member_id"]): (c.scored.total, c.grade) for c in match.candidates}
        return "name", members, scores
    return "", [], None


def roster_page(visit: Visit):
    """``GET /roster``: search members; the roster's versions."""
    roster = visit.roster()
    r = visit.request
    options = "".join(
        f'<option value="{k}"{" selected" if r.arg("kind") == k else ""}>{esc(label)}</option>' for k, label in _KINDS
    )
    form = (
        '<form method="get" action="/roster" class="search">'
        f'<fieldset><legend>By identifier</legend><label>Kind<select name="kind">{options}</select></label>'
        f'<label>Value<input type="text" name="value" value="{esc(r.arg("value"))}"></label></fieldset>'
        "<fieldset><legend>By name (as matching compares people)</legend>"
        f'<label>Family name<input type="text" name="family" value="{esc(r.arg("family"))}"></label>'
        f'<label>Given name<input type="text" name="given" value="{esc(r.arg("given"))}"></label>'
        f'<label>Birth date<input type="text" name="birth" value="{esc(r.arg("birth"))}" placeholder="YYYY-MM-DD">'
        '</label></fieldset><button type="submit">Find</button></form>'
    )
    try:
        searched, members, scores = _search(visit, roster)
    except PageError as e:
        return page("Roster", form + f'<p class="error">{esc(e.message)}</p>', visit, "/roster", status=e.status)
    results = ""
    if searched:
        visit.audit("roster search", [], by_kind=searched, members=len(members))
        headers = ["Member", "ACO", "Name", "Born", "PCP", "Attributed"] + (["Score"] if scores is not None else [])
        results = section(
            f"Members found by {searched}", table(headers, _member_rows(members, scores), "no member found"), "found"
        )
    versions = [
        [
            esc(v["id"]),
            esc(v["imported_at"][:19].replace("T", " ")),
            esc(v["aco_ids"]),
            esc(v["effective_date"] or "-"),
            esc(v["added"]),
            esc(v["changed"]),
            esc(v["ended"]),
            esc(v["rejected"]),
            esc(f"{v['file']} ({v['format']}, {v['mode']}, by {v['imported_by']})"),
        ]
        for v in roster_imports(roster, 20)
    ]
    body = (
        form
        + results
        + section(
            "Versions",
            table(
                ["Version", "Imported (UTC)", "ACO", "Effective", "Added", "Changed", "Ended", "Rejected", "File"],
                versions,
                "no roster imported yet",
            ),
            "versions",
        )
    )
    return page("Roster", body, visit, "/roster")


_SHOWN = (
    ("member_id", "Member id"),
    ("aco_id", "ACO"),
    ("mbi", "MBI"),
    ("mrn", "MRN"),
    ("mrn_authority", "MRN authority"),
    ("birth_date", "Born"),
    ("sex", "Sex"),
    ("address_line", "Address"),
    ("city", "City"),
    ("state", "State"),
    ("zip", "ZIP"),
    ("phone", "Phone"),
    ("pcp_name", "PCP"),
    ("pcp_npi", "PCP NPI"),
    ("care_manager", "Care manager"),
    ("effective_start", "Attributed from"),
    ("effective_end", "Attributed until"),
    ("opted_out", "Opted out of sharing"),
)


def member_page(visit: Visit):
    """``GET /roster/member?aco=&id=``: one member and the messages matched to them; audited."""
    aco_id, member_id = visit.request.arg("aco"), visit.request.arg("id")
    if not aco_id or not member_id:
        raise PageError(400, "aco, id: a member is named by ACO and member id")
    member = roster_member(visit.roster(), aco_id, member_id)
    matched = member_messages(visit.conn, aco_id, member_id)
    if member is None and not matched:
        raise PageError(404, f"no member {member_id} of ACO {aco_id} on the roster")
    visit.audit("roster member", [m["id"] for m in matched], aco=aco_id, member=member_id)
    facts = ""
    if member is not None:
        facts = '<dl class="facts">' + "".join(
            f"<dt>{esc(label)}</dt><dd>{esc(member.get(key, ''))}</dd>" for key, label in _SHOWN if member.get(key)
        )
        facts += "</dl>"
    else:
        facts = '<p class="notice">No longer on the published roster; its matched messages are below.</p>'
    rows = [
        [
            f'<a href="/messages/{m["id"]}">{m["id"]}</a>',
            esc(m["received_at"][:19].replace("T", " ")),
            esc(f"{m['sending_application']}|{m['sending_facility']}"),
            esc(f"{m['message_type']}^{m['trigger_event']}"),
            esc(m["control_id"]),
            badge(m["state"]),
            esc(f"{m['grade']} by {m['method']}"),
        ]
        for m in matched
    ]
    title = _name(member) if member else member_id
    body = facts + section(
        "Messages matched to this member",
        table(["Id", "Received (UTC)", "Sender", "Type", "Control id", "State", "Match"], rows, "none yet"),
        "matched",
    )
    return page(f"Member {member_id}: {title}", body, visit, "/roster")
