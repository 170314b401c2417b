"""The host net device core and the userspace switch, in process (no privileges).

Cards are :class:`tests.net.test_host_rig.NetCard` (the ring core's driver
side); the switch forwards synchronously while it handles a TX chain, so once
a sender's chains are completed every delivery has happened and "not
received" can be checked without waiting for time to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mic_host.backends import create_backend
from mic_host.backends.net import MAX_PACKET, SwitchNetBackend, create_net_backend, switches
from mic_host.config import validate_device_options
from mic_host.endpoint import EndpointState
from tests.net.test_host_rig import ALL, PLAIN, NetCard, eth, hdr, running, uid, until
from virtio.constants import NetFeature
from virtio.errors import ConfigError
from virtio.net import BROADCAST, MAX_FRAME, NET_HDR_SIZE, parse_config

NO_MRG = ALL & ~int(NetFeature.MRG_RXBUF)


def port(sw: str, card: str, **kw: Any) -> SwitchNetBackend:
    b = create_net_backend(backend="switch", switch=sw, card=card, card_mode="frames", **kw)
    assert isinstance(b, SwitchNetBackend)
    return b


@contextlib.asynccontextmanager
async def cards(sw: str, *specs: dict[str, Any]) -> AsyncIterator[list[NetCard]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i, spec in enumerate(specs):
            spec = dict(spec)
            features = spec.pop("features", ALL)
            rx = spec.pop("rx", 256)
            b = port(sw, f"c{i}", node=i, **spec)
            out.append(await stack.enter_async_context(running(b, features, rx=rx)))
        yield out


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def nothing_received(*cs: NetCard) -> bool:
    return all(c.poll_rx() == 0 and not c.received for c in cs)


def _csum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def udp_frame(dst: bytes, src: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """(correct frame, the same frame with a partial checksum as Linux sends it)."""
    sip, dip = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    ulen = 8 + len(payload)
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0, 64, 17, 0, sip, dip)
    iph = iph[:10] + struct.pack("!H", ~_csum(iph) & 0xFFFF) + iph[12:]
    pseudo = sip + dip + struct.pack("!BBH", 0, 17, ulen)
    udp0 = struct.pack("!HHHH", 1234, 5678, ulen, 0) + payload
    full = (~_csum(pseudo + udp0) & 0xFFFF) or 0xFFFF
    good = eth(dst, src, iph + udp0[:6] + struct.pack("!H", full) + udp0[8:], 0x0800)
    seed = _csum(pseudo)  # the folded pseudo-header sum, not complemented
    partial = eth(dst, src, iph + udp0[:6] + struct.pack("!H", seed) + udp0[8:], 0x0800)
    return good, partial


def tcp_gso_frame(dst: bytes, src: bytes, payload_len: int) -> bytes:
    sip, dip = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload_len, 0, 0x4000, 64, 6, 0, sip, dip)
    iph = iph[:10] + struct.pack("!H", ~_csum(iph) & 0xFFFF) + iph[12:]
    tcph = struct.pack("!HHIIBBHHH", 1, 2, 1000, 0, 5 << 4, 0x18, 65535, 0, 0)
    return eth(dst, src, iph + tcph + bytes(range(256)) * (payload_len // 256), 0x0800)


# -- the device core -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_offer_config_registry_and_card_params() -> None:
    sw = f"t{uid()}"
    # frames mode: the card opens no TAP, so no card namespace is made for it
    b = create_backend(
        "net", name="net0", card="mic3", node=2, backend="switch", switch=sw, card_mode="frames"
    )
    try:
        assert isinstance(b, SwitchNetBackend)
        assert b.queue_sizes() == (256, 256)
        assert b.features() & NetFeature.MRG_RXBUF
        cfg = parse_config(b.config_bytes())
        assert cfg.mac == b.mac
        assert cfg.link_up
        assert cfg.mtu == 1500
        p = b.card_params()
        assert p["card_ip"] == "172.31.255.2/24"  # node ids are 1-based: mic0 is node 1
        assert p["gateway"] is None  # no uplink: no host on the switch
        assert p["netns"] == "mic3"
        assert p["ifname"] == "eth0"
        assert sw in switches()
        info = b.info()
        assert info["backend"] == "switch"
        assert info["host_interface"] == sw
        assert info["counters"]["drops"]["tx"]["runt"] == 0
    finally:
        await b.aclose()
    assert sw not in switches()  # the last port left
    with pytest.raises(ConfigError, match="unknown backend"):
        create_backend("net", backend="vde")
    with pytest.raises(ConfigError, match="mtu"):
        create_backend("net", backend="switch", mtu=20)
    with pytest.raises(ConfigError, match="bad options"):
        create_backend("net", backend="switch", bogus=1)


def test_net_options_users_can_set(tmp_path: Path) -> None:
    def check(**opts: Any) -> dict[str, Any]:
        return validate_device_options("net", opts, state_dir=tmp_path, card="mic0")

    assert check(backend="switch", backlog=4)["backlog"] == 4
    with pytest.raises(ConfigError, match="backlog"):
        check(backend="switch", backlog=0)
    for gone in ("queue_size", "rx_batch"):  # constants, not options
        with pytest.raises(ConfigError, match=gone):
            check(**{gone: 64})


# -- switching ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_switch_floods_learns_and_unicasts_never_back_to_the_sender() -> None:
    sw = f"t{uid()}"
    async with cards(sw, {}, {}, {}) as (a, b, c):
        ma, mb, mc = a.backend.mac, b.backend.mac, c.backend.mac
        # broadcast from a: b and c, not a
        f1 = eth(BROADCAST, ma, b"hello all")
        a.send(hdr() + f1)
        assert [p[1] for p in await b.recv(1)] == [f1]
        assert [p[1] for p in await c.recv(1)] == [f1]
        await a.sent(1)
        await settle()
        assert nothing_received(a)
        # b -> a (a was learned): only a
        f2 = eth(ma, mb, b"to a")
        b.send(hdr() + f2)
        (h, frame, nbufs) = (await a.recv(1))[0]
        assert frame == f2
        assert nbufs == 1
        assert h[6] == 1
        await b.sent(1)
        await settle()
        assert nothing_received(b, c)
        # unknown destination: flooded to a and b
        f3 = eth(b"\x02\0\0\0\0\x99", mc, b"who?")
        c.send(hdr() + f3)
        assert (await a.recv(1))[0][1] == f3
        assert (await b.recv(1))[0][1] == f3
        # a -> its own MAC: learned on the ingress port, filtered
        a.send(hdr() + eth(ma, ma, b"loop"))
        await a.sent(2)
        await settle()
        assert nothing_received(a, b, c)
        info = switches()[sw].info()
        assert info["filtered"] == 1
        assert set(info["macs"]) >= {a.backend.info()["mac"], b.backend.info()["mac"]}


@pytest.mark.asyncio
async def test_gso_and_partial_checksums_cross_the_switch_or_are_resolved() -> None:
    sw = f"t{uid()}"
    async with cards(sw, {}, {}, {"features": PLAIN}, {"features": NO_MRG}) as (a, b, c, d):
        ma = a.backend.mac
        # a 64 KiB TSO segment: one chain to b (MRG: several buffers); dropped for c
        big = tcp_gso_frame(BROADCAST, ma, 65000)
        assert len(big) + NET_HDR_SIZE <= MAX_PACKET
        a.send(hdr(1, 1, 54, 1448, 34, 16) + big, split=[5, 40, 30000])
        (h, frame, nbufs) = (await b.recv(1))[0]
        assert frame == big
        assert (h[0], h[1], h[3], h[4], h[5]) == (1, 1, 1448, 34, 16)
        assert nbufs == -(-(len(big) + NET_HDR_SIZE) // 16384) == 4
        assert (await d.recv(1))[0][1] == big  # no MRG: one 64 KiB buffer
        await a.sent(1)
        await settle()
        assert nothing_received(c)
        assert c.backend.rx_drops["offload"] == 1
        assert b.backend.rx_gso == 1
        assert a.backend.tx_gso == 1
        assert a.backend.max_packet == len(big)
        # a partial checksum: kept for b (GUEST_CSUM), completed in software for c
        good, partial = udp_frame(BROADCAST, ma, b"odd length payload!")
        a.send(hdr(1, 0, 0, 0, 34, 6) + partial)
        (h, frame, _) = (await b.recv(1))[0]
        assert frame == partial
        assert h[0] == 1
        (h, frame, _) = (await c.recv(1))[0]
        assert frame == good
        assert h[0] == 0


@pytest.mark.asyncio
async def test_every_bad_header_is_dropped_and_counted() -> None:
    sw = f"t{uid()}"
    async with cards(sw, {}, {}, {"features": PLAIN}) as (a, b, p):
        ma = a.backend.mac
        ok = eth(BROADCAST, ma, b"x" * 50)
        bad = [
            b"\0" * 8,  # runt: not even a header
            hdr() + ok[:10],  # runt: shorter than an Ethernet header
            hdr(flags=2) + ok,  # bad_header: DATA_VALID from the driver
            hdr(flags=4) + ok,  # bad_header: RSC_INFO
            hdr(gso_type=3, gso_size=100) + ok,  # bad_header: UDP GSO not supported
            hdr(1, 1, 54, 0, 34, 16) + ok,  # bad_header: GSO with gso_size 0
            hdr(flags=1, csum_start=60, csum_offset=6) + ok,  # bad_header: csum outside
            hdr() + eth(BROADCAST, ma, b"y" * 1600),  # oversize: over MTU without GSO
            hdr(1, 1, 54, 1448, 34, 16) + ok + bytes(MAX_FRAME),  # oversize: GSO > 64 KiB
        ]
        for i, pkt in enumerate(bad):
            a.send(pkt, split=[3] if i % 2 else [])
        a.send(hdr() + ok, split=[5, 7])  # a good one, header split across descriptors
        # p negotiated neither CSUM nor HOST_TSO4: both offloads refused
        p.send(
            hdr(flags=1, csum_start=34, csum_offset=6) + eth(BROADCAST, p.backend.mac, b"z" * 40)
        )
        p.send(hdr(0, 1, 54, 1448) + eth(BROADCAST, p.backend.mac, b"z" * 40))
        await a.sent(len(bad) + 1)
        await p.sent(2)
        got = await b.recv(1)
        assert got[0][1] == ok
        await settle()
        assert nothing_received(b)
        drops = a.backend.tx_drops
        assert (drops["runt"], drops["bad_header"], drops["oversize"]) == (2, 5, 2)
        assert p.backend.tx_drops["offload"] == 2
        assert a.backend.tx_packets == 1
        assert a.task is not None
        assert not a.task.done()
        assert all(not c.owner.ring_errors for c in (a, b, p))


@pytest.mark.asyncio
async def test_a_card_without_rx_buffers_holds_nobody_up() -> None:
    sw = f"t{uid()}"
    async with cards(sw, {}, {}, {"rx": 0, "backlog": 8}) as (a, b, c):
        frames = [eth(BROADCAST, a.backend.mac, f"n{i}".encode()) for i in range(20)]
        for f in frames:
            a.send(hdr() + f)
        assert [p[1] for p in await b.recv(20)] == frames
        await a.sent(20)
        assert c.backend.rx_drops["backlog"] == 12
        assert c.backend.rx_no_buffers >= 1
        assert c.backend.info()["backlog"] == 8
        assert nothing_received(c)
        # the card posts buffers: the queued frames arrive, in order
        c.post_rx(4)
        c.post_rx(60)
        assert [p[1] for p in await c.recv(8)] == frames[:8]
        a.send(hdr() + frames[0])
        assert (await c.recv(1))[0][1] == frames[0]


@pytest.mark.asyncio
async def test_small_buffers_without_mrg_truncate_nothing() -> None:
    sw = f"t{uid()}"
    async with cards(sw, {}, {"features": NO_MRG, "rx": 0}) as (a, b):
        b.post_rx(2, 200)
        a.send(hdr() + eth(BROADCAST, a.backend.mac, b"k" * 500))  # does not fit in 200 B
        small = eth(BROADCAST, a.backend.mac, b"s" * 20)
        a.send(hdr() + small)
        (_h, frame, n) = (await b.recv(1))[0]
        assert frame == small
        assert n == 1
        assert b.backend.rx_drops["truncated"] == 1


@pytest.mark.asyncio
async def test_reset_gives_held_buffers_back_and_renegotiates() -> None:
    sw = f"t{uid()}"
    async with cards(sw, {}, {"rx": 0, "backlog": 4}) as (a, b):
        b.post_rx(1, 100)
        a.send(hdr() + eth(BROADCAST, a.backend.mac, b"q" * 200))  # b holds its buffer
        a.send(hdr() + eth(BROADCAST, a.backend.mac, b"r" * 200))
        await a.sent(2)
        assert b.backend.info()["backlog"] >= 1
        await b.reset()  # drain() returns only once every held chain is back
        assert not b.backend._held
        assert b.backend.info()["backlog"] == 0
        b.features = PLAIN
        b.driver_ok()
        b.post_rx(16)
        f = eth(BROADCAST, a.backend.mac, b"after reset")
        a.send(hdr() + f)
        (_h, frame, _) = (await b.recv(1))[0]
        assert frame == f
        assert b.backend.info()["offloads_to_card"]["csum"] is False
        assert "guest_csum" not in b.backend.info()["offloads"]
        assert "guest_tso4" in a.backend.info()["offloads"]
        assert b.backend.sessions == 2


@pytest.mark.asyncio
async def test_link_down_drops_both_ways_and_tells_the_card() -> None:
    sw = f"t{uid()}"
    async with cards(sw, {}, {}) as (a, b):
        await b.backend.set_link(False)
        assert not parse_config(b.ctx.configs[-1]).link_up
        assert b.backend.info()["link"] == "down"
        a.send(hdr() + eth(BROADCAST, a.backend.mac, b"1"))
        b.send(hdr() + eth(BROADCAST, b.backend.mac, b"2"))
        await a.sent(1)
        await b.sent(1)
        await settle()
        assert nothing_received(a, b)
        assert b.backend.rx_drops["link_down"] == 1  # a's frame, not delivered
        assert b.backend.tx_drops["link_down"] == 1  # b's own frame, not sent
        assert b.backend.stats()["tx_dropped"] == 1
        await b.backend.set_link(True)
        assert parse_config(b.ctx.configs[-1]).link_up
        f = eth(BROADCAST, a.backend.mac, b"3")
        a.send(hdr() + f)
        assert (await b.recv(1))[0][1] == f


@pytest.mark.asyncio
async def test_frames_before_driver_ok_are_dropped_not_queued() -> None:
    sw = f"t{uid()}"
    a_b = port(sw, "ca")
    b_b = port(sw, "cb")
    async with running(a_b) as a:
        b = NetCard(b_b)
        b.start()
        try:
            a.send(hdr() + eth(BROADCAST, a_b.mac, b"early"))
            await a.sent(1)
            assert b_b.rx_drops["not_ready"] == 1
            b.driver_ok()
            b.post_rx(8)
            await until(lambda: b_b.info()["negotiated"], "b negotiated")
            f = eth(BROADCAST, a_b.mac, b"late")
            a.send(hdr() + f)
            assert (await b.recv(1))[0][1] == f
        finally:
            await b.aclose()


@pytest.mark.asyncio
async def test_a_reset_ends_the_session_at_once() -> None:
    # The endpoint's on_detach ends the session synchronously: held RX chains
    # go back even if the card resets between two of the backend's get()s.
    async with cards(f"t{uid()}", {"rx": 0}) as (a,):
        a.post_rx(4, 2048)
        await until(lambda: bool(a.backend._held), "an RX buffer held")
        assert a.backend._live
        for ep in a.eps:
            ep.detach(EndpointState.IDLE, "reset")
        assert not a.backend._live
        assert not a.backend._held
        async with asyncio.timeout(10):
            await a.eps[0].drain()
        a.ctx.features = 0
        a.driver_ok()  # and again, with nothing in between
        for ep in a.eps:
            ep.detach(EndpointState.IDLE, "reset")
        a.driver_ok()
        a.post_rx(4, 2048)
        await until(lambda: a.backend._live and bool(a.backend._held), "live again")
