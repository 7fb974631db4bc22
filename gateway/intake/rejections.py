"""Rejected frames, sampled per peer: a flood of garbage is answered, not written down frame by frame.

Every rejected frame is still answered (AR/CR). While the service runs, only
the first ``sample`` rejections from one peer host in each ``window`` seconds
are stored (truncated) and logged; the rest are counted by reason, and when
the window closes each peer that had more gets one log line and one audit
event saying how many were not stored and why. Time is the reactor's
(``clock``, a ``task.Clock`` in tests).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from gateway.config import Config
from gateway.store import Store

__all__ = ["MAX_PEERS", "OTHER_PEERS", "RejectionSampler", "peer_host"]

#: Peer hosts tallied at once; rejections from further hosts in the same window share one tally.
MAX_PEERS = 1024
OTHER_PEERS = "(other peers)"


def peer_host(peer: str) -> str:
    """The host of a ``host:port`` peer (the tally is per host: a new connection is a new port)."""
    host = getattr(peer, "host", None)  # mllp.Peer says it; a plain string is split
    if isinstance(host, str) and host:
        return host
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


@dataclass(slots=True)
class _Tally:
    seen: int = 0
    reasons: Counter = field(default_factory=Counter)

    @property
    def not_stored(self) -> int:
        return sum(self.reasons.values())


class RejectionSampler(Service):
    """Decides which rejected frames are stored and logged; summarises the rest once per window."""

    _log = Logger()

    def __init__(
        self,
        store: Store,
        sample: int = Config.rejected_sample,
        window: float = Config.rejected_window,
        clock=None,
    ) -> None:
        self.store = store
        self.sample = sample
        self.window = window
        self._clock = clock
        self._peers: dict[str, _Tally] = {}
        self._timer = None

    @property
    def clock(self):
        """The reactor's clock (``callLater``): the one given, else the global reactor, looked up when first needed."""
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock

    def admit(self, peer: str, reason: str) -> bool:
        """Count one rejection from ``peer``; True when it is to be stored and logged.

        ``reason`` is a short label without message content (a table 0357
        code and a location). While the service is not running every
        rejection is admitted.
        """
        if not self.running:
            return True
        host = peer_host(peer)
        tally = self._peers.get(host)
        if tally is None:
            if len(self._peers) >= MAX_PEERS:
                host = OTHER_PEERS
            tally = self._peers.setdefault(host, _Tally())
        if self._timer is None:
            self._timer = self.clock.callLater(self.window, self._close_window)
        tally.seen += 1
        if tally.seen <= self.sample:
            return True
        tally.reasons[reason] += 1
        return False

    def _close_window(self) -> defer.Deferred:
        self._timer = None
        peers, self._peers = self._peers, {}
        written = []
        for host, tally in peers.items():
            count = tally.not_stored
            if not count:
                continue
            reasons = dict(tally.reasons.most_common())
            self._log.warn(
                "peer {peer}: {count} more rejected frames not stored in the last {window:g} s "
                "(the first {sample} were); reasons: {reasons}",
                peer=host,
                count=count,
                window=self.window,
                sample=self.sample,
                reasons=", ".join(f"{k} x{v}" for k, v in reasons.items()),
            )
            detail = {
                "peer": host,
                "count": count,
                "stored": self.sample,
                "window_seconds": self.window,
                "reasons": reasons,
            }
            d = self.store.record_intake_event("rejections-not-stored", detail)
            d.addErrback(lambda f: self._log.error("could not audit rejections not stored: {e}", e=f.getErrorMessage()))
            written.append(d)
        return defer.gatherResults(written) if written else defer.succeed(None)

    def stopService(self):
        """Close the window now: its summary is written before the store stops."""
        super().stopService()
        if self._timer is None:
            return None
        self._timer.cancel()
        return self._close_window()
