"""Card apps of the virtio-net end-to-end tests (run inside real ``mic-card`` processes).

Each is ``async def fn(card, *args)``; results are JSON-ready. They use the
frames API of the card's net driver (``card.device("eth0")``) or, to play a
hostile card, the device's transmit queue directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mic_card.card import Card
from virtio.net import NET_HDR, format_mac

ETH_TEST = 0x88B5  # IEEE 802 local experimental EtherType


def _frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + ETH_TEST.to_bytes(2, "big") + payload


async def net_info(card: Card, dev: str = "eth0") -> dict[str, Any]:
    """The driver's ``info()``."""
    info: dict[str, Any] = card.device(dev).info()
    return info


async def send_frames(card: Card, dst: str, count: int, tag: str, dev: str = "eth0") -> int:
    """Send ``count`` test frames to MAC ``dst`` (``ff:ff:ff:ff:ff:ff`` floods)."""
    nic = card.device(dev)
    await nic.wait_link(True)
    to = bytes.fromhex(dst.replace(":", ""))
    for i in range(count):
        await nic.send(_frame(to, nic.mac, f"{tag} {i}".encode()))
    return count


async def recv_frames(card: Card, count: int, timeout: float, dev: str = "eth0") -> list[str]:
    """Payloads of up to ``count`` test frames received within ``timeout`` seconds."""
    nic = card.device(dev)
    got: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while len(got) < count:
                frame = await nic.recv()
                if frame[12:14] == ETH_TEST.to_bytes(2, "big"):
                    got.append(frame[14:].decode(errors="replace").rstrip("\0"))
    except TimeoutError:
        pass
    return got


async def drain(card: Card, quiet: float = 0.5, dev: str = "eth0") -> int:
    """Throw away frames until none arrives for ``quiet`` seconds; how many there were."""
    nic = card.device(dev)
    n = 0
    while True:
        try:
            async with asyncio.timeout(quiet):
                await nic.recv()
        except TimeoutError:
            return n
        n += 1


async def mac_of(card: Card, dev: str = "eth0") -> str:
    return format_mac(card.device(dev).mac)


async def send_bad_tx(card: Card, dev: str = "eth0") -> list[int]:
    """Play a hostile card: put malformed frames on the transmitq, bypassing the driver.

    Returns the used lengths the host answered with (it must answer every chain).
    """
    nic = card.device(dev)
    cdev = card.bus.device(dev)
    tx = cdev.endpoints[1]
    bad = [
        NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + b"short",  # runt
        NET_HDR.pack(0x80, 0, 0, 0, 0, 0, 0) + bytes(60),  # unknown flag
        NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + bytes(9000),  # over MTU without GSO
        NET_HDR.pack(0, 3, 0, 1400, 0, 0, 0) + bytes(3000),  # UFO: not supported
        NET_HDR.pack(1, 0, 0, 0, 50, 40, 0) + bytes(60),  # checksum outside the frame
        NET_HDR.pack(0, 1, 54, 0, 0, 0, 0) + bytes(3000),  # TSO with gso_size 0
        b"\x00" * 5,  # not even a header
    ]
    used = []
    for raw in bad:
        addr = cdev.alloc(len(raw), 64)
        try:
            cdev.mem.view(addr, len(raw), True)[:] = raw
            used.append(await asyncio.wait_for(tx.submit([(addr, len(raw))], []), 10))
        finally:
            cdev.free(addr)
    del nic
    return used
