"""Bundle identity: a sha256 of the FHIR Bundle Herald makes of every sample and corpus message.

A change that must not alter what the converter produces (moving modules into
packages, a refactor) is checked by running this before and after it and
comparing the two files: every Bundle must be byte for byte the same, and
every refused message refused with the same code, location and reason.

Messages: every ``*.hl7`` and ``*.txt`` file under ``sample_messages/`` (as
``herald send`` picks files from a folder), and every message file of
``../shared/corpus``: the files each folder's INDEX.tsv names in its first
column, and any other ``*.hl7`` or ``*.txt`` beside them (LICENSE, README,
INDEX, CURATED and the expected outputs are not messages). Files are split
with replay's ``split_messages``, as ``herald send`` reads them. Without
``../shared`` the corpus is skipped with a note.

Each message is converted as the pipeline converts it: the MSH-18 charset read
with ``read_header_leniently``, ``V2Message(raw, charset)``, ``convert(msg,
vocab, UTC, received_at=2026-01-01T00:00Z)``, and the text of
``bundle_json(conversion.bundle)``. Its line records the text's sha256, or
``error:<code>:<location>:<reason>`` for a ``MessageError`` (Herald's own words,
no patient data), or ``crash:<ExceptionType>`` for any other exception. A file
``split_messages`` refuses is one line with index 0 and
``unsplittable:<reason>``; a file with no message ``no-message``. Each line also
has ``state``: what Herald would do with the message with an empty roster and
no recipients (``rejected`` at intake, else ``process_message``'s ``failed``,
``ignored`` or ``unmatched``).

    .venv/bin/python bench/bundle_identity.py --out /work/bundles-before.jsonl
    .venv/bin/python bench/bundle_identity.py --compare /work/bundles-before.jsonl /work/bundles-after.jsonl

Only paths, indices, hashes, states and error codes, locations and reasons
are printed or written: never message content. ``--compare`` exits 1 when any
message differs or is in one file only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.errors import MessageError  # noqa: E402  (the same in both layouts)
from gateway.store import PendingMessage  # noqa: E402

# The layout after the move into packages first, then the flat one before it.
try:
    from gateway.app.replay import ReplayError, split_messages
    from gateway.conversion.convert import convert
    from gateway.conversion.v2 import V2Message
    from gateway.conversion.vocabulary import load_vocabulary
    from gateway.delivery.routing import bundle_json
    from gateway.header import read_header, read_header_leniently
except ImportError:
    from gateway.convert import convert
    from gateway.replay import ReplayError, split_messages
    from gateway.routing import bundle_json
    from gateway.v2 import V2Message
    from gateway.vocabulary import load_vocabulary

    from gateway.header import read_header, read_header_leniently
try:
    from gateway.pipeline.process import process_message
except ImportError:
    from gateway.pipeline import process_message

SAMPLES = REPO / "sample_messages"
CORPUS = REPO.parent / "shared" / "corpus"
RECEIVED_AT = datetime(2026, 1, 1, tzinfo=UTC)
MESSAGE_SUFFIXES = (".hl7", ".txt")
NOT_MESSAGES = ("license", "readme", "index", "curated")  # name prefixes, lower case


class EmptyRoster:
    """Roster lookups that find nobody: the pipeline's state without a roster."""

    def by_mbi(self, mbi):
        return []

    def by_mrn(self, mrn, authority):
        return []

    def blocking_buckets(self, keys, cap):
        return {}

    def persons(self, refs):
        return {}

    def members(self, refs):
        return []

    def term_counts(self, terms):
        return {}, 0


def sample_files() -> list[tuple[str, Path]]:
    """(name relative to the repository, path) of every sample message file."""
    if not SAMPLES.is_dir():
        return []
    files = sorted(f for f in SAMPLES.rglob("*") if f.is_file() and f.suffix.lower() in MESSAGE_SUFFIXES)
    return [(f.relative_to(REPO).as_posix(), f) for f in files]


def corpus_files() -> list[tuple[str, Path]]:
    """(``corpus/<folder>/<file>``, path) of every corpus message file: INDEX.tsv's and any others beside them."""
    out: list[tuple[str, Path]] = []
    for folder in sorted(p for p in CORPUS.iterdir() if p.is_dir()):
        named: list[str] = []
        expected: set[str] = set()
        index = folder / "INDEX.tsv"
        if index.is_file():
            rows = [r.split("\t") for r in index.read_text(encoding="utf-8").splitlines()]
            header = [c.lower() for c in rows[0]] if rows else []
            # Columns such as expected_file / expected_fhir name outputs, not messages.
            outputs = [i for i, c in enumerate(header) if c.startswith("expected")]
            for row in rows[1:]:
                if row and row[0].strip():
                    named.append(row[0].strip())
                    expected.update(row[i].strip() for i in outputs if i < len(row))
        others = sorted(
            f.relative_to(folder).as_posix()
            for f in folder.rglob("*")
            if f.is_file() and f.suffix.lower() in MESSAGE_SUFFIXES and not f.name.lower().startswith(NOT_MESSAGES)
        )
        seen = set(named)
        for rel in named + [r for r in others if r not in seen and r not in expected]:
            out.append((f"corpus/{folder.name}/{rel}", folder / rel))
    return out


