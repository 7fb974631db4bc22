"""The store: every SQL statement Herald runs lives in this package.

One module per concern:

- :mod:`~gateway.store.schema`: the tables, migrations, how the file is opened;
- :mod:`~gateway.store.writer`: the writer thread (group commit) and the reader thread;
- :mod:`~gateway.store.messages`: the message log;
- :mod:`~gateway.store.outbox`: notifications and delivery attempts;
- :mod:`~gateway.store.events`: the audit trail, each row chained to the last by its MAC;
- :mod:`~gateway.store.integrity`: each message row's digest, and the walk that verifies the trail;
- :mod:`~gateway.store.retention`: purging the bodies of finished messages past retention;
- :mod:`~gateway.store.reviews`: matches and the review queue;
- :mod:`~gateway.store.roster_file` and :mod:`~gateway.store.roster_import`:
  the roster file, read and published;
- :mod:`~gateway.store.keys`, :mod:`~gateway.store.sealing` and
  :mod:`~gateway.store.rotation`: PHI at rest, sealed with the key ring a
  connection is opened with, and sealed again under a new key;
  :mod:`~gateway.store.files`: Herald's files 0600, its folders 0700.

:class:`Store` is what the running gateway holds: each method is one thing the
gateway does to its data. Reads that the CLI makes on a read-only connection
(``list_messages``, ``message_detail``, ``list_reviews``, ...) are functions of
a connection, re-exported here. A second backend implements these methods and
functions, not SQL scattered through the stages. The store imports no stage:
it takes and returns the value objects of :mod:`gateway.records`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from twisted.internet import defer

from gateway.errors import StoreError
from gateway.records import (
    DeliveryAttempt,
    IntakeRecord,
    IntakeResult,
    MessageOutcome,
    Notification,
    PendingMessage,
)
from gateway.store import (
    claims,
    directory,
    events,
    integrity,
    messages,
    outbox,
    retention,
    reviews,
    schema,
    transitions,
)
from gateway.store.messages import count_by_state, list_messages, message_detail, outstanding_work
from gateway.store.outbox import list_outbox, notifications_for, outbox_counts
from gateway.store.reviews import list_reviews, review_detail, stored_match
from gateway.store.roster_file import (
    RosterReader,
    RosterSnapshot,
    StoredRoster,
    open_roster_snapshot,
    roster_count,
    roster_imports,
    roster_member,
    roster_path,
)
from gateway.store.schema import (
    SCHEMA_VERSION,
    check_database,
    iso,
    migrate,
    open_database,
    read_transaction,
    schema_version,
)
from gateway.store.writer import Writer

__all__ = [
    "SCHEMA_VERSION",
    "RosterReader",
    "RosterSnapshot",
    "Store",
    "StoreError",
    "StoredRoster",
    "check_database",
    "count_by_state",
    "list_messages",
    "list_outbox",
    "outbox_counts",
    "list_reviews",
    "message_detail",
    "migrate",
    "notifications_for",
    "open_database",
    "open_roster_snapshot",
    "outstanding_work",
    "read_transaction",
    "review_detail",
    "roster_count",
    "roster_imports",
    "roster_member",
    "roster_path",
    "schema_version",
    "stored_match",
]


class Store(Writer):
    """The durable message log, outbox, audit trail and review queue of one gateway.

    Methods that return a Deferred are for the reactor's thread (intake, the
    pipeline, delivery). The others block until their transaction has
    committed and are for other threads: the CLI, or a console's worker
    thread. Every write is stamped by the injected ``clock``; outbox rows fall
    due in the reactor's seconds.
    """

    #: Pipeline outcomes written per background job.
    OUTCOMES_PER_JOB = 16
    #: How long this node holds work it claimed (PostgreSQL; ``[storage] claim_lease_seconds``).
    claim_lease = claims.LEASE_SECONDS
    #: Roles this node leads (:meth:`lead`).
    _leading: frozenset[str] = frozenset()

    def lead(self, role: str) -> defer.Deferred[bool]:
        """Whether this node does ``role``'s work, which one node of several does (always, on SQLite).

        On PostgreSQL the first node to ask leads until it stops or dies
        (:func:`~gateway.store.claims.take_lead`); the others ask again on
        their next turn, and one of them takes over.
        """
        if not self.postgres or role in self._leading:
            return defer.succeed(True)

        def taken(got: bool) -> bool:
            if got:
                self._leading = self._leading | {role}
            return got

        return self.submit(claims.take_lead, role).addCallback(taken)

    # -- intake ------------------------------------------------------------------

    def record_frame(self, record: IntakeRecord) -> defer.Deferred[IntakeResult]:
        """Store a frame (and its ``received`` event) durably; fire once committed."""
        return self.submit(messages.record_frame, record, iso(self.clock()))

    def record_ack_sent(self, message_id: int, code: str) -> None:
        """Log that an ACK went out (rides the next commit; nobody waits on it)."""
        self.submit_nowait(
            events.append_event, iso(self.clock()), message_id, None, "intake", "ack-sent", {"code": code}
        )

    def record_intake_event(self, kind: str, detail: dict) -> defer.Deferred:
        """Audit something intake did that is about no one stored message (e.g. rejected frames not stored)."""
        return self.submit(events.append_event, iso(self.clock()), None, None, "intake", kind, detail)

    def record_connection_event(self, kind: str, detail: dict, actor: str = "tls") -> defer.Deferred:
        """Audit something about a connection, not a stored message (a refused TLS client, a refused sender)."""
        return self.submit(events.append_event, iso(self.clock()), None, None, actor, kind, detail)

    # -- pipeline ----------------------------------------------------------------

    @defer.inlineCallbacks
    def pending_messages(self, after_id: int, limit: int):
        """Messages still in state ``received`` with id > ``after_id``, oldest first (a Deferred list).

        Each is checked against its digest first: one whose record was altered
        after it was stored is not processed but failed, with the reason
        (:func:`~gateway.store.integrity.fail_altered`).
        """
        while True:
            if self.postgres:  # several nodes: claimed (gateway.store.claims.claim_messages)
                lease = self.claim_lease
                altered, pending = yield self.submit_read(_claimed_pending, self.node, limit, lease, after_id)
                if altered:
                    yield self.submit(integrity.fail_altered, altered, iso(self.clock()))
                if pending or not altered:
                    return pending
                continue
            altered, pending = yield self.submit_read(_checked_pending, after_id, limit)
            if not altered:
                return pending
            yield self.submit(integrity.fail_altered, altered, iso(self.clock()))

    def record_outcomes(self, outcomes: Iterable[MessageOutcome]) -> defer.Deferred[int]:
        """Apply pipeline outcomes: state, FHIR, match, outbox rows and events; fire with how many applied.

        Written :attr:`OUTCOMES_PER_JOB` at a time, one transaction each; one
        message's outcome is always whole in one transaction. Each outcome
        applies only if its message is still ``received``, so a message is
        never turned into notifications twice.
        """
        outcomes = list(outcomes)
        now, due = iso(self.clock()), self.seconds()
        # In slices: each slice rides one commit with the intake jobs of the
        # moment, so no commit (and no ACK waiting on it) carries a whole batch.
        step = self.OUTCOMES_PER_JOB
        jobs = [
            self.submit_background(messages.apply_outcomes, outcomes[i : i + step], now, due)
            for i in range(0, len(outcomes), step)
        ]
        if not jobs:
            return defer.succeed(0)
        d = defer.gatherResults(jobs, consumeErrors=True)
        d.addCallbacks(sum, lambda f: f.value.subFailure)
        return d

    # -- delivery ----------------------------------------------------------------

    def due_notifications(self, now_seconds: float, limit: int, exclude: Iterable[str] = ()) -> defer.Deferred:
        """Notifications pending or retrying whose next attempt is due (on PostgreSQL, claimed by this node)."""
        if self.postgres:
            return self.submit_read(
                claims.claim_notifications, self.node, now_seconds, limit, tuple(exclude), self.claim_lease
            )
        return self.submit_read(outbox.due_notifications, now_seconds, limit, tuple(exclude))

    def due_for_recipient(
        self, recipient_id: str, channel_index: int, now_seconds: float, exclude: Iterable[str] = ()
    ) -> defer.Deferred:
        """Every due notification of one recipient's channel (a digest's; on PostgreSQL, those this node claimed)."""
        if self.postgres:
            return self.submit_read(
                claims.claim_recipient_notifications,
                self.node,
                recipient_id,
                channel_index,
                now_seconds,
                tuple(exclude),
                self.claim_lease,
            )
        return self.submit_read(outbox.due_for_recipient, recipient_id, channel_index, now_seconds, tuple(exclude))

    def record_attempts(self, attempts: list[DeliveryAttempt]) -> defer.Deferred:
        """Record delivery attempts and their notifications' new states, in one job (their claims given up)."""
        if self.postgres:
            return self.submit_background(claims.record_attempts, self.node, list(attempts), iso(self.clock()))
        return self.submit_background(outbox.record_attempts, list(attempts), iso(self.clock()))

    # -- the outbox, by an operator (blocking) ------------------------------------------

    def requeue_notifications(self, ids: list[str] | None, *, by: str) -> list[str]:
        """Make dead notifications (``ids``, or all when None) due now; returns those requeued (audited)."""
        return self.call(outbox.requeue_notifications, ids, iso(self.clock()), self.seconds(), by)

    def cancel_notifications(self, ids: list[str], *, by: str) -> list[str]:
        """Cancel notifications not yet sent; returns those cancelled (audited)."""
        return self.call(outbox.cancel_notifications, ids, iso(self.clock()), by)

    # -- the recipient directory (blocking) ---------------------------------------------

    def put_recipient(self, entry: dict, *, by: str) -> str:
        """Add or change a directory entry (checked already); ``added``, ``changed`` or ``unchanged`` (audited)."""
        return self.call(directory.put_directory_entry, entry, iso(self.clock()), by)

    def remove_recipient(self, entry_id: str, *, by: str) -> bool:
        """Remove a directory entry; False when there was none (audited)."""
        return self.call(directory.remove_directory_entry, entry_id, iso(self.clock()), by)

    # -- care transitions (gateway.store.transitions) -----------------------------------

    def use_episode_flags(self, flags_of: transitions.FlagsOf) -> None:
        """Have pipeline outcomes flag the member's notifications (readmission, ED use, SNF).

        ``flags_of`` runs on the writer thread, in the outcome's transaction
        (:func:`~gateway.store.transitions.record_episode_event`). Call it before :meth:`start`.
        """
        self._conn.episode_flags = flags_of

    def unfolded_episode_events(self, limit: int) -> defer.Deferred:
        """Episode events the transitions service has not folded yet, oldest first (a Deferred list)."""
        return self.submit_read(transitions.unfolded_events, limit)

    def transitions_state(self, members: Iterable[tuple[str, str]]) -> defer.Deferred:
        """Each member's events, episodes and open tasks (a Deferred dict by ``(aco_id, member_id)``)."""
        return self.submit_read(transitions.member_state, list(members))

    def open_episodes(self, setting: str) -> defer.Deferred:
        """Open episodes of one setting (a Deferred list)."""
        return self.submit_read(transitions.open_episodes, setting)

    def alert_source(self, message_id: int) -> defer.Deferred:
        """The message an ED e-alert answers, opened (a Deferred dict, None when its body is gone)."""
        return self.submit_read(transitions.alert_source, message_id)

    def apply_transitions(self, change: dict) -> defer.Deferred:
        """Write what the transitions service decided (episodes, tasks, e-alerts, events), one transaction."""
        return self.submit_background(transitions.apply_transitions, change, iso(self.clock()), self.seconds())

    def complete_task(self, task_id: str, *, by: str) -> str | None:
        """Mark a worklist task done (audited); its status before, None when there is no such task (blocking)."""
        return self.call(transitions.complete_task, task_id, by, iso(self.clock()))

    # -- reviews and the roster's audit (blocking) -------------------------------------

    def review(self, review_id: int) -> dict | None:
        """One review with its stored message (blocking read)."""
        return self.read(reviews.review_detail, review_id)

    def stored_match(self, message_id: int):
        """A message's stored match row, its detail decoded (blocking read)."""
        return self.read(reviews.stored_match, message_id)

    def accept_review(
        self,
        review_id: int,
        *,
        aco_id: str,
        member_id: str,
        notifications: list[Notification],
        events: list[tuple[str, dict]],
        mrns: Iterable[tuple[str, str]],
        by: str,
    ) -> str:
        """Accept a review in one transaction: route the held notifications (due now), remember the MRN links.

        Returns the message's new state. Raises :class:`StoreError` when the
        review does not exist or was already decided.
        """
        return self.call(
            reviews.accept_review,
            review_id,
            aco_id,
            member_id,
            list(notifications),
            list(events),
            list(mrns),
            by,
            iso(self.clock()),
            self.seconds(),
        )

    def reject_review(self, review_id: int, *, by: str, reason: str = "") -> str:
        """Reject a review: the message stays unmatched (its HIE notification stands). Returns its new state."""
        return self.call(reviews.reject_review, review_id, by, reason, iso(self.clock()))

    def record_roster_event(self, detail: dict, at: datetime | None = None) -> None:
        """Audit a published roster version (one small transaction), stamped ``at`` (default: the clock)."""
        stamp = iso(at or self.clock())
        self.call(events.append_event, stamp, None, None, "roster", "roster-imported", detail)

    # -- the audit trail and retention -----------------------------------------------

    def record_reads(
        self, actor: str, command: str, message_ids: Iterable[int] = (), detail: dict | None = None
    ) -> None:
        """Audit that ``actor`` read patient data (``phi-read``): one event per message read, or one for none.

        Blocking, and before the data is shown: a read that cannot be audited
        is not made (the caller shows nothing when this raises).
        """
        info = {"command": command, **(detail or {})}
        now = iso(self.clock())
        rows = [(now, m, None, actor, "phi-read", info) for m in message_ids] or [
            (now, None, None, actor, "phi-read", info)
        ]
        self.call(events.append_events, rows)

    def purge_bodies(self, before: str, *, by: str, limit: int = 500) -> retention.PurgeBatch:
        """Remove the bodies of up to ``limit`` messages received before ``before`` whose work is done (blocking)."""
        return self.call(retention.purge_next, before, iso(self.clock()), by, limit)

    def purge_bodies_later(self, before: str, *, by: str, limit: int = 500) -> defer.Deferred:
        """:meth:`purge_bodies` off the ACK path, for the server's periodic purge (a Deferred PurgeBatch)."""
        return self.submit_background(retention.purge_next, before, iso(self.clock()), by, limit)

    def legacy_roster(self) -> list[dict] | None:
        """The members a version-1 database kept in itself, if it still holds them (blocking read)."""
        return self.read(schema.legacy_roster)

    def drop_legacy_roster(self, detail: dict | None) -> None:
        """Forget the version-1 members (now in the roster file), with an audit event when any were moved."""
        self.call(_drop_legacy_roster, detail, iso(self.clock()))


def _checked_pending(conn, after_id: int, limit: int) -> tuple[dict[int, str], list[PendingMessage]]:
    """(altered messages among the next pending ones, with what is wrong; else the pending messages).

    One read: each body is opened once, for the check and for the pipeline."""
    altered, intact = integrity.checked_pending(conn, after_id, limit)
    return (altered, []) if altered else ({}, [PendingMessage(*fields) for fields in intact])


def _claimed_pending(
    conn, node: str, limit: int, lease: float, after_id: int = 0
) -> tuple[dict[int, str], list[PendingMessage]]:
    """:func:`_checked_pending` for a node of several: the messages it claimed (:mod:`~gateway.store.claims`).

    The intact ones come back with the altered: they are this node's now, and no second claim would return them."""
    altered, intact = claims.claim_messages(conn, node, limit, lease, after_id)
    return altered, [PendingMessage(*fields) for fields in intact]


def _drop_legacy_roster(conn, detail: dict | None, now: str) -> None:
    schema.drop_legacy_roster(conn)
    if detail is not None:
        events.append_event(conn, now, None, None, "roster", "roster-imported", detail)
