"""``herald patient``, ``herald tasks`` and ``herald snf``: care transitions from the command line.

A member's timeline, the follow-up worklist and the SNF report are read from
the store (:mod:`gateway.store.transitions`, sealed values opened with the key
ring) and made by the stages of :mod:`gateway.transitions`. Each of these is a
view of patient data: it is recorded in the audit trail (``phi-read``) before
anything is shown, and nothing is shown when it cannot be.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from pathlib import Path

import click

from gateway.app.cli import _audit_read, _config, _keys, _read_conn, _who, config_option, data_option
from gateway.transitions.episodes import episode_from_dict, timeline
from gateway.transitions.snf import snf_report, snf_report_csv
from gateway.transitions.worklist import task_status

__all__ = ["patient", "report_lines", "snf", "task_lines", "tasks", "tasks_csv", "timeline_lines"]


def _today(cfg, on: str | None) -> date:
    """``--on``, else today in the configured time zone."""
    if on:
        try:
            return date.fromisoformat(on)
        except ValueError:
            raise click.BadParameter(f"{on!r} is not a date (YYYY-MM-DD)", param_hint="--on") from None
    return datetime.now(cfg.tzinfo).date()


def _date_option(value: str, name: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)", param_hint=name) from None


# -- herald patient timeline ---------------------------------------------------------------------


@click.group()
def patient():
    """A member's care across every connected facility."""


