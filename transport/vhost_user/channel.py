"""One vhost-user connection's socket: whole messages in, whole messages out, with fds.

Owns :class:`VhostUserChannel`, the I/O half of :mod:`transport.vhost_user.protocol`.
It reuses the control link's Unix-socket fd passing
(:class:`transport.link.FramedSocket`, raw mode): a message's fds travel as
``SCM_RIGHTS`` with its header, and a read never runs past the message it is
reading, so fds are never attributed to the wrong message (libvhost-user reads
the same way).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence

from transport.link import FramedSocket
from transport.vhost_user.protocol import (
    HEADER,
    MAX_FDS,
    Message,
    encode,
    parse_header,
    reason,
)
from virtio.errors import RemoteProtocolError

__all__ = ["VhostUserChannel", "close_fds"]


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class VhostUserChannel:
    """A connected vhost-user socket (owns it). The back-end side receives
    requests and sends replies; a front-end does the reverse (``expect_reply``).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._fs = FramedSocket(sock)

    @property
    def closed(self) -> bool:
        return self._fs.closed

    async def receive(self, *, expect_reply: bool = False) -> Message | None:
        """The next whole message (the caller owns its fds), or None on a clean EOF.

        Raises:
            RemoteProtocolError: a malformed header, too many fds (the fds are closed).
            LinkLost: EOF in the middle of a message, or a socket error.
        """
        fds: list[int] = []
        try:
            head = await self._fs.recv_exact(HEADER.size, fds)
            if not head:
                return None
            request, flags, size = parse_header(head, expect_reply=expect_reply)
            payload = await self._fs.recv_exact(size, fds) if size else b""
            if size and not payload:
                raise RemoteProtocolError(
                    f"{reason(request)}: peer closed the socket before the payload",
                    reason="vhost-user",
                )
            if len(fds) > MAX_FDS:
                raise RemoteProtocolError(
                    f"{reason(request)}: {len(fds)} fds exceed {MAX_FDS}", reason="vhost-user"
                )
            return Message(request, flags, payload, fds)
        except BaseException:
            close_fds(fds)
            raise

    async def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        reply: bool = True,
        need_reply: bool = False,
    ) -> None:
        """Send one message (a reply by default: the back-end's only kind here).

        Raises:
            LinkLost: the peer is gone.
        """
        await self._fs.send_raw(encode(request, payload, reply=reply, need_reply=need_reply), fds)

    def close(self) -> None:
        self._fs.close()
