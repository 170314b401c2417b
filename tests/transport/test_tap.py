"""TAP devices and namespaces (transport/tap.py) against the real kernel.

Needs root, /dev/net/tun and iproute2; skips with the reason otherwise. Every
namespace made here has a unique name and is deleted afterwards.
"""

from __future__ import annotations

import os
import select
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from transport.tap import (
    Tap,
    TapError,
    TapPermissionError,
    create_netns,
    delete_netns_sync,
    ip_sync,
    netns_exists,
    run_in_netns,
    tap_privilege_problem,
)
from virtio.net import NET_HDR, NET_HDR_SIZE

PROBLEM = tap_privilege_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"TAP tests: {PROBLEM}")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mvt-{uuid.uuid4().hex[:8]}"
    ip_sync("netns", "add", name)
    try:
        yield name
    finally:
        ip_sync("netns", "del", name)


def _read_frame(tap: Tap, timeout: float = 5.0) -> bytes:
    r, _, _ = select.select([tap.fd], [], [], timeout)
    assert r, "no frame from the TAP"
    return os.read(tap.fd, 70000)


@pytest.mark.asyncio
async def test_tap_in_a_namespace_answers_arp_through_the_vnet_header(netns: str) -> None:
    tap = Tap.open("mvt0", netns=netns)
    try:
        await tap.configure("10.77.0.1/24", mtu=1500)
        assert "10.77.0.1/24" in ip_sync("-br", "addr", "show", "mvt0", netns=netns)
        assert "mvt0" not in ip_sync("-br", "link")  # not in our namespace
        ours = bytes.fromhex("020000000042")
        mac = bytes.fromhex(
            ip_sync("-br", "link", "show", "mvt0", netns=netns).split()[2].replace(":", "")
        )
        arp = struct.pack(
            "!6s6sHHHBBH6s4s6s4s",
            b"\xff" * 6,
            ours,
            0x0806,
            1,
            0x0800,
            6,
            4,
            1,
            ours,
            bytes([10, 77, 0, 2]),
            b"\0" * 6,
            bytes([10, 77, 0, 1]),
        )
        os.write(tap.fd, NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + arp)
        while True:  # skip IPv6 chatter; the ARP reply comes to us
            pkt = _read_frame(tap)
            hdr, frame = NET_HDR.unpack(pkt[:NET_HDR_SIZE]), pkt[NET_HDR_SIZE:]
            if frame[12:14] == b"\x08\x06":
                break
        assert hdr[1] == 0  # no GSO on an ARP reply
        assert frame[:6] == ours
        assert frame[6:12] == mac
        assert struct.unpack("!H", frame[20:22])[0] == 2  # ARP reply
    finally:
        tap.close()
    assert "mvt0" not in ip_sync("-br", "link", netns=netns)  # closing deleted it


@pytest.mark.asyncio
async def test_offloads_and_carrier(netns: str) -> None:
    tap = Tap.open("mvt1", netns=netns)
    try:
        tap.set_offloads(csum=True, tso4=True, tso6=True, ecn=True)
        assert tap.offloads == 0x0F
        tap.set_offloads(tso4=True)  # TSO without csum is not offered to the kernel
        assert tap.offloads == 0
        await tap.configure(None)
        tap.set_carrier(False)
        assert "NO-CARRIER" in ip_sync("link", "show", "mvt1", netns=netns)
        tap.set_carrier(True)
        assert "NO-CARRIER" not in ip_sync("link", "show", "mvt1", netns=netns)
    finally:
        tap.close()


def test_sync_configure_plain_frames_and_sync_delete() -> None:
    ns = f"mvt-{uuid.uuid4().hex[:8]}"
    ip_sync("netns", "add", ns)
    try:
        tap = Tap.open("mvt4", netns=ns, vnet_hdr=False)
        try:
            tap.configure_sync("10.77.1.1/24", mtu=1400)
            link = ip_sync("link", "show", "mvt4", netns=ns)
            assert "mtu 1400" in link
            assert ",UP" in link
            assert "10.77.1.1/24" in ip_sync("addr", "show", "mvt4", netns=ns)
            # No vnet header: a frame written is a bare Ethernet frame (an ARP
            # request for the TAP's own address gets its reply, also bare).
            me = bytes.fromhex("02aabbccdd04")
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, me, bytes([10, 77, 1, 2]),
                              bytes(6), bytes([10, 77, 1, 1]))  # fmt: skip
            os.write(tap.fd, b"\xff" * 6 + me + b"\x08\x06" + arp)
            for _ in range(20):
                frame = _read_frame(tap)
                if frame[12:14] == b"\x08\x06":
                    break
            assert frame[:6] == me
        finally:
            tap.close()
    finally:
        delete_netns_sync(ns)
    assert not netns_exists(ns)
    delete_netns_sync(ns)  # gone already: nothing


@pytest.mark.asyncio
async def test_namespace_errors_are_clear(netns: str) -> None:
    with pytest.raises(TapError, match="already exists"):
        await create_netns(netns)
    with pytest.raises(TapError, match="ip netns add"):
        Tap.open("mvt2", netns=f"{netns}-missing")
    assert netns_exists(netns)
    assert not netns_exists(f"{netns}-missing")
    inode = run_in_netns(netns, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert inode != os.stat("/proc/self/ns/net").st_ino  # the thread really entered it
    with pytest.raises(TapError, match="bad interface name"):
        Tap.open("a-name-far-too-long-for-linux")
    a = Tap.open("mvt3", netns=netns)
    try:
        with pytest.raises(TapError):
            ip_sync("link", "add", "mvt3", "type", "dummy", netns=netns)  # name taken
    finally:
        a.close()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_unprivileged_open_names_the_switch_backend() -> None:
    # A root process without CAP_NET_ADMIN (dropped from the bounding set
    # before exec): what an unprivileged daemon meets.
    code = (
        "from transport.tap import Tap, TapPermissionError\n"
        "try:\n"
        "    Tap.open('mvt-noperm')\n"
        "except TapPermissionError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set", "-net_admin", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "switch" in out.stdout
    assert "CAP_NET_ADMIN" in out.stdout
    assert issubclass(TapPermissionError, TapError)
