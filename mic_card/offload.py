"""The card's offload endpoint: where host scripts open accelerator channels.

Owns the listening Unix socket (path from the boot parameter
``accel_socket``, mode 0600, a stale one replaced, removed at exit) and one
task per connection. Like SCIF's listening endpoint on a real card, it only
sets channels up: the data of a channel travels through card RAM and its
notifications through its own doorbells (:mod:`mic_card.accel.offload`).

Kept light on purpose: the accelerator stack (engines, ``cryptography``,
worker processes) loads on the first connection, not at boot. A connection
that fails never ends the card OS. Depends on
:class:`mic_card.services.CardServices`, never on the card OS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from mic_card.services import CardServices
from transport import FramedSocket

__all__ = [
    "OffloadEndpoint",
    "bind_offload_endpoint",
    "serve_offload_endpoint",
]

log = logging.getLogger("mic_card")


class OffloadEndpoint:
    """A bound, listening endpoint socket (``close()`` removes it)."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def bind_offload_endpoint(path: Any, card: str) -> OffloadEndpoint | None:
    """Listen on ``path`` (the ``accel_socket`` boot parameter); None if absent or refused."""
    if not isinstance(path, str) or not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of an earlier boot
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        log.error("%s: no offload endpoint at %s: %s", card, path, e)
        return None
    log.info("%s: offload endpoint at %s", card, path)
    return OffloadEndpoint(path, sock)


async def serve_offload_endpoint(ep: OffloadEndpoint, card: CardServices) -> None:
    """Accept connections until cancelled, each served in its own task; then close ``ep``."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.TaskGroup() as tg:
            while True:
                conn, _ = await loop.sock_accept(ep.sock)
                tg.create_task(_connection(conn, card), name="offload-connection")
    finally:
        ep.close()


async def _connection(conn: socket.socket, card: CardServices) -> None:
    try:
        from mic_card.accel.offload import serve_channel

        await serve_channel(FramedSocket(conn), card)
    except Exception:  # one connection's failure must never end the card OS
        log.exception("%s: offload connection failed", card.name)
        conn.close()
