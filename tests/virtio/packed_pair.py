"""In-memory pair helpers for the packed ring (the twin of :mod:`tests.virtio.pair`).

:class:`PackedPair` puts a :class:`~virtio.packed.DriverQueue` and a
:class:`~virtio.packed.DeviceQueue` over one :class:`~virtio.memory.FlatMemory`
(the pool and the request pump are the split pair's
:class:`~tests.virtio.pair.QueuePair`); :class:`HostilePackedDriver` writes raw
descriptors (with whatever AVAIL/USED bits it likes) and the driver event word
for a :class:`~virtio.packed.DeviceQueue` to judge. No processes, no asyncio.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from tests.virtio.pair import RING_BASE, QueuePair
from virtio.constants import PackedDescFlag
from virtio.memory import FlatMemory
from virtio.packed import DESC, DESC_SIZE, Chain, DeviceQueue, DriverQueue, PackedLayout

AVAIL = int(PackedDescFlag.AVAIL)
USED = int(PackedDescFlag.USED)
_U32 = struct.Struct("<I")


def avail_bits(wrap: int) -> int:
    """The AVAIL/USED bits a driver sets to make a descriptor available in lap ``wrap``."""
    return AVAIL if wrap else USED


class PackedPair(QueuePair):
    """A packed driver ring and a device ring over one flat memory (the ring at
    ``RING_BASE``: descriptors, driver area, device area)."""

    DRIVER = DriverQueue
    DEVICE = DeviceQueue
    DESC_SIZE = DESC_SIZE
    driver: DriverQueue[int]
    device: DeviceQueue

    @classmethod
    def ring_layout(cls, size: int) -> tuple[PackedLayout, int]:
        return PackedLayout.contiguous(RING_BASE, size), PackedLayout.contiguous_bytes(size)

    @property
    def driver_event(self) -> int:
        return int(_U32.unpack_from(self.raw(), self.layout.driver)[0])

    @property
    def device_event(self) -> int:
        return int(_U32.unpack_from(self.raw(), self.layout.device)[0])

    def set_driver_event(self, word: int) -> None:
        _U32.pack_into(self.raw(), self.layout.driver, word)

    def set_device_event(self, word: int) -> None:
        _U32.pack_into(self.raw(), self.layout.device, word)

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.raw(), self.layout.desc + slot * DESC_SIZE)

    def write_desc(self, slot: int, addr: int, length: int, bid: int, flags: int) -> None:
        DESC.pack_into(self.raw(), self.layout.desc + slot * DESC_SIZE, addr, length, bid, flags)

    def request(
        self, readable: Sequence[bytes] = (b"ping",), writable: Sequence[int] = (16,)
    ) -> tuple[bool, bool, Chain, bytes]:
        """One request through both sides: (kick, interrupt, chain, response)."""
        rt = self.round_trip(readable, writable)
        return rt.kick, rt.interrupt, rt.chain, rt.response


class HostilePackedDriver:
    """Writes a packed ring byte by byte for a :class:`DeviceQueue` to judge.

    Keeps its own avail position and wrap counter so well-formed lists are
    easy (:meth:`offer`) and any bit can still be wrong (:meth:`desc`).
    """

    DESC_AT = 0x1000
    TABLE = 0x3000
    DATA = 0x4000

    def __init__(
        self,
        size: int = 8,
        *,
        features: int = 0,
        mem_size: int = 0x10000,
        activate: bool = True,
        **kwargs: bool,
    ) -> None:
        self.size = size
        self.flat = FlatMemory(mem_size)
        self.layout = PackedLayout.contiguous(self.DESC_AT, size)
        self.q = DeviceQueue(self.flat, self.layout, features, **kwargs)
        if activate:
            self.q.activate()
        self.pos = 0
        self.wrap = 1

    def raw(self) -> memoryview:
        return self.flat.raw()

    def desc(self, slot: int, addr: int, length: int, bid: int, flags: int) -> None:
        DESC.pack_into(self.raw(), self.layout.desc + slot * DESC_SIZE, addr, length, bid, flags)

    def table(self, at: int, entries: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
        """Write an indirect table of ``(addr, len, flags)`` at ``at``; returns ``(at, bytes)``."""
        for i, (addr, length, flags) in enumerate(entries):
            DESC.pack_into(self.raw(), at + i * DESC_SIZE, addr, length, 0, flags)
        return at, len(entries) * DESC_SIZE

    def offer(self, bid: int, bufs: Sequence[tuple[int, int, int]]) -> int:
        """Write one list of ``(addr, len, flags)`` at the driver's position, NEXT
        and AVAIL/USED filled in, ``bid`` in every descriptor; the head last.
        Returns the head's slot."""
        head = self.pos
        slots = []
        for k, (addr, length, flags) in enumerate(bufs):
            more = _NEXT if k < len(bufs) - 1 else 0
            slots.append((self.pos, addr, length, flags | more | avail_bits(self.wrap)))
            self.pos += 1
            if self.pos == self.size:
                self.pos = 0
                self.wrap ^= 1
        for slot, addr, length, flags in reversed(slots):
            self.desc(slot, addr, length, bid, flags)
        return head

    def set_driver_event(self, word: int) -> None:
        _U32.pack_into(self.raw(), self.layout.driver, word)

    def used(self, slot: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.raw(), self.layout.desc + slot * DESC_SIZE)


_NEXT = int(PackedDescFlag.NEXT)
