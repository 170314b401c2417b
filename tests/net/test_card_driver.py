"""The card's virtio-net driver against a real device side, in one process.

A host :class:`~mic_host.vop.Vop` and a card :class:`~mic_card.bus.VirtioBus`
share one memory (``tests.vop.rig``); :class:`RingNet` is a minimal net device
on the host side of the rings: it records what the card transmits and writes
packets into the receive buffers the card posted (the MRG_RXBUF way, spread
over as many buffers as needed), so each test controls exactly what the
driver sees, malformed headers included.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from mic_card.bus import CardRamAllocator, VirtioBus
from mic_card.drivers import DRIVERS
from mic_card.drivers.net import MRG_BIG_BUFFERS, MRG_BUFFER, NetDevice, merge_params
from mic_card.drivers.net_params import consistent
from mic_host.backends import BackendContext
from mic_host.vop import Vop
from tests.vop.rig import CARD_HEAP, CardPlat, HostPlat, TwoRegionMemory
from virtio.constants import DeviceType, NetFeature, NetHdrFlag, NetHdrGso
from virtio.errors import BrokenResourceError, LocalProtocolError, WouldBlock
from virtio.net import (
    DEVICE_FEATURES,
    MAX_PACKET,
    NET_HDR,
    NUM_BUFFERS,
    NUM_BUFFERS_OFFSET,
    build_config,
    format_mac,
)

MAC = bytes.fromhex("02aabbccdd01")
PEER = bytes.fromhex("02aabbccdd02")
QSIZE = 256


# --------------------------------------------------------------------------
# helpers (a real device side, not a stand-in for the driver's collaborators)


class RingNet:
    """Host side of one virtio-net device: TX recorder and RX writer."""

    device_type = int(DeviceType.NET)

    def __init__(
        self,
        *,
        name: str = "net0",
        mac: bytes = MAC,
        mtu: int = 1500,
        features: int = int(DEVICE_FEATURES),
        link_up: bool = True,
    ) -> None:
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self._features = features
        self.link_up = link_up
        self.ctx: BackendContext | None = None
        self.sent: list[bytes] = []
        self._ready = asyncio.Event()

    def features(self) -> int:
        return self._features

    def config_bytes(self) -> bytes:
        return build_config(self.mac, link_up=self.link_up, mtu=self.mtu)

    def queue_sizes(self) -> list[int]:
        return [QSIZE, QSIZE]

    async def run(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self._ready.set()
        tx = ctx.queues[1]
        async for chain in tx.chains():
            self.sent.append(chain.read())
            tx.put(chain, 0)

    async def aclose(self) -> None:
        return None

    @property
    def mrg(self) -> bool:
        assert self.ctx is not None
        return bool(self.ctx.features & NetFeature.MRG_RXBUF)

    async def inject_raw(self, data: bytes, *, num_buffers: int | None = None) -> int:
        """Write ``data`` (header + frame) into as many posted buffers as it needs
        (one without MRG_RXBUF); set num_buffers (or the given value). Returns the
        number of buffers used."""
        await self._ready.wait()
        assert self.ctx is not None
        rx = self.ctx.queues[0]
        chains = []
        room = 0
        while room < len(data):
            chain = await rx.get()
            chains.append(chain)
            room += chain.writable_len
            if not self.mrg:
                break
        buf = bytearray(data)
        if len(buf) >= 12:
            nb = len(chains) if num_buffers is None else num_buffers
            NUM_BUFFERS.pack_into(buf, NUM_BUFFERS_OFFSET, nb)
        off = 0
        for chain in chains:
            n = chain.write(memoryview(buf)[off:])
            rx.put(chain, n)
            off += n
        return len(chains)

    async def inject(self, frame: bytes, **hdr: int) -> int:
        fields = [hdr.get(k, 0) for k in ("flags", "gso_type", "hdr_len", "gso_size")]
        fields += [hdr.get("csum_start", 0), hdr.get("csum_offset", 0), 0]
        return await self.inject_raw(NET_HDR.pack(*fields) + frame, num_buffers=hdr.get("nb"))

    async def set_link(self, up: bool) -> None:
        assert self.ctx is not None
        self.link_up = up
        await self.ctx.update_config(self.config_bytes())


class NetRig:
    """Host Vop + card bus over one memory big enough for a NIC's buffers."""

    def __init__(self, card_ram: int = 24 << 20) -> None:
        self.card_ram = card_ram
        self.mem = TwoRegionMemory(card_size=card_ram)
        self.hp = HostPlat(self.mem)
        self.cp = CardPlat(self.mem)
        self.vop = Vop(self.hp, config_timeout=2.0, remove_timeout=2.0, drain_timeout=2.0)
        self.cp.target = self.vop
        self.bus: VirtioBus | None = None

    async def boot(
        self, *backends: Any, params: dict[str, Any] | None = None, **kw: Any
    ) -> VirtioBus:
        for b in backends:
            self.vop.add_device(b)
        self.cp.heap = CardRamAllocator(CARD_HEAP, self.card_ram)
        kw.setdefault("drivers", DRIVERS)
        bus = VirtioBus(self.cp, timeout=2.0, **kw)
        bus.params = params or {}
        self.hp.target = bus
        self.bus = bus
        await bus.start()
        return bus

    def nic(self, name: str = "eth0") -> NetDevice:
        assert self.bus is not None
        d = self.bus.driver(name)
        assert isinstance(d, NetDevice)
        return d

    async def aclose(self) -> None:
        nics = []
        if self.bus is not None:
            nics = [self.bus.driver(d["name"]) for d in self.bus.devices() if d["driver"]]
            await self.bus.aclose()
        await self.vop.aclose()
        for nic in nics:
            if isinstance(nic, NetDevice):
                await nic.wait_closed()  # a TAP setup still running has ended


