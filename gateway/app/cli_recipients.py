"""``herald recipients``: the recipient directory (PCPs, practices, care teams, HIEs and how to reach each).

The library does the work (:mod:`gateway.delivery.directory` checks an entry,
:mod:`gateway.store.directory` keeps it); these commands read the options or
a file, call it, and say what happened. Entries name providers and their
endpoints, never a patient, so listing them is not a PHI view.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from gateway.app.cli import (
    EXIT_BAD_INPUT,
    _config,
    _keys,
    _read_conn,
    _roster_snapshot,
    _who,
    config_option,
    data_option,
)
from gateway.delivery.directory import ENTRY_KINDS, EVENT_KINDS, DirectoryError, entry_from_dict, missing_pcps

#: Exit status of ``recipients missing`` when the roster names PCPs the directory lacks (for an alert).
EXIT_MISSING = 3
#: Channel settings that name files: made absolute when an entry is added, so the server finds them.
_PATH_SETTINGS = ("ca", "client_cert", "client_key", "certificate", "directory")


@click.group()
def recipients():
    """The recipient directory: who is told of which events, through which channels, when."""


def _absolute(entry: dict[str, Any], base: Path) -> dict[str, Any]:
    """``entry`` with every file path in its channels made absolute against ``base``."""
    channels = []
    for channel in entry.get("channels") or ():
        if not isinstance(channel, dict):
            channels.append(channel)
            continue
        fixed = dict(channel)
        for key in _PATH_SETTINGS:
            if isinstance(fixed.get(key), str) and fixed[key]:
                fixed[key] = str((base / Path(fixed[key]).expanduser()).resolve())
        auth = fixed.get("auth")
        if isinstance(auth, dict) and isinstance(auth.get("key_file"), str):
            fixed["auth"] = {**auth, "key_file": str((base / Path(auth["key_file"]).expanduser()).resolve())}
        channels.append(fixed)
    return {**entry, "channels": channels}


def _entries_from_file(path: Path) -> list[dict[str, Any]]:
    """The entries a TOML file (``[[recipient]]`` tables) or JSON file (one object or a list) holds."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
            items = raw if isinstance(raw, list) else [raw]
        else:
            raw = tomllib.loads(text)
            items = raw.get("recipient", [raw] if "kind" in raw else [])
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise click.ClickException(f"{path}: cannot be read as {path.suffix.lstrip('.') or 'TOML'}: {e}") from None
    if not items or not all(isinstance(i, dict) for i in items):
        raise click.ClickException(f"{path}: holds no [[recipient]] table (or JSON object)")
    return [_absolute(i, path.parent) for i in items]


def _entry_from_options(
    kind, name, npi, aco, practice, events, digest, timezone, fhir, mllp, direct, certificate, drop
):
    channels: list[dict[str, Any]] = []
    for url in fhir:
        channels.append({"channel": "fhir", "url": url})
    for spec in mllp:
        host, _, port = spec.rpartition(":")
        if not host or not port.isdigit():
            raise click.BadParameter(f"{spec!r} is not HOST:PORT", param_hint="--mllp")
        channels.append({"channel": "mllp", "host": host, "port": int(port)})
    for address in direct:
        if not certificate:
            raise click.BadParameter("a Direct address needs the recipient's --certificate", param_hint="--direct")
        channels.append({"channel": "direct", "to": address, "certificate": certificate})
    for folder in drop:
        channels.append({"channel": "file", "directory": folder, "format": "ndjson" if digest else "json"})
    entry: dict[str, Any] = {"kind": kind, "name": name, "npi": npi or "", "aco_id": aco or "", "channels": channels}
    if practice:
        entry["practice"] = practice
    if events:
        entry["events"] = [e.strip() for e in events.split(",") if e.strip()]
    if digest:
        entry["mode"], entry["digest_at"] = "digest", digest
    if timezone:
        entry["timezone"] = timezone
    return _absolute(entry, Path.cwd())


