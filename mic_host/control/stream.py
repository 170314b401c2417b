"""One streamed answer on the control socket: what a streaming op's handler writes to.

Owns :class:`Stream` (see the stream lines in :mod:`mic_host.control.wire`):
the handler of an op with ``OpSpec.stream`` sends its first response with
:meth:`Stream.start`, then items with :meth:`Stream.send`; the server sends
what it returns as the end line. Starting a stream shrinks the connection's
kernel and asyncio send buffers, so a client that stops reading pins little
in the daemon; the backlog is the handler's bounded queue
(:class:`mic_host.events.Feed`). Imports asyncio, the codec and ``virtio.errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from mic_host.control.wire import encode_item, encode_response
from virtio.errors import BrokenResourceError

__all__ = ["STREAM_SNDBUF", "STREAM_WRITE_BUFFER", "Stream"]

#: A streaming connection's kernel send buffer (Linux doubles it) and asyncio
#: write buffer: what a subscriber that stopped reading pins in the daemon
#: beyond its own bounded queue.
STREAM_SNDBUF = 16 << 10
STREAM_WRITE_BUFFER = 16 << 10


class Stream:
    """How the handler of a streaming op (``OpSpec.stream``) answers: :meth:`start`
    once (the first response), then :meth:`send` per item; what the handler
    returns becomes the end line (the first response, then the end, if it
    never started)."""

    def __init__(
        self,
        rid: int,
        send: Callable[[bytes], Awaitable[None]],
        gone: Callable[[], bool],
        writer: asyncio.StreamWriter | None,
    ) -> None:
        self.id = rid
        self._send = send
        self._gone = gone
        self._writer = writer
        self.started = False

    async def start(self, result: dict[str, Any]) -> None:
        """Send the first response (once)."""
        if self.started:
            return
        self.started = True
        if self._writer is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock = self._writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
                self._writer.transport.set_write_buffer_limits(high=STREAM_WRITE_BUFFER)
        await self._send(encode_response(self.id, result))

    async def send(self, item: dict[str, Any]) -> None:
        """Send one item; waits while the client is slow to read (the caller's
        queue, not the daemon, takes the backlog).

        Raises:
            BrokenResourceError: the client went away.
        """
        if self._gone():
            raise BrokenResourceError("the client went away")
        await self._send(encode_item(self.id, item))
        if self._gone():
            raise BrokenResourceError("the client went away")
