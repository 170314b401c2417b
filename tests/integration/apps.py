"""Card apps the integration tests run on real card OS processes (``module:function``).

Each is ``async def fn(card, *args)`` and runs inside ``mic-card`` (the daemon
puts its working directory on the card's ``PYTHONPATH``, and pytest runs
from the repository root, so ``tests.integration.apps:fn`` resolves there).
Results must be JSON-ready. The ``corrupt_*`` apps play a buggy or hostile
card: they scribble on the rings and the device page the host reads.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from mic_card.card import Card
from virtio.layouts import (
    MicDeviceCtrl,
    MicDeviceDesc,
    MicVqconfig,
    field_offset,
    mic_device_ctrl,
    mic_guest_acks,
    mic_vq_config,
)

SECTOR = 512


def _sectors(text: str) -> bytes:
    data = text.encode()
    return data + bytes(-len(data) % SECTOR or (0 if data else SECTOR))


async def echo(card: Card, *args: Any) -> dict[str, Any]:
    """The arguments back, and who ran them."""
    return {"card": card.name, "args": list(args)}


async def devices(card: Card) -> list[str]:
    """The names of the devices bound on the card bus (``hvc0``, ``vda``...)."""
    return [d["name"] for d in card.devices() if d["driver"] is not None]


async def write_text(card: Card, dev: str, sector: int, text: str) -> int:
    """Write ``text`` (zero-padded to whole sectors) at ``sector`` of ``dev``, then flush."""
    blk = card.device(dev)
    data = _sectors(text)
    await blk.write(sector, data)
    await blk.flush()
    return len(data)


async def read_text(card: Card, dev: str, sector: int, length: int) -> str:
    """``length`` bytes at ``sector`` of ``dev``, decoded, trailing NULs stripped."""
    blk = card.device(dev)
    count = -(-length // SECTOR)
    data = await blk.read(sector, count)
    return data[:length].rstrip(b"\0").decode("utf-8", "replace")


async def capacity(card: Card, dev: str) -> int:
    """Capacity of block device ``dev`` in 512-byte sectors."""
    return int(card.device(dev).capacity)


async def console_write(card: Card, text: str) -> int:
    """Write ``text`` to ``hvc0`` (the host appends it to the card's console log)."""
    data = text.encode()
    await card.device("hvc0").write(data)
    return len(data)


async def fail(card: Card, message: str) -> None:
    """An app that fails (the host reports its error type and message)."""
    raise ValueError(message)


async def suicide(card: Card) -> None:
    """Kill the card OS process from inside (a card that dies mid-request)."""
    os.kill(os.getpid(), signal.SIGKILL)


# -- a hostile card ----------------------------------------------------------------


async def corrupt_avail(card: Card, dev: str, jump: int) -> dict[str, Any]:
    """Move ``avail.idx`` of ``dev``'s queue 0 forward by ``jump`` entries and kick.

    A jump larger than the queue size is illegal (virtio 1.2 §2.7.6): the host
    must mark only this device DEVICE_NEEDS_RESET.
    """
    cdev = card.bus.device(dev)
    layout = cdev.endpoints[0].queue.layout
    idx = card.memory.view(layout.avail + 2, 2, True)
    old = int.from_bytes(idx, "little")
    idx[:] = ((old + jump) & 0xFFFF).to_bytes(2, "little")
    cdev._notify_host()
    return {"old": old, "new": (old + jump) & 0xFFFF, "size": layout.size}


def _entry(card: Card, dev: str) -> tuple[memoryview, int, int]:
    """The device-page entry of ``dev`` (writable view), and its ctrl and acks offsets."""
    cdev = card.bus.device(dev)
    ctrl = mic_device_ctrl(cdev.num_vq, cdev.feature_len, cdev.config_len)
    acks = mic_guest_acks(cdev.num_vq, cdev.feature_len)
    return cdev._mv, ctrl, acks


async def corrupt_status(card: Card, dev: str, value: int) -> int:
    """Write ``value`` as ``dev``'s status byte (clearing ``host_ack``) and ring the host."""
    cdev = card.bus.device(dev)
    mv, ctrl, _ = _entry(card, dev)
    mv[ctrl + field_offset(MicDeviceCtrl, "host_ack")] = 0
    mv[field_offset(MicDeviceDesc, "status")] = value & 0xFF
    cdev._notify_host()
    return value


async def corrupt_used_address(card: Card, dev: str) -> int:
    """After DRIVER_OK, point ``dev``'s used ring at the device page (host RAM) and ring."""
    cdev = card.bus.device(dev)
    mv, ctrl, _ = _entry(card, dev)
    used = mic_vq_config(0) + field_offset(MicVqconfig, "used_address")
    mv[used : used + 8] = card.bus.platform.dp_address.to_bytes(8, "little")
    mv[ctrl + field_offset(MicDeviceCtrl, "used_address_updated")] = 1
    cdev._notify_host()
    return card.bus.platform.dp_address


async def corrupt_entry(card: Card, dev: str, seed: int) -> int:
    """Overwrite every card-writable byte of ``dev``'s entry (status, acks, ctrl) with
    pseudo-random garbage, and the doorbell choices with out-of-range values; ring.
    """
    import random

    rng = random.Random(seed)
    cdev = card.bus.device(dev)
    mv, ctrl, acks = _entry(card, dev)
    mv[field_offset(MicDeviceDesc, "status")] = rng.randrange(256)
    mv[acks : acks + cdev.feature_len] = rng.randbytes(cdev.feature_len)
    mv[ctrl : ctrl + MicDeviceCtrl.sizeof()] = rng.randbytes(MicDeviceCtrl.sizeof())
    mv[ctrl + field_offset(MicDeviceCtrl, "h2c_vdev_db")] = 0x7F
    for db in range(4):
        card.bus.platform.ring_host(db)
    return seed


async def corrupt_page(card: Card, seed: int) -> int:
    """Scribble pseudo-random bytes over the whole device page (headers included);
    ring every card->host doorbell.
    """
    import random

    rng = random.Random(seed)
    page = card.memory.view(card.bus.platform.dp_address, 4096, True)
    page[:] = rng.randbytes(4096)
    for db in range(4):
        card.bus.platform.ring_host(db)
    return seed


async def reset_device(card: Card, dev: str) -> str:
    """Reset ``dev`` (vdev reset handshake) and probe it again: what a driver does
    after DEVICE_NEEDS_RESET. Returns the device's state after the re-probe.
    """
    new = await card.bus.reset_device(dev)
    return "failed" if new is None else new.state


async def sleep(card: Card, seconds: float) -> float:
    """Sleep (a long-running app the card must stop when it shuts down)."""
    await asyncio.sleep(seconds)
    return seconds


# -- a card that breaks the control link ----------------------------------------------


async def link_send(card: Card, *messages: Any) -> int:
    """Send each of ``messages`` (JSON objects) to the host on the control link as is."""
    link = card._os.pcie.link
    for msg in messages:
        await link.send(msg)
    return len(messages)


async def link_garbage(card: Card, data: str) -> int:
    """Write raw bytes (not a frame) on the control link socket: the framing breaks."""
    sock = card._os.pcie.link._fs.sock
    raw = bytes.fromhex(data)
    sock.send(raw)
    return len(raw)


async def power(card: Card, status: str) -> str:
    """The card OS shuts itself down (``halted``, ``poweroff`` or ``restart``) right
    after this app has answered.
    """
    os_ = card._os

    def stop() -> None:
        os_.shutdown_status = status
        os_._stop.set()

    asyncio.get_running_loop().call_later(0.2, stop)
    return status