@recipients.command("add")
@click.option(
    "--from",
    "from_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Entries from a TOML ([[recipient]] tables) or JSON file; paths in it are relative to it.",
)
@click.option("--kind", type=click.Choice(ENTRY_KINDS), default=None, help="What the entry is.")
@click.option("--name", default=None, help="A name people recognise (the practice, the care team).")
@click.option("--npi", default=None, help="A PCP's 10-digit NPI (how the roster names it).")
@click.option("--aco", default=None, help="A care team's ACO id.")
@click.option("--practice", default=None, help="A PCP's practice entry id, whose channels it uses when it has none.")
@click.option("--events", default=None, help=f"Comma-separated, of: {', '.join(EVENT_KINDS)} (default: all).")
@click.option("--digest", default=None, metavar="HH:MM", help="A daily digest at this time instead of each event.")
@click.option("--timezone", default=None, help="The recipient's IANA time zone (the digest's clock).")
@click.option("--fhir", multiple=True, metavar="URL", help="A FHIR endpoint ($process-message is appended).")
@click.option("--mllp", multiple=True, metavar="HOST:PORT", help="An MLLP listener (the v2 message is forwarded).")
@click.option("--direct", multiple=True, metavar="ADDRESS", help="A Direct address (needs --certificate).")
@click.option("--certificate", default=None, help="The Direct recipient's certificate (PEM).")
@click.option("--file-drop", "drop", multiple=True, metavar="FOLDER", help="A folder for file drops.")
@click.option("--by", default=None, help="Who makes the change (for the audit trail; default: the login name).")
@config_option
@data_option
def recipients_add(
    from_file,
    kind,
    name,
    npi,
    aco,
    practice,
    events,
    digest,
    timezone,
    fhir,
    mllp,
    direct,
    certificate,
    drop,
    by,
    config_path,
    data_dir,
):
    """Add or change directory entries (from options, or every entry of --from FILE); each is checked first."""
    from gateway.app.operations import opened_store

    if from_file is not None:
        raw_entries = _entries_from_file(from_file)
    else:
        if not kind or not name:
            raise click.UsageError("give --kind and --name (and a channel), or --from FILE")
        raw_entries = [
            _entry_from_options(
                kind, name, npi, aco, practice, events, digest, timezone, fhir, mllp, direct, certificate, drop
            )
        ]
    checked = []
    for i, raw in enumerate(raw_entries):
        where = f"{from_file}: recipient {i + 1}" if from_file else "recipients add"
        try:
            checked.append(entry_from_dict(raw).as_dict())
        except DirectoryError as e:
            click.echo(f"herald {where}: {e.field}: {e.reason}", err=True)
            click.echo("herald recipients add: nothing was changed", err=True)
            sys.exit(EXIT_BAD_INPUT)
    cfg = _config(config_path, data_dir)
    _read_conn(cfg).close()
    with opened_store(cfg.database, keys=_keys(cfg)) as store:
        for entry in checked:
            action = store.put_recipient(entry, by=_who(by))
            click.echo(f"{action} {entry['id']}  {entry['name']}  ({_channels_said(entry)})")


def _channels_said(entry: dict) -> str:
    said = []
    for c in entry.get("channels") or ():
        kind = c.get("channel")
        target = {"fhir": c.get("url"), "mllp": f"{c.get('host')}:{c.get('port')}", "direct": c.get("to")}.get(
            kind, c.get("directory")
        )
        said.append(f"{kind} {target}")
    if not said and entry.get("practice"):
        said.append(f"the channels of {entry['practice']}")
    return ", ".join(said) or "no channel"


@recipients.command("list")
@click.option("--kind", type=click.Choice(ENTRY_KINDS), default=None, help="Only entries of this kind.")
@config_option
@data_option
def recipients_list(kind, config_path, data_dir):
    """List the directory: id, name, events, immediate or digest, channels."""
    from gateway.store.directory import directory_entries

    cfg = _config(config_path, data_dir)
    entries = directory_entries(_read_conn(cfg), kind)
    if not entries:
        click.echo("the recipient directory is empty: notifications go to [recipients] in the configuration")
        return
    for e in entries:
        when = f"digest {e['digest_at']} {e['timezone']}" if e["mode"] == "digest" else "immediate"
        off = "" if e.get("enabled", True) else "  (disabled)"
        click.echo(f"{e['id']:<28} {e['name'][:32]:<32} {when:<24} {','.join(e['events'])}  [{_channels_said(e)}]{off}")


@recipients.command("show")
@click.argument("entry_id")
@config_option
@data_option
def recipients_show(entry_id, config_path, data_dir):
    """Print one entry in full (JSON), with when and by whom it last changed."""
    from gateway.store.directory import directory_entry

    cfg = _config(config_path, data_dir)
    entry = directory_entry(_read_conn(cfg), entry_id)
    if entry is None:
        click.echo(f"herald recipients show: no entry {entry_id!r} (see herald recipients list)", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(json.dumps(entry, indent=2, sort_keys=True))


@recipients.command("remove")
@click.argument("entry_id")
@click.option("--by", default=None, help="Who makes the change (for the audit trail; default: the login name).")
@config_option
@data_option
def recipients_remove(entry_id, by, config_path, data_dir):
    """Remove an entry. Notifications already queued for it are dead-lettered when next tried (say why)."""
    from gateway.app.operations import opened_store

    cfg = _config(config_path, data_dir)
    _read_conn(cfg).close()
    with opened_store(cfg.database, keys=_keys(cfg)) as store:
        removed = store.remove_recipient(entry_id, by=_who(by))
    if not removed:
        click.echo(f"herald recipients remove: no entry {entry_id!r}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(f"removed {entry_id}")


@recipients.command("missing")
@config_option
@data_option
def recipients_missing(config_path, data_dir):
    """PCPs the current roster names with no usable directory entry; exits 3 when there are any (for an alert)."""
    from gateway.delivery.directory_cache import DirectoryCache
    from gateway.store.directory import roster_pcp_npis

    cfg = _config(config_path, data_dir)
    conn = _read_conn(cfg)
    entries = DirectoryCache().entries(conn)
    snapshot = _roster_snapshot(cfg)
    try:
        counts = roster_pcp_npis(snapshot.conn)
    finally:
        snapshot.close()
    missing = missing_pcps(counts, entries)
    if not entries:
        click.echo("the recipient directory is empty: notifications go to [recipients] in the configuration")
    for npi in missing:
        click.echo(
            f"{npi}  {counts[npi]} member(s)  no directory entry (herald recipients add --kind pcp --npi {npi} ...)"
        )
    click.echo(f"PCPs on the roster: {len(counts)}; without a directory entry: {len(missing)}")
    sys.exit(EXIT_MISSING if missing and entries else 0)
