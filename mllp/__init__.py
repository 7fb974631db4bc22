"""MLLP (Minimal Lower Layer Protocol, release 1) for Twisted: bytes only."""

from mllp.client import AckTimeout, MLLPClientFactory, MLLPClientProtocol, connect, send_message
from mllp.framing import DEFAULT_MAX_LENGTH, FRAME_END, START_BLOCK, MLLPReceiver, frame
from mllp.server import FrameReceiver, MLLPServerFactory, MLLPServerProtocol
from mllp.tls import Peer, PeerCertificate

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
    "Peer",
    "PeerCertificate",
    "connect",
    "frame",
    "send_message",
]
