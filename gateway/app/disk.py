"""Intake first when the disk runs short: a free-space reserve for the data folder.

Intake stores each message before it is acknowledged; when a commit fails
(the disk is full) the sender is answered AE/CE and sends again later. The
pipeline and delivery write the large rows (Bundles, outbox files) about
messages already safe. :class:`DiskReserve` looks at the free space of the
data folder's filesystem every second; below the reserve it pauses them, so
what space is left goes to intake. They resume only once free space is back
above the reserve plus a margin (hysteresis), so the space a purge or an
operator frees goes to new messages first, and the backlog is worked off
from what is left above the reserve.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["DiskReserve", "Pausable"]

_MB = 1024 * 1024


class Pausable(Protocol):
    """A writer that can stop taking work and take it again (the pipeline, delivery)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class DiskReserve(Service):
    """Pauses ``writers`` while free space on ``path``'s filesystem is below ``reserve_bytes``.

    ``statvfs`` is injected (``os.statvfs``), and the reactor's clock drives
    the looks, so tests run it with :class:`twisted.internet.task.Clock`.
    """

    _log = Logger()

    #: Seconds between looks at the free space.
    INTERVAL = 1.0

    def __init__(
        self,
        path: Path | str,
        reserve_bytes: int,
        reactor,
        writers: Iterable[Pausable] = (),
        *,
        resume_bytes: int | None = None,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
    ) -> None:
        self.path = str(path)
        self.reserve_bytes = reserve_bytes
        # Half the reserve again (at least 1 MB) above it before the writers resume.
        self.resume_bytes = resume_bytes if resume_bytes is not None else reserve_bytes + max(reserve_bytes // 2, _MB)
        self.reactor = reactor
        self.writers = list(writers)
        self._statvfs = statvfs
        self._call = None
        #: Whether the writers are paused now, and the free bytes at the last look.
        self.paused = False
        self.free: int | None = None

    def startService(self) -> None:
        super().startService()
        self.check()

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def check(self) -> None:
        """Look at the free space now; pause or resume the writers; look again in :attr:`INTERVAL` seconds."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        try:
            st = self._statvfs(self.path)
        except OSError as e:
            self._log.warn("cannot read the free space of {path}: {error}", path=self.path, error=str(e))
        else:
            self.free = st.f_bavail * st.f_frsize
            if not self.paused and self.free < self.reserve_bytes:
                self.paused = True
                self._log.warn(
                    "free space {free:.1f} MB is below the reserve of {reserve:.1f} MB: the pipeline and delivery "
                    "pause, intake goes on",
                    free=self.free / _MB,
                    reserve=self.reserve_bytes / _MB,
                )
                for w in self.writers:
                    w.pause()
            elif self.paused and self.free >= self.resume_bytes:
                self.paused = False
                self._log.info(
                    "free space {free:.1f} MB is back above {resume:.1f} MB: the pipeline and delivery resume",
                    free=self.free / _MB,
                    resume=self.resume_bytes / _MB,
                )
                for w in self.writers:
                    w.resume()
        if self.running:
            self._call = self.reactor.callLater(self.INTERVAL, self.check)
