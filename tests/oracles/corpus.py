"""The shared ADT corpus and what Herald does with each message in it.

:func:`herald_outcome` runs one message through the same stages a message
takes in Herald: intake reads the MSH (``read_header``: a refusal there is an
AR), the pipeline parses it with the charset intake recorded, converts it
(``convert``: an event Herald does not notify on is "not converted") and
validates the Bundle (``validate_bundle``). Files are split into messages with
``gateway.app.replay.split_messages``, as ``herald send`` and ``herald convert``
read them; a file with no message in it is refused the way ``herald convert``
refuses it. Any exception other than ``MessageError`` is a crash and is left
to propagate.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from gateway.app.replay import NO_MESSAGE, ReplayError, split_messages
from gateway.conversion.convert import Conversion, convert, validate_bundle
from gateway.conversion.v2 import V2Message
from gateway.conversion.vocabulary import Vocabulary, load_vocabulary
from gateway.errors import MessageError
from gateway.header import ERR_UNSUPPORTED_EVENT, ERR_UNSUPPORTED_MESSAGE_TYPE, read_header

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpus"
TABLES = Path(__file__).resolve().parent

#: The moment every corpus message is said to have been received (Bundle.timestamp when MSH-7 has no time).
RECEIVED_AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

#: ADT corpora (folder under ../shared/corpus -> sub-folder holding the messages).
ADT_CORPORA = {
    "msft-fhir-converter": "messages",
    "linuxforhealth-hl7v2-fhir-converter": ".",
    "python-hl7": ".",
    "hl7apy": ".",
}

CONVERTED = "converted"
NOT_CONVERTED = "not converted"
REJECTED = "rejected"

#: What ``herald convert`` says about a file with no message in it (gateway/app/replay.py).
NO_MESSAGE_REASON = NO_MESSAGE


def corpus_missing() -> str:
    """Why the corpus cannot be used ("" when it can): the tests skip with this."""
    if not CORPUS.is_dir():
        return f"the shared corpus is not at {CORPUS} (expected ../shared/corpus beside the repository)"
    return ""


@cache
def vocabulary() -> Vocabulary:
    """Herald's mapping tables, loaded once."""
    return load_vocabulary()


@dataclass(frozen=True)
class CorpusCase:
    """One message of a corpus file (``index`` 0 and no bytes when the file holds no message)."""

    corpus: str
    file: str  # relative to the corpus folder, with "/"
    index: int
    count: int
    raw: bytes | None
    #: Why the file was refused as a whole (a malformed batch), "" otherwise.
    file_error: str = ""

    @property
    def case_id(self) -> str:
        """``corpus/file`` and ``#n`` when the file holds several messages."""
        suffix = f"#{self.index}" if self.count > 1 else ""
        return f"{self.corpus}/{self.file}{suffix}"


def corpus_cases(corpus: str) -> list[CorpusCase]:
    """Every message of every ``*.hl7`` file of ``corpus``, in file order ([] when the corpus is absent)."""
    base = CORPUS / corpus
    sub = base / ADT_CORPORA[corpus]
    if not sub.is_dir():
        return []
    cases = []
    for path in sorted(sub.rglob("*.hl7")):
        rel = path.relative_to(base).as_posix()
        try:
            messages = split_messages(path.read_bytes())
        except ReplayError as e:  # the whole file is refused, as herald send/convert refuse it
            cases.append(CorpusCase(corpus, rel, 0, 0, None, str(e)))
            continue
        if not messages:
            cases.append(CorpusCase(corpus, rel, 0, 0, None))
        for i, raw in enumerate(messages, 1):
            cases.append(CorpusCase(corpus, rel, i, len(messages), raw))
    return cases


def index_rows(corpus: str) -> list[list[str]]:
    """The rows of ``corpus``'s INDEX.tsv below its header line, split at tabs."""
    index = CORPUS / corpus / "INDEX.tsv"
    return [r.split("\t") for r in index.read_text(encoding="utf-8").splitlines()[1:] if r.strip()]


def index_files(corpus: str) -> list[str]:
    """The message files an INDEX.tsv names (first column), relative to the corpus folder."""
    return [r[0] for r in index_rows(corpus)]


def bundle_index(bundle: dict) -> dict[str, dict]:
    """Reference -> resource for every entry: by fullUrl, ``Type/id`` and ``urn:uuid:id``."""
    index: dict[str, dict] = {}
    for entry in bundle.get("entry", []):
        r = entry.get("resource", {})
        if entry.get("fullUrl"):
            index[entry["fullUrl"]] = r
        index[f"{r.get('resourceType')}/{r.get('id')}"] = r
        index[f"urn:uuid:{r.get('id')}"] = r
    return index


