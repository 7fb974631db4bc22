"""The ``herald`` command line. Thin: each command calls the library and turns
known errors into a clean message and exit code."""

from __future__ import annotations

import json
import sys
from datetime import UTC
from pathlib import Path

import click

from gateway.config import ROSTER_FORMATS
from gateway.errors import ConfigError, HeraldError, MessageError, RosterError
from gateway.records import MESSAGE_STATES

EXIT_BAD_INPUT = 2

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML configuration file (every setting has a default).",
)
data_option = click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the database and outputs (overrides server.data_dir).",
)


def _config(config_path, data_dir, listen=None):
    from gateway.config import load_config

    try:
        return load_config(config_path, data_dir=data_dir, listen=listen)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _read_conn(cfg):
    from gateway.store import StoreError, check_database, open_database
    from gateway.store.schema import NotAHeraldDatabase

    try:
        conn = open_database(cfg.database, readonly=True)
    except NotAHeraldDatabase as e:
        raise click.ClickException(str(e)) from None
    except StoreError as e:
        raise click.ClickException(f"{e} (is --data or --config right?)") from None
    try:
        check_database(conn)
    except StoreError as e:
        conn.close()
        raise click.ClickException(f"{cfg.database} is not a Herald database ({e})") from None
    return conn


def _roster_snapshot(cfg):
    """The roster as published now (empty before the first import)."""
    from gateway.store import StoreError, open_roster_snapshot

    try:
        return open_roster_snapshot(cfg.database)
    except StoreError as e:
        raise click.ClickException(str(e)) from None


@click.group()
@click.version_option(package_name="herald")
def main() -> None:
    """Herald: HL7 v2 ADT in over MLLP, FHIR encounter notifications out."""


# -- serve -------------------------------------------------------------------


@main.command()
@config_option
@click.option("--listen", multiple=True, help="Twisted endpoint, e.g. tcp:2575:interface=127.0.0.1 (repeatable).")
@data_option
def serve(config_path, listen, data_dir):
    """Run the gateway daemon until interrupted."""
    from twisted.internet import defer, task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from gateway.app.service import make_service
    from gateway.config import check_listen

    cfg = _config(config_path, data_dir, list(listen) or None)

    def run(reactor):
        try:
            check_listen(cfg.listen, reactor)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
        gw = make_service(cfg, reactor)
        gw.service.startService()
        done = defer.Deferred()

        def failed(f):
            click.echo(f"herald: could not listen: {f.getErrorMessage()}", err=True)
            gw.service.stopService()
            done.errback(SystemExit(1))

        d = defer.gatherResults([lst.ready for lst in gw.listeners], consumeErrors=True)
        d.addCallback(
            lambda _: click.echo(
                f"herald: serving on {', '.join(cfg.listen)} (ports {gw.listening_ports()}); data in {cfg.data_dir}",
                err=True,
            )
        )
        d.addErrback(lambda f: failed(f.value.subFailure if hasattr(f.value, "subFailure") else f))
        reactor.addSystemEventTrigger("before", "shutdown", gw.service.stopService)
        return done

    try:
        task.react(run)
    except SystemExit as e:
        if e.code not in (0, None):
            raise


# -- send --------------------------------------------------------------------


