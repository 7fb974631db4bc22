"""Herald's files are its own: data files 0600 and folders 0700, whatever the umask.

The database, its write-ahead log and shared-memory index, the roster file and
its import copy, the file drops under the data folder and the key files hold
PHI or protect it. SQLite gives a database's -wal and -shm files the mode of
the database file, so a database created 0600 keeps its companions 0600.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["FILE_MODE", "FOLDER_MODE", "create_private_file", "private_data_dir", "private_file", "private_folder"]

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def private_folder(path: Path) -> Path:
    """Make ``path`` a folder of mode 0700, and each missing folder above it; tighten it if it exists and is ours."""
    missing = []
    folder = path
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(mode=FOLDER_MODE, exist_ok=True)
    with contextlib.suppress(OSError):  # not ours (a share someone else owns): leave it
        for folder in [path, *missing]:
            if folder.stat().st_mode & 0o777 != FOLDER_MODE:
                folder.chmod(FOLDER_MODE)  # the umask may have taken bits mkdir's mode did not give
    return path


def private_file(path: Path) -> None:
    """Tighten an existing file to 0600 (a file from an older Herald, or made under a loose umask)."""
    with contextlib.suppress(OSError):  # gone, or not ours
        if path.stat().st_mode & 0o777 != FILE_MODE:
            path.chmod(FILE_MODE)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (SQLite then makes its database in it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def private_data_dir(data_dir: Path) -> Path:
    """Make the data folder 0700 and tighten what an older Herald (or a loose umask) left open.

    The folder itself, the databases and their companions, the roster file,
    and the outbox folders under it: a 0700 folder keeps others from every
    file in it, so the files of a file drop are not walked one by one.
    """
    private_folder(data_dir)
    for name in ("herald.db", "herald.db-wal", "herald.db-shm", "roster.db", "roster.lock"):
        private_file(data_dir / name)
    outbox = data_dir / "outbox"
    if outbox.is_dir():
        private_folder(outbox)
        for folder in outbox.iterdir():
            if folder.is_dir():
                private_folder(folder)
    return data_dir
