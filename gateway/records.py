"""Herald's records: the states and value objects that every stage and the store share.

A stage (conversion, matching, routing, the pipeline) describes what it
decided with these; the store writes them. Neither imports the other: this
module imports nothing from Herald, so anything may import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

# -- states of a message (see ARCHITECTURE.md) ------------------------------------

RECEIVED = "received"
REJECTED = "rejected"
IGNORED = "ignored"
FAILED = "failed"
ROUTED = "routed"
#: A possible roster match (or a probable one, when not routed automatically)
#: waits in the review queue; the HIE notification is already written.
REVIEW = "review"
#: Matched (or not) and no recipient is to be told.
MATCHED = "matched"
UNMATCHED = "unmatched"
#: Every state a message can be in (``herald log list --state``).
MESSAGE_STATES = (RECEIVED, REJECTED, IGNORED, FAILED, ROUTED, REVIEW, MATCHED, UNMATCHED)

# -- states of a notification -----------------------------------------------------

PENDING = "pending"
SENT = "sent"
RETRYING = "retrying"
DEAD = "dead"
#: Cancelled by an operator (``herald outbox cancel``): never sent.
CANCELLED = "cancelled"
NOTIFICATION_STATES = (PENDING, RETRYING, SENT, DEAD, CANCELLED)

# -- states of a review -----------------------------------------------------------

REVIEW_OPEN = "open"
REVIEW_ACCEPTED = "accepted"
REVIEW_REJECTED = "rejected"

# -- recipients -------------------------------------------------------------------

#: Every recipient role, in the order notifications are listed.
ROLES = ("pcp", "care_team", "hie")
#: The roles told about a roster member (the HIE is told about every patient).
MEMBER_ROLES = ("pcp", "care_team")

#: Roster columns as matching reads them (the README's roster table), in stored order.
MEMBER_COLUMNS = (
    "aco_id",
    "member_id",
    "mbi",
    "mrn",
    "mrn_authority",
    "last_name",
    "first_name",
    "middle_name",
    "name_suffix",
    "birth_date",
    "sex",
    "address_line",
    "city",
    "state",
    "zip",
    "phone",
    "pcp_npi",
    "pcp_name",
    "care_manager",
    "effective_start",
    "effective_end",
    "opted_out",
)


def _pickled_by_fields(cls):
    """Pickle ``cls`` (a frozen slots dataclass) as its class and field values, in order.

    Python's own way for such classes looks its fields up at every load
    (``dataclasses.fields``); outcomes cross from the pipeline's workers to the
    server by the thousand a second.
    """
    names = tuple(f.name for f in fields(cls))

    def __reduce__(self):
        return (cls, tuple([getattr(self, name) for name in names]))

    cls.__reduce__ = __reduce__
    return cls


@dataclass(frozen=True, slots=True)
class IntakeRecord:
    """What intake stores for one frame (header fields may be blank when unreadable)."""

    raw: bytes
    peer: str
    state: str
    ack_code: str
    sending_application: str = ""
    sending_facility: str = ""
    message_type: str = ""
    trigger_event: str = ""
    control_id: str = ""
    version: str = ""
    processing_id: str = ""
    accept_ack_type: str = ""
    application_ack_type: str = ""
    charset: str = ""
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class IntakeResult:
    """The outcome of storing a frame: its row id and whether it repeated an earlier one."""

    message_id: int
    duplicate_of: int | None = None
    flag: str | None = None


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class PendingMessage:
    """A stored message waiting for the pipeline."""

    id: int
    raw: bytes
    received_at: str
    charset: str


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class Notification:
    """One outbox row: a Bundle for one recipient over one channel (see :mod:`gateway.delivery.routing`).

    It holds no patient data: who the recipient is, where and how it is sent.
    The Bundle is built from the message's stored Bundle when it is sent.
    """

    id: str
    message_id: int
    recipient_role: str
    recipient: str
    channel: str
    target: str
    event_code: str
    #: The Bundle as sent, in rows written before schema version 2; None in
    #: newer rows, whose Bundle is built from the message's (``bundle``).
    payload: str | None = None
    state: str = PENDING
    attempts: int = 0
    #: The message's stored Bundle (``messages.fhir``), read with a due
    #: notification that has no stored payload.
    bundle: str | None = None
    #: When the outbox row was written (ISO 8601, UTC): the retry horizon counts from it.
    created_at: str = ""
    #: The recipient directory entry this goes to ("" for a ``[recipients]`` role from the config),
    #: and which of its channels.
    recipient_id: str = ""
    channel_index: int = 0
    #: Who the notification is about, for ordering: notifications about one patient to one
    #: destination are sent in the order of their messages. In memory it is plain (a member or
    #: MRN key); the store keeps only its keyed hash.
    patient_key: str = ""
    #: The attribution the human-readable summary shows (ACO, PCP, care manager); sealed at rest.
    attribution: dict | None = None
    #: Not before this time (epoch seconds): a daily digest's next time. None: due at once.
    not_before: float | None = None
    #: The v2 message as received (read with a due MLLP-forward notification).
    original: bytes | None = None


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One try at delivering a notification, and the state it leaves the notification in."""

    notification_id: str
    message_id: int
    attempt: int  # 1-based
    outcome: str  # ok / error
    detail: str
    state: str  # sent / retrying / dead
    next_attempt_at: float
    #: The receiver's HTTP status or SMTP reply code, when it gave one.
    status: int | None = None
    #: How long the attempt took, in milliseconds (None when not measured).
    elapsed_ms: int | None = None


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class MatchRecord:
    """A match as the store keeps it: grade, method, score and the member chosen (if any)."""

    grade: str  # certain / probable / possible / none
    method: str  # mbi / mrn / probabilistic / ambiguous / review / none
    score: float | None = None
    aco_id: str | None = None
    member_id: str | None = None
    detail: dict = field(default_factory=dict)

    @property
    def matched(self) -> bool:
        """Whether a member was chosen."""
        return self.member_id is not None


