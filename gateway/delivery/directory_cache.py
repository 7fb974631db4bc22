"""The recipient directory as the pipeline and the delivery worker read it: checked entries, re-read
only when the table changed."""

from __future__ import annotations

from gateway.delivery.directory import DirectoryEntry, entry_from_dict
from gateway.store.directory import directory_entries, directory_version

__all__ = ["DirectoryCache"]


class DirectoryCache:
    """The directory's entries (:class:`DirectoryEntry` by id), read again only when it changed:
    one small query (count and newest change) a call."""

    def __init__(self) -> None:
        self._version: tuple | None = None
        self._entries: dict[str, DirectoryEntry] = {}

    def entries(self, conn) -> dict[str, DirectoryEntry]:
        version = directory_version(conn)
        if version != self._version:
            rows = directory_entries(conn) if version[0] else []
            self._entries = {e["id"]: entry_from_dict(e) for e in rows}
            self._version = version
        return self._entries
