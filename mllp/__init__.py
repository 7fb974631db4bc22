"""MLLP (Minimal Lower Layer Protocol, release 1) for Twisted: bytes only."""

from mllp.client import AckTimeout, MLLPClientFactory, MLLPClientProtocol, connect, send_message
from mllp.framing import DEFAULT_MAX_LENGTH, FRAME_END, START_BLOCK, MLLPReceiver, frame
from mllp.server import FrameReceiver, MLLPServerFactory, MLLPServerProtocol

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "FRAME_END",
    "START_BLOCK",
    "AckTimeout",
    "FrameReceiver",
    "MLLPClientFactory",
    "MLLPClientProtocol",
    "MLLPReceiver",
    "MLLPServerFactory",
    "MLLPServerProtocol",
    "connect",
    "frame",
    "send_message",
]
