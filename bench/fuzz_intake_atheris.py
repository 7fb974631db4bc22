"""A coverage-guided fuzzer (atheris, libFuzzer) for what intake reads on the connection's path.

Each input is cut by its first byte into a stream and a read size, then fed to:

* MLLP framing (``MLLPReceiver`` on a StringTransport, in reads of that size),
  with a 4 KB frame limit;
* for every frame: the header reader (``read_header``, ``read_header_leniently``,
  ``control_id_guess``), the limit scan with small and default limits, and
  an ACK built for it (no value echoed longer than the MSH-10 limit).

Anything but :class:`MessageError` from the readers, an ACK echoing too
much, or a frame the framing invents is a crash. atheris is not a dependency
of Herald (``pip install atheris`` in a virtualenv of its own, with Herald
importable). The sample messages are a good seed corpus::

    mkdir -p /tmp/corpus && cp sample_messages/*.hl7 /tmp/corpus/
    python bench/fuzz_intake_atheris.py /tmp/corpus -max_total_time=300
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from gateway.errors import MessageError
    from gateway.header import control_id_guess, read_header, read_header_leniently
    from gateway.intake.ack import REJECTED, AckBuilder
    from gateway.limits import LimitExceeded, Limits, scan
    from mllp.framing import MLLPReceiver

SMALL = Limits(segments=8, fields=30, repetitions=3, components=12, field_length=300, control_id_length=20)
ACKS = AckBuilder(control_id_length=20)


class Frames(MLLPReceiver):
    MAX_LENGTH = 4096
    idleTimeout = None

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[bytes] = []

    def frameReceived(self, message: bytes) -> None:
        self.frames.append(message)


def check_frame(frame: bytes) -> None:
    try:
        read_header(frame)
    except MessageError:
        pass
    header = read_header_leniently(frame)
    guess = control_id_guess(frame)
    for limits in (SMALL, Limits()):
        try:
            scan(frame, limits, header) if header is not None else scan(frame, limits)
        except LimitExceeded as e:
            assert e.sequence >= 1 and e.limit in Limits.__dataclass_fields__
        except MessageError:
            assert header is None
    ack = ACKS.build(header, REJECTED, control_id=guess, error_code="104", error_location="MSH-10", reason="x")
    for segment in ack.split(b"\r"):
        for value in segment.split(ack[3:4]):
            assert len(value) <= 200 or value.startswith(b"MSH"), len(value)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    step, stream = 1 + data[0] % 64, data[1:]
    p = Frames()
    p.callLater = Clock().callLater
    transport = StringTransport()
    p.makeConnection(transport)
    for at in range(0, len(stream), step):
        if transport.disconnecting:
            break
        p.dataReceived(stream[at : at + step])
    for frame in p.frames:
        assert len(frame) <= Frames.MAX_LENGTH and b"\x1c\r" not in frame
        check_frame(frame)
    check_frame(stream)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
