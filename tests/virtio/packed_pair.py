"""In-memory pair helpers for the packed ring (the twin of :mod:`tests.virtio.pair`).

:class:`PackedPair` puts a :class:`~virtio.packed.DriverQueue` and a
:class:`~virtio.packed.DeviceQueue` over one :class:`~virtio.memory.FlatMemory`
with the split pair's block pool; :class:`HostilePackedDriver` writes raw
descriptors (with whatever AVAIL/USED bits it likes) and the driver event word
for a :class:`~virtio.packed.DeviceQueue` to judge. No processes, no asyncio.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from tests.virtio.pair import BLOCK, RING_BASE, BlockPool, features_of
from virtio.constants import PackedDescFlag
from virtio.memory import FlatMemory
from virtio.packed import DESC, DESC_SIZE, Chain, DeviceQueue, DriverQueue, PackedLayout

AVAIL = int(PackedDescFlag.AVAIL)
USED = int(PackedDescFlag.USED)
_U32 = struct.Struct("<I")


def avail_bits(wrap: int) -> int:
    """The AVAIL/USED bits a driver sets to make a descriptor available in lap ``wrap``."""
    return AVAIL if wrap else USED


class PackedPair:
    """A packed driver ring and a device ring over one flat memory.

    Memory map: the ring at ``RING_BASE`` (descriptors, driver area, device
    area), the driver's indirect area, then the buffer pool.
    """

    def __init__(
        self,
        size: int = 8,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        indirect_max: int = 4,
        blocks: int | None = None,
        require_readable: bool = False,
        require_writable: bool = False,
    ) -> None:
        self.size = size
        self.features = features_of(event_idx=event_idx, indirect=indirect)
        self.layout = PackedLayout.contiguous(RING_BASE, size)
        ring_end = RING_BASE + PackedLayout.contiguous_bytes(size)
        self.indirect_area = (ring_end + 15) & ~15
        self.indirect_max = indirect_max if indirect else 0
        ind_end = self.indirect_area + size * max(self.indirect_max, 1) * DESC_SIZE
        nblocks = blocks if blocks is not None else size * max(self.indirect_max, 2) + 4
        self.pool = BlockPool((ind_end + 0xFF) & ~0xFF, BLOCK, nblocks)
        self.flat = FlatMemory(self.pool.end)
        self.driver: DriverQueue[int] = DriverQueue(
            self.flat,
            self.layout,
            self.features,
            indirect_area=self.indirect_area if indirect else None,
            indirect_max=self.indirect_max,
        )
        self.device = DeviceQueue(
            self.flat,
            self.layout,
            self.features,
            require_readable=require_readable,
            require_writable=require_writable,
        )
        self.device.activate()
        self._bufs: dict[int, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
        self._next_token = 1

    def raw(self) -> memoryview:
        return self.flat.raw()

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

    def alloc(self, data: bytes) -> tuple[int, int]:
        addr = self.pool.alloc(len(data))
        self.raw()[addr : addr + len(data)] = data
        return addr, len(data)

    def alloc_out(self, length: int) -> tuple[int, int]:
        addr = self.pool.alloc(length)
        self.raw()[addr : addr + length] = b"\xee" * length
        return addr, length

    def add(
        self, readable: Sequence[bytes], writable: Sequence[int], token: int | None = None
    ) -> tuple[int, int]:
        """Allocate buffers and add one list; returns (token, buffer id)."""
        r = [self.alloc(d) for d in readable]
        w = [self.alloc_out(n) for n in writable]
        if token is None:
            token = self._next_token
            self._next_token += 1
        try:
            bid = self.driver.add(r, w, token)
        except Exception:
            for addr, _ in (*r, *w):
                self.pool.free(addr)
            raise
        self._bufs[token] = (r, w)
        return token, bid

    def response(self, token: int, length: int) -> bytes:
        _, w = self._bufs[token]
        out = bytearray()
        for addr, n in w:
            out += self.raw()[addr : addr + n]
        return bytes(out[:length])

    def release(self, token: int) -> None:
        r, w = self._bufs.pop(token)
        for addr, _ in (*r, *w):
            self.pool.free(addr)

    def request(
        self, readable: Sequence[bytes] = (b"ping",), writable: Sequence[int] = (16,)
    ) -> tuple[bool, bool, Chain, bytes]:
        """One request through both sides: (kick, interrupt, chain, response)."""
        token, bid = self.add(readable, writable)
        kick = self.driver.publish()
        chain = self.device.pop()
        assert chain is not None
        assert chain.head == bid
        n = chain.write(chain.read().upper())
        irq = self.device.push_used(chain.head, n)
        got = self.driver.get_used()
        assert got is not None
        assert got[0] == token
        data = self.response(token, got[1])
        self.release(token)
        return kick, irq, chain, data

    def reset(self) -> None:
        self.driver.reset()
        self.device.reset()
        self._bufs.clear()
        self.pool.reset()
        self.device.activate()


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