@dataclass
class MessageOutcome:
    """What the pipeline decided for one message, for the store to apply in one transaction."""

    message_id: int
    state: str
    reason: str | None = None
    fhir_json: str | None = None
    match: MatchRecord | None = None
    notifications: list[Notification] = field(default_factory=list)
    events: list[tuple[str, dict]] = field(default_factory=list)
    #: The review to open: {"candidates": [...]} (ids, scores and grades; no demographics).
    review: dict | None = None
    #: What the message says about its visit, for care transitions (gateway.transitions.episodes):
    #: the EpisodeEvent's fields (times as ISO 8601) with the member's ``aco_id`` and ``member_id``.
    #: Only for a member the message is routed for (not unmatched, in review or opted out). Sealed at rest.
    episode: dict | None = None
    #: The Patient resource the pipeline built (the same as in ``fhir_json``): the store indexes its search
    #: terms from it without parsing the whole Bundle again. None: the store reads the stored message.
    patient: dict | None = None


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class PatientFacts:
    """What a message says about its patient, as the converter read it: what matching needs.

    Values are as the Patient resource carries them (not yet normalised):
    ``mrns`` are (value, assigning authority) of every identifier but the MBI;
    ``gender`` is the FHIR administrative gender.
    """

    mbi: str = ""
    mrns: tuple[tuple[str, str], ...] = ()
    given: str = ""
    family: str = ""
    middle: str = ""
    birth_date: str = ""
    gender: str = ""
    street: str = ""
    city: str = ""
    state: str = ""
    zip: str = ""
    phone: str = ""
    suffix: str = ""  # the name's suffixes (XPN-4 generational, XPN-6 degree), space-separated, as written


@dataclass(frozen=True)
class RosterDerivation:
    """How a member's derived columns are computed (matching's normalisation, given to the store).

    ``recipe`` names the blocking recipe: when the stored one differs, every
    member's person and keys are computed again. ``derive`` gives a roster
    row's packed person and blocking keys; ``keys_of`` the blocking keys of a
    stored packed person (to delete a changed member's old keys); ``terms_of``
    the terms of a stored packed person whose frequencies the roster keeps
    (its normalised names and birth date: matching weighs a rare name more).
    """

    recipe: str
    derive: Callable[[dict], tuple[str, list[str]]]
    keys_of: Callable[[str], list[str]]
    terms_of: Callable[[str], list[str]]