@dataclass
class Outcome:
    """What Herald did with one message."""

    kind: str  # CONVERTED, NOT_CONVERTED or REJECTED
    stage: str = ""  # file, intake, parse, convert, validate
    code: str = ""
    location: str = ""
    reason: str = ""
    conversion: Conversion | None = None

    def describe(self) -> str:
        """One line: kind, stage and location, reason."""
        if self.kind == CONVERTED:
            return CONVERTED
        return f"{self.kind} at {self.stage}: {self.location}: {self.reason}"


def herald_outcome(raw: bytes | None, file_error: str = "") -> Outcome:
    """Run ``raw`` through intake, parse, convert and validate; anything but MessageError propagates.

    ``raw`` None is a file with no message in it, or (``file_error``) one refused as a malformed batch.
    """
    if raw is None:
        return Outcome(REJECTED, "file", "", "file", file_error or NO_MESSAGE_REASON)
    stage = "intake"
    try:
        header = read_header(raw)
        stage = "parse"
        msg = V2Message(raw, header.charset)
        stage = "convert"
        conversion = convert(msg, vocabulary(), UTC, RECEIVED_AT)
        stage = "validate"
        validate_bundle(conversion.bundle)
    except MessageError as e:
        if stage == "convert" and e.code in (ERR_UNSUPPORTED_MESSAGE_TYPE, ERR_UNSUPPORTED_EVENT):
            return Outcome(NOT_CONVERTED, stage, e.code, e.location, e.reason)
        return Outcome(REJECTED, stage, e.code, e.location, e.reason)
    return Outcome(CONVERTED, conversion=conversion)


# -- data tables -------------------------------------------------------------


def matches(value: str, pattern: str | list[str]) -> bool:
    """Shell-style match where only ``*`` and ``?`` are wildcards (``[`` is literal: element paths use it).

    ``pattern`` may be a list of patterns: any of them matching is a match.
    """
    if isinstance(pattern, list):
        return any(matches(value, p) for p in pattern)
    regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, value) is not None


@cache
def load_table(name: str) -> dict:
    """One TOML table beside this module."""
    return tomllib.loads((TABLES / name).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Defect:
    """An open converter defect and the test cases it makes fail."""

    id: str
    title: str
    field: str
    input: str
    expected: str
    herald: str
    cases: tuple[str, ...]

    def covers(self, case_id: str) -> bool:
        """True when ``case_id`` matches one of the defect's case patterns."""
        return any(matches(case_id, p) for p in self.cases)


@cache
def open_defects() -> tuple[Defect, ...]:
    """The defects in ``open_defects.toml``."""
    return tuple(
        Defect(
            id=d["id"],
            title=d["title"],
            field=d["field"],
            input=d["input"],
            expected=d["expected"],
            herald=d["herald"],
            cases=tuple(d["cases"]),
        )
        for d in load_table("open_defects.toml").get("defect", [])
    )


def defects_for(case_id: str) -> list[Defect]:
    """The open defects that cover ``case_id``."""
    return [d for d in open_defects() if d.covers(case_id)]


def case_param(case_id: str, *values):
    """A pytest param with id ``case_id``, a strict xfail naming the defect when one covers it."""
    import pytest

    found = defects_for(case_id)
    marks = [pytest.mark.xfail(strict=True, reason="; ".join(f"{d.id}: {d.title}" for d in found))] if found else []
    return pytest.param(*values, id=case_id, marks=marks)


def expectation(case_id: str) -> dict | None:
    """The decided outcome for a corpus case from ``corpus_expectations.toml`` (file rows cover all its messages)."""
    for row in load_table("corpus_expectations.toml").get("expect", []):
        if expectation_covers(row, case_id):
            return row
    return None


def expectation_covers(row: dict, case_id: str) -> bool:
    """True when an expectation row's case pattern(s) name ``case_id`` (a file pattern covers each message of it)."""
    patterns = _listed(row["case"])
    return matches(case_id, patterns) or matches(case_id, [p + "#*" for p in patterns])


def _listed(pattern: str | list[str]) -> list[str]:
    return pattern if isinstance(pattern, list) else [pattern]


def accepted_rejections() -> dict[str, str]:
    """Locations Herald may reject a corpus message at -> why that is the right answer."""
    return {k: v["why"] for k, v in load_table("corpus_expectations.toml").get("rejection", {}).items()}
