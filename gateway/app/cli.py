"""The ``herald`` command line. Thin: each command calls the library and turns
known errors into a clean message and exit code."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from datetime import UTC
from pathlib import Path

import click

from gateway.config import ROSTER_FORMATS
from gateway.errors import ConfigError, HeraldError, MessageError, RosterError, StoreError
from gateway.records import MESSAGE_STATES, NOTIFICATION_STATES

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


def _config(config_path, data_dir, listen=None, allow_plain=None):
    from gateway.config import load_config

    try:
        return load_config(config_path, data_dir=data_dir, listen=listen, allow_plain=allow_plain)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _keys(cfg):
    """The configured key ring (``HERALD_KEYS``, else ``[security] key_file``); a clean message when there is none."""
    from gateway.app.keys import key_ring
    from gateway.store.keys import KeyRingError, MissingKey

    try:
        return key_ring(cfg)
    except MissingKey as e:
        raise click.ClickException(
            f"{e}; or set [security] encrypt_at_rest = false to keep PHI unencrypted (not for production)"
        ) from None
    except KeyRingError as e:
        raise click.ClickException(str(e)) from None


def _read_conn(cfg, keys=None):
    """A read-only connection; with ``keys`` (commands that show PHI) its sealed values open."""
    from gateway.store import StoreError, check_database, open_database
    from gateway.store.schema import NotAHeraldDatabase

    try:
        conn = open_database(cfg.database, readonly=True, keys=keys)
    except NotAHeraldDatabase as e:
        raise click.ClickException(str(e)) from None
    except StoreError as e:
        raise click.ClickException(f"{e} (is --data or --config right?)") from None
    try:
        check_database(conn)
    except StoreError as e:
        conn.close()
        raise click.ClickException(f"{cfg.database} is not a Herald database ({e})") from None
    if keys is not None:
        from gateway.store.schema import check_keys

        try:
            check_keys(conn, cfg.database)  # encryption off on an encrypted database: said here
        except StoreError as e:
            conn.close()
            raise click.ClickException(str(e)) from None
    return conn


def _roster_snapshot(cfg, keys=None):
    """The roster as published now (empty before the first import), its members opened with ``keys``.

    On PostgreSQL this node's file is brought to the version published from
    any node first (its server does so every few seconds; it may not run).
    """
    from gateway.store import StoreError, open_roster_snapshot
    from gateway.store.roster_versions import follow_published_roster

    try:
        follow_published_roster(cfg.database)
    except StoreError as e:  # the node's own file is still a whole version: read it, and say so
        click.echo(f"herald: {e}; reading this node's roster file as it is", err=True)
    try:
        return open_roster_snapshot(cfg.database, keys)
    except StoreError as e:
        raise click.ClickException(str(e)) from None


@click.group()
@click.version_option(package_name="herald")
def main() -> None:
    """Herald: HL7 v2 ADT in over MLLP, FHIR encounter notifications out."""


# -- serve -------------------------------------------------------------------


@main.command()
@config_option
@click.option(
    "--listen",
    multiple=True,
    help="tls:PORT[:interface=ADDRESS] (mutual TLS, the default tls:2575:interface=127.0.0.1) "
    "or tcp:PORT[:interface=ADDRESS] (plain, needs --allow-plain) (repeatable).",
)
@click.option(
    "--allow-plain", is_flag=True, default=None, help="Allow plain tcp: listeners (overrides server.allow_plain)."
)
@data_option
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default=None, help="Log lines (overrides [logging] format)."
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warn", "error"]),
    default=None,
    help="Lowest level logged (overrides [logging] level).",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Log to this file, reopened on SIGHUP (overrides [logging] file; default: standard error).",
)
def serve(config_path, listen, allow_plain, data_dir, log_format, log_level, log_file):
    """Run the gateway daemon until interrupted (SIGTERM, SIGINT).

    SIGHUP reloads the sender profiles (as `herald reload` asks) and reopens the log file.
    """
    import dataclasses

    from twisted.internet import defer, task
    from twisted.logger import Logger

    from gateway.app.logs import on_hangup, start_logging
    from gateway.app.service import make_service, tls_server_options
    from gateway.config import check_listen, parse_listen

    cfg = _config(config_path, data_dir, list(listen) or None, allow_plain)
    cfg = dataclasses.replace(
        cfg,
        log_format=log_format or cfg.log_format,
        log_level=log_level or cfg.log_level,
        log_file=log_file or cfg.log_file,
    )
    if any(parse_listen(spec).tls for spec in cfg.listen):
        try:
            tls_server_options(cfg)  # missing or wrong certificates: said here, before anything starts
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
    # No key, or not this database's key: refused here, in words, before anything starts.
    keys = _keys(cfg)
    _check_keys(cfg, keys)
    _profiles(cfg)  # a bad sender profile: said here (file, key, reason), before anything starts

    def run(reactor):
        try:
            check_listen(cfg.listen, reactor)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
        try:
            log = start_logging(cfg.log_format, cfg.log_level, cfg.log_file)
        except OSError as e:
            raise click.ClickException(f"logging.file: cannot open {cfg.log_file}: {e.strerror}") from None
        try:
            gw = make_service(cfg, reactor, keys=keys)
        except ConfigError as e:  # a setting only the service reads (a JWKS, a worklist): said, no traceback
            raise click.ClickException(str(e)) from None
        except StoreError as e:  # e.g. the PostgreSQL server is unreachable, or refuses the role
            raise click.ClickException(f"the store: {e}") from None
        gw.service.startService()
        # What exists now (modules, mappings, the service tree) lives as long as the process: the
        # collector need not walk it again at each full collection (tens of ms each, on the reactor).
        gc.collect()  # start-up's garbage first, or it would be kept for good
        gc.freeze()
        done = defer.Deferred()

        def hangup() -> None:
            reopened = log.reopen()
            Logger(namespace="gateway.app.serve").info(
                "SIGHUP: {said}; reloading the sender profiles",
                said=f"log file {cfg.log_file} reopened" if reopened else "logging to standard error",
            )

        on_hangup(reactor, hangup)

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
        if gw.health is not None:
            # Not fatal: intake goes on without its health port (the log says why at error level).
            gw.health.ready.addCallback(
                lambda port: click.echo(
                    f"herald: health and metrics on {gw.health.address} (/healthz, /readyz, /metrics)"
                    if port is not None
                    else f"herald: health and metrics NOT served: {cfg.health_listen}: {gw.health.error}",
                    err=True,
                )
            )
        reactor.addSystemEventTrigger("before", "shutdown", gw.service.stopService)
        return done

    try:
        task.react(run)
    except SystemExit as e:
        if e.code not in (0, None):
            raise


@main.command("check-config")
@config_option
@click.option("--listen", multiple=True, help="As for serve.")
@click.option("--allow-plain", is_flag=True, default=None, help="As for serve.")
@data_option
def check_config(config_path, listen, allow_plain, data_dir):
    """Check what `herald serve` would start with, without starting it: the settings, the listeners,
    the TLS files, the key and the sender profiles. Exit 0 and a summary, or 1 naming the problem."""
    from twisted.internet import reactor

    from gateway.app.service import tls_server_options
    from gateway.config import check_listen, parse_listen

    cfg = _config(config_path, data_dir, list(listen) or None, allow_plain)
    try:
        check_listen(cfg.listen, reactor)
        if any(parse_listen(spec).tls for spec in cfg.listen):
            tls_server_options(cfg)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    keys = _keys(cfg)
    _check_keys(cfg, keys)
    profiles = _profiles(cfg)
    roles = ", ".join(f"{r.role} ({r.channel} {r.target})" for r in cfg.recipients.values() if r.enabled)
    click.echo(f"config OK{f': {config_path}' if config_path else ' (embedded defaults)'}")
    click.echo(f"  listen: {', '.join(cfg.listen)}; data in {cfg.data_dir}")
    click.echo(f"  encryption at rest: {'on, key ' + ', '.join(keys.ids) if keys.enabled else 'off'}")
    click.echo(f"  sender profiles: {len(getattr(profiles, 'profiles', {}))}; recipients: {roles or 'none'}")


# -- send --------------------------------------------------------------------


@main.command()
@click.argument("target", metavar="HOST:PORT")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for each ACK.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--tls", is_flag=True, help="Connect with TLS (implied by --ca).")
@click.option(
    "--ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA file the server's certificate must chain to.",
)
@click.option(
    "--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Client certificate (mutual TLS)."
)
@click.option(
    "--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="The client certificate's key."
)
@click.option("--server-name", default=None, help="Name the server's certificate must carry (default: HOST).")
def send(target, paths, timeout, quiet, tls, ca, cert, key, server_name):
    """Replay HL7 files or folders over MLLP; exit 1 unless every message got AA/CA.

    To a tls: listener: --ca CA.pem --cert CLIENT.pem --key CLIENT-key.pem.
    """
    from gateway.app.replay import ReplayError, collect_messages, replay

    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise click.UsageError(f"{target!r} is not HOST:PORT")
    options = _client_tls(host, tls, ca, cert, key, server_name)
    skipped: list[str] = []
    try:
        messages = collect_messages(paths, skipped)
    except ReplayError as e:
        # Nothing is sent: the operator fixes (or leaves out) the files named and runs again.
        for line in str(e).splitlines():
            click.echo(f"herald send: {line}", err=True)
        click.echo("herald send: nothing was sent", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if not messages:
        click.echo("herald send: no HL7 messages (text starting with MSH) in the given paths", err=True)
        sys.exit(EXIT_BAD_INPUT)
    for line in skipped:
        click.echo(f"herald send: {line}", err=True)
    # The bar only on a terminal: piped or logged, stderr keeps the failures and this command's summary.
    report = replay(host, int(port), messages, timeout=timeout, progress=not quiet and _stderr_is_tty(), tls=options)
    for line in report.failures:
        click.echo(line, err=True)
    answered = report.sent - report.unanswered
    quiet_said = f", no ACK asked (MSH-15 NE/ER) {report.unanswered}" if report.unanswered else ""
    click.echo(
        f"sent {report.sent}, accepted {report.accepted}, not accepted {answered - report.accepted}{quiet_said}, "
        f"errors {report.errors} in {report.seconds:.2f} s"
    )
    sys.exit(0 if report.accepted + report.unanswered == len(messages) and not report.errors else 1)


def _client_tls(host, tls, ca, cert, key, server_name):
    """`herald send`'s TLS options (None for plain TCP)."""
    if not (tls or ca or cert or key):
        return None
    if ca is None:
        raise click.UsageError("TLS needs --ca: the CA file the server's certificate is checked against")
    if (cert is None) != (key is None):
        raise click.UsageError("--cert and --key go together")
    from mllp.client import client_options

    try:
        return client_options(
            server_name or host,
            ca.read_bytes(),
            cert.read_bytes() if cert else None,
            key.read_bytes() if key else None,
        )
    except Exception as e:  # unreadable PEM, or a key that is not the certificate's
        raise click.ClickException(f"cannot use the TLS files: {e}") from None


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
@click.option(
    "--profile",
    "profile_spec",
    default=None,
    metavar="NAME|FILE.toml",
    help="Read the message with this sender profile (default: the one its MSH-3/MSH-4 select).",
)
def convert(file, config_path, no_validate, explain, profile_spec=None):
    """Convert the ADT message(s) in FILE to FHIR Bundle JSON on stdout."""
    from gateway.app.profiles import convert_for_cli, find_profile
    from gateway.app.replay import ReplayError, collect_messages
    from gateway.conversion.convert import validate_bundle
    from gateway.conversion.vocabulary import load_vocabulary

    cfg = _config(config_path, None)
    try:
        vocab = load_vocabulary()
        messages = collect_messages([file])
        if profile_spec:
            profiles, forced = find_profile(profile_spec, cfg, vocab)
        else:
            profiles, forced = _profiles(cfg, vocab), None
    except (ReplayError, ConfigError, LookupError) as e:
        for line in str(e).splitlines():
            click.echo(f"herald convert: {line}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    bundles = []
    explained: list[str] = []
    for where, raw in messages:
        try:
            msg, selection, applied, conversion = convert_for_cli(raw, profiles, forced, cfg, vocab, explain)
            if not no_validate:
                validate_bundle(conversion.bundle)
        except MessageError as e:
            click.echo(f"herald convert: {where}: {e} (HL7 error {e.code})", err=True)
            sys.exit(EXIT_BAD_INPUT)
        if selection.known:
            click.echo(
                f"herald convert: {where}: sender profile {selection.profile.name} "
                f"({len(applied.changes)} change(s); herald profile diff shows them)",
                err=True,
            )
        for m in applied.missing:
            click.echo(f"herald convert: {where}: warning: {m}", err=True)
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
    ctx.invoke(convert, file=file, config_path=config_path, no_validate=False, explain=True, profile_spec=None)


def _profiles(cfg, vocab=None):
    """The configured sender profiles; a bad one is a clean message naming its file, key and reason."""
    from gateway.app.profiles import configured_profiles

    try:
        return configured_profiles(cfg, vocab)
    except ConfigError as e:
        raise click.ClickException(f"sender profile {e}") from None


# -- profile -----------------------------------------------------------------


@main.group()
def profile():
    """Sender profiles (mappings/senders/*.toml): check one, try it on messages, see what it changes."""


def _profile_failed(command: str, error) -> None:
    """A profile that does not load: file, key and reason on stderr, exit 2."""
    from gateway.errors import ProfileError

    if isinstance(error, ProfileError):
        click.echo(f"herald profile {command}: {error.file}: {error.key}: {error.reason}", err=True)
    else:
        click.echo(f"herald profile {command}: {error}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@profile.command("check")
@click.argument("spec", metavar="PROFILE")
@config_option
def profile_check(spec, config_path):
    """Check PROFILE (a .toml file, or a name in [profiles] folder) with the profiles it joins; exit 2 when bad."""
    from gateway.app.profiles import check_profile

    cfg = _config(config_path, None)
    try:
        found = check_profile(spec, cfg)
    except (ConfigError, LookupError) as e:
        _profile_failed("check", e)
    for line in found.lines():
        click.echo(line)


@profile.command("test")
@click.argument("spec", metavar="PROFILE")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path), metavar="MESSAGES...")
@config_option
def profile_test(spec, paths, config_path):
    """Convert MESSAGES with PROFILE and summarise each: patient ids, class, event, times, codes, warnings.

    Exit 1 when a message does not convert to valid FHIR R4, 2 when the profile does not load.
    """
    from gateway.app.profiles import try_profile
    from gateway.app.replay import ReplayError, collect_messages

    cfg = _config(config_path, None)
    skipped: list[str] = []
    try:
        messages = collect_messages(paths, skipped)
    except ReplayError as e:
        for line in str(e).splitlines():
            click.echo(f"herald profile test: {line}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    try:
        found, reports = try_profile(spec, messages, cfg)
    except (ConfigError, LookupError) as e:
        _profile_failed("test", e)
    click.echo(f"profile {found.name} ({found.file}): {found.summary()}")
    for report in reports:
        click.echo("")
        for line in report.lines():
            click.echo(line)
    failed = [r for r in reports if not r.ok]
    click.echo(f"\n{len(reports)} message(s), {len(reports) - len(failed)} converted to valid FHIR R4")
    sys.exit(1 if failed else 0)


@profile.command("diff")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path), metavar="MESSAGE...")
@config_option
def profile_diff(paths, config_path):
    """Which profile each MESSAGE gets and why, and what it changes against the default mapping."""
    from gateway.app.profiles import diff_message
    from gateway.app.replay import ReplayError, collect_messages
    from gateway.conversion.vocabulary import load_vocabulary

    cfg = _config(config_path, None)
    vocab = load_vocabulary()
    skipped: list[str] = []
    try:
        messages = collect_messages(paths, skipped)
    except ReplayError as e:
        for line in str(e).splitlines():
            click.echo(f"herald profile diff: {line}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    profiles = _profiles_or_fail(cfg, vocab, "diff")
    failed = 0
    for n, (where, raw) in enumerate(messages):
        report = diff_message(where, raw, profiles, cfg, vocab)
        failed += bool(report.error)
        for line in ([""] if n else []) + report.lines():
            click.echo(line)
    sys.exit(1 if failed else 0)


def _profiles_or_fail(cfg, vocab, command: str):
    from gateway.app.profiles import configured_profiles

    try:
        return configured_profiles(cfg, vocab)
    except ConfigError as e:
        _profile_failed(command, e)


@main.command("reload")
@config_option
@data_option
def reload_command(config_path, data_dir):
    """Check the sender profiles, then have the running server load them again (no connection is dropped)."""
    from gateway.app.profiles import request_reload

    cfg = _config(config_path, data_dir)
    try:
        said = request_reload(cfg)
    except ConfigError as e:
        click.echo(f"herald reload: {getattr(e, 'file', 'config')}: {e.key}: {e.reason}", err=True)
        click.echo("herald reload: nothing was reloaded; the server keeps the profiles it has", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    click.echo(said)


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
@click.option(
    "--ignore",
    multiple=True,
    metavar="COLUMN",
    help="A column of the site's own Herald is not to read (a header or a pattern like 'hcc_*'; repeatable).",
)
@click.option("--by", default=None, help="Who imports (for the audit trail; default: the login name).")
@config_option
@data_option
def roster_import(
    file,
    aco_id,
    fmt,
    pcp_file,
    opt_out_file,
    effective,
    update,
    skip_bad_rows,
    strict,
    ignore,
    by,
    config_path,
    data_dir,
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
        ignored=tuple(n.strip().lower() for n in (*cfg.roster_ignored, *ignore)),
    )

    bars = []

    def say_columns_not_read(source) -> None:
        # Said before the rows are read: a long import shows them at once.
        _print_problems(file, [u.warning() for u in source.unread])
        if note := source.not_read_note():
            click.echo(f"{file}: line 1: {note}", err=True)
        if _stderr_is_tty():
            bars.append(_rows_progress(source, file))

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
            keys=_keys(cfg),
        )
    except RosterError as e:
        _print_problems(file, e.problems)
        more = f" (and {e.more} more)" if e.more else ""
        click.echo(
            f"herald roster import: {file}: rejected, nothing was loaded ({len(e.problems)} problem(s){more})",
            err=True,
        )
        sys.exit(EXIT_BAD_INPUT)
    except HeraldError as e:  # the store: a roster or database written with another key ring, ...
        raise click.ClickException(str(e)) from None
    finally:
        for bar in bars:
            bar.render_finish()
    _print_problems(file, report.problems, " (row skipped)")
    click.echo(
        f"imported {file} as roster version {report.import_id} of {', '.join(report.acos)}"
        + (f", effective {effective}" if effective else ", effective today")
    )
    if report.published_version:
        click.echo(f"  published to every node sharing the database (published version {report.published_version})")
    click.echo(
        f"  added {report.added}, changed {report.changed}, ended {report.ended}, unchanged {report.unchanged}, "
        f"rejected {report.rejected} (of {report.rows} rows)"
    )
    click.echo(
        f"  read in {report.read_seconds:.1f} s, applied in {report.apply_seconds:.1f} s, published in "
        f"{report.publish_seconds:.2f} s; the gateway's database was locked {report.lock_seconds * 1000:.0f} ms "
        "(the audit event)"
    )


def _stderr_is_tty() -> bool:
    """Whether a progress bar is wanted: standard error is a terminal."""
    return sys.stderr.isatty()


def _rows_progress(source, path: Path):
    """A bar on stderr over a roster file's rows as they are read (its length: the file's lines)."""
    with open(path, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    total = max(1, lines - (0 if source.fixed else 1))
    bar = click.progressbar(
        length=total,
        label=f"reading {path.name}",
        file=sys.stderr,
        update_min_steps=max(1, total // 200),
    )
    rows = source.rows

    def counted():
        # The source's rows are the import's only input: each one read moves the bar.
        for row in rows():
            bar.update(1)
            yield row

    source.rows = counted
    bar.render_progress()
    return bar


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
    keys = _keys(cfg)
    conn = _read_conn(cfg, keys)
    _audit_read(cfg, keys, "match", files=len(paths))  # it shows the roster's candidates for each patient
    failures = explain_messages(
        paths, cfg, _roster_snapshot(cfg, keys), conn, as_json, click.echo, lambda s: click.echo(s, err=True)
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
    keys = _keys(cfg)
    conn = _read_conn(cfg, keys)
    reviews = list_reviews(conn, None if state == "all" else state, limit)
    if not reviews:
        click.echo(f"no {'' if state == 'all' else state + ' '}reviews")
    else:
        _audit_read(cfg, keys, "review list", [item["message_id"] for item in reviews])
    roster = _roster_snapshot(cfg, keys)
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
    keys = _keys(cfg)
    _read_conn(cfg, keys).close()
    who = _who(by)
    try:
        with opened_store(cfg.database, keys=keys) as store:
            decision = accept_review(
                store, _roster_snapshot(cfg, keys), cfg, review_id, by=who, member_id=member_id, aco_id=aco_id
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
    keys = _keys(cfg)
    _read_conn(cfg, keys).close()
    who = _who(by)
    try:
        with opened_store(cfg.database, keys=keys) as store:
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
        if r["dead"]:
            notes += f", {r['dead']} DEAD (herald outbox list --state dead)"
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
    from gateway.app.operations import ack_said, message_view

    cfg = _config(config_path, data_dir)
    keys = _keys(cfg)
    conn = _read_conn(cfg, keys)
    try:
        view = message_view(conn, message_id, fields=fields)
    except HeraldError as e:
        _fail("log show", e)
    _audit_read(cfg, keys, "log show", [message_id])
    detail, m, reason = view.detail, view.detail["message"], view.reason
    if detail.get("integrity"):
        # Said first and last, and on stderr: nobody should read an altered record as if it were intact.
        _altered_warning(m["id"], detail["integrity"])
    click.echo(f"Message {m['id']}  state: {m['state']}" + (f"  ({reason})" if reason else ""))
    click.echo(
        f"  received {m['received_at']} from {m['peer']}; sender {m['sending_application']}|{m['sending_facility']}; "
        f"{m['message_type']}^{m['trigger_event']} v{m['version']}; control id {m['control_id']}; "
        f"{ack_said(m, detail['events'])}"
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
        click.echo("  (purged)" if m.get("purged_at") else "  (not converted)")
    if detail.get("integrity"):
        _altered_warning(m["id"], detail["integrity"])


def _altered_warning(message_id: int, problem: str) -> None:
    line = f"WARNING: message {message_id}: {problem}. Run `herald audit verify`."
    click.echo(line)
    click.echo(f"herald log show: {line}", err=True)


def _audit_read(cfg, keys, command: str, message_ids=(), **detail) -> None:
    """Record a read of patient data in the audit trail before showing it; show nothing if it cannot be."""
    from gateway.app.audit import record_read

    try:
        record_read(cfg, keys, _who(None), command, message_ids, **detail)
    except HeraldError as e:
        raise click.ClickException(
            f"the read could not be recorded in the audit trail, so nothing is shown: {e}"
        ) from None


# -- audit and retention -----------------------------------------------------


@main.group()
def audit():
    """Check the tamper-evident audit trail, and export it for a SIEM."""


@audit.command("verify")
@config_option
@data_option
def audit_verify(config_path, data_dir):
    """Walk the event chain and every message digest; exit 1 naming the first broken row.

    Reads only: it may run on a copy of the database.
    """
    from gateway.app.audit import report_lines, verify_trail

    cfg = _config(config_path, data_dir)
    conn = _read_conn(cfg, _keys(cfg))  # the chain's key: derived from the ring's first key
    try:
        report = verify_trail(conn)
    except HeraldError as e:
        raise click.ClickException(str(e)) from None
    for line in report_lines(report):
        click.echo(line)
    sys.exit(0 if report.intact else 1)


@audit.command("export")
@click.option("--since", default=None, help="Only events from then: an age (7d, 12h) or an ISO date or time (UTC).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="NDJSON file.")
@config_option
@data_option
def audit_export(since, out_path, config_path, data_dir):
    """Print the audit trail as FHIR R4 AuditEvent resources, one JSON a line (NDJSON), for a SIEM.

    Ids, codes and counts only: no patient data beyond message ids.
    """
    from datetime import datetime

    from gateway.app.audit import export_audit_events, parse_since

    cfg = _config(config_path, data_dir)
    try:
        start = parse_since(since, datetime.now(UTC)) if since else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    conn = _read_conn(cfg, _keys(cfg))
    if out_path is None:
        count = export_audit_events(conn, click.echo, start)
    else:
        with open(out_path, "w", encoding="utf-8") as f:
            count = export_audit_events(conn, lambda line: f.write(line + "\n"), start)
        click.echo(f"wrote {count} AuditEvent(s) to {out_path}", err=True)


@main.command()
@click.option("--older-than", "older_than", required=True, help="Retention: an age such as 90d, 12h or 2w.")
@click.option("--dry-run", is_flag=True, help="Say what would be purged; change nothing.")
@click.option("--by", default=None, help="Who purges (for the audit trail; default: the login name).")
@config_option
@data_option
def purge(older_than, dry_run, by, config_path, data_dir):
    """Remove the bodies of messages older than --older-than whose work is finished.

    The raw message, its Bundle, stored notification payloads and the
    notification files under the data folder go; the row, its header fields
    and its digest stay, and a 'purged' event names the messages, so
    `herald audit verify` still passes. Messages still to be processed,
    in review, or with notifications pending or retrying are kept.
    """
    from gateway.app.audit import parse_age, purge_bodies

    cfg = _config(config_path, data_dir)
    try:
        age = parse_age(older_than)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--older-than") from None
    keys = _keys(cfg)
    _read_conn(cfg, keys).close()
    try:
        report = purge_bodies(cfg, keys, age, by=f"cli:{_who(by)}", dry_run=dry_run)
    except HeraldError as e:
        raise click.ClickException(str(e)) from None
    ranges = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in report.ranges) or "none"
    if dry_run:
        click.echo(
            f"would purge {len(report.message_ids)} message(s) received before {report.received_before}: {ranges}"
        )
        return
    click.echo(
        f"purged the bodies of {len(report.message_ids)} message(s) received before {report.received_before}: "
        f"{ranges}; {report.notification_payloads} notification payload(s), {report.files_removed} file(s) removed"
    )


# -- keys --------------------------------------------------------------------


def _check_keys(cfg, keys) -> None:
    """Refuse, in words, a ring that is not the database's (or roster file's)."""
    from gateway.app.keys import check_key_ring

    try:
        check_key_ring(cfg, keys)
    except HeraldError as e:
        raise click.ClickException(str(e)) from None


@main.group("keys")
def keys_group():
    """The key ring that seals PHI at rest: make it, rotate it, see what each key seals."""


@keys_group.command("init")
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write it (default: [security] key_file, else <data>/keys/herald.key).",
)
@config_option
@data_option
def keys_init(key_file, config_path, data_dir):
    """Make a new key file: one random 256-bit key, mode 0600 in a 0700 folder. Never overwrites one."""
    from gateway.app.keys import init_key_file
    from gateway.store.keys import KEYS_ENV

    cfg = _config(config_path, data_dir)
    path = key_file or cfg.key_path
    try:
        init_key_file(path)
    except HeraldError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote a new key ring to {path} (mode 0600)")
    click.echo("  keep a copy apart from the data folder's backups: without it the sealed data cannot be read")
    if key_file is not None and key_file != cfg.key_path:
        click.echo(f'  set [security] key_file = "{path}" in the configuration so Herald uses it')
    if os.environ.get(KEYS_ENV, "").strip():
        click.echo(f"  note: ${KEYS_ENV} is set and wins over the file", err=True)


@keys_group.command("rotate")
@click.option(
    "--no-new-key",
    is_flag=True,
    help="Add no key: seal again under the newest one the ring has (after adding one to $HERALD_KEYS).",
)
@click.option("--batch", default=200, show_default=True, help="Values sealed again per transaction.")
@config_option
@data_option
def keys_rotate(no_new_key, batch, config_path, data_dir):
    """Add a key and seal every stored value under it, a small transaction at a time.

    A running gateway goes on taking messages meanwhile, and seals with the
    new key within a second. Plaintext from before encryption at rest is
    sealed too. The old keys stay in the file: they still open backups.
    """
    from gateway.app.keys import rotate_keys

    cfg = _config(config_path, data_dir)
    keys = _keys(cfg)
    _read_conn(cfg, keys).close()
    _check_keys(cfg, keys)
    last = [0.0]
    bar = _sealing_progress(cfg) if _stderr_is_tty() else None
    done_by_column: dict[str, int] = {}

    def progress(column: str, done: int) -> None:
        if bar is not None:
            if column in bar.columns:
                step = done - done_by_column.get(column, 0)
                done_by_column[column] = done
                bar.label = f"sealing {column}"
                bar.update(max(0, min(step, bar.length - bar.pos)))
            return
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            click.echo(f"  {column}: {done} sealed so far", err=True)

    try:
        report = rotate_keys(cfg, new_key=not no_new_key, batch=batch, progress=progress)
    except HeraldError as e:
        raise click.ClickException(str(e)) from None
    finally:
        if bar is not None:
            bar.render_finish()
    if report.added:
        click.echo(f"added key {report.added} to {cfg.key_path}; it seals every new value")
    click.echo(f"sealed under {report.sealing_key} in {report.seconds:.1f} s:")
    for column, count in report.sealed.items():
        click.echo(f"  {column:<24} {count:>9}")
    click.echo(f"  {'roster members':<24} {report.roster_members:>9}")
    if report.digests:
        click.echo(f"  {'message digests keyed':<24} {report.digests:>9}")
    if not report.checkpointed:
        click.echo("  the write-ahead log was in use; the gateway's writer empties it later", err=True)


def _sealing_progress(cfg):
    """A bar on stderr over every value `keys rotate` seals again (counted first, as `keys status` counts)."""
    from gateway.app.keys import key_status

    try:
        status = key_status(cfg)
    except HeraldError:
        return None  # rotate says what is wrong
    sizes = {column: sum(counts.values()) for column, counts in status.columns.items()}
    sizes["roster members"] = sum(status.roster.values())
    bar = click.progressbar(length=max(1, sum(sizes.values())), label="sealing", file=sys.stderr)
    bar.columns = set(sizes)
    bar.render_progress()
    return bar


@keys_group.command("status")
@config_option
@data_option
def keys_status(config_path, data_dir):
    """Show the key ring and how many stored values each key seals (plaintext: written before)."""
    from gateway.app.keys import key_status

    cfg = _config(config_path, data_dir)
    keys = _keys(cfg)
    _read_conn(cfg, keys).close()
    try:
        status = key_status(cfg)
    except HeraldError as e:
        raise click.ClickException(str(e)) from None
    if not keys.enabled:
        click.echo("encryption at rest is off ([security] encrypt_at_rest = false)")
    else:
        click.echo(
            f"key ring {status.source}: {', '.join(status.ids)}; {status.sealing_key} seals new values "
            f"(key check {status.fingerprint})"
        )
    totals = status.totals()
    click.echo(f"{'KEY':<12} {'VALUES':>9}")
    for key_id in [*status.ids, *sorted(k for k in totals if k is not None and k not in status.ids)]:
        click.echo(f"{key_id:<12} {totals.get(key_id, 0):>9}" + ("" if key_id in status.ids else "  (not in the ring)"))
    click.echo(f"{'plaintext':<12} {totals.get(None, 0):>9}")
    for column, counts in [*status.columns.items(), ("roster members", status.roster)]:
        parts = ", ".join(f"{k or 'plaintext'} {n}" for k, n in sorted(counts.items(), key=lambda kv: kv[0] or ""))
        click.echo(f"  {column:<24} {parts or '-'}")
    if not status.digests_keyed and keys.enabled:
        click.echo("  message digests: some may be from before (herald keys rotate makes them keyed)")


# -- outbox ------------------------------------------------------------------


@main.group()
def outbox():
    """The notifications waiting, sent and dead, by destination: list, counts, retry, cancel; open a file drop."""


@outbox.command("list")
@click.option(
    "--state", type=click.Choice(NOTIFICATION_STATES), default=None, help="Only this state (dead: dead letters)."
)
@click.option("--destination", default=None, help="Only this destination (a URL or a folder, as listed).")
@click.option("--limit", default=50, show_default=True)
@config_option
@data_option
def outbox_list(state, destination, limit, config_path, data_dir):
    """List notifications, newest change first: who, where, state, attempts and the last error."""
    from gateway.store import list_outbox

    cfg = _config(config_path, data_dir)
    conn = _read_conn(cfg)
    rows = list_outbox(conn, state, destination, limit)
    if not rows:
        click.echo("no notifications" + (f" {state}" if state else ""))
    for r in rows:
        error = f"  last error: {r['last_error']}" if r["last_error"] else ""
        click.echo(
            f"{r['id']}  message {r['message_id']:<6} {r['recipient_role']:<9} {r['state']:<9} "
            f"attempts {r['attempts']:<3} {r['channel']} {r['target']}{error}"
        )


@outbox.command("show")
@click.argument("notification_id")
@config_option
@data_option
def outbox_show(notification_id, config_path, data_dir):
    """One notification: recipient, channel, destination, state, and every attempt with its status and time."""
    from gateway.store.outbox import notification_detail

    cfg = _config(config_path, data_dir)
    n = notification_detail(_read_conn(cfg), notification_id)
    if n is None:
        click.echo(f"herald outbox show: no notification {notification_id!r}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    via = f" (directory entry {n['recipient_id']})" if n["recipient_id"] else ""
    click.echo(f"notification {n['id']}  message {n['message_id']}  {n['event_code']}")
    click.echo(f"  to        {n['recipient_role']}: {n['recipient']}{via}")
    click.echo(f"  by        {n['channel']} {n['target']}")
    click.echo(f"  state     {n['state']} after {n['attempts']} attempt(s); queued {n['created_at']}")
    if n["last_error"]:
        click.echo(f"  last error {n['last_error']}")
    for a in n["attempt_log"]:
        status = f" {a['status']}" if a["status"] is not None else ""
        took = f" {a['elapsed_ms']} ms" if a["elapsed_ms"] is not None else ""
        click.echo(f"  attempt {a['attempt']:<3} {a['at']}  {a['outcome']:<5}{status}{took}  {a['detail']}")


@outbox.command("counts")
@config_option
@data_option
def outbox_counts_command(config_path, data_dir):
    """Notifications per destination and state; exits 3 when any is dead (for an alert)."""
    from gateway.store import outbox_counts

    cfg = _config(config_path, data_dir)
    counts = outbox_counts(_read_conn(cfg))
    for target, state, n in counts:
        click.echo(f"{n:>8}  {state:<9} {target}")
    dead = sum(n for _, state, n in counts if state == "dead")
    click.echo(f"dead letters: {dead}")
    sys.exit(3 if dead else 0)


@outbox.command("retry")
@click.argument("ids", nargs=-1)
@click.option("--all-dead", is_flag=True, help="Every dead letter.")
@click.option("--by", default=None, help="Who asks (for the audit trail; default: the login name).")
@config_option
@data_option
def outbox_retry(ids, all_dead, by, config_path, data_dir):
    """Send dead (or retrying) notifications again now; the server picks them up at its next poll."""
    from gateway.app.operations import opened_store

    if bool(ids) == all_dead:
        raise click.UsageError("give notification ids, or --all-dead")
    cfg = _config(config_path, data_dir)
    _read_conn(cfg).close()
    with opened_store(cfg.database, keys=_keys(cfg)) as store:
        done = store.requeue_notifications(None if all_dead else list(ids), by=_who(by))
    missing = sorted(set(ids) - set(done))
    click.echo(
        f"requeued {len(done)} notification(s)" + (f"; not dead or retrying: {', '.join(missing)}" if missing else "")
    )
    sys.exit(EXIT_BAD_INPUT if missing else 0)


@outbox.command("cancel")
@click.argument("ids", nargs=-1, required=True)
@click.option("--by", default=None, help="Who asks (for the audit trail; default: the login name).")
@config_option
@data_option
def outbox_cancel(ids, by, config_path, data_dir):
    """Cancel notifications not yet sent: they are never sent (audited)."""
    from gateway.app.operations import opened_store

    cfg = _config(config_path, data_dir)
    _read_conn(cfg).close()
    with opened_store(cfg.database, keys=_keys(cfg)) as store:
        done = store.cancel_notifications(list(ids), by=_who(by))
    missing = sorted(set(ids) - set(done))
    click.echo(
        f"cancelled {len(done)} notification(s)"
        + (f"; already sent or unknown: {', '.join(missing)}" if missing else "")
    )
    sys.exit(EXIT_BAD_INPUT if missing else 0)


@outbox.command("open")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--by", default=None, help="Who reads (for the audit trail; default: the login name).")
@config_option
@data_option
def outbox_open(file, by, config_path, data_dir):
    """Print the Bundle of a sealed file drop (<notification id>.json.sealed); the reading is audited."""
    from gateway.app.keys import open_outbox_file

    cfg = _config(config_path, data_dir)
    _keys(cfg)
    _read_conn(cfg).close()
    try:
        payload = open_outbox_file(cfg, file, _who(by))
    except (HeraldError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(json.loads(payload), indent=2, ensure_ascii=False))


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


@main.group()
def certs():
    """Development TLS material (`certs init`) and what a certificate says (`certs show`)."""


@certs.command("init")
@click.option(
    "--dir",
    "directory",
    default="certs",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write to.",
)
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    help="Name or IP for the server certificate (repeatable; default: localhost and 127.0.0.1).",
)
@click.option(
    "--client",
    "clients",
    multiple=True,
    help="A client certificate to make, by name: its subject CN, written as NAME.pem and NAME-key.pem "
    "(repeatable; default: client).",
)
@click.option("--days", default=365, show_default=True, help="Validity of every certificate.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def certs_init(directory, hostnames, clients, days, force):
    """Make a development CA, a server certificate and client certificates for mutual TLS (never for production)."""
    from gateway.app.certs import DEFAULT_CLIENT, DEFAULT_HOSTNAMES, make_dev_certs, planned_files, tls_config_lines

    clients = tuple(clients) or (DEFAULT_CLIENT,)
    existing = [p.name for p in planned_files(directory, clients) if p.exists()]
    if existing and not force:
        raise click.ClickException(f"{directory} already holds {', '.join(existing)}; use --force to replace them")
    if days < 1:
        raise click.UsageError("--days must be at least 1")
    try:
        made = make_dev_certs(directory, tuple(hostnames) or DEFAULT_HOSTNAMES, clients, days)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {', '.join(p.name for p in made.files)} to {directory} (development only)")
    click.echo("keys (*-key.pem) are readable by you only (0600); never commit or mail them\n")
    click.echo("Gateway (herald.toml):\n")
    for line in tls_config_lines(made):
        click.echo(f"  {line}".rstrip())
    cert, key = made.client(made.clients[0])
    click.echo("\nA sender (here herald send; an interface engine takes the same three files):\n")
    click.echo(f"  herald send --ca {made.ca} --cert {cert} --key {key} localhost:2575 sample_messages/")


@certs.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def certs_show(file):
    """Print a certificate's subject, SANs, issuer, validity, SHA-256 fingerprint and kind (CA, server, client)."""
    from gateway.app.certs import describe

    try:
        found = describe(file.read_bytes())
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{file}: {e}") from None
    for n, facts in enumerate(found, 1):
        if len(found) > 1:
            click.echo(f"{'' if n == 1 else chr(10)}certificate {n} of {len(found)}:")
        for line in facts.lines():
            click.echo(line)


# -- commands in their own modules (registered here, after everything they import from this one) --------
#
# They import this module's helpers. Run as ``python -m gateway.app.cli`` this file is ``__main__``, and
# importing them here would load a second copy of it half-way: the entry point below imports the module
# proper instead, which registers them.

if __name__ not in ("__main__", "__mp_main__"):
    from gateway.app.cli_recipients import recipients

    main.add_command(recipients)

    from gateway.app.cli_transitions import patient, snf, tasks

    main.add_command(patient)
    main.add_command(tasks)
    main.add_command(snf)

    from gateway.app.cli_console import index, users

    main.add_command(users)
    main.add_command(index)


if __name__ == "__main__":  # pragma: no cover
    from gateway.app.cli import main as registered

    registered()
