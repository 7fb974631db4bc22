"""``herald users`` (the web console's users) and ``herald index`` (the message browser's blind index).

Thin, as the other commands: each opens the store, calls one library
function, and says what happened. Adding, changing and removing users is
audited (``console-user-added`` and so on, with who asked); a password is
read from a prompt (twice) or, for scripts, one line of standard input
(``--password-stdin``), and only its argon2id hash is stored.
"""

from __future__ import annotations

import sys

import click

from gateway.app.cli import EXIT_BAD_INPUT, _config, _keys, _read_conn, _stderr_is_tty, _who, config_option, data_option
from gateway.errors import StoreError

__all__ = ["index", "users"]


@click.group()
def users():
    """The web console's users: analysts and admins, with argon2-hashed passwords."""


def _password(from_stdin: bool) -> str:
    from gateway.app.console.auth import check_password

    if from_stdin:
        text = sys.stdin.readline().rstrip("\r\n")
    else:
        text = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        return check_password(text)
    except ValueError as e:
        click.echo(f"herald users: {e}", err=True)
        sys.exit(EXIT_BAD_INPUT)


def _store_call(cfg, keys, fn, *args):
    """Run one store job (``fn(conn, *args[:-1], now, by)``) with the key ring the audit trail is chained
    with; a new data folder gets its database. A clean error, exit 2, when the store refuses."""
    from gateway.app.operations import opened_store
    from gateway.store.schema import iso

    try:
        with opened_store(cfg.database, keys=keys) as store:
            return store.call(fn, *args[:-1], iso(store.clock()), args[-1])
    except StoreError as e:
        click.echo(f"herald users: {e}", err=True)
        sys.exit(EXIT_BAD_INPUT)


@users.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["analyst", "admin"]), required=True, help="admin may also manage users.")
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of standard input.")
@click.option("--by", default=None, help="Who adds (for the audit trail; default: the login name).")
@config_option
@data_option
def users_add(name, role, password_stdin, by, config_path, data_dir):
    """Add a console user NAME with a role; the password is asked for (twice) unless --password-stdin."""
    from gateway.app.console.auth import check_name, hash_password
    from gateway.store.console import add_user

    try:
        check_name(name)
    except ValueError as e:
        click.echo(f"herald users add: {e}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    cfg = _config(config_path, data_dir)
    keys = _keys(cfg)  # no key: said before a password is asked for
    hashed = hash_password(_password(password_stdin))
    _store_call(cfg, keys, add_user, name, role, hashed, _who(by))
    click.echo(f"added {name} ({role})")


@users.command("list")
@config_option
@data_option
def users_list(config_path, data_dir):
    """List the console users: name, role, when added and changed, open sessions."""
    from gateway.store.console import list_users

    cfg = _config(config_path, data_dir)
    conn = _read_conn(cfg)
    rows = list_users(conn)
    if not rows:
        click.echo("no console users (add one: herald users add NAME --role admin)")
        return
    click.echo(f"{'NAME':<24}  {'ROLE':<8}  {'ADDED (UTC)':<19}  {'CHANGED (UTC)':<19}  SESSIONS")
    for u in rows:
        click.echo(
            f"{u['name']:<24}  {u['role']:<8}  {u['created_at'][:19]:<19}  {u['updated_at'][:19]:<19}  {u['sessions']}"
        )


@users.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the new password from one line of standard input.")
@click.option("--by", default=None, help="Who changes it (for the audit trail; default: the login name).")
@config_option
@data_option
def users_passwd(name, password_stdin, by, config_path, data_dir):
    """Set a console user's password; the user's sessions end."""
    from gateway.app.console.auth import hash_password
    from gateway.store.console import set_password

    cfg = _config(config_path, data_dir)
    keys = _keys(cfg)
    _read_conn(cfg).close()
    hashed = hash_password(_password(password_stdin))
    _store_call(cfg, keys, set_password, name, hashed, _who(by))
    click.echo(f"password of {name} changed; their sessions have ended")


@users.command("remove")
@click.argument("name")
@click.option("--by", default=None, help="Who removes (for the audit trail; default: the login name).")
@config_option
@data_option
def users_remove(name, by, config_path, data_dir):
    """Remove a console user; their sessions end."""
    from gateway.store.console import remove_user

    cfg = _config(config_path, data_dir)
    keys = _keys(cfg)
    _read_conn(cfg).close()
    _store_call(cfg, keys, remove_user, name, _who(by))
    click.echo(f"removed {name}")


@click.group()
def index():
    """The message browser's blind index: keyed hashes of each message's patient identifiers and names."""


@index.command("status")
@config_option
@data_option
def index_status_command(config_path, data_dir):
    """Say how far the index is: terms stored, the back-fill of earlier messages, plaintext-era terms."""
    from gateway.store.console import index_status

    cfg = _config(config_path, data_dir)
    status = index_status(_read_conn(cfg))
    done = status["backfill_through"] >= status["backfill_to"]
    click.echo(f"terms: {status['terms']:,} for messages up to id {status['messages']:,}")
    click.echo(
        "back-fill of earlier messages: "
        + ("done" if done else f"{status['backfill_through']:,} of {status['backfill_to']:,} (the server goes on)")
    )
    if status["plain_terms"]:
        click.echo("some terms were hashed while encryption at rest was off: run `herald index rebuild`")


@index.command("rebuild")
@click.option("--batch", default=1000, show_default=True, help="Messages indexed per transaction.")
@click.option("--by", default=None, help="Who rebuilds (for the audit trail; default: the login name).")
@config_option
@data_option
def index_rebuild(batch, by, config_path, data_dir):
    """Index every message again (the server may run meanwhile: each batch is one short transaction)."""
    from gateway.app.operations import opened_store
    from gateway.store.console import finish_rebuild, rebuild_batch
    from gateway.store.schema import iso

    cfg = _config(config_path, data_dir)
    keys = _keys(cfg)
    _read_conn(cfg, keys).close()
    total, after = 0, 0
    with opened_store(cfg.database, keys=keys) as store:
        last = store.read(_last_message_id)
        bar = click.progressbar(length=max(1, last), label="indexing", file=sys.stderr) if _stderr_is_tty() else None
        while after < last:
            done, after = store.call(rebuild_batch, after, batch)
            if not done:
                break
            total += done
            if bar is not None:
                bar.update(min(after, last) - bar.pos)
        store.call(finish_rebuild, after, iso(store.clock()), _who(by))
    if bar is not None:
        bar.render_finish()
    click.echo(f"indexed {total:,} message(s) up to id {after:,}")


def _last_message_id(conn) -> int:
    from gateway.store.console import index_status

    return index_status(conn)["messages"]
