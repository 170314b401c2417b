"""Control link: handshake refusals, framed messages, link loss on process death."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import time

import pytest

from tests.transport.conftest import card_pair, reap, spawn
from transport import (
    PROTOCOL,
    CardIdentity,
    FramedSocket,
    HandshakeError,
    LinkLost,
    NotifyMode,
    NotifyPolicy,
    PcieCard,
    PcieConfig,
    PcieHost,
)
from virtio.errors import (
    BrokenResourceError,
    LocalProtocolError,
    MicTimeoutError,
    RemoteProtocolError,
)

SMALL = PcieConfig(card_ram_size=1 << 20, host_ram_size=1 << 20)


def frame(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


async def raw_client(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


async def read_frame(r: asyncio.StreamReader) -> dict:
    (n,) = struct.unpack(">I", await r.readexactly(4))
    return json.loads(await r.readexactly(n))


async def close_writer(w: asyncio.StreamWriter) -> None:
    w.close()
    await w.wait_closed()


@pytest.mark.asyncio
async def test_socket_is_private_and_removed(sock_path: str) -> None:
    async with PcieHost(sock_path, config=SMALL):
        assert os.stat(sock_path).st_mode & 0o777 == 0o600
        with pytest.raises(LocalProtocolError):
            async with PcieHost(sock_path, config=SMALL):
                pass
    assert not await asyncio.to_thread(os.path.exists, sock_path)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", None),  # garbage: absurd length prefix
        (struct.pack(">I", 5) + b"\xff\xfe{}x", None),  # not UTF-8 / JSON
        (frame([1, 2, 3]), None),  # JSON, not an object
        (frame({"type": "hello", "protocol": "other", "version": 1}), "protocol"),
        (frame({"type": "hello", "protocol": PROTOCOL, "version": 99}), "version"),
        (frame({"type": "hello", "protocol": PROTOCOL, "version": 1, "card": "mic7"}), "identity"),
    ],
)
async def test_host_refuses_bad_hello_and_keeps_listening(
    sock_path: str, payload: bytes, reason: str | None
) -> None:
    async with PcieHost(sock_path, config=SMALL) as host:
        accept = asyncio.create_task(host.accept())
        r, w = await raw_client(sock_path)
        w.write(payload)
        await w.drain()
        if reason is not None:
            refusal = await read_frame(r)
            assert refusal["type"] == "refuse"
            assert refusal["reason"] == reason
            assert refusal["versions"] == [1]
        assert await r.read() == b""  # then the host hangs up
        await close_writer(w)
        async with asyncio.timeout(5):
            while not host.refused:  # noqa: ASYNC110 - observing another task's effect
                await asyncio.sleep(0.01)
        assert isinstance(host.refused[0], RemoteProtocolError)
        assert not accept.done()
        # a good card still gets in afterwards
        async with PcieCard.connect(sock_path) as card:
            link = await accept
            assert card.identity == CardIdentity()
            await link.send({"type": "heartbeat", "n": 1})
            assert await card.link.recv() == {"type": "heartbeat", "n": 1}


@pytest.mark.asyncio
async def test_card_refuses_wrong_version_and_missing_fds(sock_path: str) -> None:
    """A fake host: first offers another version, then an offer without fds."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(2)
    srv.setblocking(False)
    loop = asyncio.get_running_loop()
    offers = [
        {"type": "offer", "protocol": PROTOCOL, "version": 2},
        None,  # filled from a real host's offer, sent without fds
        {"type": "refuse", "reason": "version", "message": "go away", "versions": [1]},
    ]
    async with PcieHost(sock_path + ".real", config=SMALL) as real:
        offers[1] = real._offer()
    replies: list[dict] = []

    async def fake_host() -> None:
        for offer in offers:
            conn, _ = await loop.sock_accept(srv)
            fs = FramedSocket(conn)
            try:
                hello, _fds = await fs.recv_frame()
                assert hello["protocol"] == PROTOCOL
                await fs.send_frame(offer)
                if offer["type"] != "refuse":
                    replies.append((await fs.recv_frame())[0])
            finally:
                fs.close()

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fake_host())
            with pytest.raises(HandshakeError) as e1:
                async with PcieCard.connect(sock_path):
                    pass
            assert e1.value.reason == "version"
            with pytest.raises(HandshakeError) as e2:
                async with PcieCard.connect(sock_path):
                    pass
            assert e2.value.reason == "fds"
            assert "expected 35" in str(e2.value)
            with pytest.raises(HandshakeError, match="go away"):
                async with PcieCard.connect(sock_path):
                    pass
    finally:
        srv.close()
    assert [r["reason"] for r in replies] == ["version", "fds"]


