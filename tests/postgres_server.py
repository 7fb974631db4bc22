"""A real PostgreSQL server for the tests: the one ``.ci/run`` started, or one started here.

``HERALD_TEST_POSTGRES`` (a URL to a database the tests may create databases
from) names a running server; ``.ci/run`` starts Debian's ``postgresql`` on a
free local port in a temporary data directory and sets it. Without it, the
tests start a server of their own when Debian's binaries are installed
(``/usr/lib/postgresql/<version>/bin``), and skip the PostgreSQL cases with a
message when they are not. ``HERALD_REQUIRE_POSTGRES=1`` (CI) turns that skip
into a failure, so a CI run cannot pass having left PostgreSQL out.

Run as a program it starts a server and prints its URL (``start <folder>``) or
stops one (``stop <folder>``): that is how ``.ci/run`` does it.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

URL_ENV = "HERALD_TEST_POSTGRES"
REQUIRE_ENV = "HERALD_REQUIRE_POSTGRES"


def binaries() -> Path | None:
    """The folder of Debian's PostgreSQL server programs (the newest version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` user the package made."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def start(folder: Path) -> str:
    """Start a server with its data in ``folder`` on a free 127.0.0.1 port; return a URL to it."""
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
    subprocess.run(
        _as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "herald", "--auth=trust", "-E", "UTF8"])
        + ["--locale=C.UTF-8"],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=on -c max_connections=200"
    subprocess.run(
        _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log")])
        + ["-o", options, "-w", "-t", "60", "start"],
        check=True,
        capture_output=True,
    )
    return f"postgresql://herald@127.0.0.1:{port}/postgres"


def stop(folder: Path) -> None:
    """Stop the server started in ``folder`` (fast shutdown), and remove its data."""
    bin_dir = binaries()
    data = folder / "data"
    if bin_dir is not None and data.exists():
        subprocess.run(
            _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )
    shutil.rmtree(folder, ignore_errors=True)


_names = itertools.count(1)


def create_database(admin_url: str) -> str:
    """A new, empty database on the server at ``admin_url``; returns its URL."""
    import psycopg

    name = f"herald_test_{os.getpid()}_{next(_names)}_{int(time.time() * 1000) % 100000}"
    with contextlib.closing(psycopg.connect(admin_url, autocommit=True)) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(admin_url: str, url: str) -> None:
    """Drop a database :func:`create_database` made (its connections are ended first)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with contextlib.closing(psycopg.connect(admin_url, autocommit=True)) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        print(start(where))
    elif action == "stop":
        stop(where)
    else:
        sys.exit(f"usage: {sys.argv[0]} start|stop <folder>")