def bundle_result(raw: bytes, vocab) -> str:
    """The sha256 of the message's Bundle text, ``error:code:location:reason`` or ``crash:Type``."""
    try:
        header = read_header_leniently(raw)
        msg = V2Message(raw, header.charset if header else "")
        conversion = convert(msg, vocab, UTC, received_at=RECEIVED_AT)
        text = bundle_json(conversion.bundle)
    except MessageError as e:
        return f"error:{e.code}:{e.location}:{e.reason}"
    except Exception as e:
        return f"crash:{type(e).__name__}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pipeline_state(number: int, raw: bytes, vocab) -> str:
    """What Herald does with the message: ``rejected`` at intake, else process_message's state (empty roster)."""
    try:
        header = read_header(raw)
    except MessageError:
        return "rejected"
    except Exception as e:
        return f"crash:{type(e).__name__}"
    pending = PendingMessage(number, raw, RECEIVED_AT.isoformat(), header.charset)
    try:
        return process_message(pending, vocab, UTC, EmptyRoster(), {}).state
    except Exception as e:
        return f"crash:{type(e).__name__}"


def file_records(source: str, path: Path, vocab, first_number: int) -> list[dict]:
    """One record per message of the file (one record for a file that holds none or cannot be split)."""
    try:
        messages = split_messages(path.read_bytes())
    except OSError as e:
        return [{"source": source, "index": 0, "result": f"unreadable:{e.strerror}"}]
    except ReplayError as e:
        return [{"source": source, "index": 0, "result": f"unsplittable:{e}"}]
    if not messages:
        return [{"source": source, "index": 0, "result": "no-message"}]
    return [
        {
            "source": source,
            "index": i,
            "result": bundle_result(raw, vocab),
            "state": pipeline_state(first_number + i, raw, vocab),
        }
        for i, raw in enumerate(messages, 1)
    ]


def write(out: Path) -> int:
    """Convert every message, write one JSON line each to ``out``, print the counts; return 0."""
    import gateway

    print(f"gateway package: {Path(gateway.__file__).parent}")
    start = time.perf_counter()
    vocab = load_vocabulary()
    files = sample_files()
    if CORPUS.is_dir():
        files += corpus_files()
    else:
        print(f"corpus: {CORPUS} not found; skipped (sample_messages only)")
    records: list[dict] = []
    for source, path in files:
        records += file_records(source, path, vocab, len(records))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    elapsed = time.perf_counter() - start

    kinds = Counter(_kind(r["result"]) for r in records)
    messages = kinds["bundle"] + kinds["error"] + kinds["crash"]
    print(
        f"{len(files)} files, {messages} messages: {kinds['bundle']} bundles, {kinds['error']} errors, "
        f"{kinds['crash']} crashes; files not split: {kinds['unsplittable']} unsplittable, "
        f"{kinds['no-message']} without a message, {kinds['unreadable']} unreadable"
    )
    states = Counter(r["state"] for r in records if "state" in r)
    print("pipeline states: " + ", ".join(f"{s} {n}" for s, n in sorted(states.items())))
    for r in records:
        if r["result"].startswith("crash:") or r.get("state", "").startswith("crash:"):
            print(f"  crash: {r['source']} #{r['index']}: convert {_kind(r['result'])}, pipeline {r.get('state')}")
    print(f"wrote {out} in {elapsed:.2f} s")
    return 0


def _kind(result: str) -> str:
    """``bundle`` for a sha256, else the result's prefix (error, crash, unsplittable, unreadable, no-message)."""
    return result.split(":", 1)[0] if ":" in result or result == "no-message" else "bundle"


def _load(path: Path) -> dict[tuple[str, int], dict]:
    records = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            records[(r["source"], r["index"])] = r
    return records


def compare(a: Path, b: Path) -> int:
    """Print identical / differing / only-in-one counts and each difference; return 1 when any differ."""
    left, right = _load(a), _load(b)
    keys = sorted(left.keys() | right.keys())
    same = differ = only_a = only_b = 0
    lines = []
    for key in keys:
        ra, rb = left.get(key), right.get(key)
        where = f"{key[0]} #{key[1]}"
        if rb is None:
            only_a += 1
            lines.append(f"  only in A: {where}: {ra['result']}")
        elif ra is None:
            only_b += 1
            lines.append(f"  only in B: {where}: {rb['result']}")
        elif ra["result"] != rb["result"]:
            differ += 1
            lines.append(f"  differs: {where}\n    A {ra['result']}\n    B {rb['result']}")
        elif "state" in ra and "state" in rb and ra["state"] != rb["state"]:
            differ += 1
            lines.append(f"  state differs: {where}: A {ra['state']}, B {rb['state']}")
        else:
            same += 1
    print(f"A {a} ({len(left)} lines), B {b} ({len(right)} lines)")
    print(f"identical {same}, differing {differ}, only in A {only_a}, only in B {only_b}")
    print("\n".join(lines) if lines else "every message gives the same result in both")
    return 1 if differ or only_a or only_b else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, metavar="FILE.jsonl", help="convert every message, write one line each")
    mode.add_argument(
        "--compare", nargs=2, type=Path, metavar=("A.jsonl", "B.jsonl"), help="compare two runs; exit 1 on any change"
    )
    args = parser.parse_args(argv)
    if args.out is not None:
        return write(args.out)
    return compare(*args.compare)


if __name__ == "__main__":
    sys.exit(main())
