"""The ``herald`` command line. Thin: each command calls the library and turns
known errors into a clean message and exit code."""

from __future__ import annotations

import json
import sys
from datetime import UTC
from pathlib import Path

import click

from gateway.errors import ConfigError, HeraldError, MessageError, RosterError

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
    import sqlite3

    from gateway.store import StoreError, open_database

    try:
        conn = open_database(cfg.database, readonly=True)
    except StoreError as e:
        raise click.ClickException(f"{e} (is --data or --config right?)") from None
    except sqlite3.Error as e:
        raise click.ClickException(f"{cfg.database} is not a Herald database ({e})") from None
    try:
        conn.execute("SELECT id FROM messages LIMIT 1").fetchall()
    except sqlite3.Error as e:
        conn.close()
        raise click.ClickException(f"{cfg.database} is not a Herald database ({e})") from None
    return conn


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

    from gateway.config import check_listen
    from gateway.service import make_service

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
    from gateway.replay import ReplayError, collect_messages, replay

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

    from gateway.convert import convert as convert_message
    from gateway.convert import validate_bundle
    from gateway.replay import ReplayError, collect_messages
    from gateway.v2 import V2Message
    from gateway.vocabulary import load_vocabulary

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
            from gateway.explain import explain_lines

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


@roster.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--skip-bad-rows", is_flag=True, help="Load the good rows and report the bad ones.")
@config_option
@data_option
def roster_import(file, skip_bad_rows, config_path, data_dir):
    """Load FILE.csv into the roster (rejected whole if any row is bad, unless --skip-bad-rows)."""
    from gateway.roster import load_roster_file
    from gateway.store import import_members_sync

    cfg = _config(config_path, data_dir)
    try:
        parsed = load_roster_file(file, skip_bad_rows)
    except RosterError as e:
        for line, column, why in e.problems:
            where = f"line {line}" if line else "file"
            click.echo(f"{file}: {where}, column {column}: {why}", err=True)
        click.echo(
            f"herald roster import: {file}: rejected, nothing was loaded ({len(e.problems)} problem(s))", err=True
        )
        sys.exit(EXIT_BAD_INPUT)
    for line, column, why in parsed.problems:
        click.echo(f"{file}: line {line}, column {column}: {why} (row skipped)", err=True)
    count = import_members_sync(cfg.database, parsed.members, str(file), len(parsed.problems))
    click.echo(f"imported {count} member(s) from {file}; {len(parsed.problems)} row problem(s) skipped")


# -- log ---------------------------------------------------------------------


@main.group()
def log():
    """Read the message log and audit trail."""


@log.command("list")
@click.option("--state", default=None, help="Only messages in this state (received, routed, rejected, ...).")
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


@log.command("show")
@click.argument("message_id", type=int)
@click.option("--fields", is_flag=True, help="Also list every field with its HL7 name (per the message's version).")
@config_option
@data_option
def log_show(message_id, fields, config_path, data_dir):
    """Show one message: raw v2, FHIR, match, notifications, deliveries and audit events."""
    from gateway.fieldnames import describe_location
    from gateway.store import message_detail
    from gateway.v2 import declared_charset, decode

    cfg = _config(config_path, data_dir)
    conn = _read_conn(cfg)
    detail = message_detail(conn, message_id)
    if detail is None:
        raise click.ClickException(f"no message with id {message_id}")
    m = detail["message"]
    reason = m["reason"] or ""
    if reason and ": " in reason:
        # "PID-7: not a valid date" -> "PID-7 (Date/time of birth): not a valid date"
        where, _, why = reason.partition(": ")
        reason = f"{describe_location(where, m['version'] or '')}: {why}"
    click.echo(f"Message {m['id']}  state: {m['state']}" + (f"  ({reason})" if reason else ""))
    click.echo(
        f"  received {m['received_at']} from {m['peer']}; sender {m['sending_application']}|{m['sending_facility']}; "
        f"{m['message_type']}^{m['trigger_event']} v{m['version']}; control id {m['control_id']}; ACK {m['ack_code']}"
    )
    if m["flag"]:
        click.echo(f"  flag: {m['flag']}")
    click.echo("\nRaw HL7 v2:")
    raw, _ = decode(m["raw"], m["charset"] or declared_charset(m["raw"]))
    for seg in raw.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        if seg:
            click.echo(f"  {seg}")
    if fields:
        click.echo("\nFields:")
        for line in _field_lines(m["raw"], m["charset"] or "", m["version"] or ""):
            click.echo(f"  {line}")
    click.echo("\nMatch:")
    match = detail["match"]
    if match is None:
        click.echo("  (none yet)")
    elif match["member_id"]:
        click.echo(f"  {match['grade']} by {match['method']}: member {match['member_id']} of ACO {match['aco_id']}")
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
    for e in detail["events"]:
        extra = f" {e['detail']}" if e["detail"] else ""
        click.echo(f"  {e['at']}  {e['actor']:<8} {e['kind']}{extra}")
    click.echo("\nFHIR:")
    if m["fhir"]:
        click.echo(json.dumps(json.loads(m["fhir"]), indent=2, ensure_ascii=False))
    else:
        click.echo("  (not converted)")


def _field_lines(raw: bytes, charset: str, version: str) -> list[str]:
    """Each non-empty field as ``PID-5 Patient name: value`` (names from hl7apy)."""
    from gateway.errors import MessageError
    from gateway.fieldnames import field_info
    from gateway.v2 import V2Message

    try:
        msg = V2Message(raw, charset)
    except MessageError as e:
        return [f"(cannot be split into fields: {e})"]
    lines = []
    for seg in msg.segments:
        for n in range(1, len(seg.fields)):
            value = seg.fields[n]
            if not value:
                continue
            info = field_info(seg.name, n, version or "2.5.1")
            name = f" {info[0]} ({info[1]})" if info else ""
            lines.append(f"{seg.name}-{n}{name}: {value}")
    return lines


# -- demo --------------------------------------------------------------------


@main.command()
@click.option("--keep", is_flag=True, help="Keep the temporary data folder and print its path.")
def demo(keep):
    """Start Herald on embedded defaults, replay sample_messages/ and print the notifications."""
    from gateway.demo import run_demo

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
    from gateway.certs import FILES, make_dev_certs, server_endpoint

    existing = [f for f in FILES if (directory / f).exists()]
    if existing and not force:
        raise click.ClickException(f"{directory} already holds {', '.join(existing)}; use --force to replace them")
    written = make_dev_certs(directory, tuple(hostnames) or ("localhost", "127.0.0.1"))
    click.echo(f"wrote {', '.join(p.name for p in written)} to {directory} (development only)")
    click.echo(f"TLS listener: --listen '{server_endpoint(directory, 2576)}'")
    click.echo(f"client side:  trust {directory / 'ca.pem'}; a client certificate is in client.pem / client-key.pem")


if __name__ == "__main__":  # pragma: no cover
    main()
