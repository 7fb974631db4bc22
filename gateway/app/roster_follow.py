"""A node of a PostgreSQL store follows the roster published from any node (its server does, once a node).

Each node matches against its own roster file; an import on any node
publishes its file to the shared database (:mod:`gateway.store.roster_versions`).
:class:`RosterFollowing` is the server's part: at start it brings the node's
file to the newest published version before the pipeline's workers open it
(a node started with no roster file downloads it then), and every
:data:`~gateway.store.roster_versions.FOLLOW_SECONDS` it asks for the newest
version number and installs a newer one, off the reactor. The workers, the
transitions service and the console follow the file as they do after a local
import (by its identity, between batches). With SQLite there is nothing to
follow (:func:`roster_following` gives None).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from gateway.errors import StoreError
from gateway.store.postgres import PostgresDatabase
from gateway.store.roster_versions import FOLLOW_SECONDS, RosterFollower

__all__ = ["RosterFollowing", "roster_following"]


class RosterFollowing(Service):
    """Keeps this node's roster file at the newest version published in the PostgreSQL store.

    Start it after the store and before the pipeline. ``run_in_thread``
    (default: the reactor's thread pool) runs a look, which may download a
    file; one runs at a time, and a look due while one runs is skipped.
    """

    _log = Logger()

    def __init__(
        self,
        database: PostgresDatabase,
        reactor,
        *,
        interval: float = FOLLOW_SECONDS,
        run_in_thread: Callable[[Callable[[], int | None]], defer.Deferred] | None = None,
    ) -> None:
        self.database = database
        self.reactor = reactor
        self.interval = interval
        self.follower = RosterFollower(database, interval=interval)
        self._run_in_thread = run_in_thread or (
            lambda fn: threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn)
        )
        self._loop: task.LoopingCall | None = None
        self._running: defer.Deferred | None = None
        self._failing = ""
        #: Versions installed since start (the first look's included).
        self.installed = 0

    def startService(self) -> None:
        super().startService()
        # Before the workers open the file: a node with none matches against the published roster from the start.
        try:
            self._installed(self.follower.follow_now())
        except StoreError as e:
            if not self.follower.path.exists():
                raise StoreError(f"{e}; this node has no roster file of its own, so it does not start") from None
            self._failed(e)
        self._loop = task.LoopingCall(self.look)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._running is not None:
            yield self._running  # a download in progress finishes (or fails) whole
        self.follower.close()

    def look(self) -> defer.Deferred | None:
        """Look for a newer version once, off the reactor (skipped while a look runs)."""
        if self._running is not None or not self.running:
            return None
        d = self._running = self._run_in_thread(self.follower.follow_now)
        d.addCallbacks(self._installed, lambda f: self._failed(f.value))

        def done(_):
            self._running = None

        d.addBoth(done)
        return d

    def _installed(self, version: int | None) -> None:
        if self._failing:
            self._log.info("following the published roster works again")
            self._failing = ""
        if version is not None:
            self.installed += 1

    def _failed(self, error: BaseException) -> None:
        said = str(error) if isinstance(error, StoreError) else f"{type(error).__name__}: {error}"
        if said != self._failing:  # said once, not every few seconds while it lasts
            self._log.warn("{error}; this node keeps its roster version and tries again", error=said)
        self._failing = said


def roster_following(database, reactor, **kwargs) -> RosterFollowing | None:
    """The node's :class:`RosterFollowing` for a PostgreSQL store; None for SQLite (its file is the roster)."""
    if not isinstance(database, PostgresDatabase):
        return None
    return RosterFollowing(database, reactor, **kwargs)
