"""A hostile card on its control link: card apps (``module:function``, run inside a
real ``mic-card``) and a card OS of its own (``card_command``) for
:mod:`tests.integration.test_hostile_link`.

The apps reach the link through the card OS's transport objects, as
:mod:`tests.integration.apps` does; raw frames are written under the link's
send lock so they never interleave with the card OS's own heartbeats.

As a card OS: ``card_command = [python, "-m", "tests.integration.hostile_link",
"dup-online"]``; the daemon appends its usual ``python -m mic_card --link-fd N
--card NAME``, of which only the fd is used: this card completes the
handshake, then says ``{"type": "heartbeat", ..., "type": "online"}``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys

from mic_card.card import Card
from transport import PcieCard
from transport.link import FramedSocket


def _fs(card: Card) -> FramedSocket:
    fs: FramedSocket = card._os.pcie.link._fs
    return fs


async def _raw(fs: FramedSocket, body: bytes) -> None:
    async with fs._send_lock:
        await asyncio.get_running_loop().sock_sendall(fs.sock, struct.pack(">I", len(body)) + body)


async def nested_frame(card: Card, depth: int) -> int:
    """One well-framed body of ``depth`` nested JSON arrays (``[[[...]]]``)."""
    body = b"[" * depth + b"]" * depth
    await _raw(_fs(card), body)
    return len(body)


async def garbage_messages(card: Card, count: int) -> int:
    """``count`` well-framed messages of a type the host does not know."""
    link = card._os.pcie.link
    for i in range(count):
        await link.send({"type": "no-such-message", "n": i})
    return count


async def forge_replies(card: Card, upto: int) -> list[str]:
    """``devices`` and ``net-params`` replies for every request id 1..``upto``: one of
    them is the id of the ``run`` request running this app. The forged device
    list renames every device ``evilN``."""
    link = card._os.pcie.link
    evil = [{"name": f"evil{i}", "offset": d["offset"]} for i, d in enumerate(card.devices())]
    for rid in range(1, upto + 1):
        await link.send({"type": "devices", "id": rid, "devices": evil})
        await link.send({"type": "net-params", "id": rid})
    return [d["name"] for d in card.devices()]


async def connect_spam(card: Card, path: str, seconds: float) -> dict[str, int]:
    """Connect to ``path`` and hang up, again and again, for ``seconds``."""
    loop = asyncio.get_running_loop()
    tries = connected = 0
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        tries += 1
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            connected += 1
        except OSError:
            pass
        finally:
            s.close()
        await asyncio.sleep(0.001)
    return {"tries": tries, "connected": connected}


# -- a card OS that lies on the link -------------------------------------------------


async def _dup_online(fd: int) -> None:
    async with PcieCard.connect(socket.socket(fileno=fd)) as pc:
        await _raw(
            pc.link._fs,
            b'{"type":"heartbeat","uptime":0.5,"type":"online","devices":[]}',
        )
        async with asyncio.timeout(30):
            await pc.link.wait_lost()  # the host hangs up on us


def main(argv: list[str]) -> int:
    mode = argv[0]
    fd = int(argv[argv.index("--link-fd") + 1])
    if mode == "dup-online":
        asyncio.run(_dup_online(fd))
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
