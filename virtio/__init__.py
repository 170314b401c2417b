"""virtio: the sans-IO core of MIC-VOP.

Owns the binary layouts, the split ring and the packed ring (driver and
device side, ``virtio.split`` and ``virtio.packed``), feature and
device-status negotiation. Must not import asyncio, the OS, or ``transport``:
it works on a small memory protocol and returns what must happen.
"""

from virtio.errors import (
    BrokenResourceError,
    ClosedResourceError,
    ConfigError,
    EndOfStream,
    LocalProtocolError,
    MicError,
    MicTimeoutError,
    ProtocolError,
    RemoteProtocolError,
    ResourceError,
    WouldBlock,
)

__all__ = [
    "BrokenResourceError",
    "ClosedResourceError",
    "ConfigError",
    "EndOfStream",
    "LocalProtocolError",
    "MicError",
    "MicTimeoutError",
    "ProtocolError",
    "RemoteProtocolError",
    "ResourceError",
    "WouldBlock",
]