def timeline_lines(member_id: str, aco_id: str, stays: list[dict]) -> list[str]:
    """What ``herald patient timeline`` prints: one line a stay, where the patient went after it, its flags."""
    lines = [f"member {member_id} ({aco_id}): {len(stays)} stay{'s' if len(stays) != 1 else ''}"]
    if not stays:
        return lines
    header = ("start", "end", "setting", "facility", "visit", "then", "flags")
    rows = [
        (
            s["start"][:16].replace("T", " "),
            (s["end"][:16].replace("T", " ") + (" (assumed)" if s["ended"] == "assumed" else "")) if s["end"] else "",
            s["setting"],
            s["facility"],
            s["visit"],
            s["then"],
            ", ".join(s.get("flags", ())),
        )
        for s in stays
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return lines


@patient.command("timeline")
@click.argument("member_id", metavar="MEMBER")
@click.option("--aco", "aco_id", default=None, help="The member's ACO, when the member id is on several rosters.")
@click.option("--json", "as_json", is_flag=True, help="The stays as JSON.")
@config_option
@data_option
def patient_timeline(member_id, aco_id, as_json, config_path, data_dir):
    """Print a member's stays (ED, inpatient, observation, SNF) in time order and where they went after each."""
    from gateway.store.transitions import episodes_of, member_acos

    cfg = _config(config_path, data_dir)
    keys = _keys(cfg)
    conn = _read_conn(cfg, keys)
    try:
        acos = [aco_id] if aco_id else member_acos(conn, member_id)
        if not acos:
            raise click.ClickException(f"no stays are recorded for member {member_id}")
        if len(acos) > 1:
            raise click.ClickException(
                f"member {member_id} is on several ACOs' rosters ({', '.join(acos)}): give --aco"
            )
        rows = episodes_of(conn, acos[0], member_id)
    finally:
        conn.close()
    episodes = [episode_from_dict(r["state"]) for r in rows]
    flags = {(r["state"]["facility"], r["state"]["visit"]): r["state"].get("flags", []) for r in rows}
    stays = [{**s, "flags": flags.get((s["facility"], s["visit"]), [])} for s in timeline(episodes)]
    messages = sorted({m for e in episodes for m in e.messages})
    _audit_read(cfg, keys, "patient timeline", messages, aco=acos[0], member=member_id)
    if as_json:
        click.echo(json.dumps({"aco_id": acos[0], "member_id": member_id, "stays": stays}, indent=2))
        return
    for line in timeline_lines(member_id, acos[0], stays):
        click.echo(line)


# -- herald tasks -----------------------------------------------------------------------------------


@click.group()
def tasks():
    """The follow-up worklist: tasks each discharge (and, per ACO, each ED visit) makes, with due dates."""


def _task_view(row: dict, today: date) -> dict:
    """A task as the list and the CSV show it."""
    task = row["resource"]
    encounter = ((task.get("encounter") or {}).get("identifier")) or {}
    return {
        "id": row["id"],
        "aco_id": row["aco_id"],
        "member_id": row["member_id"],
        "code": row["code"],
        "title": task.get("description", ""),
        "start": task["restriction"]["period"]["start"],
        "due": task["restriction"]["period"]["end"],
        "state": task_status(task, today),
        "status": task.get("status", ""),
        "reason": (task.get("statusReason") or {}).get("text", ""),
        "owner": (task.get("owner") or {}).get("display", ""),
        "facility": encounter.get("system", "").removeprefix("urn:herald:id:"),
        "visit": encounter.get("value", ""),
        "flags": next((n["text"].removeprefix("Flags: ") for n in task.get("note") or () if "text" in n), ""),
        "created_at": row["created_at"],
    }


def task_lines(views: list[dict]) -> list[str]:
    """What ``herald tasks list`` prints: one line a task (its id's first 8 characters are enough for ``done``)."""
    if not views:
        return ["no tasks"]
    header = ("id", "member", "aco", "task", "due", "state", "owner")
    rows = [(v["id"][:8], v["member_id"], v["aco_id"], v["code"], v["due"], v["state"], v["owner"]) for v in views]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def tasks_csv(views: Iterable[dict]) -> str:
    """The tasks as CSV, a row each (the export's ``--format csv``)."""
    columns = (
        "id",
        "aco_id",
        "member_id",
        "code",
        "title",
        "start",
        "due",
        "state",
        "status",
        "reason",
        "owner",
        "facility",
        "visit",
        "flags",
        "created_at",
    )
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for v in views:
        writer.writerow(v)
    return out.getvalue()


def _selected(cfg, keys, aco_id, everything):
    from gateway.store.transitions import task_rows

    conn = _read_conn(cfg, keys)
    try:
        return task_rows(conn, None if everything else ("requested",), aco_id or None)
    finally:
        conn.close()


@tasks.command("list")
@click.option("--due", is_flag=True, help="Only tasks due on the day (--on, default today).")
@click.option("--overdue", is_flag=True, help="Only tasks past their due day (with --due: both).")
@click.option("--aco", "aco_id", default=None, help="Only this ACO's members.")
@click.option("--member", "member_id", default=None, help="Only this member.")
@click.option("--all", "everything", is_flag=True, help="Done and cancelled tasks too.")
@click.option("--on", "on", default=None, help="The day to judge due and overdue by (YYYY-MM-DD; default today).")
@config_option
@data_option
def tasks_list(due, overdue, aco_id, member_id, everything, on, config_path, data_dir):
    """List worklist tasks with their due day and state (open, due, overdue; done, cancelled with --all)."""
    cfg = _config(config_path, data_dir)
    today = _today(cfg, on)
    keys = _keys(cfg)
    rows = _selected(cfg, keys, aco_id, everything)
    views = [_task_view(r, today) for r in rows if not member_id or r["member_id"] == member_id]
    wanted = {s for s, on_ in (("due", due), ("overdue", overdue)) if on_}
    if wanted:
        views = [v for v in views if v["state"] in wanted]
    _audit_read(cfg, keys, "tasks list", sorted({r["message_id"] for r in rows}), tasks=len(views))
    for line in task_lines(views):
        click.echo(line)


@tasks.command("done")
@click.argument("task_id", metavar="ID")
@click.option("--by", default=None, help="Who did it (for the audit trail; default: the login name).")
@config_option
@data_option
def tasks_done(task_id, by, config_path, data_dir):
    """Mark a task done (ID: its id, or the first characters of it that no other task shares)."""
    from gateway.app.operations import opened_store
    from gateway.store.transitions import task_rows

    cfg = _config(config_path, data_dir)
    keys = _keys(cfg)
    conn = _read_conn(cfg, keys)
    try:
        matches = [r["id"] for r in task_rows(conn, None) if r["id"].startswith(task_id.lower())]
    finally:
        conn.close()
    if not matches:
        raise click.ClickException(f"no task {task_id}")
    if len(matches) > 1:
        raise click.ClickException(f"{task_id} names {len(matches)} tasks: give more of the id")
    with opened_store(cfg.database, keys=keys) as store:
        before = store.complete_task(matches[0], by=_who(by))
    if before != "requested":
        raise click.ClickException(f"task {matches[0]} is already {'done' if before == 'completed' else before}")
    click.echo(f"task {matches[0]} done")


@tasks.command("export")
@click.option("--format", "fmt", type=click.Choice(["ndjson", "csv"]), default="ndjson", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="File.")
@click.option("--aco", "aco_id", default=None, help="Only this ACO's members.")
@click.option("--all", "everything", is_flag=True, help="Done and cancelled tasks too.")
@click.option("--on", "on", default=None, help="The day the CSV's state column is judged by (default today).")
@config_option
@data_option
def tasks_export(fmt, out_path, aco_id, everything, on, config_path, data_dir):
    """Write the tasks as FHIR Task resources (NDJSON, one a line) or as CSV (standard output, or --out)."""
    cfg = _config(config_path, data_dir)
    today = _today(cfg, on)
    keys = _keys(cfg)
    rows = _selected(cfg, keys, aco_id, everything)
    _audit_read(cfg, keys, "tasks export", sorted({r["message_id"] for r in rows}), tasks=len(rows), format=fmt)
    if fmt == "ndjson":
        text = "".join(json.dumps(r["resource"], sort_keys=True) + "\n" for r in rows)
    else:
        text = tasks_csv(_task_view(r, today) for r in rows)
    if out_path is None:
        click.echo(text, nl=False)
        return
    from gateway.store.files import create_private_file

    create_private_file(out_path)
    out_path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {len(rows)} task{'s' if len(rows) != 1 else ''} to {out_path}", err=True)


# -- herald snf report -------------------------------------------------------------------------------


@click.group()
def snf():
    """Skilled nursing facility stays: the report ACOs rank their SNF network by."""


def report_lines(ranked, too_few, start: date, end: date, min_stays: int) -> list[str]:
    """What ``herald snf report`` prints: the ranked table, then the SNFs with too few stays to rank."""
    lines = [f"SNF stays begun {start.isoformat()} to {end.isoformat()}"]
    header = ("rank", "snf", "stays", "open", "median LOS (d)", "rehospitalised 30d", "discharged home")

    def row(rank, f):
        los = "" if f.median_los_days is None else f"{f.median_los_days:.1f}"
        return (
            str(rank),
            f.snf,
            str(f.stays),
            str(f.open),
            los,
            f"{f.rehospitalised_30d} ({f.rehospitalisation_rate:.0%})",
            f"{f.discharged_home} of {f.closed} ({f.home_rate:.0%})",
        )

    rows = [row(i, f) for i, f in enumerate(ranked, 1)]
    apart = [row("-", f) for f in too_few]
    table = [header, *rows, *apart]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def fmt(r):
        return "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()

    lines += [fmt(header), *(fmt(r) for r in rows)]
    if not rows:
        lines.append(f"(no SNF has {min_stays} or more stays in the period)")
    if apart:
        lines.append(f"fewer than {min_stays} stays, not ranked:")
        lines += [fmt(r) for r in apart]
    return lines


@snf.command("report")
@click.option("--from", "start", required=True, help="First day of the period (YYYY-MM-DD).")
@click.option("--to", "end", required=True, help="Last day of the period, included (YYYY-MM-DD).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also CSV.")
@click.option("--min-stays", default=5, show_default=True, help="SNFs with fewer stays are listed apart, not ranked.")
@click.option("--aco", "aco_id", default=None, help="Only this ACO's members.")
@config_option
@data_option
def snf_report_command(start, end, csv_path, min_stays, aco_id, config_path, data_dir):
    """Per SNF, for the stays begun in the period: stays, median length of stay, re-hospitalisation within
    30 days of admission, discharges home; ranked by re-hospitalisation."""
    from gateway.store.transitions import snf_episodes

    first, last = _date_option(start, "--from"), _date_option(end, "--to")
    if last < first:
        raise click.BadParameter("must not be before --from", param_hint="--to")
    if min_stays < 1:
        raise click.BadParameter("must be at least 1", param_hint="--min-stays")
    cfg = _config(config_path, data_dir)
    keys = _keys(cfg)
    began = time.perf_counter()
    conn = _read_conn(cfg, keys)
    try:
        rows = snf_episodes(conn, aco_id)
    finally:
        conn.close()
    episodes = [episode_from_dict(r["state"]) for r in rows]
    tz = cfg.tzinfo
    period = (
        datetime.combine(first, datetime.min.time(), tz),
        datetime.combine(last + timedelta(days=1), datetime.min.time(), tz),
    )
    ranked, too_few = snf_report(episodes, *period, min_stays=min_stays)
    _audit_read(cfg, keys, "snf report", (), start=first.isoformat(), end=last.isoformat(), episodes=len(episodes))
    for line in report_lines(ranked, too_few, first, last, min_stays):
        click.echo(line)
    if csv_path is not None:
        csv_path.write_text(snf_report_csv(ranked, too_few), encoding="utf-8")
        click.echo(f"wrote {csv_path}")
    click.echo(f"({len(episodes)} episodes read in {time.perf_counter() - began:.2f} s)", err=True)
