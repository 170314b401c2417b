"""The card's virtio-net driver in tap mode: a real TAP in a real namespace.

Needs root (TAP devices, namespaces); skipped with the reason otherwise. Each
test uses a uniquely named namespace that it creates and deletes itself, as the
daemon (its one owner) does around a card; the card only opens its TAP there
and must leave the namespace in place.
The host side is the in-process device of ``test_card_driver`` (:class:`RingNet`).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from mic_card.drivers.net import NetDevice
from tests.net.test_card_driver import MAC, PEER, NetRig, RingNet, tcp_frame, until
from transport.tap import ip_sync, netns_exists, tap_privilege_problem
from virtio.constants import NetFeature, NetHdrFlag, NetHdrGso
from virtio.net import format_mac

PROBLEM = tap_privilege_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"TAP/netns unavailable: {PROBLEM}")

CARD_IP = "10.77.0.1"
PEER_IP = "10.77.0.2"


@pytest.fixture
def ns() -> Iterator[str]:
    """A namespace created before the card sees the NIC, deleted after (the daemon's job)."""
    name = f"mvtest-{uuid.uuid4().hex[:8]}"
    ip_sync("netns", "add", name)
    try:
        yield name
        assert netns_exists(name), "the card deleted the daemon's namespace"
    finally:
        if netns_exists(name):
            ip_sync("netns", "del", name)


def has_tap(ns: str) -> bool:
    return "eth0" in ip_sync("-o", "link", "show", netns=ns)


@pytest_asyncio.fixture
async def rig(ns: str) -> AsyncIterator[NetRig]:  # closed before ``ns`` checks
    r = NetRig()
    try:
        yield r
    finally:
        await r.aclose()


def params(ns: str, mode: str = "auto", **extra: object) -> dict[str, object]:
    entry = {"mac": format_mac(MAC), "card_ip": f"{CARD_IP}/24", "gateway": "10.77.0.254",
             "netns": ns, "mode": mode, "mtu": 1500, "ifname": "eth0"} | extra  # fmt: skip
    return {"net": [entry]}


async def tap_nic(rig: NetRig, dev: RingNet, ns: str, **extra: object) -> NetDevice:
    await rig.boot(dev, params=params(ns, **extra))  # type: ignore[arg-type]
    nic = rig.nic()
    await until(lambda: nic.mode != "pending", "TAP set up")
    assert nic.mode == "tap", nic.error
    return nic


def arp_request(target_ip: str) -> bytes:
    """Who has ``target_ip``? tell PEER_IP (from PEER)."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, PEER,
                       bytes(map(int, PEER_IP.split("."))), bytes(6),
                       bytes(map(int, target_ip.split("."))))  # fmt: skip
    return b"\xff" * 6 + PEER + b"\x08\x06" + body


def is_arp_reply_from_card(raw: bytes) -> bool:
    frame = raw[12:]
    return frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02" and frame[6:12] == MAC


@pytest.mark.asyncio
async def test_tap_in_a_namespace_bridges_the_kernel_to_the_rings(rig: NetRig, ns: str) -> None:
    dev = RingNet()
    nic = await tap_nic(rig, dev, ns)
    # the kernel interface: in the namespace, our MAC, address, MTU, default route
    link = ip_sync("-o", "link", "show", "eth0", netns=ns)
    assert format_mac(MAC) in link
    assert "mtu 1500" in link
    assert f"{CARD_IP}/24" in ip_sync("-o", "addr", "show", "eth0", netns=ns)
    assert "default via 10.77.0.254" in ip_sync("route", netns=ns)
    f = rig.bus.device("eth0").features if rig.bus else 0
    assert f & NetFeature.GUEST_TSO4
    assert f & NetFeature.GUEST_CSUM
    info = nic.info()
    assert (info["mode"], info["netns"], info["ifname"]) == ("tap", ns, "eth0")
    assert set(info["offloads"]["tx"]) >= {"csum", "tso4", "tso6"}

    # host -> card: an ARP request written into the TAP; the card's kernel
    # answers, and the answer comes back on the transmitq with its header
    await dev.inject(arp_request(CARD_IP))
    await until(lambda: any(is_arp_reply_from_card(s) for s in dev.sent), "ARP reply")
    assert nic.rx_packets >= 1
    assert nic.tx_packets >= 1

    # card -> host: a program in the namespace sends; the frame reaches the ring
    dev.sent.clear()
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", PEER_IP,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await until(
        lambda: any(s[12 + 12 : 12 + 14] == b"\x08\x06" and s[12 + 6 : 12 + 12] == MAC
                    for s in dev.sent),
        "the card's ARP request for the peer",
    )  # fmt: skip
    await proc.wait()


@pytest.mark.asyncio
async def test_a_64k_gso_segment_goes_into_the_tap_whole(rig: NetRig, ns: str) -> None:
    dev = RingNet()
    nic = await tap_nic(rig, dev, ns)
    # The kernel has no such connection, so it answers the segment (PSH, no
    # ACK) with a RST whose ack number covers the whole 65 KB payload (RFC 793):
    # proof it took the segment as one packet.
    payload = 65535 - 40
    frame, start, off = tcp_frame(payload, seq=1000, flags=0x08)
    frame = MAC + PEER + frame[12:]  # to the card, from the peer
    # addressed to the card: swap the IPs of tcp_frame (10.0.0.x) for ours
    ip = bytearray(frame[14:34])
    ip[12:16] = bytes(map(int, PEER_IP.split(".")))
    ip[16:20] = bytes(map(int, CARD_IP.split(".")))
    ip[10:12] = b"\0\0"
    s = sum(struct.unpack("!10H", bytes(ip)))
    s = (s & 0xFFFF) + (s >> 16)
    ip[10:12] = struct.pack("!H", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF)
    tcp = bytearray(frame[34:])
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    ps = sum(struct.unpack("!6H", bytes(pseudo)))
    while ps > 0xFFFF:
        ps = (ps & 0xFFFF) + (ps >> 16)
    tcp[16:18] = struct.pack("!H", ps)
    frame = frame[:14] + bytes(ip) + bytes(tcp)
    await dev.inject(
        frame,
        flags=int(NetHdrFlag.NEEDS_CSUM),
        gso_type=int(NetHdrGso.TCPV4),
        hdr_len=54,
        gso_size=1448,
        csum_start=start,
        csum_offset=off,
    )

    def rst() -> bytes | None:
        for raw in dev.sent:
            f = raw[12:]
            if f[12:14] == b"\x08\x00" and f[23] == 6 and f[47] & 0x04:
                return f
        return None

    # the card's kernel needs the peer's MAC to answer: tell it
    await dev.inject(arp_request(CARD_IP))
    await until(lambda: rst() is not None, "the kernel's RST")
    r = rst()
    assert r is not None
    ack = struct.unpack("!I", r[42:46])[0]
    assert ack == 1000 + payload
    assert nic.rx_gso == 1
    assert nic.rx_largest == len(frame)
    assert not nic.rx_dropped


@pytest.mark.asyncio
async def test_carrier_follows_the_link_status(rig: NetRig, ns: str) -> None:
    dev = RingNet()
    nic = await tap_nic(rig, dev, ns)
    assert "NO-CARRIER" not in ip_sync("-o", "link", "show", "eth0", netns=ns)
    await dev.set_link(False)
    await nic.wait_link(False)
    assert "NO-CARRIER" in ip_sync("-o", "link", "show", "eth0", netns=ns)
    await dev.set_link(True)
    await nic.wait_link(True)
    assert "NO-CARRIER" not in ip_sync("-o", "link", "show", "eth0", netns=ns)


@pytest.mark.asyncio
async def test_removal_closes_the_tap_and_leaves_the_namespace(rig: NetRig, ns: str) -> None:
    dev = RingNet()
    nic = await tap_nic(rig, dev, ns)
    assert has_tap(ns)
    await rig.vop.remove_device("net0")
    await until(lambda: not nic.running, "detached")
    await nic.wait_closed()
    assert not has_tap(ns)
    assert netns_exists(ns)  # the daemon's: it deletes it when its backend closes


@pytest.mark.asyncio
async def test_card_shutdown_closes_the_tap_and_leaves_the_namespace(rig: NetRig, ns: str) -> None:
    dev = RingNet()
    nic = await tap_nic(rig, dev, ns)
    assert rig.bus is not None
    await rig.bus.aclose()  # what the card OS does on shutdown
    await nic.wait_closed()
    assert not has_tap(ns)
    assert netns_exists(ns)


@pytest.mark.asyncio
async def test_missing_namespace_is_a_clear_error_and_frames_mode_used(
    rig: NetRig, caplog: pytest.LogCaptureFixture
) -> None:
    missing = f"mvtest-{uuid.uuid4().hex[:8]}"
    dev = RingNet()
    with caplog.at_level(logging.ERROR):
        await rig.boot(dev, params=params(missing, mode="tap"))
        nic = rig.nic()
        await until(lambda: nic.mode != "pending", "setup gave up")
    assert nic.mode == "frames"
    want = f"namespace {missing} does not exist: the daemon creates it"
    assert want in nic.error
    assert any(want in r.getMessage() for r in caplog.records)
    assert not netns_exists(missing)  # the card never creates one
    # frames still flow (offloads were acked for tap: checksums completed here)
    assert nic.features & NetFeature.GUEST_CSUM
    await dev.inject(arp_request(CARD_IP))
    assert await asyncio.wait_for(nic.recv(), 5) == arp_request(CARD_IP)


@pytest.mark.asyncio
async def test_setup_cancelled_by_an_early_removal_leaves_nothing(rig: NetRig, ns: str) -> None:
    dev = RingNet()
    await rig.boot(dev, params=params(ns))
    nic = rig.nic()
    assert nic.mode == "pending"
    await rig.vop.remove_device("net0")
    await until(lambda: not nic.running, "detached")
    await nic.wait_closed()
    assert not has_tap(ns)
    assert netns_exists(ns)
