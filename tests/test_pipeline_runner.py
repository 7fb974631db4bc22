"""The pipeline's service stops only after the batch in hand is written, and waits on it without polling.

No reactor runs: the store's write is held by the test (failure injection: a
slow disk) and the batch's conversion is replaced by ready outcomes, so every
step is driven by hand and the Deferreds are inspected directly.
"""

from __future__ import annotations

import dataclasses

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import Clock

from gateway.config import load_config
from gateway.pipeline.runner import PipelineWorker
from gateway.records import ROUTED, MessageOutcome, PendingMessage


class HeldStore:
    """A store that has one batch to give and holds its outcome write until the test releases it."""

    def __init__(self, batches) -> None:
        self.path = None
        self.batches = batches
        self.written: defer.Deferred = defer.Deferred()
        self.outcomes: list = []

    def pending_messages(self, after_id: int, limit: int) -> defer.Deferred:
        return defer.succeed(self.batches.pop(0) if self.batches else [])

    def record_outcomes(self, outcomes) -> defer.Deferred:
        self.outcomes.extend(outcomes)
        return self.written


class Runner(PipelineWorker):
    """The pipeline's service with conversion done at once and no thread or process pool."""

    def startService(self) -> None:
        Service.startService(self)
        self.wake()

    def _process(self, pending) -> defer.Deferred:
        return defer.succeed([MessageOutcome(p.id, ROUTED) for p in pending])


def runner(store: HeldStore, clock: Clock) -> Runner:
    config = dataclasses.replace(load_config(None), pipeline_workers=0)
    return Runner(store, config, None, clock, on_routed=lambda: None)


def test_stop_waits_for_the_batch_being_written():
    """stopService fires once the outcome write in progress has committed, not before, and sets no timer."""
    store = HeldStore([[PendingMessage(1, b"", "", "")]])
    clock = Clock()
    service = runner(store, clock)
    service.startService()
    assert [o.message_id for o in store.outcomes] == [1]  # the write is under way
    stopped = service.stopService()
    clock.advance(60)
    assert not stopped.called
    assert clock.getDelayedCalls() == []  # waiting on the write, not polling for it
    store.written.callback(1)
    assert stopped.called and service.processed == 1


def test_stop_with_nothing_in_hand_is_immediate():
    """With no batch in flight, stopping fires at once."""
    store = HeldStore([])
    service = runner(store, Clock())
    service.startService()
    stopped = service.stopService()
    assert stopped.called and store.outcomes == []
