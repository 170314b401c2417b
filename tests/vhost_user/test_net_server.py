"""The vhost-user net back-end against small Python front-ends, over real Unix sockets.

Two :class:`NetVhostUserServer` on one :class:`L2Switch` (``SwitchNetBackend``
ports, no privileges needed), each with a front-end that shares a memfd and
drives a receiveq and a transmitq (:class:`DriverQueue`): a frame one sends
reaches the other through the switch, byte for byte. A ring runs only while
enabled (protocol features acked), a stopped receiveq gives back the buffers
the backend held (used, 0 bytes) so the base loses none, the negotiation is
what QEMU's ``-netdev vhost-user`` needs (no CONFIG, queue pairs counted), and
bad input drops only its connection with a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from mic_host.backends.net import SwitchRegistry
from mic_host.vhost_user.net import NetVhostUserServer, build_net_backend
from tests.vhost_user.net_frontend import NetFrontEnd, frame
from transport.vhost_user import ProtocolFeature, Request
from transport.vhost_user.protocol import (
    U64,
    VRING_STATE,
)
from virtio.constants import Feature, NetFeature
from virtio.errors import ConfigError


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vun-", dir="/tmp"))  # AF_UNIX paths: 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest_asyncio.fixture
async def pair(short_dir: Path) -> AsyncIterator[tuple[NetVhostUserServer, NetVhostUserServer]]:
    reg = SwitchRegistry()
    a = NetVhostUserServer(build_net_backend(switch="lan", registry=reg, port="a"), short_dir / "a")
    b = NetVhostUserServer(build_net_backend(switch="lan", registry=reg, port="b"), short_dir / "b")
    async with a, b:
        yield a, b
    assert reg.snapshot() == {}  # both ports left: the switch is gone


async def _connect(srv: NetVhostUserServer) -> NetFrontEnd:
    fe = await NetFrontEnd.connect(srv.path)
    assert isinstance(fe, NetFrontEnd)
    return fe


@pytest.mark.asyncio
async def test_negotiation_is_what_qemu_net_needs(
    pair: tuple[NetVhostUserServer, NetVhostUserServer],
) -> None:
    fe = await _connect(pair[0])
    try:
        want = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)
        offered, proto = await fe.negotiate_net(want)
        assert offered & Feature.VERSION_1
        assert offered & NetFeature.MRG_RXBUF
        assert not offered & NetFeature.MQ  # one queue pair
        # no CONFIG: QEMU 7.2's virtio-net crashes on it; the config space is QEMU's
        assert proto == want
        assert U64.unpack(await fe.call_(Request.GET_QUEUE_NUM))[0] == 1  # queue pairs
    finally:
        fe.close()


@pytest.mark.asyncio
async def test_frames_cross_the_switch_only_while_the_rings_are_enabled(
    pair: tuple[NetVhostUserServer, NetVhostUserServer],
) -> None:
    a, b = pair
    fa, fb = await _connect(a), await _connect(b)
    try:
        proto = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)
        for fe in (fa, fb):
            await fe.negotiate_net(proto)
        await fa.start_net()
        await fb.start_net(enable=False)  # kicked, but not enabled yet: not running
        fb.post_rx(8)
        fa.send_frame(frame(1, b"while disabled"))
        await fa.used(1)
        assert b.net.rx_drops["not_ready"] == 1  # a disabled receiveq gets nothing
        await fb.enable(True)  # the buffers posted before are taken now, without a kick
        payload = os.urandom(1000)
        fa.send_frame(frame(1, payload))
        token, length = await fb.used(0)
        assert fb.rx_frame(token, length) == frame(1, payload)
        # and back, to the MAC the switch learned
        fa.post_rx(4)
        fb.send_frame(b"\x52\x54\x00\x00\x00\x01" + frame(2, b"reply")[6:])
        token, length = await fa.used(0)
        assert fa.rx_frame(token, length)[12:] == b"\x88\xb5reply"
        assert a.net.tx_packets == 2
        assert b.net.rx_packets == 1
    finally:
        fa.close()
        fb.close()


@pytest.mark.asyncio
async def test_a_stopped_receiveq_gives_back_the_buffers_it_held(
    pair: tuple[NetVhostUserServer, NetVhostUserServer],
) -> None:
    a, _ = pair
    fe = await _connect(a)
    try:
        await fe.negotiate_net(int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK))
        await fe.start_net()
        fe.post_rx(8)
        ep = a.endpoints[0]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not ep.in_flight:
            assert loop.time() < deadline, "the backend never took the RX buffers"
            await asyncio.sleep(0.01)
        held = ep.in_flight  # the backend holds them between packets
        t0 = loop.time()
        base = await fe.call_(Request.GET_VRING_BASE, VRING_STATE.pack(0, 0))
        assert loop.time() - t0 < 5  # not the 30 s drain timeout
        assert VRING_STATE.unpack(base) == (0, held)
        got = [await fe.used(0) for _ in range(held)]  # each of them, used with 0 bytes
        assert sorted(t for t, _ in got) == list(range(held))
        assert {n for _, n in got} == {0}
        assert fe.queues[0].get_used() is None
        assert ep.in_flight == 0
    finally:
        fe.close()


@pytest.mark.asyncio
async def test_a_small_ring_is_refused_clearly_and_only_that_connection_goes(
    pair: tuple[NetVhostUserServer, NetVhostUserServer], caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = pair
    fe = await _connect(a)
    try:
        await fe.negotiate_net(int(ProtocolFeature.REPLY_ACK))
        await fe.send(Request.SET_VRING_NUM, VRING_STATE.pack(0, 128))
        ack = await fe.reply()
        assert U64.unpack(ack.payload)[0] != 0
        assert await fe.closed_by_peer()
    finally:
        fe.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("queue 0 of 128 entries" in m and "rx_queue_size" in m for m in errors), errors
    fe = await _connect(a)  # the next front-end is served
    try:
        await fe.negotiate_net(int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK))
        await fe.start_net()
    finally:
        fe.close()


def test_backend_choice_is_checked() -> None:
    with pytest.raises(ConfigError, match="exactly one of a TAP or a switch"):
        build_net_backend()
    with pytest.raises(ConfigError, match="exactly one"):
        build_net_backend(tap="x", switch="y")
    with pytest.raises(ConfigError, match="uplink TAP belongs to a switch"):
        build_net_backend(tap="x", uplink="y")
