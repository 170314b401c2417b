"""Card apps of the vhost-user front-end tests (``tests.vhost_user.frontend_apps:fn``).

They run inside ``mic-card`` against the card's own virtio-blk driver, whose
rings an external back-end (qemu-storage-daemon) serves.
"""

from __future__ import annotations

import hashlib
from typing import Any

from mic_card.drivers.block import BlockDevice
from mic_card.services import CardServices
from virtio.errors import MicError


def _blk(card: CardServices, dev: str) -> BlockDevice:
    d = card.device(dev)
    assert isinstance(d, BlockDevice), f"{dev} is {type(d).__name__}"
    return d


async def info(card: CardServices, dev: str) -> dict[str, Any]:
    return _blk(card, dev).info()


async def read_hash(card: CardServices, dev: str) -> str:
    """sha256 of the whole disk, read in 1 MiB requests."""
    blk = _blk(card, dev)
    h = hashlib.sha256()
    step = 2048
    total = blk.capacity
    sector = 0
    while sector < total:
        n = min(step, total - sector)
        h.update(await blk.read(sector, n))
        sector += n
    return h.hexdigest()


async def try_read(card: CardServices, dev: str) -> str:
    """One read of sector 0: "ok", or the error class and message the card got."""
    try:
        await _blk(card, dev).read(0, 1)
    except (MicError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


async def rebind_and_hash(card: CardServices, dev: str) -> str:
    """Unbind ``dev`` (the vdev reset handshake), bind it again, then hash it:
    what a card does with a device the host set NEEDS_RESET."""
    await card.unbind(dev)
    await card.bind(dev, "virtio-blk")
    return await read_hash(card, dev)


async def zero(card: CardServices, dev: str) -> int:
    """WRITE_ZEROES over the whole disk, then FLUSH; returns the sectors zeroed."""
    blk = _blk(card, dev)
    await blk.write_zeroes(0, blk.capacity)
    await blk.flush()
    return blk.capacity


async def bad_buffer(card: CardServices, dev: str) -> str:
    """Claim ``dev`` and post a read whose buffer lies outside every memory region
    (a broken or hostile card driver); what the card sees once the host reacts."""
    import asyncio

    from virtio.blk import REQ_HEADER, REQ_HEADER_SIZE
    from virtio.constants import BlkReqType, Feature

    async with card.claim(dev) as raw:
        await raw.negotiate(Feature.VERSION_1)
        (q,) = await raw.setup_queues()
        await raw.driver_ok()
        hdr, status = raw.alloc(REQ_HEADER_SIZE), raw.alloc(1)
        raw.memory.view(hdr, REQ_HEADER_SIZE, True)[:] = REQ_HEADER.pack(BlkReqType.IN, 0)
        q.ring.add([(hdr, REQ_HEADER_SIZE)], [(0x4000_0000_0000, 4096), (status, 1)], "bad")
        q.publish()
        try:
            await asyncio.wait_for(q.get_used(), 60)
        except MicError as e:
            return f"{type(e).__name__}: {e}"
        return f"completed, status {raw.memory.view(status, 1)[0]}"