@pytest.mark.asyncio
async def test_card_gives_up_cleanly(sock_path: str) -> None:
    with pytest.raises(LinkLost):  # nobody listening
        async with PcieCard.connect(sock_path):
            pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)
    try:  # a host that never answers
        with pytest.raises(MicTimeoutError):
            async with PcieCard.connect(sock_path, timeout=0.2):
                pass
    finally:
        srv.close()


@pytest.mark.asyncio
async def test_messages_both_ways_and_bounds(sock_path: str) -> None:
    cfg = PcieConfig(card_ram_size=1 << 20, host_ram_size=1 << 20, max_message=4096)
    async with card_pair(sock_path, config=cfg) as p:
        for i in range(50):
            r = await p.call(op="echo", payload={"i": i, "s": "é" * i})
            assert r["echo"] == {"i": i, "s": "é" * i}
        with pytest.raises(LocalProtocolError):
            await p.link.send({"op": "echo", "payload": "x" * 5000})
        with pytest.raises(LocalProtocolError):
            await p.link.send({"bad": {1, 2}})  # type: ignore[dict-item]
        with pytest.raises(LocalProtocolError):
            await p.link.send({"nan": float("nan")})
        assert (await p.call(op="echo", payload=7))["echo"] == 7  # still in sync
        assert p.link.sent == 51
        assert p.link.received == 51


@pytest.mark.asyncio
async def test_garbage_after_handshake_is_a_broken_link(sock_path: str) -> None:
    async with PcieHost(sock_path, config=SMALL) as host:
        accept = asyncio.create_task(host.accept())
        async with PcieCard.connect(sock_path) as card:
            link = await accept
            await card.link.send({"n": 1})
            card.link._fs.sock.send(struct.pack(">I", 1 << 30))  # oversized frame
            assert await link.recv() == {"n": 1}  # what came before is delivered
            with pytest.raises(LinkLost) as e:
                async with asyncio.timeout(5):
                    await link.recv()
            assert isinstance(e.value.__cause__, RemoteProtocolError)
            with pytest.raises(LinkLost):
                await link.send({"n": 2})
            with pytest.raises(LinkLost):  # and the card sees the link drop
                async with asyncio.timeout(5):
                    await card.link.recv()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [NotifyMode.EVENTFD, NotifyMode.HYBRID])
async def test_sigkill_card_is_link_loss_on_host(sock_path: str, mode: NotifyMode) -> None:
    async with card_pair(sock_path) as p:
        vec = p.host.mmio.vector(0)
        vec.policy = NotifyPolicy(mode=mode)
        waiter = asyncio.create_task(vec.wait())
        recv = asyncio.create_task(p.link.recv())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(5):
            with pytest.raises(LinkLost):
                await recv
            with pytest.raises(LinkLost):  # a doorbell waiter is told too
                await waiter
        assert time.monotonic() - t0 < 2.0
        assert p.link.lost
        assert isinstance(p.link.error, BrokenResourceError)
        assert await reap(p.proc) == -signal.SIGKILL
        # memory stays usable after the card died
        p.host.aperture.view(0, 4, write=True)[:] = b"ok!!"


@pytest.mark.asyncio
async def test_sigkill_host_is_link_loss_on_card(sock_path: str) -> None:
    proc = await spawn(sock_path, "--host")
    try:
        async with asyncio.timeout(20):
            while not await asyncio.to_thread(os.path.exists, sock_path):  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # the other process creates it
        async with PcieCard.connect(sock_path, timeout=20) as card:
            assert card.boot_params == {"role": "host-proc"}
            assert await card.link.recv() == {"hello": "from host"}
            waiter = asyncio.create_task(card.mmio.vector(0).wait())
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            async with asyncio.timeout(5):
                lost = await card.link.wait_lost()
                with pytest.raises(LinkLost):
                    await waiter
            assert isinstance(lost, LinkLost)
            assert time.monotonic() - t0 < 2.0
            # the host's memory is still mapped on the card side
            assert len(card.space.view(0, 16)) == 16
    finally:
        await reap(proc)
