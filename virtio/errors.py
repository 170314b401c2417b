"""The project's error hierarchy: one root, and errors that say whose fault it was.

This module is the leaf of the whole import graph: it imports nothing from the
project, so every package (``virtio``, ``transport``, ``mic_host``, ``mic_card``)
can raise and catch the same classes without bending the layering rule.

- :class:`LocalProtocolError`: *you* misused an API (added a chain to a full
  ring, moved a status machine the wrong way from this side).
- :class:`RemoteProtocolError`: the *peer* wrote something illegal into shared
  memory or onto a link. Everything the other side writes either parses or
  raises this, never anything else (STYLE.md §3).
- :class:`ResourceError` and its children, as in anyio/trio: a link or queue
  that was closed by us, broken by the peer, would block, or reached its end.
"""

from __future__ import annotations

__all__ = [
    "MicError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ResourceError",
    "ClosedResourceError",
    "BrokenResourceError",
    "WouldBlock",
    "EndOfStream",
    "MicTimeoutError",
    "ConfigError",
]


class MicError(Exception):
    """Root of every error MIC-VOP raises on purpose."""


class ProtocolError(MicError):
    """A protocol rule was broken; see the two subclasses for whose fault it was."""


class LocalProtocolError(ProtocolError):
    """This side misused an API (a programming error of the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer wrote something illegal. ``reason`` is a short machine-readable tag."""

    def __init__(self, message: str, *, reason: str = "protocol") -> None:
        super().__init__(message)
        self.reason = reason


class ResourceError(MicError):
    """A link, queue or region cannot be used as asked."""


class ClosedResourceError(ResourceError):
    """This side closed the resource and then tried to use it."""


class BrokenResourceError(ResourceError):
    """The resource is unusable because of the peer (link lost, queue latched broken)."""


class WouldBlock(ResourceError):
    """A ``*_nowait`` call would have had to wait."""


class EndOfStream(ResourceError):
    """The peer closed its sending side cleanly."""


class MicTimeoutError(MicError, TimeoutError):
    """A handshake or request did not complete in time (reported, never hidden)."""


class ConfigError(MicError):
    """A configuration file or value is invalid; the message names file, key and problem."""
