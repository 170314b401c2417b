"""Control link: handshake refusals, framed messages, link loss on process death."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import struct
import time

import pytest

import transport.link
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
from transport.pcie import MAX_HANDSHAKES, MAX_REFUSALS
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


# -- who can claim a card's link, and how long a stranger can hold it up ---------------


@pytest.mark.asyncio
async def test_strangers_neither_delay_nor_fail_a_card_on_a_path(sock_path: str) -> None:
    """Half a hello, silence, and connect/close spam are served next to the card's
    handshake, each within the short handshake timeout: the card gets in at once."""
    async with PcieHost(sock_path, config=SMALL) as host:  # 2 s per handshake
        accept = asyncio.create_task(host.accept())
        silent = [await raw_client(sock_path) for _ in range(3)]
        half = await raw_client(sock_path)
        half[1].write(frame({"type": "hello", "protocol": PROTOCOL, "version": 1})[:9])
        await half[1].drain()
        stop = asyncio.Event()
        spammed = 0

        async def spam() -> None:
            nonlocal spammed
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    _r, w = await raw_client(sock_path)
                    w.close()
                    spammed += 1
                await asyncio.sleep(0)

        spammer = asyncio.create_task(spam())
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        async with PcieCard.connect(sock_path) as card:
            link = await accept
            took = time.monotonic() - t0
            await link.send({"type": "heartbeat"})
            assert await card.link.recv() == {"type": "heartbeat"}
        stop.set()
        await spammer
        # served one at a time, the card would have waited 2 s per silent stranger
        assert took < 1.5, f"the card waited {took:.2f} s behind strangers"
        assert spammed > 10
        # the strangers were refused (the silent ones after the timeout, or hung up
        # on when the card won) and what is kept of them is bounded
        assert host.refusals > 0
        assert len(host.refused) <= MAX_REFUSALS
        for r, w in [*silent, half]:
            async with asyncio.timeout(5):
                assert await r.read() == b""
            await close_writer(w)


@pytest.mark.asyncio
async def test_a_silent_peer_is_refused_after_the_short_timeout(sock_path: str) -> None:
    cfg = PcieConfig(card_ram_size=1 << 20, host_ram_size=1 << 20, handshake_timeout=0.2)
    async with PcieHost(sock_path, config=cfg) as host:
        assert PcieConfig().handshake_timeout == 2.0
        accept = asyncio.create_task(host.accept())
        r, w = await raw_client(sock_path)
        async with asyncio.timeout(5):
            assert await r.read() == b""  # hung up on
        await close_writer(w)
        assert isinstance(host.refused[0], MicTimeoutError)
        accept.cancel()


@pytest.mark.asyncio
async def test_socket_pair_only_the_given_end_reaches_the_link(sock_path: str) -> None:
    async with PcieHost(None, config=SMALL) as host:
        assert host.path is None
        end = socket.socket(fileno=os.dup(host.card_fd))
        host.close_card_end()
        with pytest.raises(LocalProtocolError):
            _ = host.card_fd
        accept = asyncio.create_task(host.accept())
        await asyncio.sleep(0.05)
        assert not accept.done()  # no deadline before the card speaks
        async with PcieCard.connect(end, expect_card="mic0") as card:
            link = await accept
            await card.link.send({"type": "online"})
            assert await link.recv() == {"type": "online"}
        async with asyncio.timeout(5):
            await link.wait_lost()


@pytest.mark.asyncio
async def test_socket_pair_names_the_card_process_the_caller_spawned() -> None:
    """On a socket pair SO_PEERCRED names the pair's maker (us), not the card: the
    host takes the pid of the process it spawned (the daemon's log and status
    used to name the daemon itself). A card process spawned on the pair sees its
    maker, the host; here both ends are this process, so neither names it."""
    async with PcieHost(None, config=SMALL) as host:
        end = socket.socket(fileno=os.dup(host.card_fd))
        host.close_card_end()
        accept = asyncio.create_task(host.accept(card_pid=4242))
        async with PcieCard.connect(end, expect_card="mic0") as card:
            await accept
            assert host.card_pid == 4242
            assert card.link.peer_pid is None  # the maker of the pair is this process
    async with PcieHost(None, config=SMALL) as host:
        end = socket.socket(fileno=os.dup(host.card_fd))
        host.close_card_end()
        accept = asyncio.create_task(host.accept())
        async with PcieCard.connect(end, expect_card="mic0"):
            await accept
            assert host.card_pid is None  # unknown rather than our own pid


@pytest.mark.asyncio
async def test_socket_pair_a_failed_handshake_ends_accept() -> None:
    async with PcieHost(None, config=SMALL) as host:
        end = socket.socket(fileno=os.dup(host.card_fd))
        host.close_card_end()
        end.sendall(frame({"type": "hello", "protocol": "other", "version": 1}))
        with pytest.raises(HandshakeError):
            async with asyncio.timeout(5):
                await host.accept()
        end.close()
    async with PcieHost(None, config=SMALL) as host:
        host.close_card_end()  # the card died before it spoke: EOF
        with pytest.raises(LinkLost):
            async with asyncio.timeout(5):
                await host.accept()


@pytest.mark.asyncio
async def test_a_frame_that_trips_the_reader_loses_the_link_not_the_task_group(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a frame does to the reader, the link is lost with the reason and the
    host's task group (the owner's task) lives on."""
    async with PcieHost(sock_path, config=SMALL) as host:
        accept = asyncio.create_task(host.accept())
        async with PcieCard.connect(sock_path) as card:
            link = await accept

            def boom(body: bytes) -> dict:
                raise TypeError("a bug the frame tripped")

            monkeypatch.setattr(transport.link, "decode_body", boom)
            await card.link.send({"type": "anything"})
            async with asyncio.timeout(5):
                err = await link.wait_lost()
            assert isinstance(err.__cause__, TypeError)
            with pytest.raises(LinkLost):
                await link.recv()
        assert not host._tg._aborting  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_deep_nesting_and_duplicate_keys_break_the_link(sock_path: str) -> None:
    for body in (b"[" * 200_000 + b"]" * 200_000, b'{"type":"heartbeat","type":"online"}'):
        async with PcieHost(sock_path, config=PcieConfig(max_message=1 << 20)) as host:
            accept = asyncio.create_task(host.accept())
            async with PcieCard.connect(sock_path) as card:
                link = await accept
                sock = card.link._fs.sock
                await asyncio.get_running_loop().sock_sendall(
                    sock, struct.pack(">I", len(body)) + body
                )
                async with asyncio.timeout(5):
                    err = await link.wait_lost()
                assert isinstance(err.__cause__, RemoteProtocolError)


@pytest.mark.asyncio
async def test_cancelled_accept_closes_every_peer_it_held(sock_path: str) -> None:
    async with PcieHost(sock_path, config=SMALL) as host:
        accept = asyncio.create_task(host.accept())
        peers = [await raw_client(sock_path) for _ in range(MAX_HANDSHAKES + 3)]
        await asyncio.sleep(0.1)
        accept.cancel()
        with pytest.raises(asyncio.CancelledError):
            await accept
        for r, _w in peers[:MAX_HANDSHAKES]:  # those being served are hung up on
            async with asyncio.timeout(5):
                assert await r.read() == b""
        for _r, w in peers:
            await close_writer(w)
        gc.collect()  # an accepted socket nobody closed would warn here
        # and the host still serves the next accept
        accept = asyncio.create_task(host.accept())
        async with PcieCard.connect(sock_path):
            await accept
