"""The project's error hierarchy: one root, and errors that say whose fault it was.

This module is the leaf of the whole import graph: it imports nothing from the
project (only ``dataclasses``), so every package (``virtio``, ``transport``,
``mic_host``, ``mic_card``) can raise and catch the same classes without
bending the layering rule.

- :class:`LocalProtocolError`: *you* misused an API (added a chain to a full
  ring, moved a status machine the wrong way from this side).
- :class:`RemoteProtocolError`: the *peer* wrote something illegal into shared
  memory or onto a link. Everything the other side writes either parses or
  raises this, never anything else (STYLE.md §3).
- :class:`ResourceError` and its children, as in anyio/trio: a link or queue
  that was closed by us, broken by the peer, would block, or reached its end.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    "INTERNAL_ERROR",
    "MAX_WIRE_MESSAGE",
    "WireError",
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


# ---------------------------------------------------------------- on the wire
#
# One convention for every channel that carries an error to the other side:
# the control socket (daemon -> micctl/client), the control link (card ->
# host, ``run_result``), the accelerator offload channel (card -> host script)
# and card apps. An error travels as ``{"type", "base", "message"}``:
# ``type`` is the exception's own class name (for the message a person reads),
# ``base`` the nearest class of this module (what the receiver raises).

#: ``type``/``base`` of a failure that is not a :class:`MicError` (a bug).
INTERNAL_ERROR = "InternalError"
#: An error message on the wire is cut to this many characters.
MAX_WIRE_MESSAGE = 4096


@dataclass(frozen=True, slots=True)
class WireError:
    """An error as it travels: its class name, nearest ``virtio.errors`` class, message."""

    type: str
    base: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException, message: str | None = None) -> WireError:
        """The wire form of ``exc``. A builtin :class:`TimeoutError` travels as
        ``MicTimeoutError``; anything else that is not a :class:`MicError` keeps
        its class name with base :data:`INTERNAL_ERROR` (a bug, or user code).
        ``message`` replaces ``str(exc)`` if given."""
        if isinstance(exc, MicError):
            base = next(
                (c.__name__ for c in type(exc).__mro__ if _WIRE_CLASSES.get(c.__name__) is c),
                "MicError",
            )
            etype = type(exc).__name__
        elif isinstance(exc, TimeoutError):
            etype = base = "MicTimeoutError"
        else:
            etype, base = type(exc).__name__, INTERNAL_ERROR
        text = str(exc) if message is None else message
        if len(text) > MAX_WIRE_MESSAGE:
            text = text[:MAX_WIRE_MESSAGE] + " [truncated]"
        return cls(etype, base, text or etype)

    @classmethod
    def from_wire(cls, obj: object) -> WireError:
        """Parse an error object the peer sent.

        Raises:
            RemoteProtocolError: not an object with string ``type`` and
                ``message`` (and optional string ``base``), or other keys.
        """
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"error must be an object, got {type(obj).__name__}")
        extra = set(obj) - {"type", "base", "message"}
        if extra:
            raise RemoteProtocolError(f"error object has unknown keys {sorted(extra)}")
        etype, base, message = obj.get("type"), obj.get("base", obj.get("type")), obj.get("message")
        if not (isinstance(etype, str) and isinstance(base, str) and isinstance(message, str)):
            raise RemoteProtocolError("error object needs string 'type', 'base' and 'message'")
        return cls(etype, base, message)

    def to_wire(self) -> dict[str, str]:
        return {"type": self.type, "base": self.base, "message": self.message}

    def exception(self, *, reason: str = "peer") -> MicError:
        """The exception to raise for it: the class named ``type`` if it is one of
        this module's, else the one named ``base``, else :class:`MicError`. A
        :class:`RemoteProtocolError` gets ``reason``."""
        cls = _WIRE_CLASSES.get(self.type) or _WIRE_CLASSES.get(self.base) or MicError
        if cls is RemoteProtocolError:
            return RemoteProtocolError(self.message, reason=reason)
        return cls(self.message)


_WIRE_CLASSES: dict[str, type[MicError]] = {
    c.__name__: c
    for c in (
        MicError,
        ProtocolError,
        LocalProtocolError,
        RemoteProtocolError,
        ResourceError,
        ClosedResourceError,
        BrokenResourceError,
        WouldBlock,
        EndOfStream,
        MicTimeoutError,
        ConfigError,
    )
}