@main.command()
@click.argument("target", metavar="HOST:PORT")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for each ACK.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def send(target, paths, timeout, quiet):
    """Replay HL7 files or folders over MLLP; exit 1 unless every message got AA/CA."""
    from gateway.app.replay import ReplayError, collect_messages, replay

    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise click.UsageError(f"{target!r} is not HOST:PORT")
    try:
        messages = collect_messages(paths)
    except ReplayError as e:
        # Nothing is sent: the operator fixes (or leaves out) the files named and runs again.
        for line in str(e).splitlines():
            click.echo(f"herald send: {line}", err=True)
        click.echo("herald send: nothing was sent", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if not messages:
        click.echo("herald send: no HL7 messages (text starting with MSH) in the given paths", err=True)
        sys.exit(EXIT_BAD_INPUT)
    report = replay(host, int(port), messages, timeout=timeout, progress=not quiet)
    for line in report.failures:
        click.echo(line, err=True)
    click.echo(
        f"sent {report.sent}, accepted {report.accepted}, not accepted {report.sent - report.accepted}, "
        f"errors {report.errors} in {report.seconds:.2f} s"
    )
    sys.exit(0 if report.accepted == len(messages) else 1)


# -- convert -----------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@config_option
@click.option("--no-validate", is_flag=True, help="Skip the fhir.resources (R4B) validation.")
@click.option(
    "--explain",
    is_flag=True,
    help="Instead of the JSON, list each v2 field used (HL7 name, value, FHIR target) and those not mapped.",
)
def convert(file, config_path, no_validate, explain):
    """Convert the ADT message(s) in FILE to FHIR Bundle JSON on stdout."""
    from datetime import datetime

    from gateway.app.replay import ReplayError, collect_messages
    from gateway.conversion.convert import convert as convert_message
    from gateway.conversion.convert import validate_bundle
    from gateway.conversion.v2 import V2Message
    from gateway.conversion.vocabulary import load_vocabulary

    cfg = _config(config_path, None)
    try:
        vocab = load_vocabulary()
        messages = collect_messages([file])
    except (ReplayError, ConfigError) as e:
        for line in str(e).splitlines():
            click.echo(f"herald convert: {line}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    bundles = []
    explained: list[str] = []
    for where, raw in messages:
        try:
            msg = V2Message(raw)
            conversion = convert_message(msg, vocab, cfg.tzinfo, datetime.now(UTC), explain=explain)
            if not no_validate:
                validate_bundle(conversion.bundle)
        except MessageError as e:
            click.echo(f"herald convert: {where}: {e} (HL7 error {e.code})", err=True)
            sys.exit(EXIT_BAD_INPUT)
        if explain:
            from gateway.conversion.explain import explain_lines

            explained += [f"{where}: " + (lines := explain_lines(msg, conversion))[0], *lines[1:], ""]
            continue
        for w in conversion.warnings:
            click.echo(f"herald convert: {where}: warning: {w}", err=True)
        bundles.append(conversion.bundle)
    if explain:
        click.echo("\n".join(explained).rstrip("\n"))
        return
    click.echo(json.dumps(bundles[0] if len(bundles) == 1 else bundles, indent=2, ensure_ascii=False))


@main.command("explain")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@config_option
@click.pass_context
def explain_command(ctx, file, config_path):
    """Same as `herald convert FILE --explain`: each v2 field used, its HL7 name and FHIR target."""
    ctx.invoke(convert, file=file, config_path=config_path, no_validate=False, explain=True)


# -- roster ------------------------------------------------------------------


@main.group()
def roster():
    """Manage the ACO attribution roster."""


def _who(by: str | None) -> str:
    import getpass

    if by:
        return by
    try:
        return getpass.getuser()
    except Exception:  # no login name (e.g. a container without a passwd entry)
        return "unknown"


def _print_problems(path, problems, suffix: str = "") -> None:
    for line, column, why in problems:
        where = f"line {line}" if line else "file"
        click.echo(f"{path}: {where}, column {column}: {why}{suffix}", err=True)


@roster.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--aco", "aco_id", default=None, help="The ACO of every row (CMS files carry none); overrides [roster] aco_id."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(ROSTER_FORMATS),
    default=None,
    help="File layout (default: [roster] format, else recognised from the header).",
)
@click.option(
    "--pcp",
    "pcp_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Second file naming each member's PCP (by MBI or member id), for files that carry none.",
)
@click.option(
    "--opt-out",
    "opt_out_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File listing members (MBI or member id) who opted out of data sharing.",
)
@click.option("--effective", default=None, help="First day of this roster version, YYYY-MM-DD (default: today).")
@click.option("--update", is_flag=True, help="Add and update members only; end nobody (a partial file).")
@click.option("--skip-bad-rows", is_flag=True, help="Load the good rows and report the bad ones.")
@click.option(
    "--strict/--no-strict",
    default=None,
    help="Refuse a file with a column Herald does not read (default: [roster] strict, else warn and go on).",
)
@click.option("--by", default=None, help="Who imports (for the audit trail; default: the login name).")
@config_option
@data_option
def roster_import(
    file, aco_id, fmt, pcp_file, opt_out_file, effective, update, skip_bad_rows, strict, by, config_path, data_dir
):
    """Import FILE as the new roster of its ACO(s): members missing from it are end-dated.

    Rejected whole (exit 2, nothing changed) if any row is bad, unless --skip-bad-rows.
    A column Herald does not read is named, with the nearest name it knows; with
    --strict it rejects the file.
    """
    from datetime import date

    from gateway.app.roster import import_roster_file
    from gateway.matching.roster import RosterOptions, read_opt_out_file, read_pcp_file

    cfg = _config(config_path, data_dir)
    if effective is not None:
        try:
            effective = date.fromisoformat(effective).isoformat()
        except ValueError:
            raise click.BadParameter(f"{effective!r} is not a date (YYYY-MM-DD)", param_hint="--effective") from None
    try:
        pcp = read_pcp_file(pcp_file) if pcp_file else {}
        opted_out = read_opt_out_file(opt_out_file) if opt_out_file else frozenset()
    except RosterError as e:
        _print_problems(e.source, e.problems)
        click.echo(f"herald roster import: {e.source}: rejected, nothing was loaded", err=True)
        sys.exit(EXIT_BAD_INPUT)
    options = RosterOptions(
        format=fmt or cfg.roster_format,
        aco_id=aco_id if aco_id is not None else cfg.roster_aco_id,
        columns=cfg.roster_columns,
        pcp=pcp,
        opted_out=opted_out,
        strict=cfg.roster_strict if strict is None else strict,
    )

    def say_columns_not_read(source) -> None:
        # Said before the rows are read: a long import shows them at once.
        _print_problems(file, [u.warning() for u in source.unread])
        if note := source.not_read_note():
            click.echo(f"{file}: line 1: {note}", err=True)

    try:
        # A path, not an opened store: the file's header is read and checked before the database is opened.
        report = import_roster_file(
            cfg.database,
            file,
            options,
            replace=not update,
            effective=effective,
            skip_bad_rows=skip_bad_rows,
            by=_who(by),
            on_header=say_columns_not_read,
        )
    except RosterError as e:
        _print_problems(file, e.problems)
        more = f" (and {e.more} more)" if e.more else ""
        click.echo(
            f"herald roster import: {file}: rejected, nothing was loaded ({len(e.problems)} problem(s){more})",
            err=True,
        )
        sys.exit(EXIT_BAD_INPUT)
    _print_problems(file, report.problems, " (row skipped)")
    click.echo(
        f"imported {file} as roster version {report.import_id} of {', '.join(report.acos)}"
        + (f", effective {effective}" if effective else ", effective today")
    )
    click.echo(
        f"  added {report.added}, changed {report.changed}, ended {report.ended}, unchanged {report.unchanged}, "
        f"rejected {report.rejected} (of {report.rows} rows)"
    )
    click.echo(
        f"  read in {report.read_seconds:.1f} s, applied in {report.apply_seconds:.1f} s, published in "
        f"{report.publish_seconds:.2f} s; the gateway's database was locked {report.lock_seconds * 1000:.0f} ms "
        "(the audit event)"
    )


@roster.command("versions")
@click.option("--limit", default=20, show_default=True)
@config_option
@data_option
def roster_versions(limit, config_path, data_dir):
    """List the roster imports (versions), newest first, with what each changed."""
    from gateway.store import roster_imports

    cfg = _config(config_path, data_dir)
    _read_conn(cfg).close()
    roster = _roster_snapshot(cfg)
    click.echo(
        f"{'VERSION':>7}  {'IMPORTED (UTC)':<23}  {'ACO':<16}  {'EFFECTIVE':<10}  {'ADDED':>7}  {'CHANGED':>7}  "
        f"{'ENDED':>7}  {'REJECTED':>8}  FILE"
    )
    for v in roster_imports(roster, limit):
        click.echo(
            f"{v['id']:>7}  {v['imported_at'][:23]:<23}  {v['aco_ids'][:16]:<16}  {v['effective_date'] or '-':<10}  "
            f"{v['added']:>7}  {v['changed']:>7}  {v['ended']:>7}  {v['rejected']:>8}  {v['file']} ({v['format']}, "
            f"{v['mode']}, by {v['imported_by']})"
        )


# -- match -------------------------------------------------------------------


@main.command("match")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message, for scripts and evaluations.")
@config_option
@data_option
def match_command(paths, as_json, config_path, data_dir):
    """Explain how the roster matches the patient of each message in PATHS (files or folders).

    Prints the candidates, each field's agreement level and weight, the total
    and the grade. Reads the roster of --data/--config; writes nothing.
    """
    from gateway.app.match_report import explain_messages

    cfg = _config(config_path, data_dir)
    conn = _read_conn(cfg)
    failures = explain_messages(
        paths, cfg, _roster_snapshot(cfg), conn, as_json, click.echo, lambda s: click.echo(s, err=True)
    )
    sys.exit(EXIT_BAD_INPUT if failures else 0)


# -- review ------------------------------------------------------------------


@main.group()
def review():
    """The review queue: possible matches waiting for a person to decide."""


@review.command("list")
@click.option("--state", type=click.Choice(["open", "accepted", "rejected", "all"]), default="open", show_default=True)
@click.option("--limit", default=100, show_default=True)
@config_option
@data_option
def review_list(state, limit, config_path, data_dir):
    """List reviews with the message's patient and the candidate members."""
    from gateway.app.match_report import describe_review
    from gateway.store import list_reviews

    cfg = _config(config_path, data_dir)
    conn = _read_conn(cfg)
    reviews = list_reviews(conn, None if state == "all" else state, limit)
    if not reviews:
        click.echo(f"no {'' if state == 'all' else state + ' '}reviews")
    roster = _roster_snapshot(cfg)
    for item in reviews:
        for line in describe_review(roster, item):
            click.echo(line)


@review.command("accept")
@click.argument("review_id", type=int)
@click.option("--member", "member_id", default=None, help="The candidate's member id (default: the best candidate).")
@click.option("--aco", "aco_id", default=None, help="The candidate's ACO, when the member id is on several.")
@click.option("--by", default=None, help="Who decides (for the audit trail; default: the login name).")
@config_option
@data_option
def review_accept(review_id, member_id, aco_id, by, config_path, data_dir):
    """Accept a review: notify the member's PCP and care team now, and remember the MRN link."""
    from gateway.app.operations import accept_review, opened_store

    cfg = _config(config_path, data_dir)
    _read_conn(cfg).close()
    who = _who(by)
    try:
        with opened_store(cfg.database) as store:
            decision = accept_review(
                store, _roster_snapshot(cfg), cfg, review_id, by=who, member_id=member_id, aco_id=aco_id
            )
    except HeraldError as e:
        _fail("review accept", e)
    roles = ", ".join(decision.roles) or "none"
    click.echo(
        f"review {review_id} accepted by {who}: message {decision.message_id} is member {decision.member_id} of "
        f"ACO {decision.aco_id}; notifications queued: {roles}; message now {decision.state}"
    )
    if decision.opted_out:
        click.echo("  the member opted out of data sharing: no PCP or care-team notification")
    if decision.links:
        click.echo(f"  remembered {decision.links} MRN link(s): the next message with one matches certain by MRN")


@review.command("reject")
@click.argument("review_id", type=int)
@click.option("--reason", default="", help="Why (kept in the audit trail).")
@click.option("--by", default=None, help="Who decides (for the audit trail; default: the login name).")
@config_option
@data_option
def review_reject(review_id, reason, by, config_path, data_dir):
    """Reject a review: none of the candidates is the patient; the message stays unmatched."""
    from gateway.app.operations import opened_store, reject_review

    cfg = _config(config_path, data_dir)
    _read_conn(cfg).close()
    who = _who(by)
    try:
        with opened_store(cfg.database) as store:
            decision = reject_review(store, review_id, by=who, reason=reason)
    except HeraldError as e:
        _fail("review reject", e)
    click.echo(f"review {review_id} rejected by {who}: message now {decision.state}")


def _fail(command: str, error) -> None:
    """End a command that could not be done: exit 2 when the request was wrong, else 1."""
    if getattr(error, "bad_input", False):
        click.echo(f"herald {command}: {error}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    raise click.ClickException(str(error))


# -- log ---------------------------------------------------------------------


@main.group()
def log():
    """Read the message log and audit trail."""


@log.command("list")
@click.option(
    "--state",
    type=click.Choice(MESSAGE_STATES),
    default=None,
    help="Only messages in this state.",
)
@click.option("--limit", default=50, show_default=True)
@config_option
@data_option
def log_list(state, limit, config_path, data_dir):
    """List the newest messages with their state."""
    from gateway.store import list_messages

    cfg = _config(config_path, data_dir)
    conn = _read_conn(cfg)
    rows = list_messages(conn, limit, state)
    click.echo(
        f"{'ID':>6}  {'RECEIVED (UTC)':<23}  {'SENDER':<24}  {'TYPE':<9}  {'CONTROL ID':<20}  {'STATE':<10}  NOTES"
    )
    for r in rows:
        sender = f"{r['sending_application']}|{r['sending_facility']}"
        mtype = f"{r['message_type']}^{r['trigger_event']}" if r["message_type"] else "-"
        notes = r["reason"] or (f"{r['notifications']} notification(s)" if r["notifications"] else "")
        if r["flag"]:
            notes = f"[{r['flag']}] {notes}"
        click.echo(
            f"{r['id']:>6}  {r['received_at'][:23]:<23}  {sender[:24]:<24}  {mtype[:9]:<9}  "
            f"{(r['control_id'] or '-')[:20]:<20}  {r['state']:<10}  {notes}"
        )


def _ack_said(message: dict, events: list[dict]) -> str:
    """What the sender was answered: the ACK code sent, or why none was (MSH-15 NE/ER asks for none)."""
    sent = [e for e in events if e["kind"] == "ack-sent"]
    if sent:
        return f"ACK {json.loads(sent[-1]['detail'] or '{}').get('code', message['ack_code'])}"
    if message["state"] == "rejected" and message["ack_code"]:
        return f"ACK {message['ack_code']} (refused)"
    if message["accept_ack_type"] in ("NE", "ER"):
        return f"no accept ACK sent (MSH-15 {message['accept_ack_type']})"
    return "no ACK recorded"


@log.command("show")
@click.argument("message_id", type=int)
@click.option("--fields", is_flag=True, help="Also list every field with its HL7 name (per the message's version).")
@config_option
@data_option
def log_show(message_id, fields, config_path, data_dir):
    """Show one message: raw v2, FHIR, match, notifications, deliveries and audit events."""
    from gateway.app.operations import message_view

    cfg = _config(config_path, data_dir)
    conn = _read_conn(cfg)
    try:
        view = message_view(conn, message_id, fields=fields)
    except HeraldError as e:
        _fail("log show", e)
    detail, m, reason = view.detail, view.detail["message"], view.reason
    click.echo(f"Message {m['id']}  state: {m['state']}" + (f"  ({reason})" if reason else ""))
    click.echo(
        f"  received {m['received_at']} from {m['peer']}; sender {m['sending_application']}|{m['sending_facility']}; "
        f"{m['message_type']}^{m['trigger_event']} v{m['version']}; control id {m['control_id']}; "
        f"{_ack_said(m, detail['events'])}"
    )
    if m["flag"]:
        click.echo(f"  flag: {m['flag']}")
    click.echo("\nRaw HL7 v2:")
    for seg in view.segments:
        click.echo(f"  {seg}")
    if fields:
        click.echo("\nFields:")
        for line in view.fields:
            click.echo(f"  {line}")
    click.echo("\nMatch:")
    match = detail["match"]
    if match is None:
        click.echo("  (none yet)")
    elif match["member_id"]:
        score = "" if match["score"] is None else f" (score {match['score']:.2f})"
        click.echo(
            f"  {match['grade']} by {match['method']}{score}: member {match['member_id']} of ACO {match['aco_id']}"
        )
    else:
        click.echo(f"  no roster member ({match['method']}; {match['detail']})")
    click.echo("\nNotifications:")
    if not detail["notifications"]:
        click.echo("  (none)")
    for n in detail["notifications"]:
        click.echo(
            f"  {n['id']}  {n['recipient_role']:<9} {n['state']:<8} attempts {n['attempts']}  "
            f"{n['channel']} {n['target']}"
        )
        click.echo(f"      to {n['recipient']}" + (f"; last error: {n['last_error']}" if n["last_error"] else ""))
    click.echo("\nDelivery attempts:")
    if not detail["attempts"]:
        click.echo("  (none)")
    for a in detail["attempts"]:
        click.echo(f"  {a['at']}  {a['notification_id'][:8]}  #{a['attempt']} {a['outcome']}: {a['detail']}")
    click.echo("\nAudit events:")
    # In time order: an event stamped earlier may have been committed after a later one.
    for e in sorted(detail["events"], key=lambda e: (e["at"], e["id"])):
        extra = f" {e['detail']}" if e["detail"] else ""
        click.echo(f"  {e['at']}  {e['actor']:<8} {e['kind']}{extra}")
    click.echo("\nFHIR:")
    if m["fhir"]:
        click.echo(json.dumps(json.loads(m["fhir"]), indent=2, ensure_ascii=False))
    else:
        click.echo("  (not converted)")


# -- demo --------------------------------------------------------------------


@main.command()
@click.option("--keep", is_flag=True, help="Keep the temporary data folder and print its path.")
def demo(keep):
    """Start Herald on embedded defaults, replay sample_messages/ and print the notifications."""
    from gateway.app.demo import run_demo

    try:
        code = run_demo(keep=keep)
    except HeraldError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(code)


# -- certs -------------------------------------------------------------------


@main.command()
@click.argument("directory", default="certs", type=click.Path(file_okay=False, path_type=Path))
@click.option("--hostname", "hostnames", multiple=True, help="Name or IP for the server certificate (repeatable).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def certs(directory, hostnames, force):
    """Make development TLS material (CA, server and client certificates) in DIRECTORY."""
    from gateway.app.certs import FILES, make_dev_certs, server_endpoint

    existing = [f for f in FILES if (directory / f).exists()]
    if existing and not force:
        raise click.ClickException(f"{directory} already holds {', '.join(existing)}; use --force to replace them")
    written = make_dev_certs(directory, tuple(hostnames) or ("localhost", "127.0.0.1"))
    click.echo(f"wrote {', '.join(p.name for p in written)} to {directory} (development only)")
    click.echo(f"TLS listener: --listen '{server_endpoint(directory, 2576)}'")
    click.echo(f"client side:  trust {directory / 'ca.pem'}; a client certificate is in client.pem / client-key.pem")


if __name__ == "__main__":  # pragma: no cover
    main()
