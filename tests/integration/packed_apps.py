"""Card apps of the packed-ring tests (run inside real ``mic-card`` processes).

``ring_of`` reports which ring the card's core runs for a device;
``corrupt_packed`` plays a hostile card on a packed ring: it makes the next
descriptor slot available with a buffer id no ring can have, and kicks.
"""

from __future__ import annotations

from typing import Any

from mic_card.card import Card
from virtio import packed

#: packed descriptor flags (virtio 1.2 §2.8.1)
_AVAIL, _USED = 1 << 7, 1 << 15


async def ring_of(card: Card, dev: str) -> dict[str, Any]:
    """The card's view of ``dev``: its ring and whether its used rings moved."""
    info = card.bus.device(dev).info()
    return {"ring": info["ring"], "used_in_card": info["used_in_card"]}


async def corrupt_packed(card: Card, dev: str) -> dict[str, int]:
    """Make the next free slot of ``dev``'s queue 0 an available descriptor with
    buffer id 0xffff (ids are below the ring size, virtio 1.2 §2.8.6) and kick."""
    cdev = card.bus.device(dev)
    q = cdev.endpoints[0].queue
    if not isinstance(q, packed.DriverQueue):
        raise TypeError(f"{dev} does not run a packed ring")
    slot, wrap = q._next_avail, q._avail_wrap
    desc = card.memory.view(q.layout.desc + 16 * slot, 16, True)
    desc[:14] = (0x1000).to_bytes(8, "little") + (512).to_bytes(4, "little") + b"\xff\xff"
    desc[14:16] = (_AVAIL if wrap else _USED).to_bytes(2, "little")  # flags last
    cdev._notify_host()
    return {"slot": slot, "size": q.size}
