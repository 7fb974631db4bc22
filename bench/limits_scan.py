"""What the limit scan (``gateway.limits.scan``) costs intake per message.

Times, on one core, the scan of (given the header, as intake calls it):

* each sample message (what an EHR sends: 6-8 segments), and the header read
  it follows, for scale;
* a message at the limits (500 segments, PID-3 with 100 repetitions): the
  most an accepted message costs;
* the attacker's frames, each refused: 60,000 PID-3 repetitions, 20,000 OBX,
  a 900 KB MSH-10, and 500 segments that each have more component separators
  than the limit (spread over their fields, so each segment is looked at) and
  a last one over it.

Example (from the repository root)::

    .venv/bin/python bench/limits_scan.py
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app.replay import split_messages  # noqa: E402
from gateway.errors import MessageError  # noqa: E402
from gateway.header import read_header, read_msh  # noqa: E402
from gateway.limits import Limits, scan  # noqa: E402

ADMIT = split_messages((ROOT / "sample_messages" / "epic-v251-a01-admit-from-ed.hl7").read_bytes())[0]


def with_pid3(raw: bytes, count: int) -> bytes:
    segs = raw.rstrip(b"\r").split(b"\r")
    for i, s in enumerate(segs):
        if s.startswith(b"PID|"):
            f = s.split(b"|")
            f[3] = b"~".join([f[3].split(b"~")[0]] + [b"X%d^^^H^MR" % n for n in range(1, count)])
            segs[i] = b"|".join(f)
    return b"\r".join(segs) + b"\r"


def with_obx(raw: bytes, count: int) -> bytes:
    return raw + b"".join(b"OBX|%d|NM|8867-4^Heart rate^LN||72|/min|||||F\r" % (i + 1) for i in range(count))


def with_control_id(raw: bytes, control_id: bytes) -> bytes:
    f = raw.split(b"|", 10)
    f[9] = control_id
    return b"|".join(f)


def cases() -> list[tuple[str, bytes]]:
    folder = ROOT / "sample_messages"
    samples = [(str(p.relative_to(folder)), split_messages(p.read_bytes())[0]) for p in sorted(folder.rglob("*.hl7"))]
    at_limits = with_obx(with_pid3(ADMIT, 100), 500 - ADMIT.count(b"\r"))
    # Each segment has 64 component separators across its fields: the message's count is over the
    # limit, so each segment is looked at, and no repetition is over it until the last segment.
    slow_segment = b"ZSL|" + b"|".join([b"^" * 4] * 16) + b"\r"
    slowest = ADMIT + slow_segment * (499 - ADMIT.count(b"\r")) + b"ZSL|" + b"^" * 64 + b"\r"
    return [
        *samples,
        ("at the limits: 500 segments, PID-3 x100", at_limits),
        ("attack: PID-3 x60,000", with_pid3(ADMIT, 60_000)),
        ("attack: 20,000 OBX", with_obx(ADMIT, 20_000)),
        ("attack: 900 KB MSH-10", with_control_id(ADMIT, b"C" * 900_000)),
        ("attack: 500 segments on the slow path", slowest),
    ]


def per_call(f, seconds: float) -> float:
    """Seconds per call of ``f``, timed over about ``seconds``."""
    timer = timeit.Timer(f)
    n, took = timer.autorange()
    runs = max(1, int(seconds / took * n))
    return min(timer.repeat(repeat=5, number=max(1, runs // 5))) / max(1, runs // 5)


def run(seconds: float) -> None:
    limits = Limits()
    print(f"{'message':44} {'bytes':>9} {'read_header µs':>15} {'scan µs':>10}  outcome")
    for name, raw in cases():
        # Intake has read the header already: the scan is given it.
        header = read_msh(raw)
        try:
            scan(raw, limits, header)
            outcome = "within"
        except MessageError as e:
            outcome = f"refused: {e.code} {e.location}"

        def do_scan(raw=raw, header=header):
            try:
                scan(raw, limits, header)
            except MessageError:
                pass

        def do_header(raw=raw):
            try:
                read_header(raw)
            except MessageError:
                pass

        t_header = per_call(do_header, seconds) * 1e6
        t_scan = per_call(do_scan, seconds) * 1e6
        print(f"{name[:44]:44} {len(raw):>9,} {t_header:>15.1f} {t_scan:>10.1f}  {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.3, help="time spent on each case (default 0.3)")
    run(parser.parse_args().seconds)


if __name__ == "__main__":
    main()
