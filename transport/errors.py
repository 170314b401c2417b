"""Errors the transport raises, each a subclass of the project's roots in ``virtio.errors``.

Owns only exception classes; imports nothing but ``virtio.errors`` and
``virtio.memory`` so every layer can catch them without importing the OS glue.

Whose fault (STYLE.md §3):

- :class:`WindowFault` — an access outside an opened window / region, or
  without permission. It *is* a :class:`virtio.memory.MemoryFault`, so the ring
  core's ``except MemoryFault`` keeps working; the access never happened.
- :class:`HandshakeError` — the peer sent a malformed, wrong-version or
  incomplete handshake (a :class:`RemoteProtocolError`).
- :class:`LinkLost` — the peer process exited, closed the socket or broke the
  framing; every later use of the link (and every doorbell wait of the side
  that lost it) raises it (a :class:`BrokenResourceError`).
- :class:`DmaError` and children — a DMA request that was refused or failed.
"""

from __future__ import annotations

from virtio.errors import BrokenResourceError, MicError, RemoteProtocolError
from virtio.memory import MemoryFault

__all__ = [
    "DmaAlignmentError",
    "DmaError",
    "DmaFault",
    "DmaOverlapError",
    "HandshakeError",
    "LinkLost",
    "RegionError",
    "WindowFault",
]


class WindowFault(MemoryFault):
    """An access outside card RAM / the opened SMPT windows, or without permission.

    ``space`` names the address space that refused it ("card", "host").
    """

    def __init__(self, addr: int, length: int, write: bool, why: str, *, space: str) -> None:
        super().__init__(addr, length, write, f"{space} view: {why}")
        self.space = space


class RegionError(MicError):
    """A shared-memory region could not be created, adopted or mapped."""


class HandshakeError(RemoteProtocolError):
    """The control-link handshake was malformed, of another version, or incomplete."""

    def __init__(self, message: str, *, reason: str = "handshake") -> None:
        super().__init__(message, reason=reason)


class LinkLost(BrokenResourceError):
    """The peer is gone (process exit, EOF, reset) or broke the link protocol."""


class DmaError(MicError):
    """A DMA request was refused or failed; nothing (or only a prefix) was copied."""


class DmaFault(DmaError):
    """A DMA source, destination or status address is outside the opened windows.

    ``fault`` is the underlying :class:`WindowFault` / ``MemoryFault``.
    """

    def __init__(self, message: str, fault: MemoryFault) -> None:
        super().__init__(message)
        self.fault = fault


class DmaAlignmentError(DmaError):
    """An unaligned request on a channel configured to refuse instead of falling back."""


class DmaOverlapError(DmaError):
    """Source and destination ranges overlap (the X100 engine's result is undefined)."""
