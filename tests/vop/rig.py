"""In-process host + card pair for the VOP tests (no processes, no transport).

One :class:`TwoRegionMemory` models the card-physical address space: card RAM
at 0.., host RAM at ``SMPT_BASE``. The host's ``card_view`` and the card's
``mem`` are that same object (in the real system they are two mappings of the
same memfds). Doorbells are callbacks scheduled on the loop, as the transport
will deliver them; each side can be "unplugged" to simulate a dead peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from mic_card.bus import CardRamAllocator, VirtioBus
from mic_card.drivers import DRIVERS
from mic_host.backends import Backend
from mic_host.vop import Vop
from virtio.memory import FlatMemory, MemoryFault

SMPT_BASE = 0x80_0000_0000
CARD_RAM = 4 << 20
CARD_HEAP = 0x10000
HOST_RAM = 512 << 10


class TwoRegionMemory:
    """Card RAM at 0 and host RAM at SMPT_BASE, bounds-checked."""

    def __init__(self, card_size: int = CARD_RAM, host_size: int = HOST_RAM) -> None:
        self.card = FlatMemory(card_size)
        self.host = FlatMemory(host_size, base=SMPT_BASE)

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        if addr >= SMPT_BASE:
            return self.host.view(addr, length, write)
        if addr + length <= self.card.size:
            return self.card.view(addr, length, write)
        raise MemoryFault(addr, length, write, "no window there")


class HostPlat:
    def __init__(self, mem: TwoRegionMemory) -> None:
        self.mem = mem
        self.host_ram = mem.host.raw()
        self.host_ram_bus = SMPT_BASE
        self.card_view = mem
        self.target: Any = None  # the card bus
        self.rings: list[int] = []
        self.connected = True

    def ring_card(self, db: int) -> None:
        self.rings.append(db)
        if self.connected and self.target is not None:
            asyncio.get_running_loop().call_soon(self.target.on_doorbell, db)


class CardPlat:
    def __init__(self, mem: TwoRegionMemory) -> None:
        self.mem = mem
        self.dp_address = SMPT_BASE
        self.heap = CardRamAllocator(CARD_HEAP, CARD_RAM)
        self.target: Any = None  # the host Vop
        self.rings: list[int] = []
        self.connected = True

    def card_ram_alloc(self, size: int, align: int) -> int:
        return self.heap.alloc(size, align)

    def card_ram_free(self, addr: int) -> None:
        self.heap.free(addr)

    def ring_host(self, db: int) -> None:
        self.rings.append(db)
        if self.connected and self.target is not None:
            asyncio.get_running_loop().call_soon(self.target.on_doorbell, db)


class Rig:
    """A host Vop and (after :meth:`boot`) a card VirtioBus over one memory."""

    def __init__(self, **vop_kw: Any) -> None:
        self.mem = TwoRegionMemory()
        self.hp = HostPlat(self.mem)
        self.cp = CardPlat(self.mem)
        self.vop = Vop(self.hp, **vop_kw)
        self.cp.target = self.vop
        self.bus: VirtioBus | None = None

    def add(self, *backends: Backend, packed: bool = False) -> None:
        """Add devices (``packed``: offering VIRTIO_F_RING_PACKED)."""
        for b in backends:
            self.vop.add_device(b, packed=packed)

    async def boot(self, **bus_kw: Any) -> VirtioBus:
        bus_kw.setdefault("timeout", 2.0)
        bus_kw.setdefault("drivers", DRIVERS)
        self.cp.heap = CardRamAllocator(CARD_HEAP, CARD_RAM)
        self.cp.connected = True
        self.hp.connected = True
        bus = VirtioBus(self.cp, **bus_kw)
        self.hp.target = bus
        self.bus = bus
        await bus.start()
        return bus

    async def settle(self, rounds: int = 20) -> None:
        """Let doorbell callbacks and the tasks they wake run."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        if self.bus is not None:
            await self.bus.aclose()
        await self.vop.aclose()


def names(bus: VirtioBus) -> Sequence[str]:
    """The devices with a driver bound (a failed or unbound device is listed by
    ``bus.devices()`` too, with its state and error)."""
    return [d["name"] for d in bus.devices() if d["driver"] is not None]