async def until(pred: Callable[[], bool], what: str = "condition") -> None:
    """Let the loop run until ``pred()`` (bounded only against a hang)."""
    try:
        async with asyncio.timeout(10):
            while not pred():  # noqa: ASYNC110 - plain counters, no event to wait on
                await asyncio.sleep(0.001)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


def eth(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp_frame(payload_len: int, *, seq: int = 1000, flags: int = 0x18) -> tuple[bytes, int, int]:
    """An IPv4/TCP frame with the checksum field seeded as Linux does for
    CHECKSUM_PARTIAL (pseudo-header sum, not complemented). Returns
    (frame, csum_start, csum_offset)."""
    src, dst = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])
    tcp_len = 20 + payload_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _sum16(ip)) + ip[12:]
    pseudo = _sum16(src + dst + struct.pack("!BBH", 0, 6, tcp_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 0, 5 << 4, flags, 65535, pseudo, 0)
    payload = bytes(i & 0xFF for i in range(payload_len))
    return eth(MAC, PEER, ip + tcp + payload, 0x0800), 34, 16


def tcp_checksum_ok(frame: bytes) -> bool:
    ip = frame[14:34]
    seg = frame[34:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    return _sum16(pseudo + seg) == 0xFFFF


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[NetRig]:
    r = NetRig()
    try:
        yield r
    finally:
        await r.aclose()


class OffloadFrames(NetDevice):
    """Frames mode with the receive offloads acked: the state a card is in when
    tap mode was planned (offloads acked) and its setup then failed."""

    @classmethod
    def supported_features(cls, dev: Any) -> int:
        return consistent(int(DEVICE_FEATURES) & dev.offered)


class CsumFrames(NetDevice):
    """Frames mode with GUEST_CSUM acked but no GUEST_TSO: 16 KiB mergeable
    buffers, so a jumbo frame with a partial checksum spans several."""

    @classmethod
    def supported_features(cls, dev: Any) -> int:
        tso = NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_ECN
        return consistent(int(DEVICE_FEATURES) & ~int(tso) & dev.offered)


# --------------------------------------------------------------------------
# tests


@pytest.mark.asyncio
async def test_frames_mode_acks_no_receive_offloads_and_posts_every_buffer(rig: NetRig) -> None:
    dev = RingNet()
    bus = await rig.boot(dev)
    nic = rig.nic()
    assert nic.mode == "frames"
    assert nic.mac == MAC
    assert nic.mac_str == format_mac(MAC)
    assert nic.mtu == 1500
    assert nic.link_up
    f = bus.device("eth0").features
    assert f & NetFeature.MRG_RXBUF
    assert f & NetFeature.STATUS
    assert f & NetFeature.MAC
    assert f & NetFeature.CSUM
    assert f & NetFeature.HOST_TSO4
    assert not f & (NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6)
    # MRG_RXBUF: one 16 KiB single-descriptor buffer per ring entry
    assert nic.rxq.outstanding == QSIZE
    st = nic.stats()
    assert (st["rx_buffers"], st["rx_buffer_size"]) == (QSIZE, MRG_BUFFER)
    info = nic.info()
    assert info["mode"] == "frames"
    assert info["link"] == "up"
    assert info["ready"]
    assert "MRG_RXBUF" in info["features"]
    assert info["offloads"]["rx"] == []


@pytest.mark.asyncio
async def test_frames_send_and_recv(rig: NetRig) -> None:
    dev = RingNet()
    await rig.boot(dev)
    nic = rig.nic()
    with pytest.raises(WouldBlock):
        nic.recv_nowait()
    out = eth(PEER, MAC, b"hello host")
    await nic.send(out)
    await until(lambda: len(dev.sent) == 1, "the host got the frame")
    assert dev.sent[0] == bytes(12) + out  # zeroed header, then the frame
    assert nic.tx_packets == 1
    assert nic.tx_bytes == len(out)

    for i in range(3):
        await dev.inject(eth(MAC, PEER, f"to card {i}".encode()))
    got = [await nic.recv() for _ in range(2)]
    assert got == [eth(MAC, PEER, f"to card {i}".encode()) for i in range(2)]
    agen = nic.frames()
    assert await agen.__anext__() == eth(MAC, PEER, b"to card 2")
    await agen.aclose()
    assert nic.rx_packets == 3
    await until(lambda: nic.rxq.outstanding == QSIZE, "buffers reposted")

    with pytest.raises(LocalProtocolError):
        nic.send_nowait(b"short")  # runt
    with pytest.raises(LocalProtocolError):
        nic.send_nowait(eth(PEER, MAC, bytes(3000)))  # over the MTU without GSO
    with pytest.raises(LocalProtocolError):
        nic.send_nowait(eth(PEER, MAC, bytes(100)), gso_type=3, gso_size=100)  # UFO


@pytest.mark.asyncio
async def test_many_sends_wait_for_slots(rig: NetRig) -> None:
    dev = RingNet()
    await rig.boot(dev)
    nic = rig.nic()
    frames = [eth(PEER, MAC, i.to_bytes(4, "big") * 10) for i in range(500)]
    for f in frames:
        await nic.send(f)
    await until(lambda: len(dev.sent) == 500, "every frame sent")
    assert [s[12:] for s in dev.sent] == frames


@pytest.mark.asyncio
async def test_transmit_slots_are_reaped_without_interrupts(rig: NetRig) -> None:
    dev = RingNet()
    await rig.boot(dev)
    nic = rig.nic()
    assert dev.ctx is not None
    txq = dev.ctx.queues[1]
    assert nic.txq.interrupts_suppressed
    slots = nic.stats()["tx_slots"]
    irqs = txq.interrupts
    # One frame at a time, each consumed before the next (a ping without its
    # reply): the host completes each one and must not interrupt for it.
    n = slots + 16  # more than the slots: they are reaped on the way
    for i in range(n):
        await nic.send(eth(PEER, MAC, i.to_bytes(4, "big") * 10))
        await until(lambda i=i: len(dev.sent) == i + 1, "frame consumed")
    assert txq.interrupts - irqs < slots // 4, (txq.interrupts, irqs)
    assert not nic.stats()["tx_dropped"]
    # Idle: the timer reaps the last ones; nothing stays held.
    await until(lambda: nic.stats()["tx_slots_free"] == slots, "every slot free again")
    assert nic.txq.outstanding == 0
    assert nic.txq.interrupts_suppressed


@pytest.mark.asyncio
async def test_a_64k_gso_packet_takes_one_buffer(rig: NetRig) -> None:
    dev = RingNet()
    await rig.boot(dev, drivers={int(DeviceType.NET): OffloadFrames})
    nic = rig.nic()
    # GUEST_TSO acked: each mergeable buffer holds a whole segment
    assert nic.rxq.outstanding == MRG_BIG_BUFFERS
    assert nic.stats()["rx_buffer_size"] >= MAX_PACKET
    frame, start, off = tcp_frame(65535 - 40)  # the largest IPv4 packet
    used = await dev.inject(
        frame,
        flags=int(NetHdrFlag.NEEDS_CSUM),
        gso_type=int(NetHdrGso.TCPV4),
        hdr_len=54,
        gso_size=1448,
        csum_start=start,
        csum_offset=off,
    )
    assert used == 1
    got = await nic.recv()
    assert len(got) == len(frame)
    assert got[:50] == frame[:50]
    assert got[52:] == frame[52:]
    assert tcp_checksum_ok(got)  # completed as a NIC would (GUEST_CSUM acked, app mode)
    assert nic.rx_gso == 1
    assert nic.rx_largest == len(frame)
    # a small packet right behind it is its own packet again
    await dev.inject(eth(MAC, PEER, b"next"))
    assert await nic.recv() == eth(MAC, PEER, b"next")
    await until(lambda: nic.rxq.outstanding == MRG_BIG_BUFFERS, "both buffers reposted")
    assert not nic.rx_dropped


@pytest.mark.asyncio
async def test_mrg_rxbuf_reassembles_a_jumbo_frame(rig: NetRig) -> None:
    dev = RingNet(mtu=60000)
    await rig.boot(dev)
    nic = rig.nic()
    assert nic.mode == "frames"
    assert nic.rxq.outstanding == QSIZE
    frame = eth(MAC, PEER, bytes(range(256)) * 200)  # 51,214 B: four 16 KiB buffers
    used = await dev.inject(frame)
    assert used == -(-(len(frame) + 12) // MRG_BUFFER) == 4
    assert await nic.recv() == frame
    assert nic.rx_largest == len(frame)
    await dev.inject(eth(MAC, PEER, b"next"))
    assert await nic.recv() == eth(MAC, PEER, b"next")
    await until(lambda: nic.rxq.outstanding == QSIZE, "all four buffers reposted")
    assert not nic.rx_dropped


@pytest.mark.asyncio
async def test_a_partial_checksum_across_buffers_is_finished_in_one_copy(rig: NetRig) -> None:
    dev = RingNet(mtu=60000)
    await rig.boot(dev, drivers={int(DeviceType.NET): CsumFrames})
    nic = rig.nic()
    assert nic.stats()["rx_buffer_size"] == MRG_BUFFER
    frame, start, off = tcp_frame(50000)
    used = await dev.inject(
        frame, flags=int(NetHdrFlag.NEEDS_CSUM), csum_start=start, csum_offset=off
    )
    assert used == 4
    got = await nic.recv()
    assert isinstance(got, bytes)
    assert len(got) == len(frame)
    assert got[:50] == frame[:50]
    assert got[52:] == frame[52:]
    assert tcp_checksum_ok(got)
    assert not nic.rx_dropped


@pytest.mark.asyncio
async def test_malformed_packets_from_the_host_are_dropped_and_counted(rig: NetRig) -> None:
    dev = RingNet()
    await rig.boot(dev)
    nic = rig.nic()
    good = eth(MAC, PEER, b"good")
    hdr = NET_HDR.pack
    bad: list[tuple[bytes, int | None, str]] = [
        (hdr(0x80, 0, 0, 0, 0, 0, 1) + good, None, "bad_header"),  # unknown flag
        (hdr(4, 0, 0, 0, 0, 0, 1) + good, None, "bad_header"),  # RSC_INFO
        (hdr(0, 1, 54, 1448, 0, 0, 1) + good, None, "offload"),  # TSO, GUEST_TSO4 not acked
        (hdr(1, 0, 0, 0, 34, 16, 1) + good, None, "offload"),  # GUEST_CSUM not acked
        (hdr(0, 0, 0, 0, 0, 0, 1) + eth(MAC, PEER, bytes(3000)), None, "oversize"),
        (hdr(0, 0, 0, 0, 0, 0, 1) + b"tiny", None, "runt"),
        (hdr(0, 0, 0, 0, 0, 0, 0) + good, 0, "num_buffers"),
        (hdr(0, 0, 0, 0, 0, 0, 0) + good, 1000, "num_buffers"),
        (b"\x00" * 5, None, "runt"),  # not even a header
    ]
    for raw, nb, _ in bad:
        await dev.inject_raw(raw, num_buffers=nb)
        await dev.inject(good)
        assert await nic.recv() == good  # the driver carries on
    expected: dict[str, int] = {}
    for _, _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(nic.rx_dropped) == expected
    assert nic.rx_packets == len(bad)
    await until(lambda: nic.rxq.outstanding == QSIZE, "no buffer lost")
    assert nic.running


@pytest.mark.asyncio
async def test_receive_queue_is_bounded(rig: NetRig) -> None:
    dev = RingNet()
    await rig.boot(dev)
    nic = rig.nic()
    nic.rx_queue_max = 4
    for i in range(10):
        await dev.inject(eth(MAC, PEER, bytes([i])))
    await until(lambda: nic.rx_packets == 10, "all ten received")
    assert [nic.recv_nowait()[14] for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(WouldBlock):
        nic.recv_nowait()
    assert nic.rx_dropped["queue_full"] == 6
    assert nic.stats()["rx_dropped"] == {"queue_full": 6}
    await until(lambda: nic.rxq.outstanding == QSIZE, "buffers reposted even when dropped")


@pytest.mark.asyncio
async def test_link_status_follows_config_changes(rig: NetRig) -> None:
    dev = RingNet(link_up=False)
    await rig.boot(dev)
    nic = rig.nic()
    assert not nic.link_up
    assert nic.info()["link"] == "down"
    await dev.set_link(True)
    await nic.wait_link(True)
    assert nic.link_up
    waiter = asyncio.create_task(nic.wait_link(False))
    await dev.set_link(False)
    await waiter
    assert not nic.link_up
    assert nic.config_changes == 2


@pytest.mark.asyncio
async def test_without_mrg_rxbuf_one_buffer_per_packet(rig: NetRig) -> None:
    dev = RingNet(features=int(DEVICE_FEATURES) & ~int(NetFeature.MRG_RXBUF), mtu=9000)
    await rig.boot(dev)
    nic = rig.nic()
    assert nic.mtu == 9000
    assert nic.stats()["rx_buffer_size"] >= 12 + 9000 + 18
    jumbo = eth(MAC, PEER, bytes(8000))
    await dev.inject(jumbo, nb=7)  # num_buffers means nothing without MRG_RXBUF
    assert await nic.recv() == jumbo


@pytest.mark.asyncio
async def test_boot_params_matched_by_mac(rig: NetRig) -> None:
    a, b = RingNet(name="net0", mac=MAC), RingNet(name="net1", mac=PEER)
    params = {
        "net": [
            {"mac": format_mac(PEER), "card_ip": "10.9.0.2/24", "mode": "frames", "mtu": 1500},
            {"mac": format_mac(MAC), "card_ip": "10.9.0.1/24", "gateway": "10.9.0.254",
             "netns": "nsx", "mode": "frames", "mtu": 1500, "ifname": "ethx"},
        ]
    }  # fmt: skip
    await rig.boot(a, b, params=params)
    n0, n1 = rig.nic("eth0"), rig.nic("eth1")
    assert n0.mac == MAC
    assert n1.mac == PEER
    i0 = n0.info()
    assert (i0["card_ip"], i0["gateway"], i0["ifname"]) == ("10.9.0.1/24", "10.9.0.254", "ethx")
    assert i0["mode"] == "frames"
    assert i0["netns"] is None
    assert n1.info()["card_ip"] == "10.9.0.2/24"
    assert n1.ifname == "eth1"


@pytest.mark.asyncio
async def test_remove_fails_waiters_and_frees_card_ram(rig: NetRig) -> None:
    dev = RingNet()
    await rig.boot(dev)
    free_before = rig.cp.heap.free_bytes
    nic = rig.nic()
    assert free_before < rig.card_ram - CARD_HEAP - (8 << 20)  # the NIC holds its buffers
    waiting = asyncio.create_task(nic.recv())
    link = asyncio.create_task(nic.wait_link(False))
    await asyncio.sleep(0)
    await rig.vop.remove_device("net0")
    await until(lambda: not nic.running, "detached")
    with pytest.raises(BrokenResourceError):
        await waiting
    with pytest.raises(BrokenResourceError):
        await link
    with pytest.raises(BrokenResourceError):
        await nic.send(eth(PEER, MAC, b"x"))
    assert rig.cp.heap.free_bytes == rig.card_ram - CARD_HEAP  # rings and pools returned
    await nic.wait_closed()


@pytest.mark.asyncio
async def test_readded_nic_gets_its_new_params(rig: NetRig) -> None:
    # The daemon sends a hot-added NIC's parameters (card.py "net-params");
    # a NIC re-attached under the same name keeps its MAC, so the new entry
    # must replace the old one, not queue behind it.
    params: dict[str, Any] = {"net": [{"mac": format_mac(MAC), "card_ip": "10.9.0.1/24",
                                       "mode": "frames", "mtu": 1500}]}  # fmt: skip
    await rig.boot(RingNet(name="net0", mac=MAC), params=params)
    assert rig.nic().info()["card_ip"] == "10.9.0.1/24"
    await rig.vop.remove_device("net0")
    assert rig.bus is not None
    bus = rig.bus
    await until(lambda: not bus.devices(), "removed")
    merge_params(params["net"], [{"mac": format_mac(MAC).upper(), "card_ip": "10.9.7.1/24",
                                  "mode": "frames", "mtu": 1500}, "junk"])  # fmt: skip
    merge_params(params["net"], [{"mac": format_mac(PEER), "card_ip": "10.9.0.2/24"}])
    assert [e["card_ip"] for e in params["net"]] == ["10.9.7.1/24", "10.9.0.2/24"]
    rig.vop.add_device(RingNet(name="net0", mac=MAC))
    await until(lambda: any(d["driver"] for d in bus.devices()), "re-added")
    assert rig.nic().info()["card_ip"] == "10.9.7.1/24"
