"""What both ends of a card's PCIe link share: its configuration, the refusal
frame, fd checks, and the task group a link's reader runs in.

Imported by :mod:`transport.pcie.host` and :mod:`transport.pcie.card`;
imports only the transport modules below ``pcie`` and ``virtio``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from transport.errors import HandshakeError, LinkLost
from transport.handshake import MAX_MESSAGE_CAP, Refuse
from transport.link import DEFAULT_MAX_MESSAGE, FramedSocket, MessageLink
from transport.mmio import MmioLayout
from transport.region import PAGE_SIZE
from virtio.errors import ClosedResourceError, LocalProtocolError

__all__ = ["LinkOwner", "PcieConfig", "is_eventfd", "json_dict", "link_tasks", "refuse"]


@dataclass(frozen=True, slots=True)
class PcieConfig:
    """Sizes and limits of one card's link (chosen by the host, sent to the card)."""

    card_ram_size: int = 64 << 20
    host_ram_size: int = 64 << 20
    layout: MmioLayout = field(default_factory=MmioLayout)
    max_message: int = DEFAULT_MAX_MESSAGE
    #: how long one peer may take from connecting (on a socket pair: from its
    #: first byte) to ``ready``
    handshake_timeout: float = 2.0

    def __post_init__(self) -> None:
        for name in ("card_ram_size", "host_ram_size"):
            v = getattr(self, name)
            if v <= 0 or v % PAGE_SIZE:
                raise ValueError(f"{name} = {v}: must be a positive multiple of 4 KiB")
        if not 64 <= self.max_message <= MAX_MESSAGE_CAP:
            raise ValueError(f"max_message = {self.max_message}: must be in 64..{MAX_MESSAGE_CAP}")


def json_dict(obj: Mapping[str, Any], what: str) -> dict[str, Any]:
    try:
        out = json.loads(json.dumps(dict(obj), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise LocalProtocolError(f"{what} must be a JSON-able dict: {e}") from e
    assert isinstance(out, dict)
    return out


async def refuse(fs: FramedSocket, reason: str, message: str) -> HandshakeError:
    """Tell the peer why (best effort) and return the local error to raise."""
    with contextlib.suppress(LinkLost, ClosedResourceError, OSError):
        await fs.send_frame(Refuse(reason, message).to_wire())
    return HandshakeError(message, reason=reason)


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class LinkOwner(Protocol):
    _link: MessageLink | None
    _reader: asyncio.Task[None] | None
    _tg: asyncio.TaskGroup | None


@contextlib.asynccontextmanager
async def link_tasks(owner: LinkOwner) -> AsyncIterator[None]:
    """The task group the link's reader runs in, open for the owner's life
    (``owner._tg`` while open). Leaving it closes the link and ends the reader.
    """
    async with asyncio.TaskGroup() as tg:
        owner._tg = tg
        try:
            yield
        finally:
            owner._tg = None
            if owner._link is not None:
                owner._link.close()
            if owner._reader is not None:
                owner._reader.cancel()
